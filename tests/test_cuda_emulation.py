"""The CUDA path, run on the host: every op of the `padst_emu` library is the CUDA implementation (validation,
metadata upload, the kernels' CTA bodies with their index and tile logic) executed by the kernel emulation in
csrc/emu/emulate.h, thread by thread and phase by phase over the real launch grid. Compared with the plain-PyTorch
reference over the same shapes, permutations and dtypes as the CPU kernels, so the BSR traversal with the
permutation, the N:M index folding and its transpose, the diagonal addressing, the batch tiles and splits are
tested on machines without a GPU. Only the launch itself (and __syncthreads) is left to the GPU tests."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from padst_ext import _extension
from padst_ext import formats as F
from padst_ext import reference as ref

from cases import DTYPES, assert_close_to_reference, make_case
from test_ops import _cases, _f64, _make, dw, dx, fwd

_extension.load_emulation()  # the padst_emu library (padst_ext._emu): not loaded by `import padst_ext`
emu = types.SimpleNamespace(**{name: getattr(torch.ops.padst_emu, name) for name in (
    "block_mm", "block_mm_t", "block_sddmm", "nm_mm", "nm_mm_t", "nm_sddmm", "diag_mm", "diag_mm_t", "diag_sddmm")})


def _check_all(case, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(case.B, case.R, generator=gen, dtype=torch.float64).to(dtype)
    v, x, b = case.weight.values, case.x, case.bias
    assert_close_to_reference(fwd(case, x, v, b, emu), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward")
    assert_close_to_reference(dx(case, dy, v, emu), dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref), "dx")
    assert_close_to_reference(dw(case, dy, x, emu), dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref), "dW")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,perm", list(_cases()))
def test_emulated_kernels_match_reference(shape, perm, dtype):
    _check_all(_make(shape, perm, dtype, "cpu"), dtype)


# Shapes aimed at the tile logic: several row tiles (128 rows per CTA), batch remainders past the 8/16-row batch
# tiles and the 64-row tiles of the tensor-core block kernels (bf16 with block sides 16/32/64 on either side),
# several batch splits in the sampled kernel, and inputs too wide for shared memory (the direct-load path:
# more than 96 KB for one batch tile, e.g. 3200 columns x 8 rows x 4 bytes).
TILE_SHAPES = [
    ("block", 137, 64, 272, dict(block=(16, 16), sparsity=0.5)),
    ("block", 70, 128, 128, dict(block=(32, 64), sparsity=0.5)),
    ("block", 67, 128, 128, dict(block=(64, 16), sparsity=0.75)),
    ("block", 600, 32, 48, dict(block=(16, 16), sparsity=0.5)),  # batch splits of the tensor-core dW kernel
    ("nm", 19, 3200, 24, dict(nm=(1, 20))),
    ("nm", 33, 40, 300, dict(nm=(2, 5))),
    ("block", 9, 3200, 32, dict(block=(32, 32), sparsity=0.9)),
    ("diag", 21, 3200, 16, dict(sparsity=0.5)),
    ("diag", 3, 16, 3200, dict(sparsity=0.5)),
    ("diag", 130, 140, 260, dict(sparsity=0.9)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-C{s[2]}-R{s[3]}")
def test_emulated_tiles(shape, dtype):
    perm = "in" if shape[0] == "nm" else "both"
    _check_all(_make(shape, perm, dtype, "cpu"), dtype)


def test_emulated_batch_splits_are_deterministic():
    """The sampled kernel splits the batch and sums the partials in a fixed order: bit-identical reruns."""
    case = make_case("nm", 200, 64, 16, nm=(1, 4), perm="in")
    dy = torch.randn(200, 16)
    a = emu.nm_sddmm(dy, case.x, case.weight.col_idx, 1, 4)
    b = emu.nm_sddmm(dy, case.x, case.weight.col_idx, 1, 4)
    assert torch.equal(a, b)


def test_emulated_nm_transpose_by_hand():
    """dx of N:M goes through a stable transpose of col_idx; a repeated and a missing column included."""
    col_idx = torch.tensor([[3, 0], [3, 1], [0, 3]])  # column 2 unused, column 3 in every row
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dy = torch.tensor([[1.0, 10.0, 100.0]])
    got = emu.nm_mm_t(dy, values, col_idx, 2, 4)
    expect = torch.tensor([[2.0 + 500.0, 40.0, 0.0, 1.0 + 30.0 + 600.0]])
    torch.testing.assert_close(got, expect)


def test_emulated_empty_and_bias_only():
    case = make_case("block", 4, 32, 32, perm="both")
    w = case.weight
    assert emu.block_mm(case.x[:0], w.values, *w.meta(), case.bias, case.in_perm, case.out_perm).shape == (0, 32)
    empty = F.block_from_dense(torch.randn(32, 32), torch.zeros(2, 2, dtype=torch.bool), (16, 16))
    y = emu.block_mm(case.x, empty.values, *empty.meta(), case.bias, case.in_perm, case.out_perm)
    torch.testing.assert_close(y, case.bias.expand(4, 32))
    dv = emu.block_sddmm(torch.zeros(0, 32), case.x[:0], w.row_ptr, w.col_idx, 16, 16, case.in_perm, case.out_perm)
    assert torch.equal(dv, torch.zeros_like(w.values))


def test_emulated_ops_validate_like_the_cpu_kernels():
    case = make_case("diag", 4, 32, 16, perm="both")
    bad = case.in_perm.clone()
    bad[0] = bad[1]
    with pytest.raises(ValueError, match="in_perm is not a permutation"):
        emu.diag_mm(case.x, case.weight.values, case.weight.offsets, 16, case.bias, bad, case.out_perm)
    c = make_case("nm", 4, 40, 8, nm=(1, 4), perm="none")
    with pytest.raises(ValueError, match="col_idx holds values"):
        emu.nm_mm(c.x, c.weight.values, c.weight.col_idx + 40, 1, 4)


# --- the validated-metadata cache of the GPU path (csrc/meta_cache.h) --------------------------------------


def _cache_info():
    hits, misses, size = torch.ops.padst._metadata_cache_info()
    return hits, misses, size


def test_metadata_cache_hits_on_unchanged_metadata():
    torch.ops.padst._metadata_cache_clear()
    case = make_case("block", 5, 64, 32, perm="both")
    w = case.weight
    y1 = emu.block_mm(case.x, w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)
    assert _cache_info()[:2] == (0, 1)
    # new data, same metadata: validation and upload are reused
    x2 = torch.randn_like(case.x)
    y2 = emu.block_mm(x2, w.values * 2, *w.meta(), case.bias, case.in_perm, case.out_perm)
    assert _cache_info()[:2] == (1, 1)
    torch.testing.assert_close(y1, fwd(case, case.x, w.values, case.bias, ref))
    torch.testing.assert_close(y2, fwd(case, x2, w.values * 2, case.bias, ref))
    # another shape of x is another key (validation reads it)
    emu.block_mm(case.x[:2], w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)
    assert _cache_info()[:2] == (1, 2)
    torch.ops.padst._metadata_cache_clear()
    assert _cache_info() == (0, 0, 0)


def test_metadata_cache_sees_in_place_changes():
    """An in-place write bumps the version counter: the metadata is validated (and uploaded) again."""
    torch.ops.padst._metadata_cache_clear()
    case = make_case("diag", 6, 48, 24, perm="both")
    w = case.weight
    emu.diag_mm(case.x, w.values, w.offsets, 24, case.bias, case.in_perm, case.out_perm)
    new_perm = torch.randperm(48)
    case.in_perm.copy_(new_perm)  # a different valid permutation: the answer must follow it
    y = emu.diag_mm(case.x, w.values, w.offsets, 24, case.bias, case.in_perm, case.out_perm)
    torch.testing.assert_close(y, fwd(case, case.x, w.values, case.bias, ref))
    case.in_perm[0] = case.in_perm[1]  # no longer a bijection: must raise, not reuse the cached check
    with pytest.raises(ValueError, match="in_perm is not a permutation"):
        emu.diag_mm(case.x, w.values, w.offsets, 24, case.bias, case.in_perm, case.out_perm)
    c = make_case("nm", 4, 40, 8, nm=(1, 4), perm="none")
    emu.nm_mm_t(torch.randn(4, 8), c.weight.values, c.weight.col_idx, 1, 4)
    c.weight.col_idx[0, 0] = 40
    with pytest.raises(ValueError, match="col_idx holds values"):
        emu.nm_mm_t(torch.randn(4, 8), c.weight.values, c.weight.col_idx, 1, 4)


def test_metadata_cache_skips_inference_tensors():
    torch.ops.padst._metadata_cache_clear()
    with torch.inference_mode():
        case = make_case("nm", 4, 40, 8, nm=(1, 4), perm="in")
        for _ in range(2):
            y = emu.nm_mm(case.x, case.weight.values, case.weight.col_idx, 1, 4, case.bias)
    assert _cache_info() == (0, 0, 0)  # neither looked up nor stored
    torch.testing.assert_close(y, fwd(case, case.x, case.weight.values, case.bias, ref))


# --- the v2 block kernels: x-stationary (csrc/kernels/block_xs.h) and row-complete (csrc/kernels/block_rc.h) ----------
# fp16/bf16, square blocks. The x-stationary kernel serves when the input side fits in shared memory (16/32/64-blocks),
# the row-complete one when it does not and the output is at most 768 wide (16/32-blocks), block_tc otherwise. On by
# default in the emulation (PADST_BLOCK_V2 unset). block_xs_calls() / block_rc_calls() count the emulated kernels'
# calls, so each test also shows which kernel ran.


def _calls() -> tuple[int, int]:
    return torch.ops.padst_emu.block_xs_calls(), torch.ops.padst_emu.block_rc_calls()


def _block_case(B, C, R, kb, mask, perm, dtype, seed=0):
    """A block layer with a given block mask [R/kb, C/kb], permutations as in make_case."""
    gen = torch.Generator().manual_seed(seed)
    w = F.block_from_dense(torch.randn(R, C, generator=gen, dtype=torch.float64), mask, (kb, kb))
    case = make_case("block", B, C, R, block=(kb, kb), sparsity=0.5, perm=perm, dtype=dtype, seed=seed)
    return dataclasses.replace(case, weight=w.replace(values=w.values.to(dtype)))


def _mask(R, C, kb, density, seed, empty=True):
    """Random block mask; with `empty`, block-row 1 and block-column 2 hold no block (when they exist)."""
    mask = torch.rand(R // kb, C // kb, generator=torch.Generator().manual_seed(seed)) < density
    mask[0, 0] = True
    if empty:
        if mask.shape[0] > 1:
            mask[1, :] = False
        if mask.shape[1] > 2:
            mask[:, 2] = False
    return mask


def _check_fwd_dx(case, dtype, xs: int, rc: int):
    """Forward and dx against the reference; `xs` / `rc`: how many of the two calls each v2 kernel served."""
    before = _calls()
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(case.B, case.R, generator=gen, dtype=torch.float64).to(dtype)
    v, x, b = case.weight.values, case.x, case.bias
    assert_close_to_reference(fwd(case, x, v, b, emu), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward")
    assert_close_to_reference(dx(case, dy, v, emu), dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref), "dx")
    after = _calls()
    assert (after[0] - before[0], after[1] - before[1]) == (xs, rc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("perm", ["none", "in", "out", "both"])
@pytest.mark.parametrize("kb", [16, 32, 64])
@pytest.mark.parametrize("B", [1, 31, 64, 69, 130])
def test_emulated_block_xs(B, kb, perm, dtype):
    """Batch 1, below / at / past one CTA's rows (64; 32 for 64-blocks), several CTAs; every block side; every
    permutation. Block-row 1 and block-column 2 are empty: the output there is the bias (forward) or zero (dx)."""
    C, R = 4 * kb, 3 * kb
    case = _block_case(B, C, R, kb, _mask(R, C, kb, 0.6, B + kb), perm, dtype, seed=B)
    _check_fwd_dx(case, dtype, xs=2, rc=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("perm", ["none", "in", "out", "both"])
@pytest.mark.parametrize("kb", [16, 32])
@pytest.mark.parametrize("B", [1, 31, 32, 33, 100])
@pytest.mark.parametrize("wide", ["in", "out"])
def test_emulated_block_rc(wide, B, kb, perm, dtype):
    """An input too wide to stage whole (1536 columns): the row-complete kernel serves the pass that reads it (forward
    when the input is wide, dx when the output is), the x-stationary one the other. Batch 1, below / at / past one
    CTA's 32 rows, several CTAs; 10 output lines, so that warps 0 and 1 own two; empty block-row and block-column."""
    C, R = (1536, 10 * kb) if wide == "in" else (10 * kb, 1536)
    case = _block_case(B, C, R, kb, _mask(R, C, kb, 0.15, B + kb), perm, dtype, seed=B)
    _check_fwd_dx(case, dtype, xs=1, rc=1)


