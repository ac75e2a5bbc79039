"""The cuSPARSELt 2:4 path: host-side logic (every machine) and the CUDA ops (skipped without a GPU)."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import padst_ext
from padst_ext import _extension, semi_structured
from padst_ext.formats import nm_from_dense, nm_to_dense

ops = torch.ops.padst
HAVE_LT = bool(_extension.build_info().get("HAVE_CUSPARSELT", False))
needs_gpu = pytest.mark.skipif(not semi_structured.is_available(),
                               reason="needs a CUDA device and a build with cuSPARSELt")

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@contextlib.contextmanager
def tf32(allowed: bool):
    """torch.backends.cuda.matmul.allow_tf32 set for the block (monkeypatch cannot restore that attribute)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"padst::{op}", key)


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["lt24_compress", "lt24_mm", "lt24_mm_t"])
def test_cuda_kernels_registered_when_built_with_cusparselt(op):
    if not HAVE_LT:
        pytest.skip("built without cuSPARSELt")
    assert padst_ext.WITH_CUDA
    assert has_kernel(op, "CUDA")


@pytest.mark.parametrize("op", ["_lt24_supported", "_lt24_padded_batch", "_lt24_plan_key", "_lt24_plan_key_eq",
                                "_lt24_layout", "_lt24_lru_trace"])
def test_host_ops_registered_in_every_build(op):
    assert has_kernel(op, "CompositeExplicitAutograd")


def test_pattern_check_registered_on_cpu():
    assert has_kernel("_lt24_check_pattern", "CPU")


# ----------------------------------------------------------------------------------------------------------
# Plan-cache key and LRU
# ----------------------------------------------------------------------------------------------------------

BASE_KEY = [0, 0, 256, 512, 64, 0, 0, 0, 0]  # device, dtype, out, in, batch, transposed, bias, alg_id, bias_ptr
FIELD_NAMES = ["device", "dtype", "out_features", "in_features", "batch", "transposed", "bias", "alg_id", "bias_ptr"]


def _variant(i: int):
    k = list(BASE_KEY)
    k[i] = {1: 1, 5: 1, 6: 1}.get(i, k[i] + 16)  # dtype code, flags: flip; the rest: another valid value
    return k


def test_plan_key_equal_keys_agree():
    h1, r1, f1 = ops._lt24_plan_key(BASE_KEY)
    h2, r2, f2 = ops._lt24_plan_key(list(BASE_KEY))
    assert (h1, r1, f1) == (h2, r2, f2)
    assert f1 == BASE_KEY
    assert ops._lt24_plan_key_eq(BASE_KEY, list(BASE_KEY))
    for name in FIELD_NAMES:
        assert f"{name}=" in r1


@pytest.mark.parametrize("i", range(len(BASE_KEY)), ids=FIELD_NAMES)
def test_plan_key_distinguishes_every_field(i):
    other = _variant(i)
    assert not ops._lt24_plan_key_eq(BASE_KEY, other)
    assert not ops._lt24_plan_key_eq(other, BASE_KEY)
    assert ops._lt24_plan_key(BASE_KEY)[0] != ops._lt24_plan_key(other)[0]
    assert ops._lt24_plan_key(BASE_KEY)[1] != ops._lt24_plan_key(other)[1]


def test_plan_key_hashes_do_not_collide_on_a_grid():
    keys = [[d, t, r, c, b, tr, bi, 0, 0] for d in (0, 1) for t in (0, 1, 2) for r in (16, 32, 48) for c in (16, 32, 48)
            for b in (8, 16) for tr in (0, 1) for bi in (0, 1)]
    hashes = {ops._lt24_plan_key(k)[0] for k in keys}
    assert len(hashes) == len(keys)


def test_plan_key_rejects_malformed_fields():
    with pytest.raises(ValueError, match="expected 9 fields"):
        ops._lt24_plan_key([0, 0, 1])
    with pytest.raises(ValueError, match="dtype_code"):
        ops._lt24_plan_key([0, 7, 16, 16, 8, 0, 0, 0, 0])


