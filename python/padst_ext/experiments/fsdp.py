"""``padst-train vit --fsdp``: the ViT recipe sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) over the
processes ``torchrun`` starts on one machine: gloo on the CPU, NCCL on GPUs (one per process)::

    torchrun --standalone --nproc_per_node 2 -m padst_ext.experiments.recipes vit --fsdp --quick
    torchrun --standalone --nproc_per_node 4 -m padst_ext.experiments.recipes vit --fsdp --device cuda --epochs 10

Each transformer block and the whole model are sharded (the sparse layers' values, their optimizer moments and the
soft permutations' logits with them); every process takes its slice of each global batch (``--batch-size`` is
the global batch), DST updates are made whole and identical on every process (:class:`padst_ext.DST`), and the
checkpoint is a ``torch.distributed.checkpoint`` folder (:mod:`padst_ext.distributed`) that ``--resume`` loads
on any number of processes. Process 0 writes ``metrics.csv``, ``summary.json`` and ``run_state.pt`` (epochs done,
metric rows, the learning-rate schedule) beside ``checkpoint/``. The speed comparison against the dense twin is
not made (``--no-speed``): time it in one process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import distributed as pdist
from . import data as D
from .recipes import (_check_same_training, batches, build_models, epoch_order, evaluate, optimization,
                      permutation_row, run_name, summarize, vit_data, write_metrics)


def _init(args):
    """The process group from torchrun's environment, and this process's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun (e.g. torchrun --standalone --nproc_per_node 2 "
                         "-m padst_ext.experiments.recipes vit --fsdp ...): RANK / WORLD_SIZE are not set")
    cuda = args.device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def _shard(model, device, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train_vit(args) -> Dict:
    torch.set_num_threads(args.threads)
    device, rank, world = _init(args)
    try:
        return _train_vit(args, device, rank, world)
    finally:
        dist.destroy_process_group()


def _train_vit(args, device, rank: int, world: int) -> Dict:
    args.no_speed = True
    out = Path(args.out) if args.out else Path("runs") / (run_name(args) + "-fsdp")
    lead = rank == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    (xtr, ytr), (xva, yva), (xte, yte), _, total_steps = vit_data(args)
    model, sparse_layers, _ = build_models(args)
    model.to(device)
    _shard(model, device, world)
    ck, state_file = out / "checkpoint", out / "run_state.pt"
    # the optimizer over the model as built (soft layers with their logits), as at the start of the run: a
    # checkpoint's hardened layers drop their logits at the load and the optimizer keeps them unused, as it did
    resuming = args.resume and (ck / pdist.META).is_file() and state_file.is_file()
    opt, sched, dst = optimization(model, sparse_layers, total_steps, args)
    done, rows = 0, []
    if resuming:
        st = D.load_checkpoint(state_file, required=("scheduler", "done", "rows", "args"))
        _check_same_training(state_file, st["args"], vars(args))
        pdist.load(ck, model, opt, dst)
        sched.load_state_dict(st["scheduler"])
        done, rows = st["done"], st["rows"]
        if lead:
            print(f"[padst-train] resumed {ck} at epoch {done} on {world} processes")

    gen = epoch_order(args.seed, xtr.shape[0], done)
    for epoch in range(done, args.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n over this process's slices
        for xb, yb in batches(xtr, ytr, args.batch_size, gen):
            xb, yb = xb.tensor_split(world)[rank].to(device), yb.tensor_split(world)[rank].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += torch.tensor([float(loss.detach()) * yb.shape[0], int((logits.argmax(-1) == yb).sum()),
                                  yb.shape[0]], dtype=torch.float64)
        dist.all_reduce(sums)
        # every process evaluates (FSDP2's forward gathers the shards collectively); the same figure on each
        row = dict(epoch=epoch + 1, train_loss=float(sums[0] / sums[2]), train_acc=float(sums[1] / sums[2]),
                   valid_acc=evaluate(model, xva, yva, 512, device), epoch_s=time.perf_counter() - t0,
                   **permutation_row(model))
        rows.append(row)
        done = epoch + 1
        pdist.save(ck, model, opt, dst)
        if lead:
            print(f"[padst-train] epoch {row['epoch']}: loss {row['train_loss']:.4f}, train {row['train_acc']:.4f}, "
                  f"valid {row['valid_acc']:.4f} ({row['epoch_s']:.0f} s, {world} processes)")
            D.save_atomic(dict(scheduler=sched.state_dict(), done=done, rows=rows, args=vars(args)), state_file)
            write_metrics(rows, out)
        dist.barrier()

    summary = dict(task="vit-fashion-mnist", epochs=args.epochs, train_examples=int(xtr.shape[0]),
                   width=args.width, depth=args.depth, processes=world, sharding="fsdp2",
                   valid_acc=rows[-1]["valid_acc"] if rows else None,
                   test_acc=evaluate(model, xte, yte, 512, device))
    return summarize(model, args, sparse_layers, out, summary, write=lead)
