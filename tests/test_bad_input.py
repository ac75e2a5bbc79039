"""Bad input: every op rejects it with a clear Python exception naming the bad value, never a crash and
never a silent wrong answer. The hypothesis fuzz tests feed random malformed metadata."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from padst_ext import formats as F
from padst_ext import ops
from padst_ext import reference as ref

from cases import make_case

CLEAR = (ValueError, TypeError, IndexError)


def _block():
    return make_case("block", 4, 64, 32, perm="both", block=(16, 16), sparsity=0.5)


def _nm():
    return make_case("nm", 4, 40, 16, nm=(2, 10), perm="in")


def _diag():
    return make_case("diag", 4, 24, 40, perm="both", sparsity=0.5)


def _block_call(case, **over):
    w = case.weight
    kw = dict(x=case.x, values=w.values, row_ptr=w.row_ptr, col_idx=w.col_idx, col_ptr=w.col_ptr,
              row_idx_t=w.row_idx_t, blk_t=w.blk_t, bias=case.bias, in_perm=case.in_perm, out_perm=case.out_perm)
    kw.update(over)
    return ops.block_mm(**kw)


def _block_t_call(case, **over):
    w = case.weight
    kw = dict(dy=torch.randn(case.B, case.R), values=w.values, row_ptr=w.row_ptr, col_idx=w.col_idx,
              col_ptr=w.col_ptr, row_idx_t=w.row_idx_t, blk_t=w.blk_t, in_perm=case.in_perm, out_perm=case.out_perm)
    kw.update(over)
    return ops.block_mm_t(**kw)


def _block_dw_call(case, **over):
    w = case.weight
    kw = dict(dy=torch.randn(case.B, case.R), x=case.x, row_ptr=w.row_ptr, col_idx=w.col_idx, block_rows=16,
              block_cols=16, in_perm=case.in_perm, out_perm=case.out_perm)
    kw.update(over)
    return ops.block_sddmm(**kw)


def _nm_call(case, fn="mm", **over):
    w = case.weight
    if fn == "mm":
        kw = dict(x=case.x, values=w.values, col_idx=w.col_idx, n=w.n, m=w.m, bias=case.bias)
        kw.update(over)
        return ops.nm_mm(**kw)
    if fn == "t":
        kw = dict(dy=torch.randn(case.B, case.R), values=w.values, col_idx=w.col_idx, n=w.n, m=w.m)
        kw.update(over)
        return ops.nm_mm_t(**kw)
    kw = dict(dy=torch.randn(case.B, case.R), x=case.x, col_idx=w.col_idx, n=w.n, m=w.m)
    kw.update(over)
    return ops.nm_sddmm(**kw)


def _diag_call(case, fn="mm", **over):
    w = case.weight
    if fn == "mm":
        kw = dict(x=case.x, values=w.values, offsets=w.offsets, out_features=case.R, bias=case.bias,
                  in_perm=case.in_perm, out_perm=case.out_perm)
        kw.update(over)
        return ops.diag_mm(**kw)
    if fn == "t":
        kw = dict(dy=torch.randn(case.B, case.R), values=w.values, offsets=w.offsets, in_features=case.C,
                  in_perm=case.in_perm, out_perm=case.out_perm)
        kw.update(over)
        return ops.diag_mm_t(**kw)
    kw = dict(dy=torch.randn(case.B, case.R), x=case.x, offsets=w.offsets, in_perm=case.in_perm,
              out_perm=case.out_perm)
    kw.update(over)
    return ops.diag_sddmm(**kw)


def _dup_perm(n):
    p = torch.arange(n)
    p[3] = 5
    return p


B, N, D = _block(), _nm(), _diag()
w = B.weight
bad_col = w.col_idx.clone()
bad_col[0] = 99
unsorted = w.col_idx.clone()
unsorted[0], unsorted[1] = int(w.col_idx[1]), int(w.col_idx[0])
neg_col = w.col_idx.clone()
neg_col[2] = -1
bad_rowptr = w.row_ptr.clone()
bad_rowptr[1] = 7

CASES = [
    # block
    ("block out-of-range col_idx", lambda: _block_call(B, col_idx=bad_col), ValueError, r"col_idx\[0\] = 99"),
    ("block negative col_idx", lambda: _block_call(B, col_idx=neg_col), ValueError, r"col_idx\[2\] = -1"),
    ("block unsorted col_idx", lambda: _block_call(B, col_idx=unsorted), ValueError, r"strictly increasing"),
    ("block bad row_ptr", lambda: _block_call(B, row_ptr=bad_rowptr), ValueError, r"row_ptr"),
    ("block row_ptr length", lambda: _block_call(B, row_ptr=w.row_ptr[:-1]), ValueError, r"row_ptr\[-1\]"),
    ("block perm not bijection", lambda: _block_call(B, in_perm=_dup_perm(64)), ValueError,
     r"in_perm is not a permutation of 0..63: value 5"),
    ("block perm out of range", lambda: _block_call(B, out_perm=torch.arange(32) + 1), ValueError,
     r"out_perm is not a permutation of 0..31: entry 31 is 32"),
    ("block perm length", lambda: _block_call(B, in_perm=torch.arange(63)), ValueError,
     r"in_perm must have length 64, got length 63"),
    ("block perm dtype", lambda: _block_call(B, in_perm=torch.arange(64.0)), TypeError, r"in_perm must be an int32"),
    ("block block size does not divide C", lambda: _block_call(B, x=torch.randn(4, 72)), ValueError,
     r"do not divide in_features 72"),
    ("block dtype mismatch", lambda: _block_call(B, x=B.x.double()), TypeError, r"values has dtype"),
    ("block int x", lambda: _block_call(B, x=B.x.long()), TypeError, r"x must be float32"),
    ("block rank of x", lambda: _block_call(B, x=B.x[None]), ValueError, r"x must be 2-D"),
    ("block rank of values", lambda: _block_call(B, values=w.values[0]), ValueError, r"values must be 3-D"),
    ("block values count", lambda: _block_call(B, values=w.values[1:]), ValueError, r"values holds"),
    ("block bias shape", lambda: _block_call(B, bias=torch.zeros(31)), ValueError, r"bias must have shape \[32\]"),
    ("block stale transpose", lambda: _block_call(B, blk_t=w.blk_t.flip(0)), ValueError,
     r"transpose metadata does not match"),
    ("block_t bad perm", lambda: _block_t_call(B, out_perm=_dup_perm(32)), ValueError, r"out_perm is not a perm"),
    ("block_t dy width", lambda: _block_t_call(B, dy=torch.randn(4, 48)), ValueError,
     r"dy has 48 columns but the weight has 32 rows"),
    ("block_t stale transpose", lambda: _block_t_call(B, row_idx_t=w.row_idx_t.flip(0)), ValueError,
     r"transpose metadata"),
    ("transpose meta unsorted", lambda: ops.block_transpose_meta(w.row_ptr, unsorted, 4), ValueError,
     r"padst::block_transpose_meta: col_idx must be strictly increasing"),
    ("transpose meta range", lambda: ops.block_transpose_meta(w.row_ptr, w.col_idx, 2), ValueError,
     r"out of range for 2 block columns"),
    ("transpose meta row_ptr", lambda: ops.block_transpose_meta(bad_rowptr, w.col_idx, 4), ValueError,
     r"row_ptr must be non-decreasing"),
    ("block_sddmm block size does not divide", lambda: _block_dw_call(B, block_rows=24), ValueError,
     r"block rows 24 do not divide out_features 32"),
    ("block_sddmm batch mismatch", lambda: _block_dw_call(B, x=torch.randn(5, 64)), ValueError,
     r"dy has 4 rows but x has 5"),
    ("block_sddmm bad col", lambda: _block_dw_call(B, col_idx=bad_col), ValueError, r"col_idx\[0\] = 99"),
    # N:M
    ("nm N >= M", lambda: _nm_call(N, n=10, m=10), ValueError, r"1 <= N < M, got N=10, M=10"),
    ("nm M does not divide C", lambda: _nm_call(N, n=1, m=3), ValueError, r"M=3 does not divide in_features 40"),
    ("nm index out of range", lambda: _nm_call(N, col_idx=N.weight.col_idx + 40), ValueError,
     r"outside the valid range \[0, 40\)"),
    ("nm negative index", lambda: _nm_call(N, col_idx=N.weight.col_idx - 100), ValueError, r"outside the valid"),
    ("nm index dtype", lambda: _nm_call(N, col_idx=N.weight.col_idx.float()), TypeError, r"col_idx must be an int32"),
    ("nm values width", lambda: _nm_call(N, n=1), ValueError, r"values must have shape"),
    ("nm dtype mismatch", lambda: _nm_call(N, values=N.weight.values.double()), TypeError, r"values has dtype"),
    ("nm rank", lambda: _nm_call(N, x=N.x[0]), ValueError, r"x must be 2-D"),
    ("nm bias", lambda: _nm_call(N, bias=torch.zeros(3)), ValueError, r"bias must have shape \[16\]"),
    ("nm_t N >= M", lambda: _nm_call(N, "t", n=4, m=2), ValueError, r"1 <= N < M"),
    ("nm_t index", lambda: _nm_call(N, "t", col_idx=N.weight.col_idx + 40), ValueError, r"outside the valid"),
    ("nm_t dy width", lambda: _nm_call(N, "t", dy=torch.randn(4, 3)), ValueError, r"dy has 3 columns"),
    ("nm_sddmm index", lambda: _nm_call(N, "dw", col_idx=N.weight.col_idx - 41), ValueError, r"outside the valid"),
    ("nm_sddmm M divides", lambda: _nm_call(N, "dw", m=7, n=1), ValueError, r"M=7 does not divide"),
    # diagonal
    ("diag offset out of range", lambda: _diag_call(D, offsets=D.weight.offsets + 40), ValueError,
     r"offsets\[0\] = \d+ is outside \[0, max\(R, C\)\) = \[0, 40\)"),
    ("diag duplicate offsets", lambda: _diag_call(D, offsets=D.weight.offsets[[0, 0]], values=D.weight.values[:2]),
     ValueError, r"offsets must be distinct, but offset \d+ appears at positions 0 and 1"),
    ("diag negative offset", lambda: _diag_call(D, offsets=D.weight.offsets - 100), ValueError, r"is outside"),
    ("diag values width", lambda: _diag_call(D, values=D.weight.values[:, 1:]), ValueError,
     r"min\(R, C\) = 24 entries"),
    ("diag offsets count", lambda: _diag_call(D, offsets=D.weight.offsets[1:]), ValueError, r"one per diagonal"),
    ("diag perm", lambda: _diag_call(D, in_perm=_dup_perm(24)), ValueError, r"in_perm is not a permutation"),
    ("diag perm length", lambda: _diag_call(D, out_perm=torch.arange(24)), ValueError, r"out_perm must have length 40"),
    ("diag dtype", lambda: _diag_call(D, values=D.weight.values.half()), TypeError, r"values has dtype"),
    ("diag_t perm", lambda: _diag_call(D, "t", out_perm=_dup_perm(40)), ValueError, r"out_perm is not a perm"),
    ("diag_t offsets", lambda: _diag_call(D, "t", offsets=D.weight.offsets * 0 + 40), ValueError, r"is outside"),
    ("diag_sddmm batch", lambda: _diag_call(D, "dw", x=torch.randn(3, 24)), ValueError, r"dy has 4 rows but x"),
    ("diag_sddmm offsets dtype", lambda: _diag_call(D, "dw", offsets=D.weight.offsets.float()), TypeError,
     r"offsets must be an int32"),
    # dense grad
    ("dense_grad perm", lambda: ops.dense_grad(torch.randn(4, 8), torch.randn(4, 6), in_perm=_dup_perm(6)),
     ValueError, r"in_perm is not a permutation of 0..5"),
    ("dense_grad batch", lambda: ops.dense_grad(torch.randn(4, 8), torch.randn(3, 6)), ValueError, r"rows but x"),
]


@pytest.mark.parametrize("name,call,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_rejects_bad_input(name, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_format_conversions_reject_bad_input():
    with pytest.raises(ValueError, match=r"block size 16x16 must divide the weight shape 40x32"):
        F.block_from_dense(torch.randn(40, 32), torch.ones(2, 2, dtype=torch.bool), (16, 16))
    mask = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask is not 2:4: row 0, group 0 .* holds 4"):
        F.nm_from_dense(torch.randn(4, 8), mask, 2, 4)
    with pytest.raises(ValueError, match=r"1 <= N < M, got N=4, M=4"):
        F.check_nm_mask(mask, 4, 4)
    with pytest.raises(ValueError, match=r"value 1 appears 2 times"):
        F.check_permutation(torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, max\(R, C\)\) = \[0, 8\)"):
        F.diag_from_dense(torch.randn(8, 4), torch.tensor([8]))


# --- fuzz --------------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(call, reference, valid=None):
    """Either a clear exception, or the same answer as the reference. A crash would kill the test process.
    When the metadata is known to be valid, the op must accept it (no over-rejection)."""
    try:
        out = call()
    except CLEAR:
        assert not valid, "the op rejected valid metadata"
        return "rejected"
    assert valid is not False, "the op accepted invalid metadata"
    torch.testing.assert_close(out, reference())
    return "accepted"


def _valid_block(row_ptr, col_idx, nnzb, nbc):
    rp, ci = row_ptr.tolist(), col_idx.tolist()
    if rp[0] != 0 or rp[-1] != nnzb or len(ci) != nnzb or any(a > b for a, b in zip(rp, rp[1:])):
        return False
    if any(not 0 <= c < nbc for c in ci):
        return False
    return all(all(a < b for a, b in zip(ci[lo:hi], ci[lo + 1:hi])) for lo, hi in zip(rp, rp[1:]))


def _valid_perm(perm, n):
    return perm is None or sorted(perm.tolist()) == list(range(n))


@FUZZ
@given(st.data())
def test_fuzz_block_metadata(data):
    nbr, nbc, br, bc = 3, 4, 8, 8
    R, C = nbr * br, nbc * bc
    ints = st.integers(min_value=-3, max_value=8)
    row_ptr = torch.tensor(data.draw(st.lists(ints, min_size=nbr + 1, max_size=nbr + 1)))
    nnzb = max(0, int(row_ptr[-1])) if data.draw(st.booleans()) else data.draw(st.integers(0, 8))
    col_idx = torch.tensor(data.draw(st.lists(ints, min_size=nnzb, max_size=nnzb)), dtype=torch.long)
    values = torch.randn(nnzb, br, bc, dtype=torch.float64)
    consistent = None  # drawn transpose metadata: validity not known in advance
    if data.draw(st.booleans()):
        col_ptr = torch.tensor(data.draw(st.lists(ints, min_size=nbc + 1, max_size=nbc + 1)))
        row_idx_t = torch.tensor(data.draw(st.lists(ints, min_size=nnzb, max_size=nnzb)), dtype=torch.long)
        blk_t = torch.tensor(data.draw(st.lists(ints, min_size=nnzb, max_size=nnzb)), dtype=torch.long)
    else:  # consistent transpose of whatever CSR was drawn (if the CSR is valid the op must accept it)
        try:
            col_ptr, row_idx_t, blk_t = F.block_transpose_meta(row_ptr.clamp(0, nnzb), col_idx.clamp(0, nbc - 1), nbc)
        except ValueError:
            return
        consistent = True
    perm_kind = data.draw(st.sampled_from(["none", "ok", "bad"]))
    in_perm = None
    if perm_kind == "ok":
        in_perm = torch.randperm(C)
    elif perm_kind == "bad":
        in_perm = torch.tensor(data.draw(st.lists(st.integers(-2, C + 1), min_size=C, max_size=C)))
    x = torch.randn(5, C, dtype=torch.float64)
    meta = (row_ptr, col_idx, col_ptr, row_idx_t, blk_t)
    csr_ok = _valid_block(row_ptr, col_idx, nnzb, nbc) and _valid_perm(in_perm, C)
    valid = csr_ok if consistent else (None if csr_ok else False)
    _outcome(lambda: ops.block_mm(x, values, *meta, in_perm=in_perm),
             lambda: ref.block_mm(x, values, *meta, in_perm=in_perm), valid)
    dy = torch.randn(5, R, dtype=torch.float64)
    _outcome(lambda: ops.block_mm_t(dy, values, *meta, in_perm=in_perm),
             lambda: ref.block_mm_t(dy, values, *meta, in_perm=in_perm), valid)
    _outcome(lambda: ops.block_sddmm(dy, x, row_ptr, col_idx, br, bc, in_perm=in_perm),
             lambda: ref.block_sddmm(dy, x, row_ptr, col_idx, br, bc, in_perm=in_perm), csr_ok)


@FUZZ
@given(st.data())
def test_fuzz_nm_metadata(data):
    R = data.draw(st.integers(1, 6))
    C = data.draw(st.sampled_from([4, 8, 12]))
    n = data.draw(st.integers(-1, 5))
    m = data.draw(st.integers(0, 6))
    K = data.draw(st.integers(0, 6))
    col_idx = torch.tensor(data.draw(st.lists(st.integers(-2, C + 1), min_size=R * K, max_size=R * K)),
                           dtype=data.draw(st.sampled_from([torch.int32, torch.int64]))).reshape(R, K)
    values = torch.randn(R, K, dtype=torch.float64)
    x = torch.randn(3, C, dtype=torch.float64)
    dy = torch.randn(3, R, dtype=torch.float64)
    valid = (1 <= n < m and C % m == 0 and K == C // m * n
             and bool(((col_idx >= 0) & (col_idx < C)).all()))
    _outcome(lambda: ops.nm_mm(x, values, col_idx, n, m), lambda: ref.nm_mm(x, values, col_idx, n, m), valid)
    # nm_mm_t has no in_features argument: its contract is C = K * m / n
    C_t = K // n * m if n >= 1 and K % n == 0 else -1
    valid_t = 1 <= n < m and C_t >= 0 and bool(((col_idx >= 0) & (col_idx < C_t)).all())
    _outcome(lambda: ops.nm_mm_t(dy, values, col_idx, n, m), lambda: ref.nm_mm_t(dy, values, col_idx, n, m), valid_t)
    _outcome(lambda: ops.nm_sddmm(dy, x, col_idx, n, m), lambda: ref.nm_sddmm(dy, x, col_idx, n, m), valid)


@FUZZ
@given(st.data())
def test_fuzz_diag_metadata(data):
    R = data.draw(st.integers(1, 9))
    C = data.draw(st.integers(1, 9))
    K = data.draw(st.integers(0, 4))
    L = data.draw(st.sampled_from([min(R, C), max(R, C), 1]))
    offsets = torch.tensor(data.draw(st.lists(st.integers(-2, max(R, C) + 1), min_size=K, max_size=K)),
                           dtype=torch.long)
    values = torch.randn(K, L, dtype=torch.float64)
    perm_kind = data.draw(st.sampled_from(["none", "ok", "bad"]))
    out_perm = None
    if perm_kind == "ok":
        out_perm = torch.randperm(R)
    elif perm_kind == "bad":
        out_perm = torch.tensor(data.draw(st.lists(st.integers(-1, R), min_size=R, max_size=R)))
    x = torch.randn(4, C, dtype=torch.float64)
    dy = torch.randn(4, R, dtype=torch.float64)
    offsets_ok = (bool(((offsets >= 0) & (offsets < max(R, C))).all())
                  and offsets.unique().numel() == offsets.numel() and _valid_perm(out_perm, R))
    valid = offsets_ok and L == min(R, C)
    _outcome(lambda: ops.diag_mm(x, values, offsets, R, out_perm=out_perm),
             lambda: ref.diag_mm(x, values, offsets, R, out_perm=out_perm), valid)
    _outcome(lambda: ops.diag_mm_t(dy, values, offsets, C, out_perm=out_perm),
             lambda: ref.diag_mm_t(dy, values, offsets, C, out_perm=out_perm), valid)
    _outcome(lambda: ops.diag_sddmm(dy, x, offsets, out_perm=out_perm),
             lambda: ref.diag_sddmm(dy, x, offsets, out_perm=out_perm), offsets_ok)


# --- an operand on the meta device beside real data ---------------------------------------


def _meta_calls():
    """(op name, callable taking a function that maps each tensor operand, by name, to the tensor to pass)."""
    gen = torch.Generator().manual_seed(0)
    bw = F.block_from_dense(torch.randn(32, 32, generator=gen), torch.ones(2, 2, dtype=torch.bool), (16, 16))
    nmask = torch.zeros(8, 4, 4, dtype=torch.bool)
    nmask[..., 0] = True
    nw = F.nm_from_dense(torch.randn(8, 16, generator=gen), nmask.reshape(8, 16), 1, 4)
    dwt = F.diag_from_dense(torch.randn(8, 16, generator=gen), torch.tensor([0, 3]))
    x16, x32, dy8, dy32 = torch.randn(3, 16), torch.randn(3, 32), torch.randn(3, 8), torch.randn(3, 32)
    p16, p32, p8 = torch.randperm(16), torch.randperm(32), torch.randperm(8)
    ops = torch.ops.padst
    meta = list(bw.meta())
    return [
        ("block_mm", dict(x=x32, values=bw.values, row_ptr=meta[0], col_idx=meta[1], col_ptr=meta[2],
                          row_idx_t=meta[3], blk_t=meta[4], bias=torch.randn(32), in_perm=p32, out_perm=p32)),
        ("block_mm_t", dict(dy=dy32, values=bw.values, row_ptr=meta[0], col_idx=meta[1], col_ptr=meta[2],
                            row_idx_t=meta[3], blk_t=meta[4], in_perm=p32, out_perm=p32)),
        ("block_sddmm", dict(dy=dy32, x=x32, row_ptr=meta[0], col_idx=meta[1], block_rows=16, block_cols=16,
                             in_perm=p32, out_perm=p32)),
        ("block_transpose_meta", dict(row_ptr=meta[0], col_idx=meta[1], num_block_cols=2)),
        ("nm_mm", dict(x=x16, values=nw.values, col_idx=nw.col_idx, n=1, m=4, bias=torch.randn(8))),
        ("nm_mm_t", dict(dy=dy8, values=nw.values, col_idx=nw.col_idx, n=1, m=4)),
        ("nm_sddmm", dict(dy=dy8, x=x16, col_idx=nw.col_idx, n=1, m=4)),
        ("diag_mm", dict(x=x16, values=dwt.values, offsets=dwt.offsets, out_features=8, bias=torch.randn(8),
                         in_perm=p16, out_perm=p8)),
        ("diag_mm_t", dict(dy=dy8, values=dwt.values, offsets=dwt.offsets, in_features=16, in_perm=p16,
                           out_perm=p8)),
        ("diag_sddmm", dict(dy=dy8, x=x16, offsets=dwt.offsets, in_perm=p16, out_perm=p8)),
        ("dense_grad", dict(dy=dy8, x=x16, in_perm=p16, out_perm=p8)),
    ], ops


@pytest.mark.parametrize("i", range(11), ids=lambda i: ["block_mm", "block_mm_t", "block_sddmm",
                                                         "block_transpose_meta", "nm_mm", "nm_mm_t", "nm_sddmm",
                                                         "diag_mm", "diag_mm_t", "diag_sddmm", "dense_grad"][i])
def test_an_operand_on_meta_beside_real_data_is_refused(i):
    """Each tensor operand in turn on the meta device while the others hold data: a ValueError naming it, never the
    fake kernel's uninitialised output. All operands on meta is shape inference and still works."""
    calls, ops = _meta_calls()
    name, kw = calls[i]
    op = getattr(ops, name)
    tensor_args = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    assert tensor_args
    for k in tensor_args:
        bad = dict(kw, **{k: kw[k].to("meta")})
        with pytest.raises(ValueError, match=rf"padst::{name}: {k} is on the meta device but \w+ is on cpu"):
            op(**bad)
    all_meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = op(**all_meta)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.device.type == "meta" for o in outs)


