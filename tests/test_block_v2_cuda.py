"""The v2 block kernels (x-stationary, csrc/kernels/block_xs.h; row-complete, block_rc.h; weight gradient, block_gw.h)
on a GPU, switched on with PADST_BLOCK_V2=1 (their GPU default stays off until these pass on one): forward, dx and dW
against the float64 reference and against the block_tc / block_sddmm_tc kernels, over block sides, permutations,
dtypes and batch sizes around the CTA tiles, the ViT-B MLP shapes, autograd through padst_ext.ops.block_linear, and
opcheck. Skipped without a GPU; the same kernels' logic runs on the host in test_cuda_emulation.py
(test_emulated_block_xs / _rc / _gw / _v2*)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from padst_ext import formats as F
from padst_ext import ops
from padst_ext import reference as ref

from cases import assert_close_to_reference, has_cuda_kernel, make_case
from test_ops import _f64, dw, dx, fwd

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernel("block_mm")),
                                reason="no CUDA device or no CUDA kernels in this build")

cuda_ops = torch.ops.padst


def _case(B, C, R, kb, density, perm, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(R // kb, C // kb, generator=gen) < density
    mask[0, 0] = True
    w = F.block_from_dense(torch.randn(R, C, generator=gen, dtype=torch.float64), mask, (kb, kb))
    case = make_case("block", B, C, R, block=(kb, kb), sparsity=0.5, perm=perm, dtype=dtype, device="cuda",
                     seed=seed)
    return dataclasses.replace(case, weight=_on(w, "cuda", dtype).with_perm(case.in_perm, case.out_perm))


def _on(w, device, dtype):
    """A weight object with its values in dtype and every tensor on device."""
    return w.to(device=device, dtype=dtype)


def _both_kernels(monkeypatch, fn):
    monkeypatch.setenv("PADST_BLOCK_V2", "1")
    a = fn()
    torch.cuda.synchronize()
    monkeypatch.setenv("PADST_BLOCK_V2", "0")
    b = fn()
    torch.cuda.synchronize()
    return a, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("perm", ["none", "in", "out", "both"])
@pytest.mark.parametrize("kernel,kb", [("xs", 16), ("xs", 32), ("xs", 64), ("rc", 16), ("rc", 32)])
@pytest.mark.parametrize("B", [1, 31, 64, 69, 1000])
def test_cuda_block_v2_matches_reference(B, kernel, kb, perm, dtype, monkeypatch):
    """xs: 4 kb -> 3 kb, both passes x-stationary; rc: 1536 -> 10 kb, the forward row-complete (dx x-stationary)."""
    C, R, density = (4 * kb, 3 * kb, 0.5) if kernel == "xs" else (1536, 10 * kb, 0.15)
    case = _case(B, C, R, kb, density, perm, dtype, seed=B + kb)
    v, x, b = case.weight.values, case.x, case.bias
    dy = torch.randn(B, case.R, device="cuda", dtype=torch.float64).to(dtype)
    y_xs, y_tc = _both_kernels(monkeypatch, lambda: fwd(case, x, v, b, cuda_ops))
    dx_xs, dx_tc = _both_kernels(monkeypatch, lambda: dx(case, dy, v, cuda_ops))
    y64, dx64 = fwd(case, _f64(x), _f64(v), _f64(b), ref), dx(case, _f64(dy), _f64(v), ref)
    assert_close_to_reference(y_xs, y64, fwd(case, x, v, b, ref), "forward (v2)")
    assert_close_to_reference(dx_xs, dx64, dx(case, dy, v, ref), "dx (v2)")
    assert_close_to_reference(y_tc, y64, fwd(case, x, v, b, ref), "forward (block_tc)")


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("perm", ["none", "both"])
def test_cuda_block_v2_vit_shapes(layer, perm, monkeypatch):
    """ViT-B's MLP at 4096 tokens, block 32, 90 %: fc1's forward and fc2's dx are the x-stationary kernel's, fc2's
    forward and fc1's dx the row-complete kernel's."""
    C, R = (768, 3072) if layer == "fc1" else (3072, 768)
    case = _case(4096, C, R, 32, 0.1, perm, torch.bfloat16, seed=7)
    v, x, b = case.weight.values, case.x, case.bias
    dy = torch.randn(4096, R, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("PADST_BLOCK_V2", "1")
    assert_close_to_reference(fwd(case, x, v, b, cuda_ops), fwd(case, _f64(x), _f64(v), _f64(b), ref),
                              fwd(case, x, v, b, ref), "forward")
    assert_close_to_reference(dx(case, dy, v, cuda_ops), dx(case, _f64(dy), _f64(v), ref), dx(case, dy, v, ref), "dx")
    assert_close_to_reference(dw(case, dy, x, cuda_ops), dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref), "dW")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("perm", ["none", "in", "out", "both"])
@pytest.mark.parametrize("kb", [16, 32])
@pytest.mark.parametrize("B", [1, 65, 2000, 50176])
def test_cuda_block_gw_matches_reference(B, kb, perm, dtype, monkeypatch):
    """The v2 weight gradient against the float64 reference and the block_sddmm_tc kernel, and bit-identical reruns."""
    case = _case(B, 6 * kb, 4 * kb, kb, 0.5, perm, dtype, seed=B + kb)
    x = case.x
    dy = torch.randn(B, case.R, device="cuda", dtype=torch.float64).to(dtype)
    g_v2, g_tc = _both_kernels(monkeypatch, lambda: dw(case, dy, x, cuda_ops))
    g64, glow = dw(case, _f64(dy), _f64(x), ref), dw(case, dy, x, ref)
    assert_close_to_reference(g_v2, g64, glow, "dW (v2)")
    assert_close_to_reference(g_tc, g64, glow, "dW (block_sddmm_tc)")
    monkeypatch.setenv("PADST_BLOCK_V2", "1")
    assert torch.equal(dw(case, dy, x, cuda_ops), g_v2)


def test_cuda_block_v2_autograd_and_opcheck(monkeypatch):
    monkeypatch.setenv("PADST_BLOCK_V2", "1")
    case = _case(70, 128, 96, 32, 0.5, "both", torch.bfloat16, seed=3)
    w = case.weight
    x = case.x.clone().requires_grad_()
    v = w.values.clone().requires_grad_()
    bias = case.bias.clone().requires_grad_()
    y = ops.block_linear(x, w.replace(values=v), bias, case.in_perm, case.out_perm)
    dy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, v, bias), dy)
    x64, v64, b64 = (t.detach().double().cpu().requires_grad_() for t in (case.x, w.values, case.bias))
    y64 = ops.block_linear(x64, _on(w, "cpu", torch.float64).replace(values=v64), b64, case.in_perm.cpu(),
                           case.out_perm.cpu())
    g64 = torch.autograd.grad(y64, (x64, v64, b64), dy.double().cpu())
    for got, want, name in zip((gx, gv, gb), g64, ("dx", "dvalues", "dbias")):
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item(),
                                   msg=name)
    meta = list(w.meta())
    torch.library.opcheck(torch.ops.padst.block_mm.default, (x, v, *meta, bias, case.in_perm, case.out_perm))
    torch.library.opcheck(torch.ops.padst.block_mm_t.default, (dy, v, *meta, case.in_perm, case.out_perm))
    torch.library.opcheck(torch.ops.padst.block_sddmm.default,
                          (dy, x, w.row_ptr, w.col_idx, 32, 32, case.in_perm, case.out_perm))