def test_emulated_block_rc_full_width():
    """768 outputs (the most it serves: 3 lines of 32 per warp, 6 of 16) from 3072 inputs, with every line busy."""
    for kb in (16, 32):
        case = _block_case(40, 3072, 768, kb, _mask(768, 3072, kb, 0.05, kb, empty=False), "both", torch.bfloat16)
        _check_fwd_dx(case, torch.bfloat16, xs=1, rc=1)  # dx stages dy (768 wide): x-stationary


def test_emulated_block_xs_wide_and_long_lines():
    """768 -> 256 with 32-blocks, 8 blocks per block-row: the ring's prefetch crosses lines and warps' line sets."""
    case = _block_case(67, 768, 256, 32, _mask(256, 768, 32, 0.35, 5, empty=False), "both", torch.bfloat16, seed=5)
    _check_fwd_dx(case, torch.bfloat16, xs=2, rc=0)


def test_emulated_block_v2_no_blocks():
    """No block at all: the forward is the bias broadcast, dx is zero."""
    case = _block_case(9, 64, 32, 16, torch.zeros(2, 4, dtype=torch.bool), "both", torch.bfloat16)
    _check_fwd_dx(case, torch.bfloat16, xs=2, rc=0)
    case = _block_case(9, 1536, 32, 16, torch.zeros(2, 96, dtype=torch.bool), "both", torch.bfloat16)
    _check_fwd_dx(case, torch.bfloat16, xs=1, rc=1)


