"""CUDA op timings against cuBLAS dense, torch's sparse kernels and a measured roofline, all in the same run.

Cases: ViT-B MLP shapes, fc1 x[T, 768] -> 3072 and fc2 x[T, 3072] -> 768, at T = 4096 and
T = 50176 tokens (= 196 x 256: ViT-B/16 at 224 px has 196 patches, 197 tokens with the class token; the issue's
"50176 (197x256)" is 196 x 256, and 50176 is what is used), dtypes bf16 and fp32, sparsity 80 / 90 / 95 % for

  block32, block16   block 32x32 / 16x16, balanced (every block-row holds the same number of blocks)
  nm                 N:M along the input dimension. M must divide C = 768 and 3072 (= 2^8 * 3 and 2^10 * 3), so the
                     paper's 1:5 / 1:10 / 1:20 (and 2:20) cannot be built at these widths; the nearest 1:M are used:
                     1:6 (83.3 %), 1:12 (91.7 %, plus 2:24 at the same density), 1:24 (95.8 %)
  diag               wrap-around diagonals, K = ceil((1 - s) R C / min(R, C))
  2:4                50 %: padst's general N:M kernel, padst's cuSPARSELt path (padst_ext.semi_structured, if built
                     and available) and torch's to_sparse_semi_structured (its default backend and, if present,
                     the cuSPARSELt one), bf16 (fp32 is attempted; torch only supports some backends there)

each PERMUTED (random in_perm and out_perm for block / diagonal; N:M: random in_perm folded into col_idx; 2:4
cuSPARSELt: in_perm passed to the op) and IDENTITY (no permutation / sorted indices), so that the permuted /
identity ratio can be read off (target <= 1.05). Every layer has a bias (as ViT-B's Linear layers do). Block cases
time padst twice: the block_tc kernels (padst_perm / padst_ident, PADST_BLOCK_V2=0) and the v2 kernels (padst_v2_*,
rows marked "v2", PADST_BLOCK_V2=1: x-stationary, row-complete and the grouped dW where they serve, block_tc
elsewhere), each checked against the reference before it is timed.

Baselines, timed round-robin with the padst variants of the same case (so drift hits all of them alike):
  dense      cuBLAS F.linear(x, W, b), W [R, C] dense; forward and forward+backward (dx, dW, db)
  torch BSR  W.to_sparse_bsr(block) @ x^T (block cases), and torch.sparse._triton_ops.bsr_dense_mm if importable
             (bf16 only: every new shape is a Triton compile; cuSPARSE's BSR covers fp32)
  torch CSR  W.to_sparse_csr() @ x^T (every case; cuSPARSE)
  torch 2:4  F.linear(x, to_sparse_semi_structured(W), b) (2:4 cases)
N:M and diagonal cases likewise: the gather kernel (padst_*, PADST_ROWS_V2=0) and the v2 row kernel (padst_v2_*, "v2"
rows, PADST_ROWS_V2=1: forward, dx and dW). padst's
cuSPARSELt rows come twice: "lt" (bias pre-filled, default algorithm, index_select for the permutation) and "lt v2"
(PADST_LT24_V2=1: cuSPARSELt's bias epilogue with beta = 0, the algorithm search on the first call, the row-permute
kernel).
The torch sparse baselines get x^T made contiguous outside the timed region and add no bias (both favour torch);
they are timed forward only.

padst variants are timed forward and forward+backward through the ops' autograd (padst_ext.ops.block_linear /
nm_linear / diag_linear: dx, dvalues on the pattern, dbias). Before timing, each variant's output and gradients are
compared once with the plain-PyTorch reference (padst_ext.reference.linear on the masked dense weight, in float64):
error <= max(2 * (error of the same product done by torch in the case's dtype) + 8 eps32 * scale, rtol * scale),
rtol = 1e-4 (fp32) / 2e-2 (bf16), scale = max |reference|. A failure is printed at once and flagged in the table.

Timing: CUDA events around every call, L2 flushed (a 256 MB buffer zeroed) before each call unless --warm-l2, a few
warm-up calls, median of the timed calls. Reps: 10 warm-up / 30 timed at T = 4096, 5 / 15 at T = 50176, fewer when
one call is slow (each variant gets about --variant-budget ms of timed calls, at least 3). A global --budget (s)
stops starting new cases so that the whole run ends in time; the table then lists the cases not run.

Roofline, measured at start on this machine: bandwidth BW = bytes read + written / time of a device-to-device copy
of a 1 GiB buffer; peak P[dtype] = 2 n^3 / time of an n = 8192 torch.mm (bf16; fp32 with TF32 off, as the fp32
cases run: torch.backends.cuda.matmul.allow_tf32 stays False). Bound = max(FLOPs / P, bytes / BW); the table gives
roof = bound / measured time (1.0 = at the roofline). Byte model (e = element size of the dtype, nnz = stored
weight values, i = index size: 4 for N:M col_idx with the default --index-dtype int32, 8 for block / diagonal
metadata and permutations, which stay int64 as padst_ext.formats builds them):
  forward      FLOPs = 2 T nnz
               bytes = e (T C [read x] + T R [write y] + nnz [values] + R [bias])
                       + metadata: block (nnzb + R/br + 1) i, N:M nnz i, diagonal K i, cuSPARSELt 2:4 nnz / 4
                         (2-bit indices); + permutations (C [+ R]) i when permuted
  fwd+bwd      FLOPs = 3 x 2 T nnz (y, dx, dvalues)
               bytes = e (2 T C [x read by fwd and dW] + T R [y] + 2 T R [dy read by dx and dW] + T C [write dx]
                       + 3 nnz [values read by fwd and dx, dvalues written] + 2 R [bias, dbias fused into dW])
                       + 3 x metadata (block: the dx pass reads the CSC metadata, nnzb + C/bc + 1 more) + 3 x perms
The 2:4 bound uses the same FLOPs (2 T nnz) at the dense peak: sparse tensor cores do 2 T nnz at the dense rate.
P depends on the implementation (compute_peak): block and cuSPARSELt 2:4 run on tensor cores, P = P[dtype]; the N:M
and diagonal kernels (and padst's general kernel on 2:4) run on the CUDA cores and accumulate in fp32, so for them
P = P[fp32] (fp32 mm with TF32 off is cuBLAS's SIMT FMA rate) in bf16 too: their "roof" is against what CUDA
cores can do, not against a tensor-core peak no SIMT kernel can reach.

    python benchmarks/gpu_ops.py                 # full run (about 3-4 min on an H100)
    python benchmarks/gpu_ops.py --quick         # a few T = 4096 bf16 cases, few reps
    python benchmarks/gpu_ops.py --cases bf16,T4096,block    # cases whose name holds every term
    python benchmarks/gpu_ops.py --dry-run       # no GPU: every case built at 1/8 width on the CPU and checked

Output: progress on stderr; JSON (device, clocks, peaks, all raw timings) to --out (default
benchmarks/results/gpu_ops.json), a detailed markdown table next to it (.md), and the compact table printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as Fn
from padst_ext import formats as F
from padst_ext import reference

HERE = Path(__file__).resolve().parent

SHAPES = {"fc1": (768, 3072), "fc2": (3072, 768)}  # (C, R) of ViT-B's MLP
TOKENS = (4096, 50176)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SPARSITIES = (0.8, 0.9, 0.95)
NM_PATTERNS = {0.8: [(1, 6)], 0.9: [(1, 12), (2, 24)], 0.95: [(1, 24)]}  # see the docstring: M must divide C
REPS = {4096: (10, 30), 50176: (5, 15)}  # (warm-up, timed)
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Nominal H100 SXM figures: only used for the byte/FLOP model of --dry-run (no GPU to measure).
NOMINAL_PEAKS = {"bf16": 989e12, "fp32": 67e12, "bandwidth": 3.35e12}
DRY_SCALE = 8  # the dry run builds C / 8 -> R / 8 (every block size and M still divides)


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    layer: str
    tokens: int
    dt: str  # "bf16" | "fp32"
    structure: str  # block32 | block16 | nm | diag | 2:4
    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def C(self) -> int:
        return SHAPES[self.layer][0]

    @property
    def R(self) -> int:
        return SHAPES[self.layer][1]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dt]

    @property
    def struct_name(self) -> str:
        if self.structure == "nm":
            return f"nm{self.n}:{self.m}"
        return self.structure

    @property
    def name(self) -> str:
        s = "" if self.structure in ("nm", "2:4") else f"-s{round(100 * self.sparsity)}"
        return f"{self.layer}-{self.dt}-T{self.tokens}-{self.struct_name}{s}"

    @property
    def label(self) -> str:
        """Short form for the compact table."""
        tok = f"{round(self.tokens / 1000)}k"
        st = {"block32": "b32", "block16": "b16", "diag": "dg"}.get(self.structure)
        if st:
            body = f"{st} s{round(100 * self.sparsity)}"
        else:
            body = f"{self.n}:{self.m}" if self.structure == "nm" else "2:4"
        return f"{self.layer} {self.dt} {tok} {body}"


def all_cases() -> list[Case]:
    """In priority order: a --budget stop drops the tail (T = 50176 fp32 first)."""
    cases = []
    for T in TOKENS:
        for dt in DTYPES:
            for layer in SHAPES:
                for s in SPARSITIES:
                    for st in ("block32", "block16"):
                        cases.append(Case(layer, T, dt, st, s))
                    for n, m in NM_PATTERNS[s]:
                        cases.append(Case(layer, T, dt, "nm", 1 - n / m, n, m))
                    cases.append(Case(layer, T, dt, "diag", s))
                cases.append(Case(layer, T, dt, "2:4", 0.5, 2, 4))
    return cases


def quick_cases() -> list[Case]:
    return [Case("fc1", 4096, "bf16", "block32", 0.9), Case("fc1", 4096, "bf16", "nm", 1 - 1 / 12, 1, 12),
            Case("fc1", 4096, "bf16", "diag", 0.9), Case("fc1", 4096, "bf16", "2:4", 0.5, 2, 4)]


def select(cases: list[Case], filt: str | None) -> list[Case]:
    if not filt:
        return cases
    terms = [t for t in filt.split(",") if t]
    return [c for c in cases if all(t in c.name for t in terms)]


# ----------------------------------------------------------------------------------------------------------
# Byte / FLOP model (documented in the module docstring)
# ----------------------------------------------------------------------------------------------------------


def structure_cost(case: Case, idx_nm: int = 4) -> dict[str, dict[str, float]]:
    """Byte / FLOP model of each padst implementation of a case at its full size: {variant key: cost}."""
    C, R, s, st = case.C, case.R, case.sparsity, case.structure
    if st.startswith("block"):
        bs = int(st[5:])
        nnzb = R // bs * max(1, round((1 - s) * (C // bs)))
        nnz, meta_f, meta_b = nnzb * bs * bs, (nnzb + R // bs + 1) * 8, (nnzb + C // bs + 1) * 8
        out = {"padst_perm": cost_model(case, nnz, meta_f, meta_b, C + R),
               "padst_ident": cost_model(case, nnz, meta_f, meta_b, 0)}
        out["padst_v2_perm"], out["padst_v2_ident"] = out["padst_perm"], out["padst_ident"]
        return out
    if st == "diag":
        L = min(R, C)
        K = math.ceil((1 - s) * R * C / L)
        out = {"padst_perm": cost_model(case, K * L, K * 8, K * 8, C + R),
               "padst_ident": cost_model(case, K * L, K * 8, K * 8, 0)}
        out["padst_v2_perm"], out["padst_v2_ident"] = out["padst_perm"], out["padst_ident"]
        return out
    nnz = R * C // case.m * case.n
    out = {"padst_perm": cost_model(case, nnz, nnz * idx_nm, nnz * idx_nm, 0),
           "padst_ident": cost_model(case, nnz, nnz * idx_nm, nnz * idx_nm, 0)}
    out["padst_v2_perm"], out["padst_v2_ident"] = out["padst_perm"], out["padst_ident"]
    if st == "2:4":  # cuSPARSELt: 2-bit indices per kept value; the permutation is a gather of x
        out["lt24_perm"] = cost_model(case, nnz, nnz // 4, nnz // 4, C)
        out["lt24_ident"] = cost_model(case, nnz, nnz // 4, nnz // 4, 0)
        out["lt24v2_perm"], out["lt24v2_ident"] = out["lt24_perm"], out["lt24_ident"]
    return out


def full_density(case: Case) -> float:
    c = structure_cost(case)["padst_ident"]
    return c["fwd_flops"] / (2.0 * case.tokens * case.R * case.C)


def cost_model(case: Case, nnz: int, meta_fwd: int, meta_bwd: int, perm_elems: int) -> dict[str, float]:
    """FLOPs and bytes of the sparse layer, forward and forward+backward. meta_* are metadata bytes (the dx pass
    reads meta_bwd, forward and dW read meta_fwd); permutations are int64."""
    T = case.tokens
    e = torch.finfo(case.dtype).bits // 8
    C, R = case.C, case.R
    perm_b = perm_elems * 8
    fwd_bytes = e * (T * C + T * R + nnz + R) + meta_fwd + perm_b
    fb_bytes = (e * (2 * T * C + T * R + 2 * T * R + T * C + 3 * nnz + 2 * R)
                + 2 * meta_fwd + meta_bwd + 3 * perm_b)
    return {"nnz": float(nnz), "fwd_flops": 2.0 * T * nnz, "fwd_bytes": float(fwd_bytes),
            "fwdbwd_flops": 6.0 * T * nnz, "fwdbwd_bytes": float(fb_bytes)}


def compute_peak(case: Case, key: str, peaks: dict) -> float:
    """The FLOP/s ceiling of one implementation: tensor cores (the case dtype's measured mm rate) for block and for
    cuSPARSELt 2:4, the CUDA cores' FMA rate (measured as fp32 mm with TF32 off) for the N:M and diagonal kernels,
    which cannot use tensor cores and accumulate in fp32 whatever the input dtype."""
    simt = case.structure in ("nm", "diag") or (case.structure == "2:4" and key.startswith("padst"))
    return peaks["fp32"] if simt else peaks[case.dt]


def bound_ms(flops: float, nbytes: float, peak: float, bw: float) -> float:
    return 1e3 * max(flops / peak, nbytes / bw)


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


class Timer:
    """CUDA events on a GPU (L2 flushed before each call unless warm), perf_counter on the CPU (dry run)."""

    def __init__(self, device: torch.device, flush_l2: bool):
        self.cuda = device.type == "cuda"
        self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda and flush_l2 else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def flush(self):
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def once(self, fn) -> float:
        """One call's time in ms (synchronised)."""
        self.flush()
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    def group(self, fns: dict[str, Callable], warmup: int, reps: int, budget_ms: float) -> dict[str, dict]:
        """Round-robin timing of each callable: {key: {"ms": median, "times": [...], "reps": n} or {"error": ...}}.

        Each callable gets warm-up calls, then as many timed calls as fit its budget (at least 3, at most reps),
        interleaved with the others so that drift (clocks, temperature) hits all of them alike."""
        out, live = {}, {}
        for k, fn in fns.items():
            try:
                if warmup <= 0:  # dry run: one call each, just to exercise the code
                    live[k] = (fn, reps)
                    continue
                fn()  # first call: compilation, cuBLAS heuristics, allocator
                t = self.once(fn)
                n = max(min(3, reps), min(reps, int(budget_ms / max(t, 1e-3))))
                if t > 2000:
                    n = 1
                for _ in range(min(max(warmup - 2, 0), n)):
                    fn()
                live[k] = (fn, n)
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the others
                _raise_if_cuda_dead(e)
                out[k] = {"error": short_error(e)}
        self.sync()
        times: dict[str, list] = {k: [] for k in live}
        events = []
        for i in range(max((n for _, n in live.values()), default=0)):
            for k, (fn, n) in live.items():
                if i >= n or k in out:
                    continue
                try:
                    self.flush()
                    if self.cuda:
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        fn()
                        e.record()
                        events.append((k, s, e))
                    else:
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(1e3 * (time.perf_counter() - t0))
                except Exception as e:  # noqa: BLE001 - one variant failing must not stop the others
                    _raise_if_cuda_dead(e)
                    out[k] = {"error": short_error(e)}
        self.sync()
        for k, s, e in events:
            times[k].append(s.elapsed_time(e))
        for k, ts in times.items():
            if k not in out:
                out[k] = {"ms": statistics.median(ts), "reps": len(ts), "times": [round(t, 5) for t in ts]}
        return out


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


# ----------------------------------------------------------------------------------------------------------
# Roofline peaks
# ----------------------------------------------------------------------------------------------------------


def measure_peaks(device: torch.device, timer: Timer, quick: bool) -> dict[str, float]:
    """Copy bandwidth (bytes read + written / s) and torch.mm throughput per dtype (FLOP/s, TF32 off)."""
    res = {}
    nbytes = (256 if quick else 1024) << 20
    res["bandwidth_copy_ms"] = _time_copy(nbytes, device, timer)
    res["bandwidth"] = 2 * nbytes / (res["bandwidth_copy_ms"] * 1e-3)
    n = 4096 if quick else 8192
    for dt, dtype in DTYPES.items():
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            res[f"{dt}_mm_ms"] = _time_mm(n, dtype, device, timer, 10 if dt == "bf16" else 5)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        res[dt] = 2 * n**3 / (res[f"{dt}_mm_ms"] * 1e-3)
        res[f"{dt}_mm_n"] = n
    return res


def _time_copy(nbytes: int, device: torch.device, timer: Timer) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return timer.group({"copy": lambda: dst.copy_(src)}, 3, 10, 1e9)["copy"]["ms"]


def _time_mm(n: int, dtype: torch.dtype, device: torch.device, timer: Timer, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return timer.group({"mm": lambda: torch.mm(a, b)}, 3, reps, 1e9)["mm"]["ms"]


# ----------------------------------------------------------------------------------------------------------
# Building a case
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One timed implementation of a case. `check` (if any) compares it with the float64 reference."""

    key: str
    fwd: Callable
    fwdbwd: Callable | None = None
    check: Callable | None = None
    needs: tuple = ()  # padst ops that must have a kernel for the device
    unavailable: str | None = None
    cost: dict[str, float] | None = None  # byte / FLOP model (padst variants)


@dataclass
class Built:
    case: Case
    density: float
    variants: list[Variant] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # baseline -> why not run


def _balanced_block_mask(nbr, nbc, density, gen):
    k = max(1, round(density * nbc))
    idx = torch.rand(nbr, nbc, generator=gen).topk(k, dim=1).indices
    return torch.zeros(nbr, nbc, dtype=torch.bool).scatter_(1, idx, True)


def _nm_mask(R, C, n, m, gen):
    idx = torch.rand(R, C // m, m, generator=gen).topk(n, dim=-1).indices
    return torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(R, C)


def _block_weight(st, dense, case, gen, index_dtype):
    R, C = dense.shape
    bs = int(st[5:])
    return F.block_from_dense(dense, _balanced_block_mask(R // bs, C // bs, 1 - case.sparsity, gen), (bs, bs))


def _diag_weight(st, dense, case, gen, index_dtype):
    R, C = dense.shape
    K = math.ceil((1 - case.sparsity) * R * C / min(R, C))
    return F.diag_from_dense(dense, torch.randperm(max(R, C), generator=gen)[:K].sort().values)


def _nm_weight(st, dense, case, gen, index_dtype):
    R, C = dense.shape
    return F.nm_from_dense(dense, _nm_mask(R, C, case.n, case.m, gen), case.n, case.m, index_dtype=index_dtype)


# the case's logical weight object per structure (2:4 is N:M here; its cuSPARSELt variants wrap the same weight)
WEIGHTS = {"block": _block_weight, "diag": _diag_weight, "nm": _nm_weight, "2:4": _nm_weight}


def _to(obj, device, dtype):
    """A weight object with its float tensors in dtype and all tensors on device."""
    return obj.to(device=device, dtype=dtype)


def _close(out: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype) -> dict:
    out64, lowp64 = out.double(), lowp.double()
    scale = max(1.0, ref64.abs().max().item())
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    torch_err = (lowp64 - ref64).abs().max().item() if out.numel() else 0.0
    tol = max(2 * torch_err + 8 * torch.finfo(torch.float32).eps * scale, RTOL[dtype] * scale)
    ok = bool(torch.isfinite(out64).all()) and err <= tol
    return {"ok": ok, "err": err, "tol": tol, "torch_err": torch_err, "scale": scale}


def _check_linear(apply, x, values, bias, dy, S_of, mask, in_perm, out_perm, dtype, grad: bool) -> dict:
    """Compares apply(x, values, bias) with reference.linear on the dense S = S_of(values): the forward
    ({"fwd": ...}), or with grad=True the gradients ({"dx", "dw", "db"}; dw masked to the pattern)."""
    S = S_of(values)

    def ref(dt):
        xr = x.detach().to(dt).requires_grad_(grad)
        Sr = S.detach().to(dt).requires_grad_(grad)
        br = bias.detach().to(dt).requires_grad_(grad)
        out = reference.linear(xr, Sr, br, in_perm, out_perm)
        return torch.autograd.grad(out, (xr, Sr, br), dy.to(dt)) if grad else out.detach()

    if not grad:
        with torch.no_grad():
            y = apply(x, values, bias)
        return {"fwd": _close(y, ref(torch.float64), ref(dtype), dtype)}
    xg, vg, bg = x.detach().requires_grad_(), values.detach().requires_grad_(), bias.detach().requires_grad_()
    got = torch.autograd.grad(apply(xg, vg, bg), (xg, vg, bg), dy)
    g64, glo = ref(torch.float64), ref(dtype)
    return {"dx": _close(got[0], g64[0], glo[0], dtype),
            "dw": _close(S_of(got[1]), g64[1] * mask.to(torch.float64), glo[1] * mask.to(dtype), dtype),
            "db": _close(got[2], g64[2], glo[2], dtype)}


def _check_plain(fwd_out, x, S, in_perm, out_perm, bias, dtype) -> dict:
    """Forward check of a baseline whose output fwd_out() is y [T, R]."""
    with torch.no_grad():
        y = fwd_out()
        y64 = reference.linear(x.double(), S.double(), bias.double() if bias is not None else None, in_perm, out_perm)
        ylo = reference.linear(x, S.to(x.dtype), bias, in_perm, out_perm)
    return {"fwd": _close(y, y64, ylo, dtype)}


def _semi_structured_module():
    try:
        from padst_ext import semi_structured

        if not semi_structured.is_available():
            return None, "padst_ext.semi_structured.is_available() is False"
        semi_structured.lt24_linear  # noqa: B018 - probe the entry point
        return semi_structured, None
    except (ImportError, AttributeError) as e:
        return None, f"n/a ({short_error(e)})"


def _with_env(env: dict[str, str] | None, fn: Callable) -> Callable:
    """fn with the environment variables of `env` set during each call (None: fn itself). padst reads its kernel
    switches (PADST_BLOCK_V2, PADST_LT24_V2) at every call, so variants of one run can differ."""
    if not env:
        return fn

    def run(*args):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return run


def build_case(case: Case, device: torch.device, T: int, scale_div: int, index_dtype: torch.dtype,
               do_check: bool) -> Built:
    """Inputs and variants of one case; scale_div > 1 shrinks C and R (dry run). The byte / FLOP model attached to
    the padst variants is always the case's full size."""
    C, R = case.C // scale_div, case.R // scale_div
    dtype = case.dtype
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(f"{case.layer}{case.structure}{case.sparsity}{case.n}"))
    gen = torch.Generator().manual_seed(seed % 2**31)
    is_cuda = device.type == "cuda"
    costs = structure_cost(case, 4 if index_dtype == torch.int32 else 8)
    dense = torch.randn(R, C, generator=gen) / math.sqrt(max(1.0, (1 - case.sparsity) * C))
    in_perm, out_perm = torch.randperm(C, generator=gen).to(device), torch.randperm(R, generator=gen).to(device)
    bias = (0.1 * torch.randn(R, generator=gen)).to(device=device, dtype=dtype)
    dgen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T, C, generator=dgen, device=device, dtype=dtype)
    dy = torch.randn(T, R, generator=dgen, device=device, dtype=dtype)
    xT = x.T.contiguous()  # torch's sparse @ dense baselines compute y^T = S x^T; layout prepared outside the timing
    st = case.structure
    variants: list[Variant] = []
    skipped: dict[str, str] = {}

    def padst_variant(key, apply, values, S_of, mask, ip, op, needs=(), env=None):
        """env: environment variables set during this variant's calls (kernel switches), None = the defaults."""
        xr = x.detach().requires_grad_()
        vr = values.detach().requires_grad_()
        br = bias.detach().requires_grad_()
        fwd = _with_env(env, lambda: apply(x, values, bias))
        fwdbwd = _with_env(env, lambda: torch.autograd.grad(apply(xr, vr, br), (xr, vr, br), dy))
        v = Variant(key, fwd=fwd, fwdbwd=fwdbwd, needs=needs, cost=costs.get(key))
        if do_check:
            v.check = _with_env(env, lambda grad: _check_linear(apply, x, values, bias, dy, S_of, mask, ip, op, dtype,
                                                                grad))
        return v

    def plain_variant(key, fwd, out_of, S, ip=None, op=None, with_bias=False):
        """A forward-only baseline; out_of() gives its output as y [T, R] for the check."""
        chk = None
        if do_check:
            def chk(grad):
                return _check_plain(out_of, x, S, ip, op, bias if with_bias else None, dtype)
        return Variant(key, fwd=fwd, check=chk)

    # the case's logical (unpermuted) weight object; the permuted layer is the same object with the permutations
    # (N:M folds its input permutation into col_idx, block and diagonal carry both)
    w = _to(WEIGHTS["block" if st.startswith("block") else st](st, dense, case, gen, index_dtype), device, dtype)
    w_perm = w.with_perm(in_perm, out_perm if w.supports_output_perm else None)
    density = w.density
    # block: padst_* is the block_tc kernel, padst_v2_* the v2 kernels where they serve (the x-stationary one for
    # fc1's forward and fc2's dx, the row-complete one for fc2's forward and fc1's dx), block_tc elsewhere; N:M and
    # diagonal: padst_* the gather kernel, padst_v2_* the v2 row kernel (rows_v2.h) where it serves
    switch = "PADST_BLOCK_V2" if isinstance(w, F.BlockSparse) else "PADST_ROWS_V2"
    for key, wv, env in (("padst_perm", w_perm, "0"), ("padst_ident", w, "0"), ("padst_v2_perm", w_perm, "1"),
                         ("padst_v2_ident", w, "1")):
        def apply(xx, v, b, wv=wv):
            return wv.mm(xx, b, values=v)

        variants.append(padst_variant(key, apply, wv.values, wv.to_dense, wv.mask(), getattr(wv, "in_perm", None),
                                      getattr(wv, "out_perm", None), wv.op_names, {switch: env}))
    S_id = w.to_dense()  # logical frame: the permuted layer computes (x[:, in_perm] @ S_id.T)[:, out_perm]
    S_ref, ip_ref, op_ref = S_id, in_perm, (out_perm if w.supports_output_perm else None)
    # the layer's effective dense weight: x @ W.T == (x[:, in_perm] @ S.T)[:, out_perm] (exact: a permutation)
    dense_eff = reference.linear(torch.eye(C, device=device, dtype=dtype), S_id, None, in_perm, op_ref).T
    if isinstance(w, F.BlockSparse):
        try:
            bsr = S_id.to_sparse_bsr(w.block_size)
            variants.append(plain_variant("torch_bsr", lambda: bsr @ xT, lambda: (bsr @ xT).T, S_id))
        except Exception as ex:  # noqa: BLE001 - a conversion torch lacks: the baseline is skipped
            skipped["torch_bsr"] = short_error(ex)
        if not is_cuda:
            skipped["triton_bsr"] = "needs CUDA"
        elif dtype == torch.float32:
            # each (dtype, block, shape) is a Triton compile of seconds; fp32 has cuSPARSE's BSR (torch_bsr)
            skipped["triton_bsr"] = "bf16 only (fp32: cuSPARSE BSR)"
        elif "torch_bsr" not in skipped:
            try:
                from torch.sparse._triton_ops import bsr_dense_mm

                variants.append(plain_variant("triton_bsr", lambda: bsr_dense_mm(bsr, xT),
                                              lambda: bsr_dense_mm(bsr, xT).T, S_id))
            except Exception as ex:  # noqa: BLE001 - triton missing or the private API moved
                skipped["triton_bsr"] = short_error(ex)
    if st == "2:4":
        ss, why = _semi_structured_module()
        if ss is None:
            skipped["lt24"] = why
        else:
            # lt24_*: bias pre-filled into y (beta = 1), cuSPARSELt's default algorithm, index_select;
            # lt24v2_*: the bias epilogue, the algorithm search and the row-permute kernel (PADST_LT24_V2=1)
            w24 = F.Semi24Sparse(w.values, w.col_idx, w.n, w.m, w.shape)
            for key, ip, epi in (("lt24_perm", in_perm, "0"), ("lt24_ident", None, "0"),
                                 ("lt24v2_perm", in_perm, "1"), ("lt24v2_ident", None, "1")):
                def lt_apply(xx, v, b, wv=w24.with_perm(ip)):
                    return wv.mm(xx, b, values=v)

                variants.append(padst_variant(key, lt_apply, w24.values, w24.to_dense, w24.mask(), ip, None,
                                              env={"PADST_LT24_V2": epi}))
        if not is_cuda:
            skipped["torch_24"] = "needs CUDA"
        else:
            try:
                from torch.sparse import to_sparse_semi_structured

                W24 = to_sparse_semi_structured(S_id)
                variants.append(plain_variant("torch_24", lambda: Fn.linear(x, W24, bias),
                                              lambda: Fn.linear(x, W24, bias), S_id, with_bias=True))
                skipped["torch_24_backend"] = type(W24).__name__  # informational
            except Exception as ex:  # noqa: BLE001 - a backend torch lacks: the baseline is skipped
                skipped["torch_24"] = short_error(ex)
            try:
                from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

                W24lt = SparseSemiStructuredTensorCUSPARSELT.from_dense(S_id)
                variants.append(plain_variant("torch_24_cusparselt", lambda: Fn.linear(x, W24lt, bias),
                                              lambda: Fn.linear(x, W24lt, bias), S_id, with_bias=True))
            except Exception as ex:  # noqa: BLE001 - a backend torch lacks: the baseline is skipped
                skipped["torch_24_cusparselt"] = short_error(ex)

    # cuSPARSE CSR for every structure (the only torch sparse baseline for N:M and diagonal)
    try:
        csr = S_id.to_sparse_csr()
        variants.append(plain_variant("torch_csr", lambda: csr @ xT, lambda: (csr @ xT).T, S_id))
    except Exception as ex:  # noqa: BLE001 - a conversion torch lacks: the baseline is skipped
        skipped["torch_csr"] = short_error(ex)

    # cuBLAS dense on the effective weight; its check confirms that weight (and the permutation convention)
    Wd = dense_eff.contiguous()
    Wr, xr, br = Wd.detach().requires_grad_(), x.detach().requires_grad_(), bias.detach().requires_grad_()
    dense_v = plain_variant("dense", lambda: Fn.linear(x, Wd, bias), lambda: Fn.linear(x, Wd, bias), S_ref, ip_ref,
                            op_ref, with_bias=True)
    dense_v.fwdbwd = lambda: torch.autograd.grad(Fn.linear(xr, Wr, br), (xr, Wr, br), dy)
    variants.insert(0, dense_v)

    key = "CUDA" if is_cuda else "CPU"
    for v in variants:
        missing = [op for op in v.needs if not torch._C._dispatch_has_kernel_for_dispatch_key(f"padst::{op}", key)]
        if missing:
            v.unavailable = "no kernel: " + ", ".join(f"padst::{op}" for op in missing)
            if missing[0] == v.needs[0]:
                v.fwd = None  # no forward kernel: nothing to time
            v.fwdbwd = None
    return Built(case, density, variants, skipped)


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


