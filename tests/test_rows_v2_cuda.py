"""The v2 row kernels (csrc/kernels/rows_v2.h: the N:M and diagonal forward, dx and dW) on a GPU, switched on with
PADST_ROWS_V2=1 (its GPU default stays off until these pass on one): against the float64 reference and the gather
kernel, over dtypes, batch sizes around the CTA's batch tile, the three tile sizes and the ViT-B shapes; autograd and
opcheck. Skipped without a GPU; the same kernel runs on the host in test_cuda_emulation.py (test_emulated_rows_v2*)."""

from __future__ import annotations

import pytest
import torch

from padst_ext import ops
from padst_ext import reference as ref

from cases import assert_close_to_reference, has_cuda_kernel, make_case
from test_ops import _f64, dw, dx, fwd

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernel("nm_mm")),
                                reason="no CUDA device or no CUDA kernels in this build")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B", [1, 7, 33, 4096])
@pytest.mark.parametrize("C,R,nm", [(768, 3072, (1, 12)), (3072, 768, (1, 24)), (1536, 96, (2, 24)),
                                    (64, 1030, (1, 8))])
def test_cuda_rows_v2_nm_matches_reference(C, R, nm, B, dtype, monkeypatch):
    case = make_case("nm", B, C, R, nm=nm, perm="in", dtype=dtype, device="cuda", seed=B + C)
    v, x, b = case.weight.values, case.x, case.bias
    monkeypatch.setenv("PADST_ROWS_V2", "1")
    y = fwd(case, x, v, b, torch.ops.padst)
    torch.cuda.synchronize()
    assert_close_to_reference(y, fwd(case, _f64(x), _f64(v), _f64(b), ref), fwd(case, x, v, b, ref), "forward (v2)")
    monkeypatch.setenv("PADST_ROWS_V2", "0")
    assert_close_to_reference(fwd(case, x, v, b, torch.ops.padst), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward (gather)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 33, 4096])
@pytest.mark.parametrize("C,R,nm", [(3072, 768, (1, 12)), (768, 3072, (1, 24)), (96, 1040, (3, 8))])
def test_cuda_rows_v2_nm_dx_matches_reference(C, R, nm, B, dtype, monkeypatch):
    """N:M dx through the ELL form of the transpose, against the reference and the gather kernel."""
    case = make_case("nm", B, C, R, nm=nm, perm="in", dtype=dtype, device="cuda", seed=B + R)
    v = case.weight.values
    dy = torch.randn(B, R, device="cuda", dtype=torch.float64).to(dtype)
    want64, wantlow = dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref)
    for switch in ("1", "0"):
        monkeypatch.setenv("PADST_ROWS_V2", switch)
        assert_close_to_reference(dx(case, dy, v, torch.ops.padst), want64, wantlow, f"dx (PADST_ROWS_V2={switch})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 70, 50176])
@pytest.mark.parametrize("shape", [("nm", 768, 3072, dict(nm=(1, 12))), ("nm", 3072, 768, dict(nm=(1, 24))),
                                   ("diag", 768, 3072, dict(sparsity=0.9)), ("diag", 3072, 768, dict(sparsity=0.95))],
                         ids=lambda s: f"{s[0]}-C{s[1]}-R{s[2]}")
def test_cuda_rows_v2_dw_matches_reference(shape, B, dtype, monkeypatch):
    """The v2 row weight gradient against the reference and the sampled kernel; bit-identical reruns."""
    structure, C, R, kw = shape
    perm = "in" if structure == "nm" else "both"
    case = make_case(structure, B, C, R, perm=perm, dtype=dtype, device="cuda", seed=B + C, **kw)
    x = case.x
    dy = torch.randn(B, R, device="cuda", dtype=torch.float64).to(dtype)
    want64, wantlow = dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref)
    for switch in ("1", "0"):
        monkeypatch.setenv("PADST_ROWS_V2", switch)
        got = dw(case, dy, x, torch.ops.padst)
        assert_close_to_reference(got, want64, wantlow, f"dW (PADST_ROWS_V2={switch})")
        assert torch.equal(dw(case, dy, x, torch.ops.padst), got)


def test_cuda_rows_v2_nm_autograd_and_opcheck(monkeypatch):
    monkeypatch.setenv("PADST_ROWS_V2", "1")
    case = make_case("nm", 40, 96, 64, nm=(1, 8), perm="in", dtype=torch.float32, device="cuda")
    w = case.weight
    x = case.x.clone().requires_grad_()
    v = w.values.clone().requires_grad_()
    b = case.bias.clone().requires_grad_()
    y = ops.nm_linear(x, w.replace(values=v), b)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, v, b), dy)
    x64, v64, b64 = (t.detach().double().requires_grad_() for t in (case.x, w.values, case.bias))
    want = torch.autograd.grad(ops.nm_linear(x64, w.replace(values=v64), b64), (x64, v64, b64), dy.double())
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.padst.nm_mm.default, (x, v, w.col_idx, w.n, w.m, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("perm", ["none", "both"])
@pytest.mark.parametrize("B", [1, 33, 4096])
@pytest.mark.parametrize("C,R,sparsity", [(768, 3072, 0.9), (3072, 768, 0.95), (96, 1040, 0.75)])
def test_cuda_rows_v2_diag_matches_reference(C, R, sparsity, B, perm, dtype, monkeypatch):
    case = make_case("diag", B, C, R, sparsity=sparsity, perm=perm, dtype=dtype, device="cuda", seed=B + C)
    v, x, b = case.weight.values, case.x, case.bias
    dy = torch.randn(B, R, device="cuda", dtype=torch.float64).to(dtype)
    monkeypatch.setenv("PADST_ROWS_V2", "1")
    assert_close_to_reference(fwd(case, x, v, b, torch.ops.padst), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward (v2)")
    assert_close_to_reference(dx(case, dy, v, torch.ops.padst), dx(case, _f64(dy), _f64(v), ref),
                              dx(case, dy, v, ref), "dx (v2)")