@pytest.mark.parametrize("what", ["switched off", "not square", "too wide", "64-blocks too wide", "float32"])
def test_emulated_block_v2_falls_back(what, monkeypatch):
    """Where no v2 kernel serves, the block_tc / gather kernels do, with the same results."""
    dtype, kb, C, R, block = torch.bfloat16, 16, 64, 48, None
    if what == "switched off":
        monkeypatch.setenv("PADST_BLOCK_V2", "0")
    elif what == "not square":
        block = (16, 32)
    elif what == "too wide":  # both sides: too wide to stage whole, and more than 768 outputs
        C = R = 1792
    elif what == "64-blocks too wide":  # the row-complete kernel takes 16/32-blocks only
        kb, C, R = 64, 3072, 128
    else:
        dtype = torch.float32
    if block is None:
        case = _block_case(70, C, R, kb, _mask(R, C, kb, 0.05 if C > 64 else 0.5, 0, empty=False), "both", dtype)
    else:
        case = make_case("block", 70, C, R, block=block, sparsity=0.5, perm="both", dtype=dtype)
    _check_fwd_dx(case, dtype, xs=1 if what == "64-blocks too wide" else 0, rc=0)


def _gw_calls() -> int:
    return torch.ops.padst_emu.block_gw_calls()


def _check_dw(case, dtype, gw: int):
    before = _gw_calls()
    gen = torch.Generator().manual_seed(4)
    dy = torch.randn(case.B, case.R, generator=gen, dtype=torch.float64).to(dtype)
    x = case.x
    assert_close_to_reference(dw(case, dy, x, emu), dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref), "dW")
    assert _gw_calls() - before == gw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("perm", ["none", "in", "out", "both"])
