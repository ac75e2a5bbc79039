"""2:4 (and 1:2 for float32) N:M layers through cuSPARSELt, with the N:M kernels as the fallback.

``lt24_linear(x, values, col_idx, n, m, in_features, in_perm, bias)`` computes ``y = x[:, in_perm] @ S.T + bias`` with
``S = padst_ext.formats.nm_to_dense(values, col_idx, in_features)``: ``values``/``col_idx`` ``[R, C*n/m]`` are the
condensed N:M weight in the *logical* (unpermuted) frame, i.e. ``S`` is N:M along its columns.

When cuSPARSELt can serve the problem (``is_available()`` and ``supports(...)``):

* forward: ``S`` is compressed once per weight version (cached on the ``values`` tensor, keyed on its
  ``data_ptr``/``_version``/shape and those of ``col_idx``, so repeated forwards with unchanged weights do not
  recompress), then ``padst::lt24_mm`` gathers ``x[:, in_perm]`` into cuSPARSELt's dense operand buffer and runs the
  sparse matmul (plan cached per shape/dtype in C++). The gather is one extra pass over ``x``: cuSPARSELt cannot read
  through an index, so on this path (only) the permutation is not free.
* ``dx``: the reduction of ``dx = dy @ S`` runs over ``R``, but ``S`` is 2:4 along ``C``, and sparse tensor cores need
  the pattern along the reduction dimension. cuSPARSELt serves ``dx`` only when ``S`` is *also* 2:4 along ``R``
  (a transposable pattern): then ``S.T`` is compressed on its own and ``padst::lt24_mm_t`` runs the transposed
  problem and scatters ``dx`` through the permutation. Otherwise (the common case for a pattern pruned along ``C``
  only) ``dx`` is ``padst::nm_mm_t`` (the general N:M kernel) with the permutation folded into ``col_idx``.
* ``dW`` on the pattern: ``padst::nm_sddmm(dy, x, folded_col_idx, n, m)`` with ``folded_col_idx = in_perm[col_idx]``.
* ``dbias = dy.sum(0)``.

Fallback: otherwise (no cuSPARSELt in the build, no GPU, a CPU tensor, another N:M, a float32 layer while TF32 is
disabled, or shapes cuSPARSELt cannot take: out/in_features not multiples of 16 (8 for float32), more than 2^31
elements) ``lt24_linear`` runs ``padst_ext.ops.nm_mm`` with the permutation folded into ``col_idx``: the same result,
differentiable the same way. ``choose_path`` tells which path a call takes and why.

float32 on cuSPARSELt computes in TF32 (10-bit mantissa), so float32 layers take this path only while
``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's own switch for TF32 in float32 matmuls).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _extension
from . import ops as _padst_ops
from .formats import check_permutation, nm_to_dense

_extension.load()

__all__ = ["is_available", "supports", "choose_path", "lt24_linear", "compress", "clear_cache"]

_ops = torch.ops.padst


# ----------------------------------------------------------------------------------------------------------
# Availability and host-side rules
# ----------------------------------------------------------------------------------------------------------


def is_available() -> bool:
    """True when padst_ext was built with cuSPARSELt and a CUDA device is usable."""
    return bool(_extension.HAVE_CUSPARSELT) and torch.cuda.is_available()


def supports(dtype: torch.dtype, n: int, m: int, out_features: int, in_features: int,
             batch: Optional[int] = None) -> Tuple[bool, str]:
    """Whether cuSPARSELt can serve this layer, and why not (pure host logic; works without a GPU).

    Rules (``csrc/lt24_logic.h``): float16/bfloat16 with 2:4 or float32 with 1:2 (TF32 math, only while
    ``torch.backends.cuda.matmul.allow_tf32``); out_features and in_features multiples of 16 (8 for float32); every
    matrix below 2^31 elements. Any batch is fine: the ops pad it to a multiple of 8 (4 for float32) with zero rows.
    """
    ok, reason = _ops._lt24_supported(dtype, int(n), int(m), int(out_features), int(in_features),
                                      -1 if batch is None else int(batch))
    if ok and dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return False, ("float32 on cuSPARSELt computes in TF32; set torch.backends.cuda.matmul.allow_tf32 = True to "
                       "allow it")
    return bool(ok), str(reason)


def choose_path(x: Tensor, values: Tensor, n: int, m: int, in_features: int) -> Tuple[str, str]:
    """``("cusparselt", "")`` or ``("nm", reason)``: the path ``lt24_linear`` takes for these arguments."""
    if not _extension.HAVE_CUSPARSELT:
        return "nm", "padst_ext was built without cuSPARSELt"
    if not x.is_cuda:
        return "nm", f"x is on {x.device}, cuSPARSELt needs a CUDA tensor"
    if not torch.cuda.is_available():
        return "nm", "no usable CUDA device"
    if values.dtype != x.dtype:
        return "nm", f"values dtype {values.dtype} differs from x dtype {x.dtype}"
    batch = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    ok, reason = supports(x.dtype, n, m, values.shape[0], in_features, batch)
    return ("cusparselt", "") if ok else ("nm", reason)


# ----------------------------------------------------------------------------------------------------------
# Compression cache: one entry per live `values` tensor (dies with it)
# ----------------------------------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("key", "compressed", "compressed_t", "transposable")

    def __init__(self, key, compressed: Tensor):
        self.key = key
        self.compressed = compressed
        self.compressed_t: Optional[Tensor] = None
        self.transposable: Optional[bool] = None


_cache: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _version_key(values: Tensor, col_idx: Tensor, in_features: int):
    return (values.data_ptr(), values._version, tuple(values.shape), values.dtype, values.device,
            col_idx.data_ptr(), col_idx._version, tuple(col_idx.shape), int(in_features))


def clear_cache() -> None:
    """Drops every cached compressed weight."""
    _cache.clear()


def compress(values: Tensor, col_idx: Tensor, in_features: int) -> Tensor:
    """The cuSPARSELt-compressed ``S`` (cached per weight version; see the module docstring)."""
    return _entry(values, col_idx, in_features).compressed


def _entry(values: Tensor, col_idx: Tensor, in_features: int) -> _Entry:
    key = _version_key(values, col_idx, in_features)
    e = _cache.get(values)
    if e is not None and e.key == key:
        return e
    with torch.no_grad():
        w = nm_to_dense(values.detach(), col_idx, in_features).contiguous()
        e = _Entry(key, _ops.lt24_compress.default(w))
    _cache[values] = e
    return e


def _compressed_t(e: _Entry, values: Tensor, col_idx: Tensor, in_features: int, n: int, m: int) -> Optional[Tensor]:
    """The compressed ``S.T`` when ``S`` is also N:M along its rows, else None (decided once per weight version)."""
    if e.transposable is None:
        with torch.no_grad():
            wt = nm_to_dense(values.detach(), col_idx, in_features).t().contiguous()  # [C, R]
            C, R = wt.shape
            counts = (wt != 0).reshape(C, R // m, m).sum(-1)
            e.transposable = bool(counts.max() <= n) if counts.numel() else True
            if e.transposable:
                e.compressed_t = _ops.lt24_compress.default(wt)
    return e.compressed_t


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------


def _fold(col_idx: Tensor, in_perm: Optional[Tensor], in_features: int) -> Tensor:
    """``in_perm[col_idx]``: the permutation folded into the indices (the N:M kernels' frame)."""
    if in_perm is None:
        return col_idx
    perm = check_permutation(in_perm, in_features, "in_perm").to(col_idx.device)
    return perm[col_idx.long()].to(col_idx.dtype)


class _Lt24Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, values, col_idx, bias, in_perm, n, m, in_features, entry):
        R = values.shape[0]
        y = _ops.lt24_mm.default(x2, entry.compressed, R, in_features, bias, in_perm)
        ctx.n, ctx.m, ctx.in_features, ctx.entry = n, m, in_features, entry
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, values, col_idx, in_perm)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, values, col_idx, in_perm = ctx.saved_tensors
        n, m, C = ctx.n, ctx.m, ctx.in_features
        R = values.shape[0]
        dy = dy.contiguous()
        need_x, need_v, _, need_b = ctx.needs_input_grad[:4]
        folded = _fold(col_idx, in_perm, C) if (need_x or need_v) else None
        dx = dv = db = None
        if need_x:
            ct = _compressed_t(ctx.entry, values, col_idx, C, n, m)
            if ct is not None:
                dx = _ops.lt24_mm_t.default(dy, ct, R, C, in_perm)
            else:  # S is 2:4 along C only: no sparse-tensor-core form of dy @ S; the general N:M kernel serves
                dx = _ops.nm_mm_t.default(dy, values, folded, n, m)
        if need_v:
            dv = _ops.nm_sddmm.default(dy, x2, folded, n, m)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dv, None, db, None, None, None, None, None


