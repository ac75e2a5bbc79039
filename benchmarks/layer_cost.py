"""What the soft-permutation phase costs: SparseLinear forward+backward per phase against dense nn.Linear.

The soft phase applies a dense d x d doubly-stochastic matrix (plus Sinkhorn iterations and the penalty), an
extra B*d^2 product and about 40 passes of exp/log over d^2 entries forward and backward (20 Sinkhorn
iterations, computed for the product and again for the penalty); after hardening the permutation is an index
fused into the kernel. N:M always permutes its input side, so its d is in_features even when that is the larger
side. Shapes: ViT-B MLP
(x [1024, 768] -> 3072 and [1024, 3072] -> 768), 2 threads. Prints a table, writes JSON to benchmarks/results/.

    python benchmarks/layer_cost.py [--threads 2] [--batch 1024] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from padst_ext import SparseLinear

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_ops import bench_group  # noqa: E402


def layer_times(C, R, B, structure, reps, **kw):
    x = torch.randn(B, C, requires_grad=True)
    dy = torch.randn(B, R)
    layers = {"dense nn.Linear": nn.Linear(C, R)}
    for phase in ("none", "soft", "hard"):
        # "uniform": the soft matrix acts from the first call (the default gradient start runs unpermuted for its
        # first training steps); what a step costs does not depend on where the matrix starts
        layer = SparseLinear(C, R, structure=structure, permute=phase != "none", perm_side="auto", seed=0,
                             perm_init="uniform", **kw)
        if phase == "hard":
            layer.harden()
        layers[f"{structure} {phase}"] = layer

    def step(layer):
        def f():
            y = layer(x)
            loss = (y * dy).sum()
            if isinstance(layer, SparseLinear):
                loss = loss + layer.permutation_penalty()
            torch.autograd.grad(loss, [x] + [p for p in layer.parameters()])
        return f

    return bench_group({k: step(v) for k, v in layers.items()}, reps), layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, one rep (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "layer_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    shapes = [(768, 3072), (3072, 768)]
    if args.quick:
        shapes, args.batch, args.reps = [(128, 256)], 32, 1
    for C, R in shapes:
        for structure, kw in [("block", dict(block_size=32, sparsity=0.9)), ("nm", dict(n=3, m=32)),
                              ("diagonal", dict(sparsity=0.9))]:
            times, layers = layer_times(C, R, args.batch, structure, args.reps, **kw)
            d = layers[f"{structure} soft"].perm_dim
            dense = times.pop("dense nn.Linear")
            for name, t in times.items():
                rows.append(dict(shape=f"{args.batch}x{C}->{R}", layer=name, perm_dim=d, ms=t, dense_ms=dense,
                                 vs_dense=dense / t))
    print(f"SparseLinear forward+backward per phase, {args.threads} threads (ratio = dense time / time)")
    print(f"{'shape':<16} {'layer':<16} {'perm d':>6} {'ms':>8} {'dense ms':>9} {'x dense':>8}")
    for r in rows:
        print(f"{r['shape']:<16} {r['layer']:<16} {r['perm_dim']:>6} {r['ms']:>8.1f} {r['dense_ms']:>9.1f} "
              f"{r['vs_dense']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(threads=args.threads, batch=args.batch, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
