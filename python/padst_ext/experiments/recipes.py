"""Training recipes: ``padst-train vit|gpt2 ...`` (also ``python -m padst_ext.experiments.recipes vit|gpt2 ...``).

- ``vit``: a small ViT (timm ``VisionTransformer`` for 28x28 inputs, patch 4) trained from scratch on Fashion-MNIST.
- ``gpt2``: a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) trained from scratch on English Wikipedia articles
  (or ``--text FILE``), GPT-2 BPE through tiktoken, offline.

The transformer blocks' linear layers are made sparse by :func:`padst_ext.sparsify` (the first and last linear
layers, and tied ones, stay dense) and trained with dynamic sparse training (:class:`padst_ext.DST`: RigL, SET or a
static mask), with or without a learned permutation. Each run prints its validation metric as it goes, the test
accuracy / perplexity at the end and the speed of the sparse model against a dense twin measured in the same run,
and writes ``metrics.csv``, ``summary.json`` and ``checkpoint.pt`` (resumable with ``--resume``) under ``--out``.

    padst-train vit --quick                                   # a short run (about 2 minutes on 2 cores)
    padst-train vit --structure nm --sparsity 0.95 --permute --algorithm rigl --epochs 10
    padst-train gpt2 --structure block --sparsity 0.9 --steps 2000
    torchrun --standalone --nproc_per_node 2 -m padst_ext.experiments.recipes vit --fsdp --quick   # FSDP2
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from ..dst import DST
from ..nn import SparseLinear, export, param_groups, permutation_report, sparsify
from ..permutation import HARDEN_MODES, INITS

STRUCTURES = ("dense", "unstructured", "block", "nm", "diagonal")
GPT2_VOCAB = 50257  # GPT-2's BPE vocabulary
GPT2_EOT = 50256  # its <|endoftext|>, which ends every document
ALGORITHMS = ("rigl", "set", "static")


def build_vit(width: int, depth: int, heads: int, mlp_ratio: float = 4.0, num_classes: int = 10,
              seed: int = 0) -> nn.Module:
    """timm's VisionTransformer for 1x28x28 images with 4x4 patches (49 tokens and a class token)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=width,
                             depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, class_token=True,
                             global_pool="token")


def make_sparse(model: nn.Module, args, include=("blocks.*",)) -> List[str]:
    """Sparsify the blocks' linear layers in place as ``args`` says; returns the replaced layer names."""
    if args.structure == "dense":
        return []
    # block_size only shapes block structures (the others take no such option)
    kw = dict(permute=args.permute and args.structure != "unstructured", seed=args.seed, block_size=args.block_size)
    if kw["permute"]:
        kw.update(perm_init=args.perm_init, perm_warmup=args.perm_warmup, perm_init_scale=args.perm_init_scale,
                  perm_lambda=args.perm_lambda,
                  perm_lambda_ramp=getattr(args, "perm_lambda_ramp", None), harden_step=args.harden_step,
                  harden_mode=args.harden_mode)
    report = sparsify(model, args.structure, args.sparsity, include=list(include), **kw)
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


def _median_seconds(fn, reps: int, device) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after two warm-up calls (synchronised on CUDA)."""
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_train_steps(model: nn.Module, loss_fn, steps: int, device) -> float:
    """Median seconds of a forward + backward + AdamW step, ``loss_fn(model)`` on one fixed batch (on a copy of the
    model: nothing is learned)."""
    import copy

    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(m).backward()
        opt.step()

    return _median_seconds(step, steps, device)


@torch.inference_mode()
def time_inference(model: nn.Module, x: torch.Tensor, reps: int, device) -> float:
    """Median seconds of ``model(x)`` in eval and inference mode."""
    m = model.to(device).eval()
    xb = x.to(device)
    return _median_seconds(lambda: m(xb), reps, device)


# padst-train arguments that do not change what is trained: a run may be resumed with other values of these
_RESUME_FREE = frozenset({"resume", "out", "threads", "device", "no_progress", "no_speed", "speed_steps", "infer_batch",
                          "data_dir"})


def _check_same_training(path: Path, saved: Dict, now: Dict) -> None:
    """Refuses (CheckpointError) a --resume whose training arguments differ from the checkpoint's, naming each
    difference; arguments the checkpoint predates are not compared."""
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} (now {now[k]!r})" for k in sorted(now)
            if k not in _RESUME_FREE and k in saved and saved[k] != now[k]]
    if diff:
        raise D.CheckpointError(f"--resume: {path} was trained with other arguments: {'; '.join(diff)}. Resume with "
                                f"the same ones, or train into a new --out.")


def optimization(model: nn.Module, sparse_layers: List[str], total_steps: int, args):
    """The optimizer (AdamW), its one-cycle schedule and DST over the sparse layers (None without any)."""
    # the soft permutations' logits in their own group: their own learning rate and no weight decay (which would
    # pull them towards the uniform matrix)
    groups = param_groups(model, lr=args.lr, weight_decay=args.weight_decay, perm_lr=args.perm_lr,
                          soft_steps=args.harden_step - args.perm_warmup)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total_steps,
                                                pct_start=0.1)
    dst = None
    if sparse_layers:
        dst = DST(model, opt, algorithm=args.algorithm, update_interval=args.update_interval,
                  drop_fraction=args.drop_fraction, total_steps=total_steps, seed=args.seed)
    return opt, sched, dst


def write_metrics(rows: List[Dict], out: Path) -> None:
    """``out/metrics.csv``: one row per evaluation, the union of the rows' columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    D.write_text_atomic(buf.getvalue(), out / "metrics.csv")


