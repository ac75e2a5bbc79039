"""The padst ops: thin wrappers over ``torch.ops.padst.*`` plus their fake (meta) kernels and autograd.

Conventions, for every structure: ``x [B, C]``, weight ``S [R, C]``, ``y [B, R]``::

    x_p = x[:, in_perm]                       # optional input-side permutation (bijection of 0..C-1)
    y   = (x_p @ S.T)[:, out_perm] + bias     # optional output-side permutation (bijection of 0..R-1)

``*_mm`` is the forward, ``*_mm_t`` the input gradient ``dx`` for an output gradient ``dy``, ``*_sddmm`` the
weight gradient sampled on the active pattern. N:M ops take no permutation: it is folded into ``col_idx``.
The permutations are fused into the kernels (gathered loads / scattered stores), never a separate pass.
Schemas are declared once in ``csrc/ops.cpp``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from . import _extension

_extension.load()

__all__ = [
    "block_mm",
    "block_mm_t",
    "block_sddmm",
    "block_transpose_meta",
    "nm_mm",
    "nm_mm_t",
    "nm_sddmm",
    "diag_mm",
    "diag_mm_t",
    "diag_sddmm",
    "dense_grad",
    "block_linear",
    "nm_linear",
    "diag_linear",
]

_ops = torch.ops.padst


# ----------------------------------------------------------------------------------------------------------
# Public wrappers
# ----------------------------------------------------------------------------------------------------------


def block_mm(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor, row_idx_t: Tensor,
             blk_t: Tensor, bias: Optional[Tensor] = None, in_perm: Optional[Tensor] = None,
             out_perm: Optional[Tensor] = None) -> Tensor:
    """Block-sparse forward. ``x [B, C]``, ``values [nnzb, br, bc]`` -> ``y [B, R]``, R = (len(row_ptr)-1)*br.

    Differentiable in ``x``, ``values`` and ``bias``."""
    return _ops.block_mm.default(x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias, in_perm, out_perm)


def block_mm_t(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor, row_idx_t: Tensor,
               blk_t: Tensor, in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> Tensor:
    """Block-sparse dx. ``dy [B, R]`` -> ``dx [B, C]``, C = (len(col_ptr)-1)*bc; uses the CSC metadata."""
    return _ops.block_mm_t.default(dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm)


def block_sddmm(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, block_rows: int, block_cols: int,
                in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> Tensor:
    """dW on the active blocks: ``dy [B, R]``, ``x [B, C]`` -> ``[nnzb, br, bc]``."""
    return _ops.block_sddmm.default(dy, x, row_ptr, col_idx, block_rows, block_cols, in_perm, out_perm)


def block_transpose_meta(row_ptr: Tensor, col_idx: Tensor, num_block_cols: int):
    """CSC metadata ``(col_ptr [nbc+1], row_idx_t [nnzb], blk_t [nnzb])`` of the CSR block pattern: within each
    block-column, the block-rows ascending and ``blk_t`` the index of each block in ``values``."""
    return _ops.block_transpose_meta.default(row_ptr, col_idx, num_block_cols)


def nm_mm(x: Tensor, values: Tensor, col_idx: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """N:M forward: ``y[b, r] = sum_k values[r, k] * x[b, col_idx[r, k]] + bias[r]``; ``values [R, C*n/m]``.

    Differentiable in ``x``, ``values`` and ``bias``."""
    return _ops.nm_mm.default(x, values, col_idx, n, m, bias)


def nm_mm_t(dy: Tensor, values: Tensor, col_idx: Tensor, n: int, m: int) -> Tensor:
    """N:M dx: ``dy [B, R]`` -> ``dx [B, C]`` with C = K*m/n."""
    return _ops.nm_mm_t.default(dy, values, col_idx, n, m)


def nm_sddmm(dy: Tensor, x: Tensor, col_idx: Tensor, n: int, m: int) -> Tensor:
    """N:M dW on the pattern: ``dv[r, k] = sum_b dy[b, r] * x[b, col_idx[r, k]]``."""
    return _ops.nm_sddmm.default(dy, x, col_idx, n, m)


def diag_mm(x: Tensor, values: Tensor, offsets: Tensor, out_features: int, bias: Optional[Tensor] = None,
            in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> Tensor:
    """Diagonal forward: ``x [B, C]``, ``values [K, min(R, C)]``, ``offsets [K]`` -> ``y [B, R]``.

    Differentiable in ``x``, ``values`` and ``bias``."""
    return _ops.diag_mm.default(x, values, offsets, out_features, bias, in_perm, out_perm)


def diag_mm_t(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int, in_perm: Optional[Tensor] = None,
              out_perm: Optional[Tensor] = None) -> Tensor:
    """Diagonal dx: ``dy [B, R]`` -> ``dx [B, C]``."""
    return _ops.diag_mm_t.default(dy, values, offsets, in_features, in_perm, out_perm)


def diag_sddmm(dy: Tensor, x: Tensor, offsets: Tensor, in_perm: Optional[Tensor] = None,
               out_perm: Optional[Tensor] = None) -> Tensor:
    """Diagonal dW on the diagonals: ``[K, min(R, C)]``."""
    return _ops.diag_sddmm.default(dy, x, offsets, in_perm, out_perm)


def dense_grad(dy: Tensor, x: Tensor, in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> Tensor:
    """Dense dW in the permuted frame, ``dy[:, inv(out_perm)].T @ x[:, in_perm]`` ``[R, C]``: RigL's grow score."""
    return _ops.dense_grad.default(dy, x, in_perm, out_perm)


