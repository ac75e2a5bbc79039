"""Plain-PyTorch references, one per op: a dense product with the pattern's dense matrix, permutations as
indexing. Slow and obviously correct; the tests compare every kernel with these."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import formats as F

__all__ = [
    "linear",
    "linear_t",
    "sampled_grad",
    "dense_grad",
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
]


def _inv(perm: Tensor) -> Tensor:
    return torch.argsort(perm.long())


def linear(x: Tensor, W: Tensor, bias: Optional[Tensor] = None, in_perm: Optional[Tensor] = None,
           out_perm: Optional[Tensor] = None) -> Tensor:
    """``y = (x[:, in_perm] @ W.T)[:, out_perm] + bias``."""
    xp = x if in_perm is None else x[:, in_perm.long()]
    z = xp @ W.T
    y = z if out_perm is None else z[:, out_perm.long()]
    return y if bias is None else y + bias


def linear_t(dy: Tensor, W: Tensor, in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> Tensor:
    """dx of :func:`linear`: ``dx = (dy[:, inv(out_perm)] @ W)[:, inv(in_perm)]``."""
    dz = dy if out_perm is None else dy[:, _inv(out_perm)]
    dxp = dz @ W
    return dxp if in_perm is None else dxp[:, _inv(in_perm)]


def dense_grad(dy: Tensor, x: Tensor, in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> Tensor:
    """dW of :func:`linear` for a dense W: ``dy[:, inv(out_perm)].T @ x[:, in_perm]``."""
    dz = dy if out_perm is None else dy[:, _inv(out_perm)]
    xp = x if in_perm is None else x[:, in_perm.long()]
    return dz.T @ xp


def sampled_grad(dy: Tensor, x: Tensor, rows: Tensor, cols: Tensor, in_perm: Optional[Tensor] = None,
                 out_perm: Optional[Tensor] = None) -> Tensor:
    """dW of :func:`linear` read at the positions ``(rows, cols)`` of the pattern."""
    return dense_grad(dy, x, in_perm, out_perm)[rows, cols]


# --- block -----------------------------------------------------------------------------------------------

def _block_dense(values: Tensor, row_ptr: Tensor, col_idx: Tensor, R: int, C: int) -> Tensor:
    return F.block_to_dense(values, row_ptr, col_idx, (R, C))


def block_mm(x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias=None, in_perm=None, out_perm=None):
    R = (row_ptr.numel() - 1) * values.shape[1]
    return linear(x, _block_dense(values, row_ptr, col_idx, R, x.shape[1]), bias, in_perm, out_perm)


def block_mm_t(dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm=None, out_perm=None):
    C = (col_ptr.numel() - 1) * values.shape[2]
    return linear_t(dy, _block_dense(values, row_ptr, col_idx, dy.shape[1], C), in_perm, out_perm)


def block_sddmm(dy, x, row_ptr, col_idx, block_rows, block_cols, in_perm=None, out_perm=None):
    G = dense_grad(dy, x, in_perm, out_perm)
    R, C = G.shape
    blocks = G.reshape(R // block_rows, block_rows, C // block_cols, block_cols).transpose(1, 2)
    rows = torch.repeat_interleave(torch.arange(R // block_rows, device=G.device), row_ptr.long().diff())
    return blocks[rows, col_idx.long()].contiguous()


def block_transpose_meta(row_ptr, col_idx, num_block_cols):
    """CSC order by a stable sort of the blocks on their column."""
    row_ptr, col_idx = row_ptr.long(), col_idx.long()
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr.diff())
    order = torch.sort(col_idx, stable=True).indices
    col_ptr = torch.zeros(num_block_cols + 1, dtype=torch.long)
    col_ptr[1:] = torch.cumsum(torch.bincount(col_idx, minlength=num_block_cols), 0)
    return col_ptr, rows[order], order


# --- N:M -------------------------------------------------------------------------------------------------

def nm_mm(x, values, col_idx, n, m, bias=None):
    return linear(x, F.nm_to_dense(values, col_idx, x.shape[1]), bias)


def nm_mm_t(dy, values, col_idx, n, m):
    C = values.shape[1] // n * m
    return linear_t(dy, F.nm_to_dense(values, col_idx, C))


def nm_sddmm(dy, x, col_idx, n, m):
    return dense_grad(dy, x).gather(1, col_idx.long())


# --- diagonal --------------------------------------------------------------------------------------------

def diag_mm(x, values, offsets, out_features, bias=None, in_perm=None, out_perm=None):
    W = F.diag_to_dense(values, offsets, (out_features, x.shape[1]))
    return linear(x, W, bias, in_perm, out_perm)


def diag_mm_t(dy, values, offsets, in_features, in_perm=None, out_perm=None):
    W = F.diag_to_dense(values, offsets, (dy.shape[1], in_features))
    return linear_t(dy, W, in_perm, out_perm)


def diag_sddmm(dy, x, offsets, in_perm=None, out_perm=None):
    G = dense_grad(dy, x, in_perm, out_perm)
    rows, cols = F.diag_coords(offsets.to(G.device), tuple(G.shape))
    return G[rows, cols].contiguous()