def is_padst(key: str) -> bool:
    return key.startswith(("padst", "lt24"))


class _CudaDead(Exception):
    """The CUDA context is unusable (a kernel faulted): nothing after this can be measured in this process."""


def _raise_if_cuda_dead(ex: BaseException) -> None:
    msg = str(ex)
    if any(k in msg for k in ("illegal memory access", "device-side assert", "unspecified launch failure",
                              "illegal instruction", "misaligned address", "CUDA error: an illegal")):
        raise _CudaDead(short_error(ex)) from ex


_NOTED: set = set()


def _check_variant(case: Case, v: Variant, info: dict) -> None:
    """Runs v's forward check, then its gradient check; records the results in info and drops what cannot run."""
    for grad in (False, True):
        if grad and v.fwdbwd is None:
            continue
        try:
            chk = v.check(grad)
        except Exception as ex:  # noqa: BLE001 - one variant failing must not stop the run
            _raise_if_cuda_dead(ex)
            err = short_error(ex)
            if not grad:
                info["fwd_error"] = err
                v.fwd = v.fwdbwd = None
            else:
                info["bwd_error"] = err
                v.fwdbwd = None
            no_autograd = "does not require grad" in err or "does not have a grad_fn" in err
            if is_padst(v.key) and not (grad and no_autograd):
                info["check_error"] = err
                print(f"!!! CHECK FAILED {case.name} {v.key} ({'backward' if grad else 'forward'}): {err}",
                      file=sys.stderr, flush=True)
            elif (v.key, grad, err) not in _NOTED:  # a baseline this platform lacks: say so once
                _NOTED.add((v.key, grad, err))
                print(f"note: {v.key}{' fwd+bwd' if grad else ''} not run ({case.name}, and wherever the same error "
                      f"recurs): {err}", file=sys.stderr, flush=True)
            if not grad:
                return
            continue
        info.setdefault("check", {}).update(chk)
        bad = [k for k, r in chk.items() if not r["ok"]]
        if bad:
            print(f"!!! MISMATCH {case.name} {v.key}: " + ", ".join(
                f"{k} err {chk[k]['err']:.3e} > tol {chk[k]['tol']:.3e}" for k in bad), file=sys.stderr, flush=True)