class Run:
    """What both tasks share: the optimizer (AdamW, one-cycle schedule), DST over the sparse layers, and the
    output folder (``checkpoint.pt`` written atomically after every evaluation, ``metrics.csv``)."""

    def __init__(self, model: nn.Module, sparse_layers: List[str], total_steps: int, args, out: Path):
        self.model, self.out, self.args = model, out, args
        self.opt, self.sched, self.dst = optimization(model, sparse_layers, total_steps, args)
        self.rows: List[Dict] = []
        self.extra: Dict = {}  # more for the checkpoint (GPT-2 with --vocab: the id table)
        self.done = 0  # epochs (ViT) or steps (GPT-2) completed
        self.path = out / "checkpoint.pt"

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()

    def resume(self) -> int:
        # a kill during a save leaves its temporary file behind (each as big as the checkpoint): clean them first
        for name in ("checkpoint.pt", "metrics.csv", "summary.json"):
            D.remove_orphans(self.out / name)
        if self.args.resume and self.path.is_file():
            # onto the CPU first: a checkpoint written on a GPU resumes on a CPU-only machine too; the model, the
            # optimizer and DST put every tensor on their own device as they load it
            ck = D.load_checkpoint(self.path, required=("model", "optimizer", "scheduler", "dst", "done", "rows"))
            _check_same_training(self.path, ck.get("args", {}), vars(self.args))
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            if self.dst is not None:
                self.dst.load_state_dict(ck["dst"])
            self.done, self.rows = ck["done"], ck["rows"]
            self._write_metrics()  # the checkpoint's rows: a metrics.csv lost to a kill is written again
            print(f"[padst-train] resumed {self.path} at {self.done}")
        return self.done

    def _write_metrics(self) -> None:
        write_metrics(self.rows, self.out)

    def save(self, done: int, row: Dict) -> None:
        self.done = done
        self.rows.append(row)
        ck = dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                  dst=self.dst.state_dict() if self.dst is not None else None, done=done, rows=self.rows,
                  args=vars(self.args), **self.extra)
        D.save_atomic(ck, self.path)
        self._write_metrics()


def permutation_row(model: nn.Module) -> Dict:
    """Columns for metrics.csv on how the permutations are learning: soft layers left, their mean per-row penalty,
    and how many hardened because they converged or because the deadline came."""
    rep = permutation_report(model)
    if not rep["layers"]:
        return {}
    soft = [v["penalty"] for v in rep["layers"].values() if v["penalty"] is not None]
    s = rep["summary"]
    return dict(perm_soft=s["layers"] - s["hardened"], perm_penalty=sum(soft) / len(soft) if soft else "",
                perm_converged=s["converged"], perm_deadline=s["deadline"])