@pytest.mark.parametrize("kb", [16, 32])
@pytest.mark.parametrize("B", [1, 63, 64, 65, 300, 2000])
def test_emulated_block_gw(B, kb, perm, dtype):
    """The v2 weight gradient: batch 1, around one 64-row stage, several stages per split (300), several splits
    (2000: 8 splits of 250 rows, none a multiple of 64); every permutation; an empty block-row."""
    C, R = 6 * kb, 4 * kb
    case = _block_case(B, C, R, kb, _mask(R, C, kb, 0.5, B + kb), perm, dtype, seed=B)
    _check_dw(case, dtype, gw=1)


@pytest.mark.parametrize("kb", [16, 32])
def test_emulated_block_gw_groups(kb):
    """Rows with more blocks than one CTA's group (32 of 16-blocks, 16 of 32-blocks): several groups per row, rows of
    different lengths, and bit-identical reruns (the splits are summed in a fixed order)."""
    C, R = 80 * kb if kb == 16 else 40 * kb, 3 * kb
    mask = _mask(R, C, kb, 0.9, kb, empty=False)
    mask[1, : C // kb // 2] = False  # a shorter row
    case = _block_case(600, C, R, kb, mask, "both", torch.bfloat16, seed=kb)
    _check_dw(case, torch.bfloat16, gw=1)
    dy = torch.randn(600, R).to(torch.bfloat16)
    w = case.weight
    a = emu.block_sddmm(dy, case.x, w.row_ptr, w.col_idx, kb, kb, case.in_perm, case.out_perm)
    b = emu.block_sddmm(dy, case.x, w.row_ptr, w.col_idx, kb, kb, case.in_perm, case.out_perm)
    assert torch.equal(a, b)


def test_emulated_block_gw_empty_batch():
    case = _block_case(5, 64, 32, 16, _mask(32, 64, 16, 0.5, 0, empty=False), "both", torch.bfloat16)
    w = case.weight
    before = _gw_calls()
    dv = emu.block_sddmm(torch.zeros(0, 32, dtype=torch.bfloat16), case.x[:0], w.row_ptr, w.col_idx, 16, 16,
                         case.in_perm, case.out_perm)
    assert torch.equal(dv, torch.zeros_like(w.values)) and _gw_calls() - before == 1


@pytest.mark.parametrize("what", ["switched off", "64-blocks", "not square", "float32"])
def test_emulated_block_gw_falls_back(what, monkeypatch):
    dtype, kb, block = torch.bfloat16, 16, None
    if what == "switched off":
        monkeypatch.setenv("PADST_BLOCK_V2", "0")
    elif what == "64-blocks":
        kb = 64
    elif what == "not square":
        block = (16, 32)
    else:
        dtype = torch.float32
    if block is None:
        case = _block_case(70, 4 * kb, 2 * kb, kb, _mask(2 * kb, 4 * kb, kb, 0.5, 1), "both", dtype)
    else:
        case = make_case("block", 70, 128, 64, block=block, sparsity=0.5, perm="both", dtype=dtype)
    _check_dw(case, dtype, gw=0)


@pytest.mark.parametrize("shape,perm", [p for p in _cases(("block",))])
def test_emulated_block_tc_kernel(shape, perm, monkeypatch):
    """The block_tc kernel (the GPU default until the v2 kernels have run on a GPU), with the v2 kernels off."""
    monkeypatch.setenv("PADST_BLOCK_V2", "0")
    before = _calls(), _gw_calls()
    _check_all(_make(shape, perm, torch.bfloat16, "cpu"), torch.bfloat16)
    assert (_calls(), _gw_calls()) == before


# --- the column permutation kernel of the cuSPARSELt path (csrc/kernels/permute_cols.h) ------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("cols", [8, 24, 768, 3072])
def test_emulated_permute_cols(rows, cols, dtype):
    """out[:, c] = x[:, idx[c]] for the gather (lt24_mm's dense operand) and, with the inverse, the scatter
    (lt24_mm_t's dx); rows around one CTA's 8, 16-byte vectors of 8 (16-bit) or 4 (fp32) elements."""
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    perm = torch.randperm(cols, generator=gen)
    got = torch.ops.padst_emu._permute_cols(x, perm.int())
    assert torch.equal(got, x[:, perm])
    scattered = torch.empty_like(x)
    scattered[:, perm] = x
    assert torch.equal(torch.ops.padst_emu._permute_cols(x, torch.argsort(perm).int()), scattered)


def test_emulated_permute_cols_limits():
    with pytest.raises(ValueError, match="not served"):
        torch.ops.padst_emu._permute_cols(torch.zeros(2, 12, dtype=torch.bfloat16), torch.arange(12).int())
    with pytest.raises(ValueError, match="not served"):  # 8 rows x 6,144 x 2 bytes per CTA is the most it stages
        torch.ops.padst_emu._permute_cols(torch.zeros(2, 6152, dtype=torch.bfloat16), torch.arange(6152).int())


# --- the v2 row kernel on CUDA cores (csrc/kernels/rows_v2.h): the N:M forward, the diagonal forward and dx --------
# On by default in the emulation (PADST_ROWS_V2 unset); serves fp32/bf16/fp16 with an even number of output rows and at
# most 3,072 input columns (32 / 16 / 8 batch rows per CTA up to 768 / 1,536 / 3,072). rows_v2_calls() counts its calls.


def _rows_calls() -> int:
    return torch.ops.padst_emu.rows_v2_calls()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B", [1, 7, 8, 33, 70])
@pytest.mark.parametrize("C,R,nm", [(64, 48, (1, 8)), (768, 36, (1, 12)), (1536, 20, (2, 24)), (3072, 10, (1, 24)),
                                    (96, 1030, (3, 8))])
def test_emulated_rows_v2_nm(C, R, nm, B, dtype):
    """Each batch-tile size (C up to 768: 32 rows per CTA, 1,536: 16, 3,072: 8), batch 1 and partial tiles, more
    rows than one pass of the CTA's threads (1,030 > 512), several N:M ratios, the permutation folded in."""
    case = make_case("nm", B, C, R, nm=nm, perm="in", dtype=dtype, seed=B + C)
    v, x, b = case.weight.values, case.x, case.bias
    before = _rows_calls()
    assert_close_to_reference(fwd(case, x, v, b, emu), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward")
    assert _rows_calls() - before == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B", [1, 9, 40])
@pytest.mark.parametrize("C,R,nm", [(64, 48, (1, 8)), (768, 40, (1, 12)), (96, 1040, (3, 8)), (1536, 24, (2, 24))])
def test_emulated_rows_v2_nm_dx(C, R, nm, B, dtype):
    """N:M dx through the ELL form of the transpose: columns of different degrees (padding skipped), the permutation
    folded in, each batch-tile size of dy."""
    case = make_case("nm", B, C, R, nm=nm, perm="in", dtype=dtype, seed=B + R)
    gen = torch.Generator().manual_seed(6)
    dy = torch.randn(B, R, generator=gen, dtype=torch.float64).to(dtype)
    v = case.weight.values
    before = _rows_calls()
    assert_close_to_reference(dx(case, dy, v, emu), dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref), "dx")
    assert _rows_calls() - before == 1


def test_emulated_rows_v2_nm_dx_unused_columns():
    """Columns that no row uses get zero; a column used by every row is the widest ELL row."""
    col_idx = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 5]])  # columns 2, 4, 6, 7 unused; 3 in every row
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    dy = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    before = _rows_calls()
    got = emu.nm_mm_t(dy, values, col_idx, 2, 8)
    expect = torch.zeros(1, 8)
    expect[0, 3] = 1.0 + 30.0 + 600.0 + 7000.0
    expect[0, 0] = 2.0 + 500.0
    expect[0, 1] = 40.0
    expect[0, 5] = 8000.0
    torch.testing.assert_close(got, expect)
    assert _rows_calls() - before == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("perm", ["none", "in", "out", "both"])