def test_sparse_linear_with_a_buffer_on_meta_is_refused():
    """A SparseLinear whose metadata buffer was left on meta (e.g. a partial load after meta-device init)."""
    from padst_ext import SparseLinear

    layer = SparseLinear(32, 32, structure="block", sparsity=0.5, block_size=16)
    layer.col_idx = layer.col_idx.to("meta")
    with pytest.raises(ValueError, match="is on the meta device but"):
        layer(torch.randn(4, 32))


# --- misconfiguration is an error naming the argument -------------------------------------


def _dst_model():
    from padst_ext import SparseLinear

    layer = SparseLinear(32, 32, structure="block", sparsity=0.5, block_size=16)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), layer, torch.nn.Linear(32, 8))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kw,err,match", [
    (dict(total_steps=0), ValueError, "total_steps must be an integer >= 1, got 0"),
    (dict(total_steps=-5), ValueError, "total_steps must be an integer >= 1, got -5"),
    (dict(total_steps=10.5), TypeError, "total_steps must be an integer"),
    (dict(total_steps=10, end=0), ValueError, "end must be"),
    (dict(total_steps=10, end=-1), ValueError, "end must be"),
    (dict(total_steps=10, end=0.01), ValueError, "stops the updates at step 0"),
    (dict(total_steps=10, update_interval=2.5), TypeError, "update_interval must be an integer >= 1, got 2.5"),
    (dict(total_steps=10, update_interval=0), ValueError, "update_interval must be an integer >= 1, got 0"),
])
def test_dst_misconfiguration_is_an_error(kw, err, match):
    from padst_ext import DST

    model, opt = _dst_model()
    with pytest.raises(err, match=match):
        DST(model, opt, **kw)