def summarize(model: nn.Module, args, sparse_layers: List[str], out: Path, summary: Dict, write: bool = True) -> Dict:
    """Adds the sparse layers' realised density, writes ``summary.json`` and prints the closing lines (``write``:
    False on the processes of a sharded run other than the first, which compute the same summary collectively)."""
    permute = bool(args.permute and args.structure not in ("dense", "unstructured"))
    summary = dict(structure=args.structure, sparsity=args.sparsity, permute=permute, algorithm=args.algorithm,
                   seed=args.seed, sparse_layers=len(sparse_layers), threads=args.threads, device=args.device,
                   **summary)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if layers:
        summary["density"] = sum(m.density * m.in_features * m.out_features for m in layers) / \
            sum(m.in_features * m.out_features for m in layers)
    if permute:
        summary["permutation"] = permutation_report(model)
        summary["permutation"]["summary"].update(total_steps=getattr(args, "total_steps", None),
                                                 deadline_step=args.harden_step)
    if not write:
        return summary
    D.write_text_atomic(json.dumps(summary, indent=1), out / "summary.json")
    metric = ", ".join(f"{k.replace('_', ' ')} {summary[k]:.4f}" for k in ("test_acc", "test_ppl") if k in summary)
    msg = f"[padst-train] {out.name}: {metric}"
    if permute:
        ps = summary["permutation"]["summary"]
        moved = ps["moved_from_start"]
        print(f"[padst-train] permutations: {ps['hardened']} of {ps['layers']} hardened, {ps['converged']} because "
              f"they converged, {ps['deadline']} at the deadline; indices moved from the start's rounding: "
              + ("-" if moved is None else f"{moved:.0%}"))
    if "train_speedup" in summary:
        msg += (f"; vs the dense twin: training step {summary['train_speedup']:.2f}x, inference "
                f"{summary['infer_speedup']:.2f}x ({args.threads} threads)")
    print(msg)
    print(f"[padst-train] wrote {out}/summary.json, metrics.csv, "
          + ("checkpoint/ (torch.distributed.checkpoint) and run_state.pt" if getattr(args, "fsdp", False)
             else "checkpoint.pt"))
    return summary


def speed(model: nn.Module, dense_twin: nn.Module, loss_fn, x_infer: torch.Tensor, args, device) -> Dict:
    """Training-step and inference time of the sparse model (exported for inference) against its dense twin."""
    t_sparse = time_train_steps(model, loss_fn, args.speed_steps, device)
    t_dense = time_train_steps(dense_twin, loss_fn, args.speed_steps, device)
    i_sparse = time_inference(export(model), x_infer, args.speed_steps, device)
    i_dense = time_inference(dense_twin, x_infer, args.speed_steps, device)
    return dict(train_step_s=t_sparse, dense_train_step_s=t_dense, train_speedup=t_dense / t_sparse,
                infer_s=i_sparse, dense_infer_s=i_dense, infer_speedup=i_dense / i_sparse)


def _permutation_schedule(args, total_steps: int) -> None:
    """The permutations' deadline (``--harden-at``) and penalty ramp (``--perm-ramp``) in steps of this run."""
    args.total_steps = total_steps
    if args.harden_step is None:
        args.harden_step = int(args.harden_at * total_steps)
    args.perm_lambda_ramp = int(args.perm_ramp * total_steps)


def build_models(args):
    """The model of ``args.task`` sparsified as ``args`` says (the transformer blocks' linear layers), the names of
    its sparse layers, and its dense twin (same initialisation; the speed ratios' baseline)."""
    if args.task == "vit":
        make = lambda: build_vit(args.width, args.depth, args.heads, seed=args.seed)  # noqa: E731
        include = ("blocks.*",)
    else:
        make = lambda: build_gpt2(args.width, args.depth, args.heads, args.context, seed=args.seed,  # noqa: E731
                                  vocab=args.vocab or GPT2_VOCAB, eot_id=getattr(args, "eot_id", None))
        include = ("transformer.h.*",)
    model = make()
    return model, make_sparse(model, args, include=include), make()


def run_name(args) -> str:
    perm = "perm" if args.permute and args.structure not in ("dense", "unstructured") else "noperm"
    sp = "" if args.structure == "dense" else f"-{args.sparsity:g}"
    return f"{args.task}-{args.structure}{sp}-{perm}-{args.algorithm}-s{args.seed}"


