"""Smallest end-to-end use of the ops: train a permuted structured-sparse MLP on scikit-learn's bundled
digits (8x8 images, 1797 samples) and print test accuracy next to the dense model's.

    python -m padst_ext.experiments.demo [--structure block|nm|diag] [--epochs 60] [--threads 2]

The hidden layer is ``y = S P x``, a sparse-weight object of :mod:`padst_ext.formats` (its product runs the
``padst_ext.ops`` kernel with the permutation fused) with a fixed random input permutation. Learned permutations,
the layer API (:class:`padst_ext.SparseLinear`) and DST are what ``padst-train`` (:mod:`.recipes`) trains with.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as Fn

from .. import formats as F


def load_digits(seed: int = 0):
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("the demo needs scikit-learn (pip install scikit-learn) for its bundled digits data") from e
    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    te, tr = order[:n_test], order[n_test:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-3
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def _block(dense, g):
    r, c = dense.shape
    idx = torch.rand(r // 8, c // 8, generator=g).topk(1, dim=1).indices  # balanced: 1 block per block-row
    return F.block_from_dense(dense, torch.zeros(r // 8, c // 8, dtype=torch.bool).scatter_(1, idx, True), (8, 8))


def _nm(dense, g):
    r, c = dense.shape
    idx = torch.rand(r, c // 8, 8, generator=g).topk(1, dim=-1).indices
    return F.nm_from_dense(dense, torch.zeros(r, c // 8, 8, dtype=torch.bool).scatter_(-1, idx, True).reshape(r, c),
                           1, 8)


def _diag(dense, g):
    r, c = dense.shape
    k = math.ceil(0.125 * r * c / min(r, c))
    return F.diag_from_dense(dense, torch.randperm(max(r, c), generator=g)[:k])


WEIGHTS = {"block": _block, "nm": _nm, "diag": _diag}


class SparseHidden(torch.nn.Module):
    """``y = S (x[:, perm]) + b`` with S structured (block 8x8 / N:M 1:8 / diagonal), 87.5% sparse."""

    def __init__(self, c: int, r: int, structure: str, seed: int):
        super().__init__()
        if structure not in WEIGHTS:
            raise ValueError(f"unknown structure {structure!r}; use one of {sorted(WEIGHTS)}")
        g = torch.Generator().manual_seed(seed)
        dense = torch.randn(r, c, generator=g) * math.sqrt(2.0 / (c / 8))
        self.perm = torch.randperm(c, generator=g)
        self.w = WEIGHTS[structure](dense, g).with_perm(self.perm)  # N:M folds it into its indices
        self.values = torch.nn.Parameter(self.w.values.clone())
        self.bias = torch.nn.Parameter(torch.zeros(r))
        self.density = self.w.density

    def forward(self, x):
        return self.w.mm(x, self.bias, values=self.values)


def train(model, xtr, ytr, xte, yte, epochs: int, seed: int):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr)).split(128):
            loss = Fn.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    secs = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc, secs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structure", default="block", choices=sorted(WEIGHTS))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the dense layers' initialisation
    xtr, ytr, xte, yte = load_digits(args.seed)
    print(f"digits: {len(ytr)} train / {len(yte)} test, 64 features, 10 classes")

    hidden = SparseHidden(64, args.hidden, args.structure, args.seed)
    sparse = torch.nn.Sequential(hidden, torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10))
    dense = torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10))
    acc_s, t_s = train(sparse, xtr, ytr, xte, yte, args.epochs, args.seed)
    acc_d, t_d = train(dense, xtr, ytr, xte, yte, args.epochs, args.seed)
    print(f"dense  64->{args.hidden}->10            test accuracy {100 * acc_d:5.1f}%  ({t_d:.1f} s)")
    print(f"{args.structure:<6} 64->{args.hidden}->10 permuted, {100 * (1 - hidden.density):.1f}% sparse "
          f"test accuracy {100 * acc_s:5.1f}%  ({t_s:.1f} s)")
    return acc_s, acc_d


if __name__ == "__main__":
    main()