def run_case(case: Case, device: torch.device, timer: Timer, args, peaks: dict) -> dict:
    T = case.tokens if not args.dry_run else args.dry_tokens
    warmup, reps = REPS[case.tokens]
    if args.quick:
        warmup, reps = 3, 10
    if args.dry_run:
        warmup, reps = 0, 1
    b = build_case(case, device, T, DRY_SCALE if args.dry_run else 1, getattr(torch, args.index_dtype),
                   not args.no_check)
    row = dict(name=case.name, layer=case.layer, tokens=case.tokens, T_run=T, dtype=case.dt, C=case.C, R=case.R,
               structure=case.structure, n=case.n, m=case.m, sparsity=case.sparsity,
               density=round(full_density(case), 4), density_built=round(b.density, 4), skipped=b.skipped,
               variants={})
    for v in b.variants:
        info = {}
        if v.unavailable:
            info["unavailable"] = v.unavailable
        if v.cost:
            info["cost"] = v.cost
            peak = compute_peak(case, v.key, peaks)
            info["compute_peak"] = peak
            info["bound_fwd_ms"] = bound_ms(v.cost["fwd_flops"], v.cost["fwd_bytes"], peak, peaks["bandwidth"])
            info["bound_fwdbwd_ms"] = bound_ms(v.cost["fwdbwd_flops"], v.cost["fwdbwd_bytes"], peak,
                                               peaks["bandwidth"])
        if v.check is not None and v.fwd is not None:
            _check_variant(case, v, info)
        row["variants"][v.key] = info
    budget = args.variant_budget_ms
    fwd = {v.key: v.fwd for v in b.variants if v.fwd is not None}
    for k, r in timer.group(fwd, warmup, reps, budget).items():
        row["variants"][k]["fwd"] = r
    fb = {v.key: v.fwdbwd for v in b.variants if v.fwdbwd is not None}
    for k, r in timer.group(fb, warmup, reps, budget).items():
        row["variants"][k]["fwdbwd"] = r
    del b
    return row


