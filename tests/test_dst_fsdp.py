"""DST under FSDP2 (torch.distributed.fsdp.fully_shard; 2 processes, gloo, CPU): the sparse layers' values and their
Adam moments are sharded DTensors, every update is made whole on every rank from the all-reduced grow score and each
rank writes back its shard. The patterns stay identical across ranks, and the run matches one process that sees both
ranks' data, with and without learned permutations (the soft logits are sharded too; the clock and the hardening
read them whole)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cases import leave_worker

WORLD = 2
STEPS = 8
KINDS = [("block", dict(block_size=8)), ("nm", dict(n=2, m=8)), ("diagonal", {}), ("unstructured", {}),
         ("2:4", {}),
         # learned permutations: the soft phase from step 1, hardened at step 4 (DST's harden_at)
         ("block", dict(block_size=8, permute=True, perm_warmup=1)), ("nm", dict(n=2, m=8, permute=True, perm_warmup=1)),
         ("diagonal", dict(permute=True, perm_warmup=1, perm_side="output"))]
IDS = [k + ("+perm" if kw.get("permute") else "") for k, kw in KINDS]


def _model(structure: str, kw: dict) -> nn.Module:
    from padst_ext import sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    sparsify(model, structure, 0.75, from_weights=False, **{"permute": False, **kw})
    return model


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(2 * WORLD * 4, 16, generator=g), torch.randint(0, 4, (2 * WORLD * 4,), generator=g))
            for _ in range(STEPS)]


def _dst(model, opt, harden_at=0.5):
    from padst_ext import DST

    return DST(model, opt, algorithm="rigl", update_interval=2, drop_fraction=0.4, drop_schedule="constant",
               total_steps=STEPS, seed=5, harden_at=harden_at)


def _train(model, opt, rank=None, dst=None, start=0, stop=STEPS):
    dst = dst or _dst(model, opt)
    losses = []
    for x, y in _batches()[start:stop]:
        if rank is not None:  # each rank its half of the batch
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return dst, torch.stack(losses)


def _state(model) -> dict:
    from padst_ext.nn import full_tensor

    return {k: full_tensor(v.detach()).clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _worker(rank: int, init_file: str, out_dir: str, structure: str, kw: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from padst_ext import SparseLinear

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model(structure, kw)
        for m in model:
            if isinstance(m, SparseLinear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        dst, losses = _train(model, opt, rank)
        dist.all_reduce(losses)
        state = _state(model)
        state["_losses"] = losses / WORLD
        state["_grown"] = torch.tensor([sum(r["grown"] for r in h["layers"].values()) for h in dst.history])
        sharded = [m.values for m in model.modules() if isinstance(m, SparseLinear)]
        state["_sharded"] = torch.tensor(all(type(v).__name__ == "DTensor" for v in sharded) and bool(sharded))
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no collective in flight when the group goes
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("structure,kw", KINDS, ids=IDS)
def test_dst_under_fsdp2_matches_one_process(tmp_path, structure, kw):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), structure, kw), nprocs=WORLD, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert bool(s0["_sharded"]), "the sparse layers' values were not sharded"
    assert len(s0["_grown"]) == STEPS // 2 - 1 and (s0["_grown"] > 0).all()  # every update moved units
    if kw.get("permute"):  # hardened on both ranks, to the one-process run's permutation (checked below)
        assert any(k.endswith(".perm") for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    # one process, the whole batch: the same patterns, weights and losses up to reduction order
    torch.set_num_threads(1)
    model = _model(structure, kw)
    _, losses = _train(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    ref = _state(model)
    torch.testing.assert_close(s0["_losses"], losses, rtol=1e-4, atol=1e-5)
    if kw.get("permute"):
        # the hardening's weight-preserving rounding chooses among permutations that keep (nearly) the same weight,
        # by a margin below the reduction order's: the losses above agree, the hardened indices need not
        return
    for k, v in sorted(ref.items(), key=lambda kv: kv[1].is_floating_point()):  # patterns and permutations first
        if v.is_floating_point():
            torch.testing.assert_close(s0[k], v, rtol=1e-3, atol=1e-4, msg=k)
        else:
            assert torch.equal(s0[k], v), f"{k}: the pattern differs from the one-process run"


# -- checkpoints through torch.distributed.checkpoint (padst_ext.distributed) ---------------------------------------
CK_KINDS = [("block", dict(block_size=8)), ("nm", dict(n=2, m=8)),
            # saved in the soft phase, hardened after the resume (harden_at=0.75 of 8 steps: step 6)
            ("block", dict(block_size=8, permute=True, perm_warmup=1))]
CK_IDS = [k + ("+perm" if kw.get("permute") else "") for k, kw in CK_KINDS]


def _fsdp_model(structure, kw, mesh):
    from torch.distributed.fsdp import fully_shard

    from padst_ext import SparseLinear

    model = _model(structure, kw)
    for m in model:
        if isinstance(m, SparseLinear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _ckpt_worker(rank: int, init_file: str, out_dir: str, structure: str, kw: dict, mode: str) -> None:
    """mode "save": 4 steps, a DCP checkpoint, 4 more steps (the uninterrupted run); "resume": a fresh model loads the
    checkpoint and runs the last 4 steps."""
    from torch.distributed.device_mesh import init_device_mesh

    from padst_ext import distributed as pdist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _fsdp_model(structure, kw, mesh)
        ck = os.path.join(out_dir, "ck")
        half = STEPS // 2
        if mode == "save":
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            dst = _dst(model, opt, harden_at=0.75)
            _train(model, opt, rank, dst, 0, half)
            pdist.save(ck, model, opt, dst)
            torch.save(_state(model), os.path.join(out_dir, f"mid{rank}.pt"))
        else:
            pdist.prepare(ck, model)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            dst = _dst(model, opt, harden_at=0.75)
            pdist.load(ck, model, opt, dst)
        _, losses = _train(model, opt, rank, dst, half, STEPS)
        state = _state(model)
        state["_losses"] = losses
        state["_step"] = torch.tensor(dst.step)
        torch.save(state, os.path.join(out_dir, f"{mode}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("structure,kw", CK_KINDS, ids=CK_IDS)
def test_dcp_checkpoint_resumes_on_two_ranks_and_loads_in_one_process(tmp_path, structure, kw):
    from padst_ext import distributed as pdist

    for mode, init in (("save", "init_a"), ("resume", "init_b")):
        mp.spawn(_ckpt_worker, args=(str(tmp_path / init), str(tmp_path), structure, kw, mode), nprocs=WORLD,
                 join=True)
    # 2 -> 2: the resumed run continues exactly as the uninterrupted one (same values, patterns, permutations,
    # optimizer moments behind them, DST clock and generator: the losses and the final states are equal)
    for rank in range(WORLD):
        full = torch.load(tmp_path / f"save{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"resume{rank}.pt", weights_only=True)
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), f"rank {rank}: {k} differs after the 2 -> 2 resume"
    if kw.get("permute"):  # the resumed run hardened after the load, on both ranks alike
        assert any(k.endswith(".perm") for k in full)
    # 2 -> 1: one process without a process group loads the same model, bit for bit
    mid = torch.load(tmp_path / "mid0.pt", weights_only=True)
    torch.set_num_threads(1)
    model = _model(structure, kw)
    pdist.load(tmp_path / "ck", model)
    one = _state(model)
    assert one.keys() == mid.keys()
    for k in mid:
        assert torch.equal(one[k], mid[k]), f"{k} differs after the 2 -> 1 load"


def test_dcp_checkpoint_errors_name_the_problem(tmp_path):
    from padst_ext import distributed as pdist

    with pytest.raises(FileNotFoundError, match="padst_meta.pt"):
        pdist.load(tmp_path, _model("block", dict(block_size=8)))
    model = _model("block", dict(block_size=8, permute=True, perm_warmup=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pdist.save(tmp_path / "ck", model, opt)
    other = _model("nm", dict(n=2, m=8))
    with pytest.raises(ValueError, match="config is"):
        pdist.load(tmp_path / "ck", other)
    with pytest.raises(ValueError, match="are not this model's"):
        pdist.load(tmp_path / "ck", nn.Sequential(nn.Linear(16, 4)))
    from padst_ext import harden_all

    same = _model("block", dict(block_size=8, permute=True, perm_warmup=1))
    harden_all(same, force=True)
    with pytest.raises(ValueError, match="prepare"):
        pdist.load(tmp_path / "ck", same, torch.optim.Adam(same.parameters(), lr=1e-2))
    with pytest.raises(ValueError, match="no DST state"):
        pdist.load(tmp_path / "ck", model, opt, dst=_dst(model, opt))