@pytest.mark.parametrize("B", [1, 9, 40])
@pytest.mark.parametrize("C,R,sparsity", [(64, 48, 0.75), (48, 64, 0.75), (768, 1040, 0.95), (1536, 96, 0.9),
                                          (96, 1536, 0.9)])
def test_emulated_rows_v2_diag(C, R, sparsity, B, perm, dtype):
    """Wide and tall diagonals (direct and shifted rows, forward and dx), both permutations, every batch tile."""
    case = make_case("diag", B, C, R, sparsity=sparsity, perm=perm, dtype=dtype, seed=B + C + R)
    before = _rows_calls()
    _check_fwd_dx_any(case, dtype)
    assert _rows_calls() - before == 2


def _check_fwd_dx_any(case, dtype):
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(case.B, case.R, generator=gen, dtype=torch.float64).to(dtype)
    v, x, b = case.weight.values, case.x, case.bias
    assert_close_to_reference(fwd(case, x, v, b, emu), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward")
    assert_close_to_reference(dx(case, dy, v, emu), dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref), "dx")


@pytest.mark.parametrize("what", ["switched off", "odd rows", "too wide", "float64"])
def test_emulated_rows_v2_falls_back(what, monkeypatch):
    C, R, dtype = 64, 48, torch.float32
    if what == "switched off":
        monkeypatch.setenv("PADST_ROWS_V2", "0")
    elif what == "odd rows":
        R = 47
    elif what == "too wide":
        C = 3200
    else:
        dtype = torch.float64
    case = make_case("nm", 9, C, R, nm=(1, 8), perm="in", dtype=dtype)
    v, x, b = case.weight.values, case.x, case.bias
    before = _rows_calls()
    assert_close_to_reference(fwd(case, x, v, b, emu), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward")
    assert _rows_calls() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 9, 70, 300])