def ms(row, key, what="fwd") -> float | None:
    return row["variants"].get(key, {}).get(what, {}).get("ms")


def check_code(info: dict) -> str:
    if "check_error" in info:
        return "err"
    chk = info.get("check")
    if chk is None:
        return "-"
    bad = [k for k, r in chk.items() if not r["ok"]]
    if not bad:
        return "ok"
    fwd_bad = "fwd" in bad
    bwd_bad = any(k != "fwd" for k in bad)
    return "F+B!" if fwd_bad and bwd_bad else ("FWD!" if fwd_bad else "BWD!")


def impl_rows(row) -> list[tuple]:
    """(label suffix, perm key, ident key) of the padst implementations of a case."""
    out = [("", "padst_perm", "padst_ident")]
    if row["structure"] == "2:4":
        out = [(" nm", "padst_perm", "padst_ident")]
    if "padst_v2_perm" in row["variants"]:
        out.append((" v2", "padst_v2_perm", "padst_v2_ident"))
    if row["structure"] == "2:4":
        if "lt24_perm" in row["variants"]:
            out.append((" lt", "lt24_perm", "lt24_ident"))
        if "lt24v2_perm" in row["variants"]:
            out.append((" lt v2", "lt24v2_perm", "lt24v2_ident"))
    return out