def vit_data(args):
    """Fashion-MNIST's train / valid / test splits as ``args`` says, and the run's steps per epoch and in all (which
    also set the permutations' schedule in steps)."""
    ds = D.fashion_mnist(args.data_dir)
    xtr, ytr = D.image_split(ds, "train", valid=args.valid, seed=0)
    xva, yva = D.image_split(ds, "valid", valid=args.valid, seed=0)
    xte, yte = D.image_split(ds, "test")
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    steps_per_epoch = math.ceil(xtr.shape[0] / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    _permutation_schedule(args, total_steps)
    return (xtr, ytr), (xva, yva), (xte, yte), steps_per_epoch, total_steps


def epoch_order(seed: int, n: int, done: int) -> torch.Generator:
    """The generator of the training order after ``done`` epochs: the same shuffles as an uninterrupted run."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(done):
        torch.randperm(n, generator=gen)
    return gen


def train_vit(args) -> Dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else Path("runs") / run_name(args)
    out.mkdir(parents=True, exist_ok=True)

    (xtr, ytr), (xva, yva), (xte, yte), steps_per_epoch, total_steps = vit_data(args)
    model, sparse_layers, dense_twin = build_models(args)
    model.to(device)
    run = Run(model, sparse_layers, total_steps, args, out)
    start_epoch = run.resume()

    from tqdm import tqdm

    gen = epoch_order(args.seed, xtr.shape[0], start_epoch)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(batches(xtr, ytr, args.batch_size, gen), total=steps_per_epoch, leave=False,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress)
        for xb, yb in bar:
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            run.step(loss)
            loss_sum += float(loss.detach()) * yb.shape[0]
            correct += int((logits.argmax(-1) == yb).sum())
            seen += yb.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        row = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen,
                   valid_acc=evaluate(model, xva, yva, 512, device), epoch_s=time.perf_counter() - t0,
                   **permutation_row(model))
        print(f"[padst-train] epoch {row['epoch']}: loss {row['train_loss']:.4f}, train {row['train_acc']:.4f}, "
              f"valid {row['valid_acc']:.4f} ({row['epoch_s']:.0f} s)")
        run.save(epoch + 1, row)

    summary = dict(task="vit-fashion-mnist", epochs=args.epochs, train_examples=int(xtr.shape[0]),
                   width=args.width, depth=args.depth, valid_acc=run.rows[-1]["valid_acc"] if run.rows else None,
                   test_acc=evaluate(model, xte, yte, 512, device))
    if not args.no_speed:
        xb, yb = xtr[:args.batch_size].to(device), ytr[:args.batch_size].to(device)
        summary.update(speed(model, dense_twin, lambda m: F.cross_entropy(m(xb), yb), xte[:args.infer_batch],
                             args, device))
    return summarize(model, args, sparse_layers, out, summary)


def build_gpt2(width: int, depth: int, heads: int, context: int, seed: int = 0,
               vocab: int = GPT2_VOCAB, eot_id: Optional[int] = None) -> nn.Module:
    """A small GPT-2 (Hugging Face ``GPT2LMHeadModel``, GPT-2's 50257-token vocabulary unless ``vocab`` says
    otherwise, tied embeddings). ``eot_id``: the id of ``<|endoftext|>`` (bos and eos of the config); by default
    GPT-2's with the full vocabulary, none with a shrunk one whose table is not known here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if eot_id is None and vocab == GPT2_VOCAB:
        eot_id = GPT2_EOT
    if eot_id is not None and not 0 <= eot_id < vocab:
        raise ValueError(f"eot_id must be an id of the {vocab}-token vocabulary, got {eot_id}")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=depth, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot_id, eos_token_id=eot_id)
    return GPT2LMHeadModel(cfg)


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``x [B, T + 1]`` (inputs x[:, :-1], targets x[:, 1:])."""
    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def windows(tokens: torch.Tensor, context: int, starts: torch.Tensor) -> torch.Tensor:
    return tokens[starts[:, None] + torch.arange(context + 1)].long()


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, context: int, batch: int, device,
               max_windows: Optional[int] = None) -> float:
    """exp(mean next-token loss) over consecutive non-overlapping windows of ``tokens``."""
    was = model.training
    model.eval()
    n = (tokens.numel() - 1) // context
    if max_windows:
        n = min(n, max_windows)
    starts = torch.arange(n) * context
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows(tokens, context, starts[i:i + batch]).to(device)
        total += float(lm_loss(model, x)) * x.shape[0]
        count += x.shape[0]
    model.train(was)
    return math.exp(total / max(1, count))


def vocab_table(train: torch.Tensor, size: int) -> torch.Tensor:
    """The map of :func:`shrink_vocab` (int32, one entry per GPT-2 id): the ``size - 1`` most frequent ids of
    ``train`` (ties to the lower id) renumbered by frequency, every other id to the shared "rare" id ``size - 1``."""
    counts = torch.bincount(train.long(), minlength=GPT2_VOCAB)
    if not 2 <= size <= counts.numel():
        raise ValueError(f"--vocab must be in [2, {counts.numel()}] (or 0 for the full vocabulary), got {size}")
    order = torch.sort(-counts, stable=True).indices[:size - 1]  # most frequent first, ties to the lower id
    table = torch.full((counts.numel(),), size - 1, dtype=torch.int32)
    table[order] = torch.arange(size - 1, dtype=torch.int32)
    return table


def shrink_vocab(splits: Dict[str, torch.Tensor], size: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Keep the ``size - 1`` most frequent token ids of the training split and map every other id to one shared
    "rare" id; returns the mapped splits and the map (:func:`vocab_table`). Perplexity is then over this
    ``size``-way vocabulary, which makes the 50257-way output layer that dominates a small model's cost ``50257 /
    size`` times cheaper (documented with every result that uses it)."""
    table = vocab_table(splits["train"], size)
    return {k: table[v.long()] for k, v in splits.items()}, table


