"""Training recipes: ``padst-train vit ...`` (also ``python -m padst_ext.recipes vit ...``).

A small ViT (timm ``VisionTransformer`` for 28x28 inputs, patch 4) trained from scratch on Fashion-MNIST
(:mod:`padst_ext.data`), its transformer blocks' linear layers made sparse by :func:`padst_ext.sparsify` (the first
and last linear layers stay dense) and trained with dynamic sparse training (:class:`padst_ext.DST`: RigL, SET or a
static mask), with or without a learned permutation. Prints accuracy and the speed of the sparse model against a
dense twin measured in the same run; writes ``metrics.csv`` (one row per epoch), ``summary.json`` and
``checkpoint.pt`` (resumable with ``--resume``) under ``--out``.

    padst-train vit --quick                                   # a short run (about 2 minutes on 2 cores)
    padst-train vit --structure nm --sparsity 0.95 --permute --algorithm rigl --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .dst import DST
from .nn import SparseLinear, export, sparsify

STRUCTURES = ("dense", "unstructured", "block", "nm", "diagonal")
ALGORITHMS = ("rigl", "set", "static")


def build_vit(width: int, depth: int, heads: int, mlp_ratio: float = 4.0, num_classes: int = 10,
              seed: int = 0) -> nn.Module:
    """timm's VisionTransformer for 1x28x28 images with 4x4 patches (49 tokens and a class token)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=width,
                             depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, class_token=True,
                             global_pool="token")


def make_sparse(model: nn.Module, args) -> List[str]:
    """Sparsify the blocks' linear layers in place as ``args`` says; returns the replaced layer names."""
    if args.structure == "dense":
        return []
    kw = dict(permute=args.permute and args.structure != "unstructured", seed=args.seed)
    if args.structure == "block":
        kw["block_size"] = args.block_size
    if kw["permute"]:
        kw.update(perm_init=args.perm_init, perm_lambda=args.perm_lambda, harden_step=args.harden_step)
    report = sparsify(model, args.structure, args.sparsity, include=["blocks.*"], **kw)
    return [name for name, _ in report.replaced]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: Optional[torch.Generator]):
    order = torch.randperm(x.shape[0], generator=gen) if gen is not None else torch.arange(x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size, None):
        correct += int((model(xb.to(device)).argmax(-1).cpu() == yb).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def time_train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, device) -> float:
    """Median seconds of a forward + backward + AdamW step on one batch (a copy of the model: nothing learned)."""
    import copy

    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    xb, yb = x.to(device), y.to(device)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(xb), yb).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def time_inference(model: nn.Module, x: torch.Tensor, reps: int, device) -> float:
    m = model.to(device).eval()
    xb = x.to(device)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        m(xb)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_name(args) -> str:
    perm = "perm" if args.permute and args.structure not in ("dense", "unstructured") else "noperm"
    sp = "" if args.structure == "dense" else f"-{args.sparsity:g}"
    return f"vit-{args.structure}{sp}-{perm}-{args.algorithm}-s{args.seed}"


