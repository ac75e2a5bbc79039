"""Under DDP (2 processes, gloo, CPU) every rank makes the identical DST update: masks, permutations and
weights stay identical although each rank sees different data."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str, structure: str, algorithm: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from cases import leave_worker
    from padst_ext import DST, sparsify

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # identical initial model on every rank
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                              nn.ReLU(), nn.Linear(32, 4))
        kw = dict(block_size=8) if structure == "block" else dict(n=2, m=8) if structure == "nm" else {}
        sparsify(model, structure, 0.75, from_weights=False, harden_step=7, **kw)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        dst = DST(ddp, opt, algorithm=algorithm, update_interval=3, drop_fraction=0.4, total_steps=12, seed=5)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(10):
            x = torch.randn(16, 16, generator=g)
            y = torch.randint(0, 4, (16,), generator=g)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        state["_updates"] = torch.tensor(len(dst.history))
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("structure,algorithm", [("block", "rigl"), ("nm", "rigl"), ("diagonal", "set")])
def test_ranks_stay_identical(tmp_path, structure, algorithm):
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(init_file, str(tmp_path), structure, algorithm), nprocs=WORLD, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert int(s0["_updates"]) == 3
    assert s0.keys() == s1.keys()
    assert any(k.endswith(".perm") for k in s0)  # hardened at step 7 on both ranks
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