@pytest.mark.parametrize("kw,err,match", [
    (dict(in_features=2.7), TypeError, "in_features must be an integer >= 1, got 2.7"),
    (dict(out_features=0), ValueError, "out_features must be an integer >= 1, got 0"),
    (dict(sparsity=None), ValueError, "sparsity must be a number in \\[0, 1\\) for structure='block'"),
    (dict(sparsity="0.9"), TypeError, "sparsity must be a number"),
    (dict(block_size=2.5), TypeError, "block_size must be an integer >= 1, got 2.5"),
    (dict(block_size=(16, 16, 16)), TypeError, "block_size must be an integer or a pair"),
])
def test_sparse_linear_misconfiguration_is_an_error(kw, err, match):
    from padst_ext import SparseLinear

    args = dict(in_features=32, out_features=32, structure="block", sparsity=0.5, block_size=16)
    args.update(kw)
    with pytest.raises(err, match=match):
        SparseLinear(args.pop("in_features"), args.pop("out_features"), **args)


def test_nm_needs_no_sparsity_when_n_and_m_are_given():
    from padst_ext import SparseLinear

    assert SparseLinear(32, 32, structure="nm", sparsity=None, n=1, m=4).structure.config()["m"] == 4


def test_a_zero_dim_input_is_an_error():
    from padst_ext import SparseLinear

    layer = SparseLinear(32, 32, structure="block", sparsity=0.5, block_size=16)
    with pytest.raises(ValueError, match="expected input with last dimension 32, got shape \\(\\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.block_linear(torch.tensor(1.0), F.block_from_dense(torch.randn(32, 32), torch.ones(2, 2, dtype=torch.bool),
                                                                (16, 16)))


