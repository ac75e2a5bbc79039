"""Proof that the DST loop learns: a short CPU run on scikit-learn's bundled digits (8x8, 1797 images).

MLP 64-256-256-256-10 (first and last layers dense), the two 256x256 hidden layers at 90% sparsity:
dense, RigL/SET unstructured (masked dense, the accuracy baselines), and block 16x16 / N:M / diagonal with RigL,
each without and with a learned permutation (the layers' defaults; the permutations' logits in their own group). Prints final test accuracy (mean over seeds) and writes JSON. This
task is far too easy to separate the structures (that is the recipes' job); it shows the loop trains.

    python benchmarks/dst_digits.py [--epochs 20] [--seeds 2] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from padst_ext import DST, param_groups, sparsify
from padst_ext.experiments.demo import load_digits

HERE = Path(__file__).resolve().parent

CONFIGS = [("dense", None, None, False), ("unstructured", "rigl", {}, False), ("unstructured", "set", {}, False),
           ("block", "rigl", dict(block_size=16), False), ("block", "rigl", dict(block_size=16), True),
           ("nm", "rigl", {}, False), ("nm", "rigl", {}, True),
           ("diagonal", "rigl", {}, False), ("diagonal", "rigl", {}, True)]


def run(structure, algorithm, kw, permute, sparsity, epochs, seed, data):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10))
    if structure != "dense":
        sparsify(model, structure, sparsity, from_weights=False, permute=permute, **kw)
    batches = (len(ytr) + 127) // 128
    total = epochs * batches
    # the permutations' logits in their own group, with a learning rate for a soft phase of half of training
    opt = torch.optim.Adam(param_groups(model, lr=2e-3, soft_steps=total // 2), lr=2e-3)
    dst = None
    if structure != "dense":
        dst = DST(model, opt, algorithm=algorithm, update_interval=max(1, total // 20), total_steps=total,
                  seed=seed)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=g).split(128):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    secs = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc, secs, (len(dst.history) if dst else 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", type=int, nargs="*", help="indices into the config list (default: all)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "dst_digits.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits(0)
    configs = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
    rows = []
    for structure, algorithm, kw, permute in configs:
        accs, times = [], []
        for seed in range(args.seeds):
            acc, secs, updates = run(structure, algorithm, kw, permute, args.sparsity, args.epochs, seed, data)
            accs.append(acc)
            times.append(secs)
        name = structure if structure == "dense" else f"{structure} {algorithm}" + (" +perm" if permute else "")
        rows.append(dict(name=name, acc_mean=statistics.mean(accs),
                         acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, accs=accs,
                         seconds=statistics.mean(times), updates=updates))
    print(f"digits MLP 64-256-256-256-10, hidden layers at {args.sparsity:.0%} sparsity, {args.epochs} epochs, "
          f"{args.seeds} seeds, {args.threads} threads")
    print(f"{'model':<24} {'test acc %':>12} {'train s':>8} {'updates':>8}")
    for r in rows:
        print(f"{r['name']:<24} {100 * r['acc_mean']:>7.2f} ±{100 * r['acc_std']:.2f} {r['seconds']:>8.1f} "
              f"{r['updates']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