# Convenience forms taking the format objects of padst_ext.formats and inputs of shape [*, C].

def _flat(x: Tensor) -> Tensor:
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def block_linear(x: Tensor, w, bias: Optional[Tensor] = None, in_perm: Optional[Tensor] = None,
                 out_perm: Optional[Tensor] = None) -> Tensor:
    """``block_mm`` for ``x [*, C]`` and a :class:`padst_ext.formats.BlockSparse` weight."""
    y = block_mm(_flat(x), w.values, *w.meta(), bias=bias, in_perm=in_perm, out_perm=out_perm)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def nm_linear(x: Tensor, w, bias: Optional[Tensor] = None) -> Tensor:
    """``nm_mm`` for ``x [*, C]`` and a :class:`padst_ext.formats.NMSparse` weight (permutation folded in)."""
    y = nm_mm(_flat(x), w.values, w.col_idx, w.n, w.m, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def diag_linear(x: Tensor, w, bias: Optional[Tensor] = None, in_perm: Optional[Tensor] = None,
                out_perm: Optional[Tensor] = None) -> Tensor:
    """``diag_mm`` for ``x [*, C]`` and a :class:`padst_ext.formats.DiagSparse` weight."""
    y = diag_mm(_flat(x), w.values, w.offsets, w.shape[0], bias, in_perm, out_perm)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Fake kernels: output shapes only (data-dependent checks happen in the real kernels).
# ----------------------------------------------------------------------------------------------------------


def _one_device(op: str, fn):
    """fn, first checking that no operand is on the meta device while another holds data: the dispatcher would run the
    fake kernel for such a call and return uninitialised memory. All operands on meta (shape inference,
    deferred initialisation) and fake tensors (torch.compile) pass."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        tensors = [(n, v) for n, v in sig.bind(*args, **kwargs).arguments.items() if isinstance(v, Tensor)]
        meta = [n for n, v in tensors if v.device.type == "meta"]
        if meta and len(meta) < len(tensors):
            name, dev = next((n, v.device) for n, v in tensors if v.device.type != "meta")
            raise ValueError(f"{op}: {meta[0]} is on the meta device but {name} is on {dev}: every operand must be on "
                             f"one device (a meta tensor has no data to compute with)")
        return fn(*args, **kwargs)

    return checked


def _register_fake(op: str):
    """torch.library.register_fake(op) for a fake kernel guarded by _one_device."""
    return lambda fn: torch.library.register_fake(op)(_one_device(op, fn))


def _fake_common(op: str, a: Tensor, *others: Optional[Tensor]) -> None:
    torch._check(a.dim() == 2, lambda: f"{op}: expected a 2-D input, got shape {tuple(a.shape)}")
    for t in others:
        if t is not None and t.is_floating_point():
            torch._check(t.dtype == a.dtype, lambda: f"{op}: dtype mismatch {t.dtype} vs {a.dtype}")


@_register_fake("padst::block_mm")
def _(x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias=None, in_perm=None, out_perm=None):
    _fake_common("padst::block_mm", x, values, bias)
    torch._check(values.dim() == 3, lambda: "padst::block_mm: values must be 3-D")
    torch._check(x.shape[1] == (col_ptr.shape[0] - 1) * values.shape[2],
                 lambda: "padst::block_mm: x width does not match the block pattern")
    return x.new_empty((x.shape[0], (row_ptr.shape[0] - 1) * values.shape[1]))


@_register_fake("padst::block_mm_t")
def _(dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm=None, out_perm=None):
    _fake_common("padst::block_mm_t", dy, values)
    torch._check(values.dim() == 3, lambda: "padst::block_mm_t: values must be 3-D")
    return dy.new_empty((dy.shape[0], (col_ptr.shape[0] - 1) * values.shape[2]))


@_register_fake("padst::block_sddmm")
def _(dy, x, row_ptr, col_idx, block_rows, block_cols, in_perm=None, out_perm=None):
    _fake_common("padst::block_sddmm", dy, x)
    return x.new_empty((col_idx.shape[0], block_rows, block_cols))


@_register_fake("padst::block_transpose_meta")
def _(row_ptr, col_idx, num_block_cols):
    nnzb = col_idx.shape[0]
    return (row_ptr.new_empty((num_block_cols + 1,), dtype=torch.long), row_ptr.new_empty((nnzb,), dtype=torch.long),
            row_ptr.new_empty((nnzb,), dtype=torch.long))


@_register_fake("padst::nm_mm")
def _(x, values, col_idx, n, m, bias=None):
    _fake_common("padst::nm_mm", x, values, bias)
    torch._check(values.shape[1] * m == x.shape[1] * n, lambda: "padst::nm_mm: values width must be C*n/m")
    return x.new_empty((x.shape[0], values.shape[0]))


@_register_fake("padst::nm_mm_t")
def _(dy, values, col_idx, n, m):
    _fake_common("padst::nm_mm_t", dy, values)
    return dy.new_empty((dy.shape[0], values.shape[1] // n * m))


@_register_fake("padst::nm_sddmm")
def _(dy, x, col_idx, n, m):
    _fake_common("padst::nm_sddmm", dy, x)
    return x.new_empty(col_idx.shape)


@_register_fake("padst::diag_mm")
def _(x, values, offsets, out_features, bias=None, in_perm=None, out_perm=None):
    _fake_common("padst::diag_mm", x, values, bias)
    return x.new_empty((x.shape[0], out_features))


@_register_fake("padst::diag_mm_t")
def _(dy, values, offsets, in_features, in_perm=None, out_perm=None):
    _fake_common("padst::diag_mm_t", dy, values)
    return dy.new_empty((dy.shape[0], in_features))


@_register_fake("padst::diag_sddmm")
def _(dy, x, offsets, in_perm=None, out_perm=None):
    _fake_common("padst::diag_sddmm", dy, x)
    return x.new_empty((offsets.shape[0], min(dy.shape[1], x.shape[1])))


@_register_fake("padst::dense_grad")
def _(dy, x, in_perm=None, out_perm=None):
    _fake_common("padst::dense_grad", dy, x)
    return x.new_empty((dy.shape[1], x.shape[1]))


# ----------------------------------------------------------------------------------------------------------
# Autograd: each backward is built from the other registered ops.
# ----------------------------------------------------------------------------------------------------------


def _bias_grad(dy: Tensor) -> Tensor:
    return dy.sum(0)


def _full(inputs, n):
    """The op's inputs padded with the defaults (None) that the dispatcher may drop from the end."""
    return tuple(inputs) + (None,) * (n - len(inputs))


def _needs(ctx, i: int) -> bool:
    need = ctx.needs_input_grad
    return i < len(need) and bool(need[i])


def _grads(ctx, *grads):
    """One gradient per input the op was actually called with."""
    return grads[: len(ctx.needs_input_grad)]


def _block_setup(ctx, inputs, output):
    x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias, in_perm, out_perm = _full(inputs, 10)
    ctx.save_for_backward(x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm)


def _block_backward(ctx, dy):
    x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm = ctx.saved_tensors
    dx = dv = db = None
    if _needs(ctx, 0):
        dx = _ops.block_mm_t.default(dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm)
    if _needs(ctx, 1):
        dv = _ops.block_sddmm.default(dy, x, row_ptr, col_idx, values.shape[1], values.shape[2], in_perm, out_perm)
    if _needs(ctx, 7):
        db = _bias_grad(dy)
    return _grads(ctx, dx, dv, None, None, None, None, None, db, None, None)


def _nm_setup(ctx, inputs, output):
    x, values, col_idx, n, m, bias = _full(inputs, 6)
    ctx.n, ctx.m = n, m
    ctx.save_for_backward(x, values, col_idx)


def _nm_backward(ctx, dy):
    x, values, col_idx = ctx.saved_tensors
    dx = dv = db = None
    if _needs(ctx, 0):
        dx = _ops.nm_mm_t.default(dy, values, col_idx, ctx.n, ctx.m)
    if _needs(ctx, 1):
        dv = _ops.nm_sddmm.default(dy, x, col_idx, ctx.n, ctx.m)
    if _needs(ctx, 5):
        db = _bias_grad(dy)
    return _grads(ctx, dx, dv, None, None, None, db)


def _diag_setup(ctx, inputs, output):
    x, values, offsets, out_features, bias, in_perm, out_perm = _full(inputs, 7)
    ctx.save_for_backward(x, values, offsets, in_perm, out_perm)


def _diag_backward(ctx, dy):
    x, values, offsets, in_perm, out_perm = ctx.saved_tensors
    dx = dv = db = None
    if _needs(ctx, 0):
        dx = _ops.diag_mm_t.default(dy, values, offsets, x.shape[1], in_perm, out_perm)
    if _needs(ctx, 1):
        dv = _ops.diag_sddmm.default(dy, x, offsets, in_perm, out_perm)
    if _needs(ctx, 4):
        db = _bias_grad(dy)
    return _grads(ctx, dx, dv, None, None, db, None, None)


torch.library.register_autograd("padst::block_mm", _block_backward, setup_context=_block_setup)
torch.library.register_autograd("padst::nm_mm", _nm_backward, setup_context=_nm_setup)
torch.library.register_autograd("padst::diag_mm", _diag_backward, setup_context=_diag_setup)


# The backward ops are bilinear in their two tensor operands, so their own gradients are again padst ops:
# this makes every op differentiable to any order (double backward, gradgradcheck, Hessian-vector products).

def _save_inputs(n: int):
    """A setup_context that saves the op's ``n`` inputs (tensors or None) for its backward."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*_full(inputs, n))

    return setup


def _block_t_backward(ctx, g):
    dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm = ctx.saved_tensors
    d_dy = d_v = None
    if _needs(ctx, 0):
        d_dy = _ops.block_mm.default(g, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, None, in_perm, out_perm)
    if _needs(ctx, 1):
        d_v = _ops.block_sddmm.default(dy, g, row_ptr, col_idx, values.shape[1], values.shape[2], in_perm, out_perm)
    return _grads(ctx, d_dy, d_v, None, None, None, None, None, None, None)


def _block_dw_setup(ctx, inputs, output):
    dy, x, row_ptr, col_idx, br, bc, in_perm, out_perm = _full(inputs, 8)
    ctx.br, ctx.bc = br, bc
    ctx.save_for_backward(dy, x, row_ptr, col_idx, in_perm, out_perm)


def _block_dw_backward(ctx, g):
    dy, x, row_ptr, col_idx, in_perm, out_perm = ctx.saved_tensors
    meta = (row_ptr, col_idx, *_ops.block_transpose_meta.default(row_ptr, col_idx, x.shape[1] // ctx.bc))
    d_dy = d_x = None
    if _needs(ctx, 0):
        d_dy = _ops.block_mm.default(x, g, *meta, None, in_perm, out_perm)
    if _needs(ctx, 1):
        d_x = _ops.block_mm_t.default(dy, g, *meta, in_perm, out_perm)
    return _grads(ctx, d_dy, d_x, None, None, None, None, None, None)


def _nm_pair_setup(ctx, inputs, output):
    """nm_mm_t(dy, values, ...) and nm_sddmm(dy, x, ...): two tensors, the indices, then n and m."""
    a, b, col_idx, n, m = inputs
    ctx.n, ctx.m = n, m
    ctx.save_for_backward(a, b, col_idx)


def _nm_t_backward(ctx, g):
    dy, values, col_idx = ctx.saved_tensors
    d_dy = _ops.nm_mm.default(g, values, col_idx, ctx.n, ctx.m, None) if _needs(ctx, 0) else None
    d_v = _ops.nm_sddmm.default(dy, g, col_idx, ctx.n, ctx.m) if _needs(ctx, 1) else None
    return _grads(ctx, d_dy, d_v, None, None, None)


def _nm_dw_backward(ctx, g):
    dy, x, col_idx = ctx.saved_tensors
    d_dy = _ops.nm_mm.default(x, g, col_idx, ctx.n, ctx.m, None) if _needs(ctx, 0) else None
    d_x = _ops.nm_mm_t.default(dy, g, col_idx, ctx.n, ctx.m) if _needs(ctx, 1) else None
    return _grads(ctx, d_dy, d_x, None, None, None)


def _diag_t_setup(ctx, inputs, output):
    dy, values, offsets, in_features, in_perm, out_perm = _full(inputs, 6)
    ctx.save_for_backward(dy, values, offsets, in_perm, out_perm)


def _diag_t_backward(ctx, g):
    dy, values, offsets, in_perm, out_perm = ctx.saved_tensors
    d_dy = d_v = None
    if _needs(ctx, 0):
        d_dy = _ops.diag_mm.default(g, values, offsets, dy.shape[1], None, in_perm, out_perm)
    if _needs(ctx, 1):
        d_v = _ops.diag_sddmm.default(dy, g, offsets, in_perm, out_perm)
    return _grads(ctx, d_dy, d_v, None, None, None, None)


def _diag_dw_backward(ctx, g):
    dy, x, offsets, in_perm, out_perm = ctx.saved_tensors
    d_dy = d_x = None
    if _needs(ctx, 0):
        d_dy = _ops.diag_mm.default(x, g, offsets, dy.shape[1], None, in_perm, out_perm)
    if _needs(ctx, 1):
        d_x = _ops.diag_mm_t.default(dy, g, offsets, x.shape[1], in_perm, out_perm)
    return _grads(ctx, d_dy, d_x, None, None, None)


def _dense_grad_backward(ctx, g):
    from . import reference

    dy, x, in_perm, out_perm = ctx.saved_tensors
    # dense_grad = dz.T @ x_p: its gradients are the dense layer's forward and dx with weight g
    d_dy = reference.linear(x, g, None, in_perm, out_perm) if _needs(ctx, 0) else None
    d_x = reference.linear_t(dy, g, in_perm, out_perm) if _needs(ctx, 1) else None
    return _grads(ctx, d_dy, d_x, None, None)


torch.library.register_autograd("padst::block_mm_t", _block_t_backward, setup_context=_save_inputs(9))
torch.library.register_autograd("padst::block_sddmm", _block_dw_backward, setup_context=_block_dw_setup)
torch.library.register_autograd("padst::nm_mm_t", _nm_t_backward, setup_context=_nm_pair_setup)
torch.library.register_autograd("padst::nm_sddmm", _nm_dw_backward, setup_context=_nm_pair_setup)
torch.library.register_autograd("padst::diag_mm_t", _diag_t_backward, setup_context=_diag_t_setup)
torch.library.register_autograd("padst::diag_sddmm", _diag_dw_backward, setup_context=_save_inputs(5))
torch.library.register_autograd("padst::dense_grad", _dense_grad_backward, setup_context=_save_inputs(4))