@pytest.mark.parametrize("shape", [("nm", 64, 48, dict(nm=(1, 8))), ("nm", 768, 40, dict(nm=(1, 12))),
                                   ("nm", 96, 1040, dict(nm=(3, 8))), ("diag", 64, 48, dict(sparsity=0.75)),
                                   ("diag", 48, 64, dict(sparsity=0.75)), ("diag", 1536, 96, dict(sparsity=0.9))],
                         ids=lambda s: f"{s[0]}-C{s[1]}-R{s[2]}")
def test_emulated_rows_v2_dw(shape, B, dtype):
    """The v2 row weight gradient: N:M with K = 8, 64 and 36 entries per row (one, four and three groups of 16, the
    last partial) and wide / tall diagonals with both permutations; batch 1, partial batch tiles, several splits (300
    rows); every entry written (the emulated partials start as NaN); bit-identical reruns."""
    structure, C, R, kw = shape
    perm = "in" if structure == "nm" else "both"
    case = make_case(structure, B, C, R, perm=perm, dtype=dtype, seed=B + C, **kw)
    gen = torch.Generator().manual_seed(8)
    dy = torch.randn(B, R, generator=gen, dtype=torch.float64).to(dtype)
    x = case.x
    before = _rows_calls()
    assert_close_to_reference(dw(case, dy, x, emu), dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref), "dW")
    assert _rows_calls() - before == 1
    assert torch.equal(dw(case, dy, x, emu), dw(case, dy, x, emu))  # splits summed in a fixed order