def test_block_transpose_meta_bounds_num_block_cols():
    w = F.block_from_dense(torch.randn(32, 32), torch.ones(2, 2, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match=r"num_block_cols must be in \[0, 2\^31\).*4611686018427387904"):
        torch.ops.padst.block_transpose_meta(w.row_ptr, w.col_idx, 2**62)


# --- a state dict is validated on load like a constructed layer --------------------------


def _hard_layer(structure):
    from padst_ext import SparseLinear

    kw = dict(nm=dict(n=1, m=4, sparsity=None), block=dict(block_size=8, sparsity=0.5),
              diagonal=dict(sparsity=0.5))[structure]
    layer = SparseLinear(32, 32, structure=structure, seed=0, **kw)
    layer.harden()
    return layer, kw


@pytest.mark.parametrize("structure", ["nm", "block", "diagonal"])
def test_a_non_bijective_permutation_in_a_state_dict_is_refused(structure):
    from padst_ext import SparseLinear

    layer, kw = _hard_layer(structure)
    sd = layer.state_dict()
    other = SparseLinear(32, 32, structure=structure, seed=1, **kw)
    other.load_state_dict(sd)  # a valid one loads
    bad = dict(sd, perm=torch.zeros_like(sd["perm"]))
    with pytest.raises(ValueError, match="perm is not a permutation of 0..31: value 0 appears 32 times"):
        other.load_state_dict(bad)


@pytest.mark.parametrize("damage,match", [
    ("group", r"mask is not 1:4: row 0, group 0 .* holds 0 non-zeros"),
    ("repeat", r"col_idx repeats a column in row 0"),
    ("range", r"col_idx holds values in \[0, 32\], outside \[0, 32\)"),
    ("width", r"col_idx has 7 entries per row; 1:4 of 32 inputs has 8"),
])
def test_a_broken_nm_pattern_in_a_state_dict_is_refused(damage, match):
    layer, _ = _hard_layer("nm")
    sd = layer.state_dict()
    ci = sd["col_idx"].clone()
    if damage == "group":
        ci[0, 0] = 4 + (int(ci[0, 1]) - 4 + 1) % 4  # group 0 loses its entry, group 1 gets a second one
    elif damage == "repeat":
        ci[0, 0] = ci[0, 1]
    elif damage == "range":
        ci[0, -1] = 32
    else:
        ci = ci[:, :7].contiguous()
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(dict(sd, col_idx=ci), strict=True)


def test_inconsistent_block_metadata_and_bad_offsets_in_a_state_dict_are_refused():
    layer, _ = _hard_layer("block")
    sd = layer.state_dict()
    bad = dict(sd, blk_t=sd["blk_t"].flip(0))
    with pytest.raises(ValueError, match="do not describe the pattern"):
        layer.load_state_dict(bad)
    dlayer, _ = _hard_layer("diagonal")
    sd = dlayer.state_dict()
    off = sd["offsets"].clone()
    off[-1] = off[0]
    with pytest.raises(ValueError, match="offsets must be distinct"):
        dlayer.load_state_dict(dict(sd, offsets=off))


def test_numpy_and_integral_float_arguments_are_accepted():
    """The argument checks take any real number that is an integer (numpy scalars, 16.0), not only Python ints."""
    import numpy as np

    from padst_ext import SparseLinear

    layer = SparseLinear(np.int64(32), 32.0, structure="block", sparsity=np.float32(0.5), block_size=np.int64(16))
    assert layer.in_features == 32 and layer.out_features == 32 and layer.structure.config()["block_size"] == (16, 16)