def test_lru_trace():
    hits, evicted = ops._lt24_lru_trace(2, [1, 2, 1, 3, 2, 3, 1])
    # 1 miss, 2 miss, 1 hit (1 most recent), 3 miss evicts 2, 2 miss evicts 1, 3 hit, 1 miss evicts 2
    assert hits == [0, 0, 1, 0, 0, 1, 0]
    assert evicted == [2, 1, 2]
    hits, evicted = ops._lt24_lru_trace(1, [5, 5, 6])
    assert hits == [0, 1, 0] and evicted == [5]
    with pytest.raises(ValueError, match="capacity"):
        ops._lt24_lru_trace(0, [1])


# ----------------------------------------------------------------------------------------------------------
# supports(): which problems cuSPARSELt serves
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,n,m,R,C", [
    (torch.float16, 2, 4, 64, 128),
    (torch.bfloat16, 2, 4, 16, 16),
    (torch.float16, 2, 4, 768, 3072),
    (torch.float32, 1, 2, 24, 40),  # multiples of 8 suffice for float32
])
def test_supports_accepts(dtype, n, m, R, C):
    with tf32(True):
        for batch in (None, 1, 7, 8, 1000):  # any batch: the ops pad it
            assert semi_structured.supports(dtype, n, m, R, C, batch) == (True, "")


@pytest.mark.parametrize("dtype,n,m,R,C,batch,pattern", [
    (torch.float16, 1, 2, 64, 64, None, "float16 needs 2:4"),
    (torch.bfloat16, 1, 4, 64, 64, None, "bfloat16 needs 2:4"),
    (torch.float32, 2, 4, 64, 64, None, "float32 needs 1:2"),
    (torch.float64, 2, 4, 64, 64, None, "dtype not supported"),
    (torch.int8, 2, 4, 64, 64, None, "dtype not supported"),
    (torch.float16, 2, 4, 24, 64, None, r"multiples of 16 for float16.*\[24, 64\]"),
    (torch.bfloat16, 2, 4, 64, 40, None, r"multiples of 16 for bfloat16.*\[64, 40\]"),
    (torch.float32, 1, 2, 20, 64, None, r"multiples of 8 for float32"),
    (torch.float16, 2, 4, 0, 64, None, "empty weight"),
    (torch.float16, 2, 4, 1 << 16, 1 << 16, None, "exceeds 2\\^31"),
    (torch.float16, 2, 4, 64, 1 << 20, 1 << 12, "exceeds 2\\^31"),
])
def test_supports_rejects_with_reason(dtype, n, m, R, C, batch, pattern):
    with tf32(True):
        ok, reason = semi_structured.supports(dtype, n, m, R, C, batch)
    assert not ok
    assert reason
    assert re.search(pattern, reason), reason


def test_supports_float32_needs_tf32():
    with tf32(False):
        ok, reason = semi_structured.supports(torch.float32, 1, 2, 64, 64)
    assert not ok and "allow_tf32" in reason
    with tf32(True):
        assert semi_structured.supports(torch.float32, 1, 2, 64, 64)[0]


@pytest.mark.parametrize("dtype,batch,expect", [
    (torch.float16, 0, 0), (torch.float16, 1, 8), (torch.float16, 8, 8), (torch.float16, 9, 16),
    (torch.bfloat16, 17, 24), (torch.float32, 1, 4), (torch.float32, 4, 4), (torch.float32, 5, 8),
])
def test_padded_batch(dtype, batch, expect):
    assert ops._lt24_padded_batch(dtype, batch) == expect


# ----------------------------------------------------------------------------------------------------------
# Layouts: emulate cuSPARSELt's D = op(A) @ op(B) on the CPU from the very descriptors the CUDA op builds, reading
# and writing the row-major PyTorch buffers as the library would, and compare with the layer's formula.
# ----------------------------------------------------------------------------------------------------------