def test_metadata_cache_drops_entries_of_older_versions():
    """DST changes a pattern in place at every update; the entries of the old versions are never hit
    again and are dropped when the new version's entry is made, instead of filling the cache (64 entries of copies)."""
    torch.ops.padst._metadata_cache_clear()
    case = make_case("nm", 8, 64, 32, nm=(1, 4), perm="in")
    w = case.weight
    col_idx = w.col_idx.clone()
    groups = col_idx // 4
    for step in range(100):
        col_idx.copy_(groups * 4 + (col_idx + 1) % 4)  # still 1:4, a new version each time
        torch.ops.padst.nm_mm(case.x, w.values, col_idx, 1, 4)  # CPU kernels: validation + owned copies cached
        emu.nm_mm(case.x, w.values, col_idx, 1, 4)  # the CUDA path's cache (the emulation)
    hits, misses, size = torch.ops.padst._metadata_cache_info()
    assert misses >= 200 and size <= 4, (hits, misses, size)  # one entry per (op, kind), not one per version
    assert 0 < torch.ops.padst._metadata_cache_bytes() < 64 * 1024
    torch.ops.padst._metadata_cache_clear()
    assert torch.ops.padst._metadata_cache_bytes() == 0


def test_metadata_cache_is_bounded_by_bytes(tmp_path):
    """With PADST_META_CACHE_MB=1, a run over 12 distinct patterns of ~700 KB of cached copies each keeps the cache
    under 1 MB, dropping the least recently used (a subprocess: the bound is read once per process)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "bytes.py"
    script.write_text(
        "import torch, padst_ext\n"
        "from padst_ext import formats as F\n"
        "sizes = []\n"
        "for i in range(12):\n"
        "    w = F.block_from_dense(torch.randn(2048, 2048), torch.rand(128, 128) < 0.9, (16, 16))\n"
        "    torch.ops.padst.block_mm(torch.randn(2, 2048), w.values, *w.meta())\n"
        "    sizes.append(torch.ops.padst._metadata_cache_bytes())\n"
        "info = torch.ops.padst._metadata_cache_info()\n"
        "assert max(sizes) <= 1 << 20, sizes\n"
        "assert info[2] < 12, info\n"
        "print('bounded', max(sizes), info)\n")
    env = dict(os.environ, PADST_META_CACHE_MB="1")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         check=False)
    assert res.returncode == 0 and "bounded" in res.stdout, res.stdout + res.stderr
