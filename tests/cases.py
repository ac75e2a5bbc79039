"""Shared test cases: devices, dtypes, tolerances and random instances of each structure."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional

import pytest
import torch

from padst_ext import formats as F

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def leave_worker() -> None:
    """Ends a process-group test worker (spawned, its results saved, its group destroyed) without interpreter
    finalization. Gloo's worker threads free a finished collective's buffers after the caller's wait returns, and when
    those buffers are tensors Python also saw, freeing them takes the GIL; at finalization that aborts the process
    ("terminate called without an active exception", SIGABRT: a core dump showed ProcessGroupGloo::runLoop destroying
    an AsyncBarrierWork that held an all-gather's tensors while the main thread was in the final garbage collection).
    It failed 2 of 8 runs of the DCP checkpoint tests here; torch has no way to wait for gloo's threads
    (`_wait_for_pending_works` is NCCL-only)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"padst::{op}", "CUDA")


# CPU always; CUDA collected everywhere and skipped cleanly without a GPU (tests also skip per op when this
# build has no CUDA kernel for it).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: Optional[torch.Tensor] = None,
                              what: str = "") -> None:
    """flash-attention's rule: the kernel's error against a float64 reference is at most twice the error of the
    same computation done by PyTorch in the kernel's precision (plus a few ulps of slack for exact cases)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == (ref_lowp.dtype if ref_lowp is not None else out.dtype)
    out64 = out.double().cpu()
    ref64 = ref64.double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output"
    err = (out64 - ref64).abs().max().item() if out64.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    # slack of a few float32 ulps: the low-precision kernels accumulate in float32 and round once, so their
    # error is covered by torch_err; a low-precision eps here would hide an accumulation bug.
    eps = torch.finfo(torch.float32 if out.dtype in (torch.bfloat16, torch.float16) else out.dtype).eps
    torch_err = 0.0
    if ref_lowp is not None and ref_lowp.numel():
        torch_err = (ref_lowp.double().cpu() - ref64).abs().max().item()
    tol = 2 * torch_err + 8 * eps * scale
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (torch's own error {torch_err:.3e})"


def random_perm(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def balanced_block_mask(nbr: int, nbc: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Every block-row holds the same number of blocks (at least one)."""
    k = max(1, round(density * nbc))
    scores = torch.rand(nbr, nbc, generator=gen)
    idx = scores.topk(k, dim=1).indices
    return torch.zeros(nbr, nbc, dtype=torch.bool).scatter_(1, idx, True)


def random_nm_mask(R: int, C: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(R, C // m, m, generator=gen)
    idx = scores.topk(n, dim=-1).indices
    return torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(R, C)


def random_offsets(R: int, C: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    L = min(R, C)
    K = max(1, math.ceil((1 - sparsity) * R * C / L))
    return torch.randperm(max(R, C), generator=gen)[:K].sort().values


@dataclass
class Case:
    """One random layer of a given structure, with everything needed to call the op and the reference."""

    structure: str
    B: int
    C: int
    R: int
    dtype: torch.dtype
    device: str
    in_perm: Optional[torch.Tensor]
    out_perm: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    weight: F.SparseWeight  # BlockSparse / NMSparse / DiagSparse, with the case's permutations
    x: torch.Tensor
    extra: Dict = field(default_factory=dict)


def _block(dense, gen, *, sparsity, block, extra, **_):
    R, C = dense.shape
    br, bc = block
    return F.block_from_dense(dense, balanced_block_mask(R // br, C // bc, 1 - sparsity, gen), block)


def _nm(dense, gen, *, nm, extra, **_):
    n, m = nm
    mask = random_nm_mask(*dense.shape, n, m, gen)
    extra["logical_mask"] = mask
    return F.nm_from_dense(dense, mask, n, m)


def _diag(dense, gen, *, sparsity, **_):
    return F.diag_from_dense(dense, random_offsets(*dense.shape, sparsity, gen))


BUILDERS = {"block": _block, "nm": _nm, "diag": _diag}


def make_case(structure: str, B: int, C: int, R: int, *, sparsity: float = 0.9, block=(16, 16), nm=(1, 10),
              perm: str = "both", bias: bool = True, dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(R, C, generator=gen, dtype=torch.float64)
    x = torch.randn(B, C, generator=gen, dtype=torch.float64)
    in_perm = random_perm(C, gen) if perm in ("in", "both") else None
    out_perm = random_perm(R, gen) if perm in ("out", "both") and structure != "nm" else None
    b = torch.randn(R, generator=gen, dtype=torch.float64) if bias else None
    extra = {}
    w = BUILDERS[structure](dense, gen, sparsity=sparsity, block=block, nm=nm, extra=extra)
    # the case's weight object applies the case's permutations (N:M folds its input permutation into col_idx)
    w = w.with_perm(in_perm, out_perm).to(device=device, dtype=dtype)

    def conv(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return Case(structure, B, C, R, dtype, device, conv(in_perm), conv(out_perm), conv(b), w, conv(x), extra)