def _unpack(lay):
    m, n, k = lay[:3]
    a, b, d = (tuple(lay[3 + 4 * i: 7 + 4 * i]) for i in range(3))
    return m, n, k, a, b, d, lay[15], lay[16]


def _read(buf, desc):
    rows, cols, ld, order = desc
    if order == 0:  # row-major: element (i, j) at i*ld + j
        return buf[: rows * ld].view(rows, ld)[:, :cols]
    return buf[: cols * ld].view(cols, ld)[:, :rows].t()  # column-major: (i, j) at j*ld + i


def _write(buf, desc, mat):
    rows, cols, ld, order = desc
    if order == 0:
        buf[: rows * ld].view(rows, ld)[:, :cols] = mat
    else:
        buf[: cols * ld].view(cols, ld)[:, :rows] = mat.t()


def _op(mat, op):
    return mat.t() if op == 1 else mat


def _emulate(lay, a_buf, b_buf, d_numel):
    m, n, k, a, b, d, op_a, op_b = _unpack(lay)
    A, Bm = _op(_read(a_buf, a), op_a), _op(_read(b_buf, b), op_b)
    assert A.shape == (m, k) and Bm.shape == (k, n)
    d_buf = torch.full((d_numel,), float("nan"), dtype=a_buf.dtype)
    _write(d_buf, d, A @ Bm)
    return d_buf, A