def train_vit(args) -> Dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else Path("runs") / run_name(args)
    out.mkdir(parents=True, exist_ok=True)

    ds = D.fashion_mnist(args.data_dir)
    xtr, ytr = D.image_split(ds, "train", valid=args.valid, seed=0)
    xva, yva = D.image_split(ds, "valid", valid=args.valid, seed=0)
    xte, yte = D.image_split(ds, "test")
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    steps_per_epoch = math.ceil(xtr.shape[0] / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.permute and args.harden_step is None and args.structure not in ("dense", "unstructured"):
        args.harden_step = int(args.harden_at * total_steps)

    model = build_vit(args.width, args.depth, args.heads, seed=args.seed)
    sparse_layers = make_sparse(model, args)
    dense_twin = build_vit(args.width, args.depth, args.heads, seed=args.seed)  # for the speed ratios
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.1)
    dst = None
    if sparse_layers:
        dst = DST(model, opt, algorithm=args.algorithm, update_interval=args.update_interval,
                  drop_fraction=args.drop_fraction, total_steps=total_steps, seed=args.seed)

    start_epoch, rows = 0, []
    ckpt_path = out / "checkpoint.pt"
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if dst is not None:
            dst.load_state_dict(ck["dst"])
        start_epoch, rows = ck["epoch"], ck["rows"]
        print(f"[padst-train] resumed {ckpt_path} after epoch {start_epoch}")

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(start_epoch):  # the same shuffles as an uninterrupted run
        torch.randperm(xtr.shape[0], generator=gen)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(batches(xtr, ytr, args.batch_size, gen), total=steps_per_epoch, leave=False,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress)
        for xb, yb in bar:
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * yb.shape[0]
            correct += int((logits.argmax(-1) == yb).sum())
            seen += yb.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        row = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen,
                   valid_acc=evaluate(model, xva, yva, 512, device), epoch_s=time.perf_counter() - t0)
        rows.append(row)
        print(f"[padst-train] epoch {row['epoch']}: loss {row['train_loss']:.4f}, train {row['train_acc']:.4f}, "
              f"valid {row['valid_acc']:.4f} ({row['epoch_s']:.0f} s)")
        ck = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                  dst=dst.state_dict() if dst is not None else None, epoch=epoch + 1, rows=rows, args=vars(args))
        torch.save(ck, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        with open(out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    test_acc = evaluate(model, xte, yte, 512, device)
    summary = dict(task="vit-fashion-mnist", structure=args.structure, sparsity=args.sparsity,
                   permute=bool(args.permute and args.structure not in ("dense", "unstructured")),
                   algorithm=args.algorithm, seed=args.seed, epochs=args.epochs, train_examples=int(xtr.shape[0]),
                   width=args.width, depth=args.depth, sparse_layers=len(sparse_layers),
                   valid_acc=rows[-1]["valid_acc"] if rows else None, test_acc=test_acc, threads=args.threads,
                   device=str(device))
    if sparse_layers:
        layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
        summary["density"] = sum(m.density * m.in_features * m.out_features for m in layers) / \
            sum(m.in_features * m.out_features for m in layers)
    if not args.no_speed:
        xb, yb = xtr[:args.batch_size], ytr[:args.batch_size]
        t_sparse = time_train_steps(model, xb, yb, args.speed_steps, device)
        t_dense = time_train_steps(dense_twin, xb, yb, args.speed_steps, device)
        xi = xte[:args.infer_batch]
        i_sparse = time_inference(export(model), xi, args.speed_steps, device)
        i_dense = time_inference(dense_twin, xi, args.speed_steps, device)
        summary.update(train_step_s=t_sparse, dense_train_step_s=t_dense, train_speedup=t_dense / t_sparse,
                       infer_s=i_sparse, dense_infer_s=i_dense, infer_speedup=i_dense / i_sparse)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    msg = f"[padst-train] {run_name(args)}: test accuracy {test_acc:.4f}"
    if "train_speedup" in summary:
        msg += (f"; vs the dense twin: training step {summary['train_speedup']:.2f}x, inference "
                f"{summary['infer_speedup']:.2f}x (batch {args.batch_size} / {args.infer_batch}, "
                f"{args.threads} threads)")
    print(msg)
    print(f"[padst-train] wrote {out}/summary.json, metrics.csv, checkpoint.pt")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padst-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    v = sub.add_parser("vit", help="a small ViT on Fashion-MNIST")
    v.add_argument("--structure", choices=STRUCTURES, default="block")
    v.add_argument("--sparsity", type=float, default=0.9)
    v.add_argument("--permute", action=argparse.BooleanOptionalAction, default=True,
                   help="learn a permutation per sparse layer (not for dense / unstructured)")
    v.add_argument("--algorithm", choices=ALGORITHMS, default="rigl")
    v.add_argument("--block-size", type=int, default=16)
    v.add_argument("--perm-init", default="random", choices=("random", "identity", "uniform"))
    v.add_argument("--perm-lambda", type=float, default=1e-3)
    v.add_argument("--harden-step", type=int, default=None, help="harden the permutations at this step at the latest")
    v.add_argument("--harden-at", type=float, default=0.5, help="... or at this fraction of training (default 0.5)")
    v.add_argument("--update-interval", type=int, default=100, help="DST: steps between mask updates")
    v.add_argument("--drop-fraction", type=float, default=0.3)
    v.add_argument("--width", type=int, default=192)
    v.add_argument("--depth", type=int, default=6)
    v.add_argument("--heads", type=int, default=3)
    v.add_argument("--epochs", type=int, default=10)
    v.add_argument("--batch-size", type=int, default=128)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--weight-decay", type=float, default=0.05)
    v.add_argument("--label-smoothing", type=float, default=0.1)
    v.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    v.add_argument("--valid", type=int, default=5000, help="training images held out for validation")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    v.add_argument("--device", default="cpu")
    v.add_argument("--data-dir", default=None, help="a folder with the four Fashion-MNIST IDX gz files")
    v.add_argument("--out", default=None, help="output folder (default runs/<run name>)")
    v.add_argument("--resume", action="store_true", help="continue from --out's checkpoint.pt")
    v.add_argument("--no-speed", action="store_true", help="skip timing against the dense twin")
    v.add_argument("--speed-steps", type=int, default=5)
    v.add_argument("--infer-batch", type=int, default=512)
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--quick", action="store_true",
                   help="a short run: width 96, depth 4, one epoch")
    return p


def main(argv=None) -> Dict:
    args = parser().parse_args(argv)
    if args.task == "vit":
        if not 0 < args.sparsity < 1:
            raise SystemExit(f"--sparsity must be in (0, 1), got {args.sparsity}")
        if args.quick:  # about two minutes on 2 cores: one pass over the 55k training images with a small ViT
            given = argv if argv is not None else sys.argv
            args.width, args.depth, args.heads = 96, 4, 3
            args.epochs = args.epochs if "--epochs" in given else 1
            args.update_interval = min(args.update_interval, 50)
        return train_vit(args)
    raise SystemExit(f"unknown task {args.task!r}")


def cli() -> int:
    """Console entry point (``padst-train``)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
