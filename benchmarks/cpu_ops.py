"""CPU op timings against dense PyTorch and torch's own sparse kernels, measured in the same run.

For each ViT-B MLP shape (x 1024x768 -> 3072 and 1024x3072 -> 768), each structure and sparsity it times
  dense      F.linear (forward) and F.linear forward+backward (dx and dW)
  torch BSR  W.to_sparse_bsr(block) @ x.T (block structure only), torch CSR W.to_sparse_csr() @ x.T
  padst      forward and forward+backward (dx + dW on the pattern), permuted and identity permutation, and the
             unfused alternative: materialise x[:, perm] then call the unpermuted kernel
and prints ratios (dense time / time, so > 1 is faster than dense). Writes JSON to benchmarks/results/.

    python benchmarks/cpu_ops.py [--threads 2] [--batch 1024] [--reps 9] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as Fn

from padst_ext import formats as F
from padst_ext import ops

HERE = Path(__file__).resolve().parent


def bench(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time in milliseconds."""
    return bench_group({"t": fn}, reps, warmup)["t"]


def bench_group(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median wall time (ms) of each callable, measured round-robin so that drift (clock, cache, other load)
    hits all of them alike; the ratios between them are what the table reports."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def make_weight(structure, R, C, sparsity, gen, perm):
    dense = torch.randn(R, C, generator=gen) / math.sqrt(C)
    if structure.startswith("block"):
        bs = int(structure[5:])
        nbr, nbc = R // bs, C // bs
        k = max(1, round((1 - sparsity) * nbc))
        idx = torch.rand(nbr, nbc, generator=gen).topk(k, dim=1).indices
        mask = torch.zeros(nbr, nbc, dtype=torch.bool).scatter_(1, idx, True)
        return F.block_from_dense(dense, mask, (bs, bs)), mask
    if structure == "nm":
        # N:M with M dividing both 768 and 3072: 3:32 (90.6%) and 3:64 (95.3%)
        n, m = (3, 32) if sparsity < 0.93 else (3, 64)
        idx = torch.rand(R, C // m, m, generator=gen).topk(n, dim=-1).indices
        mask = torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(R, C)
        return F.nm_from_dense(dense, mask, n, m, perm=perm), mask
    if structure == "diag":
        L = min(R, C)
        K = math.ceil((1 - sparsity) * R * C / L)
        offsets = torch.randperm(max(R, C), generator=gen)[:K].sort().values
        return F.diag_from_dense(dense, offsets), None
    raise ValueError(structure)


def call(structure, w, x, in_perm, out_perm):
    if structure.startswith("block"):
        return ops.block_mm(x, w.values, *w.meta(), None, in_perm, out_perm)
    if structure == "nm":
        return ops.nm_mm(x, w.values, w.col_idx, w.n, w.m)
    return ops.diag_mm(x, w.values, w.offsets, w.shape[0], None, in_perm, out_perm)


def run_case(structure, B, C, R, sparsity, reps):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, generator=gen)
    Wd = torch.randn(R, C, generator=gen)
    in_perm = torch.randperm(C, generator=gen)
    ident = None
    w_perm, mask = make_weight(structure, R, C, sparsity, gen, in_perm)
    # N:M folds the permutation into its indices: the identity layer is a separate (unpermuted) index set.
    w_id = F.nm_from_dense(w_perm.to_dense()[:, in_perm], mask, w_perm.n, w_perm.m) if structure == "nm" else w_perm
    density = w_perm.values.numel() / (R * C)
    row = dict(structure=structure, B=B, C=C, R=R, sparsity=sparsity, density=round(density, 4))

    W = w_perm.to_dense()
    csr = W.to_sparse_csr()
    fwd = {"dense_fwd_ms": lambda: Fn.linear(x, Wd),
           "padst_fwd_perm_ms": lambda: call(structure, w_perm, x, in_perm, None),
           "padst_fwd_ident_ms": lambda: call(structure, w_id, x, ident, None),
           "torch_csr_fwd_ms": lambda: (csr @ x.T).T}
    if structure != "nm":
        fwd["padst_fwd_gather_then_ident_ms"] = lambda: call(structure, w_id, x[:, in_perm], ident, None)
    if structure.startswith("block"):
        bs = int(structure[5:])
        bsr = W.to_sparse_bsr((bs, bs))
        fwd["torch_bsr_fwd_ms"] = lambda: (bsr @ x.T).T
    row.update(bench_group(fwd, reps))

    xr = x.clone().requires_grad_()
    vr = w_perm.values.clone().requires_grad_()
    Wr = Wd.clone().requires_grad_()
    dy = torch.randn(B, R, generator=gen)
    wv = w_perm._replace(values=vr)
    row.update(bench_group({
        "dense_fwdbwd_ms": lambda: torch.autograd.grad(Fn.linear(xr, Wr), (xr, Wr), dy),
        "padst_fwdbwd_perm_ms": lambda: torch.autograd.grad(call(structure, wv, xr, in_perm, None), (xr, vr), dy),
    }, max(3, reps // 2)))

    # correctness guard for the figures: the timed kernel computes the right thing
    ref = (x[:, in_perm] @ w_perm.to_dense().T) if structure != "nm" else x @ W.T
    got = call(structure, w_perm, x, in_perm, None)
    row["max_abs_err"] = float((got - ref).abs().max())
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="one shape, one sparsity, few reps (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_ops.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    torch.set_num_threads(args.threads)
    shapes = [(768, 3072), (3072, 768)]  # (C, R): fc1, fc2 of ViT-B
    sparsities = [0.9, 0.95]
    structures = ["block32", "block16", "nm", "diag"]
    B, reps = args.batch, args.reps
    if args.quick:
        shapes, sparsities, B, reps = [(256, 512)], [0.9], min(B, 64), 2

    rows = []
    for C, R in shapes:
        for s in sparsities:
            for st in structures:
                rows.append(run_case(st, B, C, R, s, reps))
                print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)

    hdr = (f"{'structure':<8} {'shape (BxC->R)':<17} {'dens':>6} {'dense ms':>9} {'fwd ms':>8} {'fwd x':>6} "
           f"{'ident x':>7} {'perm/id':>7} {'gather+id/perm':>14} {'f+b x':>6} {'BSR x':>6} {'CSR x':>6}")
    print(f"padst_ext CPU ops, {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("ratios are dense time / time (> 1 = faster than dense F.linear); perm/id = permuted / identity time")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        d = r["dense_fwd_ms"]  # measured round-robin with this row's kernels
        g = r.get("padst_fwd_gather_then_ident_ms")
        bsr = r.get("torch_bsr_fwd_ms")
        print(f"{r['structure']:<8} {r['B']}x{r['C']}->{r['R']:<8} {r['density']:>6.3f} {d:>9.2f} "
              f"{r['padst_fwd_perm_ms']:>8.2f} {d / r['padst_fwd_perm_ms']:>6.2f} "
              f"{d / r['padst_fwd_ident_ms']:>7.2f} {r['padst_fwd_perm_ms'] / r['padst_fwd_ident_ms']:>7.2f} "
              f"{(g / r['padst_fwd_perm_ms']) if g else float('nan'):>14.2f} "
              f"{r['dense_fwdbwd_ms'] / r['padst_fwdbwd_perm_ms']:>6.2f} "
              f"{(d / bsr) if bsr else float('nan'):>6.2f} {d / r['torch_csr_fwd_ms']:>6.2f}")
    meta = dict(threads=args.threads, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpu=_cpu_name(), batch=B, reps=reps, quick=args.quick,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