def train_gpt2(args) -> Dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else Path("runs") / run_name(args)
    out.mkdir(parents=True, exist_ok=True)
    tok = D.text_tokens(args.text, progress=not args.no_progress)
    table = None
    if args.vocab:  # the table goes into the checkpoint (to decode the model's ids) and <|endoftext|> keeps its role
        tok, table = shrink_vocab(tok, args.vocab)
        args.eot_id = int(table[GPT2_EOT])
    train, valid, test = tok["train"], tok["valid"], tok["test"]
    if train.numel() <= args.context + 1:
        raise SystemExit(f"the training text has {train.numel()} tokens, fewer than --context {args.context} + 1")
    _permutation_schedule(args, args.steps)

    model, sparse_layers, dense_twin = build_models(args)
    model.to(device)
    run = Run(model, sparse_layers, args.steps, args, out)
    run.extra["vocab_table"] = table
    start = run.resume()

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    high = train.numel() - args.context - 1
    for _ in range(start):  # the same batches as an uninterrupted run
        torch.randint(0, high, (args.batch_size,), generator=gen)
    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, leave=False, disable=args.no_progress,
               desc="steps")
    t0, loss_sum, seen = time.perf_counter(), 0.0, 0
    for step in bar:
        x = windows(train, args.context, torch.randint(0, high, (args.batch_size,), generator=gen)).to(device)
        loss = lm_loss(model, x)
        run.step(loss)
        loss_sum, seen = loss_sum + float(loss.detach()), seen + 1
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = dict(step=step + 1, train_loss=loss_sum / seen,
                       valid_ppl=perplexity(model, valid, args.context, args.eval_batch, device,
                                            args.eval_windows),
                       interval_s=time.perf_counter() - t0, **permutation_row(model))
            print(f"[padst-train] step {row['step']}: loss {row['train_loss']:.4f}, valid perplexity "
                  f"{row['valid_ppl']:.2f} ({row['interval_s']:.0f} s)")
            run.save(step + 1, row)
            t0, loss_sum, seen = time.perf_counter(), 0.0, 0

    summary = dict(task="gpt2-wikipedia" if args.text is None else f"gpt2-{Path(args.text).name}", steps=args.steps,
                   train_tokens=int(train.numel()), width=args.width, depth=args.depth, context=args.context,
                   vocab=args.vocab or GPT2_VOCAB,
                   valid_ppl=perplexity(model, valid, args.context, args.eval_batch, device),
                   test_ppl=perplexity(model, test, args.context, args.eval_batch, device))
    if not args.no_speed:
        xb = windows(train, args.context, torch.arange(args.batch_size) * args.context).to(device)
        summary.update(speed(model, dense_twin, lambda m: lm_loss(m, xb), xb[:, :-1], args, device))
    return summarize(model, args, sparse_layers, out, summary)