def best(row, keys) -> float | None:
    ts = [t for t in (ms(row, k) for k in keys) if t]
    return min(ts) if ts else None


def fmt(v, spec=".2f", none="-"):
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _ratio(a, b):
    return a / b if a and b else None


def fms(v) -> str:
    """A time in ms with three significant digits (the compact table has to fit in the tail of a log)."""
    return "-" if v is None else f"{v:.3g}"


def compact_table(rows: list[dict], cases_not_run: list[Case]) -> list[str]:
    lines = ["|case|dens|fwd ms|roof|x dense|x BSR|x 2:4|p/id|f+b ms|roof|x dense|check|",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, dfb = ms(r, "dense"), ms(r, "dense", "fwdbwd")
        bsr = best(r, ["torch_bsr", "triton_bsr"])
        t24 = best(r, ["torch_24", "torch_24_cusparselt"])
        for suffix, kp, ki in impl_rows(r):
            info = r["variants"].get(kp, {})
            t, tfb, ti = ms(r, kp), ms(r, kp, "fwdbwd"), ms(r, ki)
            roof = _ratio(info.get("bound_fwd_ms"), t)
            rooffb = _ratio(info.get("bound_fwdbwd_ms"), tfb)
            chk = check_code(info)
            chk_i = check_code(r["variants"].get(ki, {}))
            if chk_i not in ("ok", "-") and chk == "ok":
                chk = "id:" + chk_i
            if t is None:
                why = info.get("unavailable") or info.get("fwd", {}).get("error", "not run")
                chk = chk if chk != "-" else ("n/a" if "no kernel" in why else "err")
            lines.append(f"|{_label(r)}{suffix}|{r['density']:.3f}|{fms(t)}|{fmt(roof)}|{fmt(_ratio(d, t))}|"
                         f"{fmt(_ratio(bsr, t))}|{fmt(_ratio(t24, t))}|{fmt(_ratio(t, ti))}|{fms(tfb)}|"
                         f"{fmt(rooffb)}|{fmt(_ratio(dfb, tfb))}|{chk}|")
        if r["structure"] == "2:4" and t24:
            chk = "/".join(check_code(r["variants"][k]) for k in ("torch_24", "torch_24_cusparselt")
                           if k in r["variants"])
            lines.append(f"|{_label(r)} torch|0.500|{fms(t24)}|-|{fmt(_ratio(d, t24))}|-|1.00|-|-|-|-|{chk}|")
    for c in cases_not_run:
        lines.append(f"|{c.label}|-|not run|||||||||")
    return lines


def _label(r) -> str:
    return Case(r["layer"], r["tokens"], r["dtype"], r["structure"], r["sparsity"], r["n"], r["m"]).label


def detailed_table(rows: list[dict]) -> list[str]:
    """Every variant's median ms (errors as [n] with the messages listed below the table)."""
    cols = ["dense", "padst_perm", "padst_ident", "padst_v2_perm", "padst_v2_ident", "lt24_perm", "lt24_ident",
            "lt24v2_perm", "lt24v2_ident", "torch_bsr", "triton_bsr", "torch_csr", "torch_24", "torch_24_cusparselt"]
    notes: dict[str, int] = {}

    def note(msg: str) -> str:
        return f"[{notes.setdefault(msg, len(notes) + 1)}]"

    lines = ["| case | density | " + " | ".join(f"{c} ms" for c in cols)
             + " | bound fwd ms | dense f+b ms | padst perm f+b ms | padst ident f+b ms | v2 perm f+b ms | "
             "v2 ident f+b ms | bound f+b ms | check |",
             "|---" * (len(cols) + 10) + "|"]
    for r in rows:
        v = r["variants"]
        cells = []
        for c in cols:
            if c not in v:
                cells.append(note(r["skipped"][c]) if c in r.get("skipped", {}) else "-")
            elif ms(r, c) is not None:
                cells.append(f"{ms(r, c):.4f}")
            else:
                i = v[c]
                cells.append(note(i.get("unavailable") or i.get("fwd_error") or i.get("fwd", {}).get("error", "?")))
        p = v.get("padst_perm", {})
        checks = ", ".join(f"{k}:{check_code(i)}" for k, i in v.items() if is_padst(k))
        if "error" in r:
            checks = note(r["error"])
        lines.append(f"| {r['name']} | {r['density']:.4f} | " + " | ".join(cells)
                     + f" | {fmt(p.get('bound_fwd_ms'), '.4f')} | {fmt(ms(r, 'dense', 'fwdbwd'), '.4f')} | "
                     f"{fmt(ms(r, 'padst_perm', 'fwdbwd'), '.4f')} | {fmt(ms(r, 'padst_ident', 'fwdbwd'), '.4f')} | "
                     f"{fmt(ms(r, 'padst_v2_perm', 'fwdbwd'), '.4f')} | "
                     f"{fmt(ms(r, 'padst_v2_ident', 'fwdbwd'), '.4f')} | "
                     f"{fmt(p.get('bound_fwdbwd_ms'), '.4f')} | {checks} |")
    lines.append("")
    lines += [f"[{i}] {msg}" for msg, i in notes.items()]
    return lines


def device_meta(device: torch.device) -> dict:
    meta = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        import padst_ext

        meta["padst_build"] = padst_ext._extension.build_info()
    except Exception as e:  # noqa: BLE001 - metadata only
        meta["padst_build"] = short_error(e)
    if device.type != "cuda":
        meta["device"] = "cpu (dry run)"
        return meta
    p = torch.cuda.get_device_properties(device)
    meta["device"] = p.name
    props = {}
    for a in ("major", "minor", "total_memory", "multi_processor_count", "L2_cache_size", "clock_rate",
              "memory_clock_rate", "memory_bus_width", "max_threads_per_multi_processor", "uuid"):
        if hasattr(p, a):
            props[a] = str(getattr(p, a)) if a == "uuid" else getattr(p, a)
    meta["properties"] = props
    try:
        q = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,driver_version"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True,
                             check=False, timeout=15)
        meta["nvidia_smi"] = out.stdout.strip()
    except Exception as e:  # noqa: BLE001 - metadata only
        meta["nvidia_smi"] = short_error(e)
    return meta