def _random_24(R, C, gen, dtype=torch.float64):
    """A dense [R, C] weight with exactly 2 non-zeros in every group of 4 along C."""
    scores = torch.rand(R, C // 4, 4, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
    w = torch.randn(R, C, generator=gen, dtype=dtype) * keep.reshape(R, C)
    return w


@pytest.mark.parametrize("R,C,B", [(32, 64, 8), (48, 16, 24), (16, 16, 8)])
def test_forward_layout_computes_x_perm_times_w_t(R, C, B):
    gen = torch.Generator().manual_seed(0)
    W = _random_24(R, C, gen)
    xp = torch.randn(B, C, generator=gen, dtype=torch.float64)  # the gathered, padded dense operand
    lay = ops._lt24_layout(R, C, B, False)
    m, n, k, a, b, d, op_a, op_b = _unpack(lay)
    assert (m, n, k) == (R, B, C)
    assert a == (R, C, C, 0) and b == (B, C, C, 0) and d == (R, B, R, 1) and (op_a, op_b) == (0, 1)
    d_buf, A = _emulate(lay, W.reshape(-1), xp.reshape(-1), B * R)
    # D's memory is exactly the row-major y [B, R] (no gaps, nothing left unwritten)
    torch.testing.assert_close(d_buf.view(B, R), xp @ W.t())
    # op(A) is 2:4 along its reduction dimension k, which is what the sparse tensor cores need
    assert int(((A != 0).reshape(m, k // 4, 4).sum(-1) > 2).sum()) == 0


@pytest.mark.parametrize("R,C,B", [(32, 64, 8), (48, 16, 24)])
def test_transposed_layout_computes_dy_times_w(R, C, B):
    gen = torch.Generator().manual_seed(1)
    W = _random_24(R, C, gen)
    dy = torch.randn(B, R, generator=gen, dtype=torch.float64)
    lay = ops._lt24_layout(R, C, B, True)
    m, n, k, a, b, d, op_a, op_b = _unpack(lay)
    assert (m, n, k) == (C, B, R)
    assert a == (C, R, R, 0) and b == (B, R, R, 0) and d == (C, B, C, 1)
    # A is W.t().contiguous() (what lt24_linear compresses for dx), B is dy as it lies in memory
    d_buf, A = _emulate(lay, W.t().contiguous().reshape(-1), dy.reshape(-1), B * C)
    torch.testing.assert_close(d_buf.view(B, C), dy @ W)
    # ...and that operand is 2:4 along k = R only when W is also 2:4 along R (hence the separate compression)
    torch.testing.assert_close(A, W.t())


def test_layout_spans_match_tensor_sizes():
    for R, C, B, tr in [(64, 128, 8, False), (64, 128, 8, True), (16, 48, 40, False)]:
        m, n, k, a, b, d, _, _ = _unpack(ops._lt24_layout(R, C, B, tr))
        span = lambda desc: desc[0] * desc[2] if desc[3] == 0 else desc[1] * desc[2]  # noqa: E731
        assert span(a) == R * C  # the weight (or its transpose)
        assert span(b) == B * (R if tr else C)  # x_p or dy
        assert span(d) == B * (C if tr else R)  # y or dx_p
        for desc in (a, b, d):
            lead = desc[1] if desc[3] == 0 else desc[0]
            assert desc[2] >= lead


# ----------------------------------------------------------------------------------------------------------
# Pattern validation (host version of lt24_compress's check)
# ----------------------------------------------------------------------------------------------------------


def test_pattern_check_accepts_24_and_sparser():
    gen = torch.Generator().manual_seed(2)
    W = _random_24(16, 32, gen, torch.float32)
    ops._lt24_check_pattern(W, 2, 4)
    W[3, :] = 0  # fewer non-zeros than n is fine
    ops._lt24_check_pattern(W, 2, 4)
    ops._lt24_check_pattern(torch.zeros(4, 8), 1, 2)


def test_pattern_check_names_row_and_group():
    gen = torch.Generator().manual_seed(3)
    W = _random_24(16, 32, gen, torch.float32)
    W[5, 20:24] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    W[9, 0:4] = 1.0  # a later violation: the first one is reported
    with pytest.raises(ValueError, match=r"not 2:4 .*row 5, group 5 \(columns 20\.\.23\) holds 3 non-zeros, at most 2"):
        ops._lt24_check_pattern(W, 2, 4)


def test_pattern_check_one_of_two_for_float32():
    W = torch.zeros(4, 8)
    W[:, ::2] = 1.0
    ops._lt24_check_pattern(W, 1, 2)
    W[2, 6:8] = 1.0
    with pytest.raises(ValueError, match=r"not 1:2 .*row 2, group 3 \(columns 6\.\.7\) holds 2"):
        ops._lt24_check_pattern(W, 1, 2)


def test_pattern_check_bad_arguments():
    with pytest.raises(ValueError, match="multiple of m"):
        ops._lt24_check_pattern(torch.zeros(4, 6), 2, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        ops._lt24_check_pattern(torch.zeros(4, 8), 4, 4)


# ----------------------------------------------------------------------------------------------------------
# lt24_linear on the CPU: the fallback path (nm_mm with the folded indices), forward and backward
# ----------------------------------------------------------------------------------------------------------


def _layer(R, C, n, m, gen, dtype=torch.float64, device="cpu"):
    dense = torch.randn(R, C, generator=gen, dtype=torch.float64)
    scores = torch.rand(R, C // m, m, generator=gen)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True).reshape(R, C)
    w = nm_from_dense(dense, mask, n, m)  # logical frame (no perm folded)
    values = w.values.to(device=device, dtype=dtype).requires_grad_()
    col_idx = w.col_idx.to(device)
    perm = torch.randperm(C, generator=gen).to(device)
    bias = torch.randn(R, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    return values, col_idx, perm, bias


def _reference(x, values, col_idx, perm, bias, C):
    S = nm_to_dense(values, col_idx, C)
    xp = x if perm is None else x[..., perm]
    y = xp @ S.t()
    return y if bias is None else y + bias


@pytest.mark.parametrize("use_perm,use_bias", [(True, True), (False, False), (True, False)])
def test_lt24_linear_cpu_fallback_matches_reference(use_perm, use_bias):
    gen = torch.Generator().manual_seed(4)
    R, C, n, m = 16, 32, 2, 4
    values, col_idx, perm, bias = _layer(R, C, n, m, gen)
    perm = perm if use_perm else None
    bias = bias if use_bias else None
    x = torch.randn(3, 5, C, generator=gen, dtype=torch.float64, requires_grad=True)
    assert semi_structured.choose_path(x, values, n, m, C)[0] == "nm"
    y = semi_structured.lt24_linear(x, values, col_idx, n, m, C, in_perm=perm, bias=bias)
    assert y.shape == (3, 5, R)
    leaves = [t for t in (x, values, bias) if t is not None]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    y_ref = _reference(x, values, col_idx, perm, bias, C)
    want = torch.autograd.grad(y_ref, leaves, g)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_choose_path_reasons_on_cpu():
    x = torch.randn(4, 32)
    path, reason = semi_structured.choose_path(x, torch.randn(16, 16), 2, 4, 32)
    assert path == "nm" and reason


def test_lt24_linear_argument_errors():
    values = torch.randn(16, 16)
    col_idx = torch.zeros(16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="in_features"):
        semi_structured.lt24_linear(torch.randn(4, 30), values, col_idx, 2, 4, 32)
    with pytest.raises(ValueError, match="values and col_idx"):
        semi_structured.lt24_linear(torch.randn(4, 32), values, col_idx[:, :8], 2, 4, 32)


# ----------------------------------------------------------------------------------------------------------
# GPU: the cuSPARSELt path itself
# ----------------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float16, torch.bfloat16]


def _tol_check(got, ref64, same_dtype_torch, what):
    err = (got.double() - ref64).abs().max().item()
    base = (same_dtype_torch.double() - ref64).abs().max().item()
    slack = 1e-3 * max(ref64.abs().max().item(), 1.0)
    assert err <= 2 * base + slack, f"{what}: error {err:.3e} vs torch same-dtype {base:.3e}"


def _transposable(R, C, gen):
    """[R, C] mask that is 2:4 along rows AND columns (4x4 tiles of two transposable patterns)."""
    t0 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    t1 = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    pick = torch.rand(R // 4, C // 4, generator=gen) < 0.5
    tiles = torch.where(pick[:, :, None, None], t0, t1)  # [R/4, C/4, 4, 4]
    return tiles.permute(0, 2, 1, 3).reshape(R, C)


def _gpu_layer(R, C, dtype, gen, transposable=False):
    dense = torch.randn(R, C, generator=gen, dtype=torch.float64)
    if transposable:
        mask = _transposable(R, C, gen)
    else:
        mask = _random_24(R, C, gen) != 0
    w = nm_from_dense(dense, mask, 2, 4)
    values = w.values.to("cuda", dtype).requires_grad_()
    col_idx = w.col_idx.cuda()
    perm = torch.randperm(C, generator=gen).cuda()
    bias = (0.1 * torch.randn(R, generator=gen, dtype=torch.float64)).to("cuda", dtype).requires_grad_()
    return values, col_idx, perm, bias


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("B", [64, 13])  # 13: padded batch
def test_gpu_lt24_linear_forward_backward(dtype, transposable, B):
    gen = torch.Generator().manual_seed(10)
    R, C = 64, 128
    values, col_idx, perm, bias = _gpu_layer(R, C, dtype, gen, transposable)
    x = torch.randn(B, C, generator=gen, dtype=torch.float64).to("cuda", dtype).requires_grad_()
    assert semi_structured.choose_path(x, values, 2, 4, C) == ("cusparselt", "")
    y = semi_structured.lt24_linear(x, values, col_idx, 2, 4, C, in_perm=perm, bias=bias)
    g = torch.randn(B, R, generator=gen, dtype=torch.float64).to("cuda", dtype)
    got = torch.autograd.grad(y, (x, values, bias), g)

    leaves64 = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    y64 = _reference(leaves64[0], leaves64[1], col_idx, perm, leaves64[2], C)
    want64 = torch.autograd.grad(y64, leaves64, g.double())
    leaves_lp = [t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y_lp = _reference(leaves_lp[0], leaves_lp[1], col_idx, perm, leaves_lp[2], C)
    want_lp = torch.autograd.grad(y_lp, leaves_lp, g)

    _tol_check(y, y64, y_lp, "y")
    for name, a, b, c in zip(("dx", "dvalues", "dbias"), got, want64, want_lp):
        _tol_check(a, b, c, name)
    assert (semi_structured._cache[values].transposable is True) == transposable


@needs_gpu
def test_gpu_float32_one_of_two():
    gen = torch.Generator().manual_seed(11)
    R, C = 32, 64
    dense = torch.randn(R, C, generator=gen, dtype=torch.float64)
    mask = torch.zeros(R, C, dtype=torch.bool)
    mask[:, ::2] = True
    w = nm_from_dense(dense, mask, 1, 2)
    values, col_idx = w.values.float().cuda(), w.col_idx.cuda()
    x = torch.randn(16, C, generator=gen).cuda()
    with tf32(True):
        assert semi_structured.choose_path(x, values, 1, 2, C) == ("cusparselt", "")
        y = semi_structured.lt24_linear(x, values, col_idx, 1, 2, C)
    ref = _reference(x.double(), values.double(), col_idx, None, None, C)
    torch.testing.assert_close(y.double(), ref, rtol=5e-3, atol=5e-3)  # TF32


@needs_gpu
def test_gpu_caches_compression_and_plans():
    gen = torch.Generator().manual_seed(12)
    values, col_idx, perm, bias = _gpu_layer(32, 64, torch.float16, gen)
    x = torch.randn(16, 64, generator=gen).to("cuda", torch.float16)
    with torch.no_grad():
        semi_structured.lt24_linear(x, values, col_idx, 2, 4, 64, perm, bias)
        first = semi_structured._cache[values].compressed
        info0 = ops._lt24_plan_cache_info(0)
        semi_structured.lt24_linear(x, values, col_idx, 2, 4, 64, perm, bias)
        assert semi_structured._cache[values].compressed is first  # not recompressed
        info1 = ops._lt24_plan_cache_info(0)
        assert info1[0] == info0[0] and info1[2] == info0[2] + 1  # plan reused
        values.mul_(2.0)  # new weight version
        semi_structured.lt24_linear(x, values, col_idx, 2, 4, 64, perm, bias)
        assert semi_structured._cache[values].compressed is not first


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_opcheck(dtype):
    gen = torch.Generator().manual_seed(13)
    R, C, B = 32, 64, 16
    mask = _transposable(R, C, gen).cuda()
    W = torch.randn(R, C, generator=gen).to("cuda", dtype) * mask
    comp = ops.lt24_compress(W)
    comp_t = ops.lt24_compress(W.t().contiguous())
    x = torch.randn(B, C, generator=gen).to("cuda", dtype)
    dy = torch.randn(B, R, generator=gen).to("cuda", dtype)
    perm = torch.randperm(C, generator=gen).cuda()
    bias = torch.randn(R, generator=gen).to("cuda", dtype)
    torch.library.opcheck(ops.lt24_mm.default, (x, comp, R, C, bias, perm))
    torch.library.opcheck(ops.lt24_mm.default, (x, comp, R, C))
    torch.library.opcheck(ops.lt24_mm_t.default, (dy, comp_t, R, C, perm))
    # the compressed size is data-independent but only cuSPARSELt knows it: no fake-tensor test for compress
    torch.library.opcheck(ops.lt24_compress.default, (W,), test_utils=("test_schema", "test_autograd_registration"))
    # the raw ops against the formula
    y = ops.lt24_mm(x, comp, R, C, bias, perm)
    torch.testing.assert_close(y.float(), (x[:, perm].float() @ W.float().t() + bias.float()), rtol=2e-2, atol=2e-2)
    dx = ops.lt24_mm_t(dy, comp_t, R, C, perm)
    want = torch.empty_like(x, dtype=torch.float32)
    want[:, perm] = dy.float() @ W.float()
    torch.testing.assert_close(dx.float(), want, rtol=2e-2, atol=2e-2)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("R,C,B", [(32, 64, 16), (64, 32, 8), (16, 32, 24), (64, 16, 40), (16, 16, 8), (48, 96, 13)])
def test_gpu_raw_ops_small_shapes(dtype, R, C, B):
    """lt24_mm and lt24_mm_t against the formula on small shapes, where cuSPARSELt's compressed size on a fresh
    descriptor (what lt24_compress writes) and on a plan's descriptor differ (S.T [64, 32]: 2560 vs 2304 bytes)."""
    gen = torch.Generator().manual_seed(R * 1000 + C + B)
    W = (torch.randn(R, C, generator=gen) * _transposable(R, C, gen)).to("cuda", dtype)
    x = torch.randn(B, C, generator=gen).to("cuda", dtype)
    dy = torch.randn(B, R, generator=gen).to("cuda", dtype)
    perm = torch.randperm(C, generator=gen).cuda()
    bias = torch.randn(R, generator=gen).to("cuda", dtype)
    comp, comp_t = ops.lt24_compress(W), ops.lt24_compress(W.t().contiguous())
    Wf = W.float()
    for p in (None, perm):
        xp = x.float() if p is None else x.float()[:, p]
        torch.testing.assert_close(ops.lt24_mm(x, comp, R, C, bias, p).float(), xp @ Wf.t() + bias.float(),
                                   rtol=2e-2, atol=2e-2)
        want = torch.empty(B, C, device="cuda")
        want[:, torch.arange(C, device="cuda") if p is None else p] = dy.float() @ Wf
        torch.testing.assert_close(ops.lt24_mm_t(dy, comp_t, R, C, p).float(), want, rtol=2e-2, atol=2e-2)


@needs_gpu
@pytest.mark.parametrize("v2", ["0", "1"])  # index_select / the row-permute kernel
@pytest.mark.parametrize("C", [64, 3072, 8192])  # 8192 x 2 bytes is past what the row-permute kernel stages
def test_gpu_permuted_calls_do_not_synchronise(C, v2, monkeypatch):
    """The permutation is validated once per tensor version (csrc/meta_cache.h): the second call with the same
    in_perm makes no host synchronisation (torch's sync debug mode raises on one), and is still right."""
    monkeypatch.setenv("PADST_LT24_V2", v2)
    gen = torch.Generator().manual_seed(C)
    R, B = 64, 24
    W = (torch.randn(R, C, generator=gen) * _transposable(R, C, gen)).to("cuda", torch.bfloat16)
    x = torch.randn(B, C, generator=gen).to("cuda", torch.bfloat16)
    dy = torch.randn(B, R, generator=gen).to("cuda", torch.bfloat16)
    perm = torch.randperm(C, generator=gen).cuda()
    comp, comp_t = ops.lt24_compress(W), ops.lt24_compress(W.t().contiguous())
    ops.lt24_mm(x, comp, R, C, None, perm)
    ops.lt24_mm_t(dy, comp_t, R, C, perm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ops.lt24_mm(x, comp, R, C, None, perm)
        dx = ops.lt24_mm_t(dy, comp_t, R, C, perm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(y.float(), x.float()[:, perm] @ W.float().t(), rtol=2e-2, atol=2e-2)
    want = torch.empty(B, C, device="cuda")
    want[:, perm] = dy.float() @ W.float()
    torch.testing.assert_close(dx.float(), want, rtol=2e-2, atol=2e-2)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_bias_epilogue_and_search(dtype, monkeypatch):
    """PADST_LT24_V2=1: the row-permute kernel, and the bias through cuSPARSELt's epilogue (beta = 0) with the
    algorithm searched on the
    first call. Checked: right with and without a permutation; a second bias of the same shape gets its own plan (the
    pointer is in the key); a bias changed in place is seen; lt24_mm_t (no bias) is unaffected; repeated calls give
    the same result."""
    monkeypatch.setenv("PADST_LT24_V2", "1")
    gen = torch.Generator().manual_seed(21)
    R, C, B = 64, 128, 40
    W = (torch.randn(R, C, generator=gen) * _transposable(R, C, gen)).to("cuda", dtype)
    x = torch.randn(B, C, generator=gen).to("cuda", dtype)
    dy = torch.randn(B, R, generator=gen).to("cuda", dtype)
    perm = torch.randperm(C, generator=gen).cuda()
    b1, b2 = (torch.randn(R, generator=gen).to("cuda", dtype) for _ in range(2))
    comp, comp_t = ops.lt24_compress(W), ops.lt24_compress(W.t().contiguous())
    Wf = W.float()
    for p in (None, perm):
        xp = x.float() if p is None else x.float()[:, p]
        for b in (b1, b2):
            y = ops.lt24_mm(x, comp, R, C, b, p)
            torch.testing.assert_close(y.float(), xp @ Wf.t() + b.float(), rtol=2e-2, atol=2e-2)
            assert torch.equal(ops.lt24_mm(x, comp, R, C, b, p), y)
    b1.mul_(-2.0)  # same storage, new values: the plan reads the pointer at every call
    torch.testing.assert_close(ops.lt24_mm(x, comp, R, C, b1, None).float(), x.float() @ Wf.t() + b1.float(),
                               rtol=2e-2, atol=2e-2)
    want = torch.empty(B, C, device="cuda")
    want[:, perm] = dy.float() @ Wf
    torch.testing.assert_close(ops.lt24_mm_t(dy, comp_t, R, C, perm).float(), want, rtol=2e-2, atol=2e-2)


@needs_gpu
def test_gpu_fallback_path_for_unsupported_shapes():
    gen = torch.Generator().manual_seed(14)
    R, C = 24, 64  # R not a multiple of 16
    values, col_idx, perm, bias = _gpu_layer(R, C, torch.float16, gen)
    x = torch.randn(8, C, generator=gen).to("cuda", torch.float16)
    path, reason = semi_structured.choose_path(x, values, 2, 4, C)
    assert path == "nm" and "multiples of 16" in reason
    with torch.no_grad():
        y = semi_structured.lt24_linear(x, values, col_idx, 2, 4, C, perm, bias)
    ref = _reference(x.double(), values.double(), col_idx, perm, bias.double(), C)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


@needs_gpu
def test_gpu_bad_inputs():
    gen = torch.Generator().manual_seed(15)
    W = _random_24(32, 64, gen, torch.float32).to("cuda", torch.float16)
    W[7, 12:16] = 1.0
    with pytest.raises(ValueError, match=r"row 7, group 3 \(columns 12\.\.15\) holds 4 non-zeros"):
        ops.lt24_compress(W)
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.lt24_compress(torch.zeros(24, 64, device="cuda", dtype=torch.float16))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        ops.lt24_compress(torch.zeros(32, 64, device="cuda", dtype=torch.float64))
    good = _random_24(32, 64, gen, torch.float32).to("cuda", torch.float16)
    comp = ops.lt24_compress(good)
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="features but in_features"):
        ops.lt24_mm(x[:, :48], comp, 32, 64)
    with pytest.raises(ValueError, match="bytes"):
        ops.lt24_mm(torch.randn(8, 128, device="cuda", dtype=torch.float16), comp, 32, 128)
    with pytest.raises(ValueError, match="not a permutation|permutation"):
        ops.lt24_mm(x, comp, 32, 64, None, torch.zeros(64, dtype=torch.long, device="cuda"))
