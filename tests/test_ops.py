"""Every kernel against its plain-PyTorch reference: forward, dx, sampled dW and autograd, permuted and not,
over shapes (square, R<C, R>C, batch 1, batch past the tile sizes), sparsities and dtypes; plus gradcheck,
opcheck and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch

from padst_ext import formats as F
from padst_ext import ops
from padst_ext import reference as ref

from cases import DEVICES, DTYPES, assert_close_to_reference, has_cuda_kernel, make_case

# (structure, B, C, R, kwargs): non-square both ways, batch 1, batches beyond the kernels' tiles,
# block widths with compile-time (16, 32, 8) and run-time (12, 20) tiles, sparsities 50-95%.
SHAPES = [
    ("block", 1, 64, 32, dict(block=(16, 16), sparsity=0.5)),
    ("block", 7, 64, 128, dict(block=(16, 16), sparsity=0.75)),
    ("block", 33, 128, 64, dict(block=(32, 32), sparsity=0.5)),
    ("block", 70, 64, 96, dict(block=(32, 8), sparsity=0.9)),
    ("block", 5, 80, 48, dict(block=(12, 20), sparsity=0.75)),
    ("block", 3, 320, 64, dict(block=(16, 16), sparsity=0.95)),
    ("nm", 1, 80, 32, dict(nm=(1, 10))),
    ("nm", 17, 160, 96, dict(nm=(1, 20))),
    ("nm", 5, 64, 128, dict(nm=(2, 4))),
    ("nm", 70, 48, 24, dict(nm=(3, 8))),
    ("diag", 1, 64, 32, dict(sparsity=0.5)),
    ("diag", 9, 32, 96, dict(sparsity=0.75)),
    ("diag", 17, 80, 80, dict(sparsity=0.9)),
    ("diag", 70, 48, 24, dict(sparsity=0.5)),
    ("diag", 3, 200, 100, dict(sparsity=0.95)),
]
PERMS = ["none", "in", "out", "both"]


def _shape_id(s):
    structure, B, C, R, kw = s
    return f"{structure}-B{B}-C{C}-R{R}-" + "-".join(f"{k}{v}" for k, v in kw.items()).replace(" ", "")


def _cases(structures=("block", "nm", "diag")):
    for s in SHAPES:
        if s[0] not in structures:
            continue
        for perm in PERMS:
            if s[0] == "nm" and perm in ("out", "both"):
                continue  # N:M takes only an input permutation (folded into its indices)
            yield pytest.param(s, perm, id=f"{_shape_id(s)}-perm_{perm}")


# --- structure adapters: the op and the reference, called the same way ----------------------------------


def fwd(case, x, values, bias, impl):
    return case.weight.mm(x, bias, values=values, impl=impl)


def dx(case, dy, values, impl):
    return case.weight.mm_t(dy, values=values, impl=impl)


def dw(case, dy, x, impl):
    return case.weight.sddmm(dy, x, impl=impl)


def _make(s, perm, dtype, device, bias=True, seed=0):
    structure, B, C, R, kw = s
    return make_case(structure, B, C, R, perm=perm, dtype=dtype, device=device, bias=bias, seed=seed, **kw)


def _f64(t):
    return None if t is None else t.double()


# --- forward / dx / dW -------------------------------------------------------------------------------------


FORWARD_OP = {"block": "block_mm", "nm": "nm_mm", "diag": "diag_mm"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,perm", list(_cases()))
def test_forward(shape, perm, dtype, device):
    if device == "cuda" and not has_cuda_kernel(FORWARD_OP[shape[0]]):
        pytest.skip(f"padst::{FORWARD_OP[shape[0]]} has no CUDA kernel in this build")
    case = _make(shape, perm, dtype, device)
    out = fwd(case, case.x, case.weight.values, case.bias, ops)
    ref64 = fwd(case, _f64(case.x), _f64(case.weight.values), _f64(case.bias), ref)
    ref_lp = fwd(case, case.x, case.weight.values, case.bias, ref)
    assert_close_to_reference(out, ref64, ref_lp, "forward")


def _skip_without_cuda_kernel(device, *names):
    for name in names:
        if device == "cuda" and not has_cuda_kernel(name):
            pytest.skip(f"padst::{name} has no CUDA kernel in this build")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,perm", list(_cases()))
def test_backward_ops(shape, perm, dtype, device):
    _skip_without_cuda_kernel(device, shape[0] + "_mm_t", shape[0] + "_sddmm")
    case = _make(shape, perm, dtype, device)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(case.B, case.R, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    values = case.weight.values
    assert_close_to_reference(dx(case, dy, values, ops), dx(case, _f64(dy), _f64(values), ref),
                              dx(case, dy, values, ref), "dx")
    assert_close_to_reference(dw(case, dy, case.x, ops), dw(case, _f64(dy), _f64(case.x), ref),
                              dw(case, dy, case.x, ref), "dW")


@pytest.mark.parametrize("shape,perm", list(_cases()))
def test_autograd_matches_dense_reference(shape, perm):
    """Gradients through the registered autograd equal those of a dense masked layer (float64, CPU)."""
    case = _make(shape, perm, torch.float64, "cpu")
    x = case.x.clone().requires_grad_()
    v = case.weight.values.clone().requires_grad_()
    b = case.bias.clone().requires_grad_()
    y = fwd(case, x, v, b, ops)
    dy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, v, b), dy)

    x2 = case.x.clone().requires_grad_()
    v2 = case.weight.values.clone().requires_grad_()
    b2 = case.bias.clone().requires_grad_()
    y2 = fwd(case, x2, v2, b2, ref)  # dense product of the pattern's matrix, built from v2 by index_put
    rx, rv, rb = torch.autograd.grad(y2, (x2, v2, b2), dy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gb, rb)


@pytest.mark.parametrize("structure", ["block", "nm", "diag"])
def test_autograd_without_optional_args(structure):
    """No bias, no permutations: the dispatcher drops trailing defaults; gradients must still flow."""
    case = make_case(structure, 5, 80, 40, block=(8, 8), nm=(1, 4), perm="none", bias=False, dtype=torch.float64)
    w = case.weight
    x = case.x.clone().requires_grad_()
    v = w.values.clone().requires_grad_()
    y = w.mm(x, values=v)  # the weight object calls the op with its trailing arguments left out
    gx, gv = torch.autograd.grad(y.square().sum(), (x, v))
    x2 = case.x.clone().requires_grad_()
    v2 = w.values.clone().requires_grad_()
    y2 = fwd(case, x2, v2, None, ref)
    rx, rv = torch.autograd.grad(y2.square().sum(), (x2, v2))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gv, rv)


@pytest.mark.parametrize("nbr,nbc,density", [(1, 1, 1.0), (4, 6, 0.5), (16, 3, 0.3), (5, 40, 0.1), (3, 4, 0.0)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_block_transpose_meta(nbr, nbc, density, index_dtype):
    g = torch.Generator().manual_seed(nbr * 100 + nbc)
    mask = torch.rand(nbr, nbc, generator=g) < density
    w = F.block_from_dense(torch.randn(nbr * 2, nbc * 2), mask, (2, 2))
    got = ops.block_transpose_meta(w.row_ptr.to(index_dtype), w.col_idx.to(index_dtype), nbc)
    for a, b in zip(got, ref.block_transpose_meta(w.row_ptr, w.col_idx, nbc)):
        assert a.dtype == torch.int64 and torch.equal(a, b)


def test_permuted_equals_explicit_gather():
    """The fused permutation equals materialising x[:, perm] and calling the unpermuted kernel."""
    case = make_case("block", 9, 64, 64, perm="in", bias=False)
    w = case.weight
    fused = ops.block_mm(case.x, w.values, *w.meta(), in_perm=case.in_perm)
    explicit = ops.block_mm(case.x[:, case.in_perm], w.values, *w.meta())
    torch.testing.assert_close(fused, explicit)
    # and the permutation matters: a different answer without it
    assert not torch.allclose(fused, ops.block_mm(case.x, w.values, *w.meta()))


def test_nm_folded_permutation_equals_gather():
    case = make_case("nm", 6, 80, 40, perm="in", bias=False, nm=(2, 10))
    mask = case.extra["logical_mask"]
    dense = F.nm_to_dense(case.weight.values, case.weight.col_idx, 80)  # effective S P
    plain = F.nm_from_dense(dense[:, case.in_perm], mask, 2, 10)  # logical S, no permutation
    y_folded = ops.nm_linear(case.x, case.weight)
    y_gather = ops.nm_linear(case.x[:, case.in_perm], plain)
    torch.testing.assert_close(y_folded, y_gather)


@pytest.mark.parametrize("structure", ["block", "diag"])
def test_dense_grad(structure):
    case = make_case(structure, 11, 64, 32, perm="both")
    dy = torch.randn(11, 32)
    got = ops.dense_grad(dy, case.x, case.in_perm, case.out_perm)
    torch.testing.assert_close(got, ref.dense_grad(dy, case.x, case.in_perm, case.out_perm))
    # The sampled gradients are the dense gradient read on the pattern.
    sampled = dw(case, dy, case.x, ops)
    if structure == "diag":
        rows, cols = F.diag_coords(case.weight.offsets, (32, 64))
        torch.testing.assert_close(sampled, got[rows, cols])
    else:
        w = case.weight
        mask = F.block_to_dense(torch.ones_like(w.values), w.row_ptr, w.col_idx, w.shape).bool()
        torch.testing.assert_close(F.block_to_dense(sampled, w.row_ptr, w.col_idx, w.shape), got * mask)


def test_batched_leading_dims():
    case = make_case("diag", 12, 48, 24, perm="both")
    x3 = case.x.reshape(3, 4, 48)
    y3 = ops.diag_linear(x3, case.weight, case.bias, case.in_perm, case.out_perm)
    assert y3.shape == (3, 4, 24)
    torch.testing.assert_close(y3.reshape(12, 24), ops.diag_linear(case.x, case.weight, case.bias, case.in_perm,
                                                                   case.out_perm))


def test_empty_batch_and_empty_pattern():
    case = make_case("block", 4, 32, 32, perm="both")
    w = case.weight
    y = ops.block_mm(case.x[:0], w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)
    assert y.shape == (0, 32)
    empty = F.block_from_dense(torch.randn(32, 32), torch.zeros(2, 2, dtype=torch.bool), (16, 16))
    y = ops.block_mm(case.x, empty.values, *empty.meta(), case.bias, case.in_perm, case.out_perm)
    torch.testing.assert_close(y, case.bias.expand(4, 32))


# --- gradcheck, opcheck, compile ---------------------------------------------------------------------------


def _small_float64_case(structure, perm, device="cpu"):
    """A small float64 case and fresh leaf tensors (x, values, bias) for gradcheck / gradgradcheck."""
    kw = dict(perm=perm, dtype=torch.float64, device=device)
    if structure == "diag_wide":
        case = make_case("diag", 3, 24, 8, sparsity=0.5, **kw)
    elif structure == "block":
        case = make_case("block", 3, 16, 24, block=(8, 8), sparsity=0.5, **kw)
    elif structure == "nm":
        case = make_case("nm", 3, 16, 12, nm=(1, 4), **kw)
    else:
        case = make_case("diag", 3, 12, 20, sparsity=0.5, **kw)
    leaves = tuple(t.clone().requires_grad_() for t in (case.x, case.weight.values, case.bias))
    return case, leaves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure,perm", [("block", "none"), ("block", "both"), ("nm", "none"), ("nm", "in"),
                                            ("diag", "none"), ("diag", "both"), ("diag_wide", "both")])
def test_gradcheck(structure, perm, device):
    _skip_without_cuda_kernel(device, *(structure.split("_")[0] + s for s in ("_mm", "_mm_t", "_sddmm")))
    case, leaves = _small_float64_case(structure, perm, device)
    assert torch.autograd.gradcheck(lambda x, v, b: fwd(case, x, v, b, ops), leaves)


@pytest.mark.parametrize("structure,perm", [("block", "both"), ("nm", "in"), ("diag", "both"), ("diag_wide", "in")])
def test_gradgradcheck(structure, perm):
    """The backward ops have autograd too: second derivatives are exact, not silently zero."""
    case, leaves = _small_float64_case(structure, perm)
    assert torch.autograd.gradgradcheck(lambda x, v, b: fwd(case, x, v, b, ops), leaves)
    x = leaves[0]
    # and the dense grow-score helper
    dy = torch.randn(3, case.R, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda dy, x: ops.dense_grad(dy, x, case.in_perm, case.out_perm), (dy, x))


@pytest.mark.parametrize("structure", ["block", "nm", "diag"])
@pytest.mark.parametrize("which", ["x", "values", "bias"])
def test_partial_requires_grad(structure, which):
    case = make_case(structure, 6, 32, 48, block=(16, 16), nm=(1, 4), perm="both", dtype=torch.float64)
    args = {"x": case.x.clone(), "values": case.weight.values.clone(), "bias": case.bias.clone()}
    args[which].requires_grad_()
    y = fwd(case, args["x"], args["values"], args["bias"], ops)
    (g,) = torch.autograd.grad(y.square().sum(), args[which])
    ref_args = {k: v.detach().clone().requires_grad_(k == which) for k, v in args.items()}
    y2 = fwd(case, ref_args["x"], ref_args["values"], ref_args["bias"], ref)
    (g2,) = torch.autograd.grad(y2.square().sum(), ref_args[which])
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["block", "nm", "diag"])
def test_empty_batch(structure, device):
    _skip_without_cuda_kernel(device, structure + "_mm", structure + "_mm_t", structure + "_sddmm")
    case = make_case(structure, 4, 32, 48, block=(16, 16), nm=(1, 4), perm="both", device=device)
    x = case.x[:0].clone().requires_grad_()
    v = case.weight.values.clone().requires_grad_()
    y = fwd(case, x, v, case.bias, ops)
    assert y.shape == (0, 48)
    gx, gv = torch.autograd.grad(y.sum(), (x, v))
    assert gx.shape == (0, 32) and torch.equal(gv, torch.zeros_like(gv))


def test_zero_output_features():
    x = torch.randn(5, 32)
    empty_block = F.block_from_dense(torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.bool), (16, 16))
    assert ops.block_linear(x, empty_block).shape == (5, 0)
    nm = F.nm_from_dense(torch.randn(0, 32), torch.zeros(0, 32, dtype=torch.bool), 1, 4)
    assert ops.nm_linear(x, nm).shape == (5, 0)
    assert ops.nm_mm_t(torch.randn(5, 0), nm.values, nm.col_idx, 1, 4).abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["block", "nm", "diag"])
def test_non_contiguous_inputs_and_int32_indices(structure, device):
    _skip_without_cuda_kernel(device, structure + "_mm", structure + "_mm_t", structure + "_sddmm")
    case = make_case(structure, 7, 32, 48, block=(16, 16), nm=(1, 4), perm="both", dtype=torch.float64,
                     device=device)
    xt = case.x.T.contiguous().T  # same values, transposed strides
    assert not xt.is_contiguous()
    c32 = copy.copy(case)
    c32.in_perm = None if case.in_perm is None else case.in_perm.int()
    c32.out_perm = None if case.out_perm is None else case.out_perm.int()
    w = case.weight
    c32.weight = w.map_index(torch.Tensor.int)
    torch.testing.assert_close(fwd(c32, xt, w.values, case.bias, ops), fwd(case, case.x, w.values, case.bias, ref))
    dy = torch.randn(48, 7, dtype=torch.float64, device=device).T
    torch.testing.assert_close(dx(c32, dy, w.values, ops), dx(case, dy, w.values, ref))
    torch.testing.assert_close(dw(c32, dy, xt, ops), dw(case, dy, case.x, ref))


def test_diagonal_layout_by_hand():
    """design.md: entry t of diagonal k sits at ((t + o_k) mod R, t) if R >= C, else (t, (t + o_k) mod C)."""
    tall = F.diag_to_dense(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]), (5, 3))
    expect_tall = torch.zeros(5, 3)
    expect_tall[2, 0], expect_tall[3, 1], expect_tall[4, 2] = 1.0, 2.0, 3.0
    assert torch.equal(tall, expect_tall)
    wide = F.diag_to_dense(torch.tensor([[1.0, 2.0]]), torch.tensor([3]), (2, 4))
    expect_wide = torch.zeros(2, 4)
    expect_wide[0, 3], expect_wide[1, 0] = 1.0, 2.0  # (0, 3) and (1, (1+3) mod 4 = 0): the wrap
    assert torch.equal(wide, expect_wide)
    x = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(ops.diag_mm(x, torch.tensor([[1.0, 2.0]]), torch.tensor([3]), 2), x @ expect_wide.T)


def _opcheck_samples():
    for s, perm in [(SHAPES[1], "both"), (SHAPES[4], "none"), (SHAPES[7], "in"), (SHAPES[11], "both"),
                    (SHAPES[13], "in")]:
        yield pytest.param(s, perm, id=f"{_shape_id(s)}-perm_{perm}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,perm", list(_opcheck_samples()))
def test_opcheck(shape, perm, device):
    _skip_without_cuda_kernel(device, *(shape[0] + s for s in ("_mm", "_mm_t", "_sddmm")))
    case = _make(shape, perm, torch.float32, device)
    w = case.weight
    dy = torch.randn(case.B, case.R, device=device, requires_grad=True)  # the backward ops are differentiable too
    x = case.x.clone().requires_grad_()
    v = w.values.clone().requires_grad_()
    b = case.bias.clone().requires_grad_()
    if case.structure == "block":
        br, bc = w.block_size
        meta = list(w.meta())
        torch.library.opcheck(torch.ops.padst.block_mm.default, (x, v, *meta, b, case.in_perm, case.out_perm))
        torch.library.opcheck(torch.ops.padst.block_mm.default, (case.x, w.values, *meta, None, None, None))
        torch.library.opcheck(torch.ops.padst.block_mm_t.default, (dy, v, *meta, case.in_perm, case.out_perm))
        torch.library.opcheck(torch.ops.padst.block_transpose_meta.default, (w.row_ptr, w.col_idx, case.C // bc))
        torch.library.opcheck(torch.ops.padst.block_sddmm.default,
                              (dy, x, w.row_ptr, w.col_idx, br, bc, case.in_perm, case.out_perm))
    elif case.structure == "nm":
        torch.library.opcheck(torch.ops.padst.nm_mm.default, (x, v, w.col_idx, w.n, w.m, b))
        torch.library.opcheck(torch.ops.padst.nm_mm_t.default, (dy, v, w.col_idx, w.n, w.m))
        torch.library.opcheck(torch.ops.padst.nm_sddmm.default, (dy, x, w.col_idx, w.n, w.m))
    else:
        torch.library.opcheck(torch.ops.padst.diag_mm.default,
                              (x, v, w.offsets, case.R, b, case.in_perm, case.out_perm))
        torch.library.opcheck(torch.ops.padst.diag_mm_t.default,
                              (dy, v, w.offsets, case.C, case.in_perm, case.out_perm))
        torch.library.opcheck(torch.ops.padst.diag_sddmm.default,
                              (dy, x, w.offsets, case.in_perm, case.out_perm))
    torch.library.opcheck(torch.ops.padst.dense_grad.default, (dy, x, case.in_perm, case.out_perm))


def test_torch_compile_smoke():
    """All three structures inside one compiled function, forward and backward, no graph breaks."""
    torch._dynamo.reset()
    cb = make_case("block", 8, 64, 32, perm="both")
    cn = make_case("nm", 8, 32, 64, nm=(2, 8), perm="in", seed=1)
    cd = make_case("diag", 8, 64, 64, perm="both", seed=2)

    def model(x, vb, vn, vd):
        h = ops.block_mm(x, vb, *cb.weight.meta(), cb.bias, cb.in_perm, cb.out_perm)
        h = ops.nm_mm(torch.relu(h), vn, cn.weight.col_idx, 2, 8, cn.bias)
        return ops.diag_mm(h, vd, cd.weight.offsets, 64, cd.bias, cd.in_perm, cd.out_perm).square().sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    args = [cb.x, cb.weight.values, cn.weight.values, cd.weight.values]
    a1 = [a.clone().requires_grad_() for a in args]
    a2 = [a.clone().requires_grad_() for a in args]
    out_c = compiled(*a1)
    out_e = model(*a2)
    torch.testing.assert_close(out_c, out_e)
    for g1, g2 in zip(torch.autograd.grad(out_c, a1), torch.autograd.grad(out_e, a2)):
        torch.testing.assert_close(g1, g2)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    case = make_case("block", 8, 64, 32, perm="both")
    w = case.weight

    def f(x):
        return torch.relu(ops.block_mm(x, w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(case.x), f(case.x))


# --- every vectorised CPU kernel variant (csrc/cpu/*.h, one dispatch_isa: base SSE2, AVX2, AVX-512) ---------------


def _isas():
    best = torch.ops.padst._cpu_isa()
    order = ["base", "avx2", "avx512"]
    for isa in order:
        supported = order.index(isa) <= order.index(best)
        yield pytest.param(isa, id=isa, marks=pytest.mark.skipif(not supported, reason=f"CPU lacks {isa}"))


@pytest.fixture
def cpu_isa(request):
    before = torch.ops.padst._cpu_isa()
    torch.ops.padst._cpu_isa(request.param)
    yield request.param
    torch.ops.padst._cpu_isa(before)


# batch sizes around the 32-row tiles and the 8-row vector threshold; odd widths (vector tails, block groups)
ISA_SHAPES = [
    ("block", 8, 64, 96, dict(block=(32, 8), sparsity=0.5)),
    ("block", 130, 96, 64, dict(block=(16, 32), sparsity=0.5)),  # dW over several 64-row batch tiles
    ("block", 33, 80, 48, dict(block=(12, 20), sparsity=0.75)),
    # 36 outputs / 60 inputs: the permuted write-back's vector gathers end in a tail (4 or 12 values)
    ("block", 20, 60, 36, dict(block=(12, 20), sparsity=0.5)),
    ("block", 70, 128, 64, dict(block=(32, 32), sparsity=0.5)),
    # rows of 8 KB (float32) / 4 KB (bfloat16): a permuted input is packed too (its rows would alias in L1)
    ("block", 13, 2048, 32, dict(block=(32, 16), sparsity=0.9)),
    ("nm", 9, 48, 24, dict(nm=(3, 8))),
    ("nm", 65, 160, 70, dict(nm=(1, 20))),
    ("diag", 31, 40, 96, dict(sparsity=0.75)),
    ("diag", 40, 130, 50, dict(sparsity=0.5)),
    ("diag", 17, 64, 64, dict(sparsity=0.9)),
    # P - L = 16 is under one vector chunk: lanes wrap past P onto the diagonal's start (the gathered path), and
    # 150 rows cross the forward's 64-row packing groups
    ("diag", 150, 48, 64, dict(sparsity=0.6)),
    ("diag", 9, 200, 12, dict(sparsity=0.5)),  # wide, L smaller than one vector
]


@pytest.mark.parametrize("cpu_isa", list(_isas()), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=_shape_id)
def test_cpu_isa_variants(shape, dtype, cpu_isa):
    # identity and permuted inputs take different paths (packed copies vs reads through the permutation)
    for perm in ("none", "in") if shape[0] == "nm" else ("none", "both"):
        case = _make(shape, perm, dtype, "cpu")
        gen = torch.Generator().manual_seed(3)
        dy = torch.randn(case.B, case.R, generator=gen, dtype=torch.float64).to(dtype)
        v, x, b = case.weight.values, case.x, case.bias
        assert_close_to_reference(fwd(case, x, v, b, ops), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                                  fwd(case, x, v, b, ref), f"{perm} forward")
        assert_close_to_reference(dx(case, dy, v, ops), dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref),
                                  f"{perm} dx")
        assert_close_to_reference(dw(case, dy, x, ops), dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref),
                                  f"{perm} dW")


def test_cpu_isa_switch_rejects_unknown():
    with pytest.raises(ValueError, match="unknown ISA"):
        torch.ops.padst._cpu_isa("sse9")


def test_cpu_validation_cache_sees_in_place_changes():
    """The CPU ops cache their metadata validation per tensor and version (csrc/meta_cache.h), like the GPU path:
    an in-place write to a permutation or an index tensor is validated again."""
    case = make_case("block", 9, 64, 32, perm="both")
    w = case.weight
    ops.block_mm(case.x, w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)
    hits = torch.ops.padst._metadata_cache_info()[0]
    y = ops.block_mm(case.x, w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)
    assert torch.ops.padst._metadata_cache_info()[0] == hits + 1
    torch.testing.assert_close(y, fwd(case, case.x, w.values, case.bias, ref))
    case.in_perm.copy_(torch.randperm(64))
    torch.testing.assert_close(ops.block_mm(case.x, w.values, *w.meta(), case.bias, case.in_perm, case.out_perm),
                               fwd(case, case.x, w.values, case.bias, ref))
    case.out_perm[0] = case.out_perm[1]
    with pytest.raises(ValueError, match="out_perm is not a permutation"):
        ops.block_mm(case.x, w.values, *w.meta(), case.bias, case.in_perm, case.out_perm)
    c = make_case("nm", 9, 40, 8, nm=(1, 4), perm="none")
    ops.nm_mm(c.x, c.weight.values, c.weight.col_idx, 1, 4)
    c.weight.col_idx[0, 0] = -1
    with pytest.raises(ValueError, match="col_idx holds values"):
        ops.nm_mm(c.x, c.weight.values, c.weight.col_idx, 1, 4)


def test_cpu_nm_batch1_compact_index_follows_in_place_changes():
    """At batch 1 the CPU N:M forward reads a cached uint16 copy of col_idx: an in-place change of the pattern
    must reach it (same tensor, new version), and int32 / int64 indices give the same result."""
    perm = make_case("nm", 1, 48, 16, nm=(2, 8), perm="in")
    torch.testing.assert_close(ops.nm_mm(perm.x, perm.weight.values, perm.weight.col_idx, 2, 8),
                               perm.x @ perm.weight.to_dense().T)
    c = make_case("nm", 1, 48, 16, nm=(2, 8), perm="none")
    w = c.weight
    torch.testing.assert_close(ops.nm_mm(c.x, w.values, w.col_idx, 2, 8), c.x @ w.to_dense().T)
    torch.testing.assert_close(ops.nm_mm(c.x, w.values, w.col_idx.int(), 2, 8), c.x @ w.to_dense().T)
    # move row 0's first entry to a free column of its group (still a valid 2:8 pattern)
    first = w.col_idx[0, :2].tolist()
    free = [j for j in range(first[0] // 8 * 8, first[0] // 8 * 8 + 8) if j not in first]
    w.col_idx[0, 0] = free[0]
    torch.testing.assert_close(ops.nm_mm(c.x, w.values, w.col_idx, 2, 8), c.x @ w.to_dense().T)


@pytest.mark.parametrize("cpu_isa", list(_isas()), indirect=True)
@pytest.mark.parametrize("C,R,nm", [(48, 24, (3, 8)), (160, 70, (1, 20)), (800, 33, (1, 16)), (768, 40, (2, 24))],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_nm_batch1_isa_variants(C, R, nm, dtype, cpu_isa):
    """Batch-1 N:M forward (the gathered dot products, K = 18, 8, 50 and 64 entries per row: the masked AVX-512
    tail, K under one vector, 32 + 16 + tail, whole vectors) on every ISA, with and without a folded permutation."""
    for perm in ("none", "in"):
        c = make_case("nm", 1, C, R, nm=nm, perm=perm, dtype=dtype)
        w = c.weight
        y = ops.nm_mm(c.x, w.values, w.col_idx, *nm, c.bias)
        dense = w.to_dense()
        assert_close_to_reference(y, c.x.double() @ dense.double().T + c.bias.double(),
                                  torch.nn.functional.linear(c.x, dense, c.bias), what=f"{cpu_isa} {perm}")


@pytest.mark.parametrize("B", [1, 9])
def test_cpu_nm_wide_input_keeps_full_indices(B):
    """Past 65536 input columns the CPU N:M forward cannot use its uint16 copy of col_idx and reads the indices
    as given (int64 and int32)."""
    c = make_case("nm", B, 65544, 4, nm=(1, 8), perm="in")
    w = c.weight
    want = c.x.double() @ w.to_dense().double().T + c.bias.double()
    for idx in (w.col_idx, w.col_idx.int()):
        y = ops.nm_mm(c.x, w.values, idx, 1, 8, c.bias)
        assert_close_to_reference(y, want, torch.nn.functional.linear(c.x, w.to_dense(), c.bias))