def lt24_linear(x: Tensor, values: Tensor, col_idx: Tensor, n: int, m: int, in_features: int,
                in_perm: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x[:, in_perm] @ S.T + bias``, ``S = nm_to_dense(values, col_idx, in_features)``, for ``x [*, C]``.

    Autograd-aware in ``x``, ``values`` and ``bias``. Runs on cuSPARSELt when :func:`choose_path` says so (see the
    module docstring for forward, ``dx`` and ``dW``), else falls back to ``padst_ext.ops.nm_mm`` with the permutation
    folded into ``col_idx`` (every device and dtype the N:M kernels support). A weight whose pattern breaks 2:4 along
    ``C`` raises ValueError from ``padst::lt24_compress`` naming the row and group.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but in_features is {in_features}")
    if values.dim() != 2 or col_idx.shape != values.shape:
        raise ValueError(f"values and col_idx must both be [R, C*n/m], got {tuple(values.shape)} and "
                         f"{tuple(col_idx.shape)}")
    x2 = x.reshape(-1, in_features)
    path, _ = choose_path(x, values, n, m, in_features)
    if path == "cusparselt":
        entry = _entry(values, col_idx, in_features)
        y = _Lt24Linear.apply(x2, values, col_idx, bias, in_perm, n, m, in_features, entry)
    else:
        y = _padst_ops.nm_mm(x2, values, _fold(col_idx, in_perm, in_features), n, m, bias)
    return y.reshape(*x.shape[:-1], values.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Fake kernels (shapes only). The compressed size is cuSPARSELt's business: a dynamic size for tracing.
# ----------------------------------------------------------------------------------------------------------


@_padst_ops._register_fake("padst::lt24_compress")
def _(weight):
    torch._check(weight.dim() == 2, lambda: "padst::lt24_compress: weight must be 2-D")
    size = torch.library.get_ctx().new_dynamic_size()
    return weight.new_empty((size,), dtype=torch.uint8)


@_padst_ops._register_fake("padst::lt24_mm")
def _(x, compressed, out_features, in_features, bias=None, in_perm=None):
    torch._check(x.dim() == 2, lambda: "padst::lt24_mm: x must be 2-D")
    torch._check(x.shape[1] == in_features, lambda: "padst::lt24_mm: x width must be in_features")
    return x.new_empty((x.shape[0], out_features))


@_padst_ops._register_fake("padst::lt24_mm_t")
def _(dy, compressed, out_features, in_features, in_perm=None):
    torch._check(dy.dim() == 2, lambda: "padst::lt24_mm_t: dy must be 2-D")
    torch._check(dy.shape[1] == out_features, lambda: "padst::lt24_mm_t: dy width must be out_features")
    return dy.new_empty((dy.shape[0], in_features))