def print_model(cases: list[Case], idx_nm: int, peaks) -> None:
    """The case list with the padst permuted variant's byte / FLOP model and roofline bound (full size)."""
    print(f"{'case':<30} {'density':>7} {'fwd GFLOP':>9} {'fwd MB':>8} {'bound ms':>9} {'f+b GFLOP':>9} "
          f"{'f+b MB':>8} {'bound ms':>9}")
    for c in cases:
        cost = structure_cost(c, idx_nm)["padst_perm"]
        bw, pk = peaks["bandwidth"], compute_peak(c, "padst_perm", peaks)
        print(f"{c.name:<30} {full_density(c):>7.4f} {cost['fwd_flops'] / 1e9:>9.2f} {cost['fwd_bytes'] / 1e6:>8.1f} "
              f"{bound_ms(cost['fwd_flops'], cost['fwd_bytes'], pk, bw):>9.4f} {cost['fwdbwd_flops'] / 1e9:>9.2f} "
              f"{cost['fwdbwd_bytes'] / 1e6:>8.1f} "
              f"{bound_ms(cost['fwdbwd_flops'], cost['fwdbwd_bytes'], pk, bw):>9.4f}")


class _Stop(Exception):
    pass


def _on_term(signum, frame):  # timeout(1) sends SIGTERM: stop, but still write the JSON and print the table
    raise _Stop(f"signal {signum}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few T=4096 bf16 cases, few reps")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/gpu_ops.json; the dry run writes only if given)")
    p.add_argument("--cases", default=None, help="comma-separated substrings; a case runs if its name holds all")
    p.add_argument("--dry-run", action="store_true", help="no GPU: build and check every case on the CPU at 1/8 width")
    p.add_argument("--dry-tokens", type=int, default=8, help="tokens per case in the dry run")
    p.add_argument("--budget", type=float, default=230.0, help="seconds; no new case starts after this")
    p.add_argument("--variant-budget-ms", type=float, default=300.0, help="timed ms per variant (>= 3 calls)")
    p.add_argument("--warm-l2", action="store_true", help="do not flush the L2 cache before each call")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--index-dtype", choices=["int32", "int64"], default="int32", help="N:M col_idx dtype")
    p.add_argument("--list", action="store_true", help="print the selected case names and exit")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*(beta|prototype).*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.sparse")
    t_start = time.monotonic()

    cases = select(quick_cases() if args.quick else all_cases(), args.cases)
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        print(f"no case matches --cases {args.cases!r}", file=sys.stderr)
        return 2
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny tensors: a thread pool only adds overhead (and contention on a busy machine)
    elif not torch.cuda.is_available():
        print("no CUDA device (use --dry-run to check the cases on the CPU)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    out = args.out if args.out is not None else (None if args.dry_run else HERE / "results" / "gpu_ops.json")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (torch's default, made explicit)
    index_dtype = getattr(torch, args.index_dtype)

    timer = Timer(device, flush_l2=not args.warm_l2)
    meta = device_meta(device)
    if args.dry_run:
        peaks = dict(NOMINAL_PEAKS, source="nominal H100 SXM (dry run, not measured)")
        print(f"dry run: {len(cases)} cases; each shape built at 1/{DRY_SCALE} width with {args.dry_tokens} tokens on "
              f"the CPU and checked; byte/FLOP model at full size, bound at {peaks['source']}")
        print_model(cases, 4 if index_dtype == torch.int32 else 8, peaks)
        # the token count is the only difference between T=4096 and T=50176 cases: build each shape once
        seen, unique = set(), []
        for c in cases:
            k = (c.layer, c.dt, c.structure, c.sparsity, c.n, c.m)
            if k not in seen:
                seen.add(k)
                unique.append(c)
        cases = unique
    else:
        print(f"measuring roofline peaks on {meta['device']} ...", file=sys.stderr, flush=True)
        peaks = dict(measure_peaks(device, timer, args.quick), source="measured")
        print(f"peaks: bandwidth {peaks['bandwidth'] / 1e12:.2f} TB/s, bf16 mm {peaks['bf16'] / 1e12:.0f} TFLOP/s, "
              f"fp32 mm (no TF32) {peaks['fp32'] / 1e12:.1f} TFLOP/s", file=sys.stderr, flush=True)
    meta.update(peaks=peaks, index_dtype=args.index_dtype, flush_l2=not args.warm_l2, quick=args.quick,
                dry_run=args.dry_run, variant_budget_ms=args.variant_budget_ms, nm_patterns=str(NM_PATTERNS))

    rows: list[dict] = []
    not_run: list[Case] = []
    stopped = None
    old = signal.signal(signal.SIGTERM, _on_term)

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(dict(meta=meta, rows=rows, stopped=stopped,
                                           not_run=[c.name for c in not_run]), indent=1))
            tmp.replace(out)

    try:
        for i, c in enumerate(cases):
            if time.monotonic() - t_start > args.budget:
                not_run = cases[i:]
                stopped = f"time budget {args.budget:.0f} s reached"
                print(f"--budget reached: {len(not_run)} cases not run", file=sys.stderr, flush=True)
                break
            t0 = time.monotonic()
            try:
                row = run_case(c, device, timer, args, peaks)
            except (_CudaDead, _Stop, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - out of memory, a bug in one case: record it, go on
                _raise_if_cuda_dead(e)
                print(f"!!! case {c.name} failed: {short_error(e)}", file=sys.stderr, flush=True)
                row = dict(name=c.name, layer=c.layer, tokens=c.tokens, dtype=c.dt, structure=c.structure, n=c.n,
                           m=c.m, sparsity=c.sparsity, density=full_density(c), variants={}, error=short_error(e))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            d, t = ms(row, "dense"), ms(row, "padst_perm")
            chk = check_code(row["variants"].get("padst_perm", {}))
            print(f"[{i + 1}/{len(cases)}] {c.name}: dense {fmt(d, '.4f')} ms, padst perm {fmt(t, '.4f')} ms "
                  f"(x dense {fmt(_ratio(d, t))}), check {chk}, {time.monotonic() - t0:.1f} s", file=sys.stderr,
                  flush=True)
            save()
    except _CudaDead as e:
        stopped = f"CUDA context lost in {cases[len(rows)].name}: {e}"
        not_run = cases[len(rows):]
        print(f"!!! {stopped}", file=sys.stderr, flush=True)
    except (_Stop, KeyboardInterrupt) as e:
        stopped = f"interrupted ({e})"
        not_run = cases[len(rows):]
        print(f"stopped: {stopped}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    save()

    table = compact_table(rows, not_run)
    n_chk = [check_code(v) for r in rows for k, v in r["variants"].items() if is_padst(k)]
    n_bad = sum(c.endswith("!") or c == "err" for c in n_chk)
    if out is not None:
        md = out.with_suffix(".md")
        md.write_text("\n".join([f"# padst_ext CUDA ops on {meta['device']}", "", *detailed_table(rows), "",
                                 "## compact", "", *table, ""]))
        print(f"wrote {out} and {md}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    pk = (f"bandwidth {peaks['bandwidth'] / 1e12:.2f} TB/s, bf16 {peaks['bf16'] / 1e12:.0f} TFLOP/s, "
          f"fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s ({peaks['source']})")
    print(f"padst_ext CUDA ops on {meta['device']}, torch {torch.__version__}; roofline: {pk}; "
          f"{time.monotonic() - t_start:.0f} s" + (f"; {stopped}" if stopped else ""))
    print("fwd ms: padst permuted forward, median; roof: roofline bound / time; x dense, x BSR, x 2:4: baseline time "
          "/ padst time (> 1: padst faster; torch's best BSR / 2:4); p/id: permuted / identity time; f+b: forward + "
          "backward. check vs float64: ok, FWD!/BWD!/F+B! MISMATCH, err raised, n/a no kernel. 4k/50k = 4096/50176 "
          "tokens; nm 1:6 = 83%, 1:12 and 2:24 = 92%, 1:24 = 96%.")
    print(f"correctness of the padst variants: {sum(c == 'ok' for c in n_chk)} ok, {n_bad} MISMATCH or error"
          + ("  <<<<<<<<<< MISMATCH" if n_bad else ""))
    print("\n".join(table), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