def _common(p: argparse.ArgumentParser, width: int, depth: int, heads: int, lr: float) -> None:
    p.add_argument("--structure", choices=STRUCTURES, default="block")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--permute", action=argparse.BooleanOptionalAction, default=True,
                   help="learn a permutation per sparse layer (not for dense / unstructured)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="rigl")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--perm-init", default="gradient", choices=INITS,
                   help="soft permutation start (default: from the gradient of the first --perm-warmup steps)")
    p.add_argument("--perm-warmup", type=int, default=5, help="steps of gradient for the 'gradient' start")
    p.add_argument("--perm-init-scale", type=float, default=2.0,
                   help="how peaked the 'gradient' start is (its logits: the standardised score times this)")
    p.add_argument("--perm-lambda", type=float, default=0.1, help="penalty weight at the end of its ramp")
    p.add_argument("--perm-ramp", type=float, default=0.25,
                   help="fraction of training over which the penalty weight rises from 1/1000 of --perm-lambda")
    p.add_argument("--perm-lr", type=float, default=None,
                   help="learning rate of the soft permutations' logits (default: 8 / the steps before the deadline, "
                        "within [0.01, 0.5]: see padst_ext.param_groups)")
    p.add_argument("--harden-mode", default="weights", choices=HARDEN_MODES,
                   help="weights: keep the most of S M and re-fit S; matrix: round M alone (the paper's)")
    p.add_argument("--harden-step", type=int, default=None, help="harden the permutations at this step at the latest")
    p.add_argument("--harden-at", type=float, default=0.5, help="... or at this fraction of training (default 0.5)")
    p.add_argument("--update-interval", type=int, default=100, help="DST: steps between mask updates")
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output folder (default runs/<run name>)")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint.pt")
    p.add_argument("--no-speed", action="store_true", help="skip timing against the dense twin")
    p.add_argument("--speed-steps", type=int, default=5)
    p.add_argument("--no-progress", action="store_true")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padst-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    v = sub.add_parser("vit", help="a small ViT on Fashion-MNIST")
    _common(v, width=192, depth=6, heads=3, lr=2e-3)
    v.add_argument("--epochs", type=int, default=10)
    v.add_argument("--batch-size", type=int, default=128)
    v.add_argument("--label-smoothing", type=float, default=0.1)
    v.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    v.add_argument("--valid", type=int, default=5000, help="training images held out for validation")
    v.add_argument("--data-dir", default=None, help="a folder with the four Fashion-MNIST IDX gz files")
    v.add_argument("--infer-batch", type=int, default=512)
    v.add_argument("--quick", action="store_true", help="a short run: width 96, depth 4, one epoch")
    v.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 over the processes torchrun starts (gloo on the CPU, NCCL with "
                        "--device cuda); --batch-size is the global batch; see padst_ext.experiments.fsdp")
    g = sub.add_parser("gpt2", help="a small GPT-2 on English Wikipedia text")
    _common(g, width=128, depth=4, heads=4, lr=1e-3)
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--context", type=int, default=128)
    g.add_argument("--eval-every", type=int, default=250)
    g.add_argument("--eval-batch", type=int, default=32, help="windows per batch when measuring perplexity")
    g.add_argument("--eval-windows", type=int, default=0,
                   help="validation perplexity during training over at most this many windows (0: all); the "
                        "final validation and test perplexities always use every window")
    g.add_argument("--vocab", type=int, default=0,
                   help="0: GPT-2's 50257 tokens; K: the K - 1 most frequent training tokens and one shared rare "
                        "token (a K-way output layer, for cheap sweeps)")
    g.add_argument("--text", default=None, help="train on this text file instead (blank-line separated paragraphs)")
    g.add_argument("--quick", action="store_true", help="a short run: 300 steps")
    return p


def main(argv=None) -> Dict:
    args = parser().parse_args(argv)
    if not 0 < args.sparsity < 1:
        raise SystemExit(f"--sparsity must be in (0, 1), got {args.sparsity}")
    for flag, value in (("--perm-ramp", args.perm_ramp), ("--harden-at", args.harden_at)):
        if not 0 <= value <= 1:
            raise SystemExit(f"{flag} must be a fraction of training in [0, 1], got {value}")
    given = argv if argv is not None else sys.argv
    if args.task == "vit":
        if args.quick:  # about two minutes on 2 cores: one pass over the 55k training images with a small ViT
            args.width, args.depth, args.heads = 96, 4, 3
            args.epochs = args.epochs if "--epochs" in given else 1
            args.update_interval = min(args.update_interval, 50)
        if args.fsdp:
            from .fsdp import train_vit as train_vit_fsdp

            return train_vit_fsdp(args)
        return train_vit(args)
    if args.quick:
        args.steps = args.steps if "--steps" in given else 300
        args.eval_every = min(args.eval_every, 100)
        args.update_interval = min(args.update_interval, 50)
    return train_gpt2(args)


def cli() -> int:
    """Console entry point (``padst-train``): a checkpoint that cannot be trusted or read is one line and exit 2."""
    try:
        main()
    except D.CheckpointError as e:
        print(f"padst-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
