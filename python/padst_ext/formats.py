"""Storage formats of the three structures and conversions dense+mask <-> storage.

The formats are the kernels' contract (see docs/design.md in the project notes):

* :class:`BlockSparse` -- BSR-like: ``values [nnzb, br, bc]``, ``row_ptr [R/br + 1]``, ``col_idx [nnzb]``
  (strictly increasing within a block-row) plus the CSC transpose ``col_ptr [C/bc + 1]``,
  ``row_idx_t [nnzb]``, ``blk_t [nnzb]`` used by the dx kernel, rebuilt only when the pattern changes.
* :class:`NMSparse` -- N:M along the input dimension, condensed: ``values [R, K]``, ``col_idx [R, K]`` with
  ``K = C * n / m``. An input permutation is folded into ``col_idx`` (``col_idx = perm[logical index]``).
* :class:`DiagSparse` -- wrap-around diagonals: ``values [K, min(R, C)]``, ``offsets [K]`` in
  ``[0, max(R, C))``; entry ``t`` of diagonal ``k`` sits at ``((t + o_k) % R, t)`` if ``R >= C`` else
  ``(t, (t + o_k) % C)``.

All conversions are plain PyTorch (they run once per pattern change, not per step).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "BlockSparse",
    "NMSparse",
    "DiagSparse",
    "block_transpose_meta",
    "block_from_dense",
    "block_to_dense",
    "block_mask_to_dense",
    "nm_from_dense",
    "nm_to_dense",
    "check_nm_mask",
    "diag_from_dense",
    "diag_to_dense",
    "diag_mask",
    "diag_coords",
    "check_permutation",
]


def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_permutation(perm: Tensor, n: int, name: str = "perm") -> Tensor:
    """Returns ``perm`` as int64 after checking that it is a bijection of ``0..n-1``."""
    if not isinstance(perm, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(perm).__name__}")
    if perm.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {perm.dtype}")
    if perm.dim() != 1 or perm.numel() != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(perm.shape)}")
    perm = perm.long()
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n):
        raise ValueError(f"{name} is not a permutation of 0..{n - 1}: values range over "
                         f"[{int(perm.min())}, {int(perm.max())}]")
    counts = torch.bincount(perm, minlength=n)
    if n and int(counts.max()) > 1:
        dup = int(torch.nonzero(counts > 1)[0])
        raise ValueError(f"{name} is not a permutation of 0..{n - 1}: value {dup} appears {int(counts[dup])} times")
    return perm


# ----------------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------------


class BlockSparse(NamedTuple):
    values: Tensor  # [nnzb, br, bc]
    row_ptr: Tensor  # [R/br + 1] int64
    col_idx: Tensor  # [nnzb] int64
    col_ptr: Tensor  # [C/bc + 1] int64
    row_idx_t: Tensor  # [nnzb] int64, block-row of each block in CSC order
    blk_t: Tensor  # [nnzb] int64, index into values of each block in CSC order
    shape: Tuple[int, int]  # (R, C)

    @property
    def block_size(self) -> Tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def density(self) -> float:
        R, C = self.shape
        return self.values.numel() / max(R * C, 1)

    def meta(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(row_ptr, col_idx, col_ptr, row_idx_t, blk_t), in the order the ops take them."""
        return self.row_ptr, self.col_idx, self.col_ptr, self.row_idx_t, self.blk_t

    def to_dense(self) -> Tensor:
        return block_to_dense(self.values, self.row_ptr, self.col_idx, self.shape)

    def mask(self) -> Tensor:
        """Boolean ``[R, C]`` mask of the active blocks."""
        ones = torch.ones_like(self.values, dtype=torch.float32)
        return block_to_dense(ones, self.row_ptr, self.col_idx, self.shape) != 0


def block_transpose_meta(row_ptr: Tensor, col_idx: Tensor, num_block_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSC metadata (col_ptr, row_idx_t, blk_t) of a CSR block pattern; computed once per pattern change.

    Runs the ``padst::block_transpose_meta`` op (validated like the matmul ops: ValueError on malformed input)."""
    from . import ops

    device = row_ptr.device
    out = ops.block_transpose_meta(row_ptr.cpu(), col_idx.cpu(), int(num_block_cols))
    return tuple(t.to(device) for t in out)


def block_from_dense(dense: Tensor, block_mask: Tensor, block_size: Tuple[int, int]) -> BlockSparse:
    """Packs the blocks of ``dense [R, C]`` selected by ``block_mask [R/br, C/bc]`` (bool)."""
    _check_2d("dense", dense)
    br, bc = (int(b) for b in block_size)
    R, C = dense.shape
    if br <= 0 or bc <= 0 or R % br or C % bc:
        raise ValueError(f"block size {br}x{bc} must divide the weight shape {R}x{C}")
    if block_mask.shape != (R // br, C // bc):
        raise ValueError(f"block_mask must have shape {(R // br, C // bc)}, got {tuple(block_mask.shape)}")
    block_mask = block_mask.to(device=dense.device, dtype=torch.bool)
    blocks = dense.reshape(R // br, br, C // bc, bc).transpose(1, 2)  # [nbr, nbc, br, bc]
    rows, cols = torch.nonzero(block_mask, as_tuple=True)  # row-major order: CSR with sorted columns
    values = blocks[rows, cols].contiguous()
    row_ptr = torch.zeros(R // br + 1, dtype=torch.long, device=dense.device)
    row_ptr[1:] = torch.cumsum(block_mask.sum(1), 0)
    col_idx = cols.contiguous()
    col_ptr, row_idx_t, blk_t = block_transpose_meta(row_ptr, col_idx, C // bc)
    return BlockSparse(values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, (R, C))


def block_to_dense(values: Tensor, row_ptr: Tensor, col_idx: Tensor, shape: Tuple[int, int]) -> Tensor:
    """Dense ``[R, C]`` matrix of a block pattern (duplicate blocks, if any, are summed)."""
    R, C = shape
    nnzb, br, bc = values.shape
    nbr, nbc = R // br, C // bc
    rows = torch.repeat_interleave(torch.arange(nbr, device=values.device), row_ptr.long().diff())
    dense = values.new_zeros(nbr, nbc, br, bc)
    dense.index_put_((rows, col_idx.long()), values, accumulate=True)
    return dense.transpose(1, 2).reshape(R, C)


def block_mask_to_dense(block_mask: Tensor, block_size: Tuple[int, int]) -> Tensor:
    """Element mask ``[R, C]`` of a block mask ``[R/br, C/bc]``."""
    br, bc = block_size
    return block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


# ----------------------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------------------


class NMSparse(NamedTuple):
    values: Tensor  # [R, K]
    col_idx: Tensor  # [R, K], permutation folded in
    n: int
    m: int
    shape: Tuple[int, int]  # (R, C)

    @property
    def density(self) -> float:
        return self.n / self.m

    def to_dense(self) -> Tensor:
        """The effective dense weight ``S @ P`` (so that ``x @ W.T == x[:, perm] @ S.T``)."""
        return nm_to_dense(self.values, self.col_idx, self.shape[1])

    def mask(self) -> Tensor:
        """Boolean ``[R, C]`` mask of the effective weight (permuted frame folded in, like :meth:`to_dense`)."""
        ones = torch.ones_like(self.values, dtype=torch.float32)
        return nm_to_dense(ones, self.col_idx, self.shape[1]) != 0


def _check_nm_args(n: int, m: int, C: int) -> None:
    if not (1 <= n < m):
        raise ValueError(f"N:M sparsity needs 1 <= N < M, got N={n}, M={m}")
    if C % m:
        raise ValueError(f"M={m} does not divide in_features {C}")


def check_nm_mask(mask: Tensor, n: int, m: int) -> None:
    """Raises ValueError unless every group of ``m`` consecutive inputs of every row holds exactly ``n`` ones."""
    _check_2d("mask", mask)
    R, C = mask.shape
    _check_nm_args(n, m, C)
    per_group = mask.reshape(R, C // m, m).sum(-1)
    bad = torch.nonzero(per_group != n)
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(f"mask is not {n}:{m}: row {r}, group {g} (inputs {g * m}..{g * m + m - 1}) holds "
                         f"{int(per_group[r, g])} non-zeros")


def nm_from_dense(dense: Tensor, mask: Tensor, n: int, m: int, perm: Optional[Tensor] = None,
                  index_dtype: torch.dtype = torch.int64) -> NMSparse:
    """Condenses ``dense [R, C]`` under an exact N:M ``mask`` (in the permuted frame).

    With ``perm``, the layer computes ``x[:, perm] @ S.T`` and the permutation is folded into the indices:
    ``col_idx = perm[logical index]``.
    """
    _check_2d("dense", dense)
    if mask.shape != dense.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from dense shape {tuple(dense.shape)}")
    check_nm_mask(mask, n, m)
    R, C = dense.shape
    K = C // m * n
    mask = mask.to(device=dense.device, dtype=torch.bool)
    # Positions of the ones, row by row, in increasing order (each row has exactly K of them).
    logical = torch.nonzero(mask)[:, 1].reshape(R, K)
    values = dense.gather(1, logical).contiguous()
    if perm is not None:
        logical = check_permutation(perm, C).to(dense.device)[logical]
    return NMSparse(values, logical.to(index_dtype).contiguous(), n, m, (R, C))


def nm_to_dense(values: Tensor, col_idx: Tensor, in_features: int) -> Tensor:
    """Dense ``[R, C]`` effective weight of a condensed N:M layer (duplicate indices are summed)."""
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter_add_(1, col_idx.long(), values)


# ----------------------------------------------------------------------------------------------------------
# Diagonal
# ----------------------------------------------------------------------------------------------------------


class DiagSparse(NamedTuple):
    values: Tensor  # [K, min(R, C)]
    offsets: Tensor  # [K] int64
    shape: Tuple[int, int]  # (R, C)

    @property
    def density(self) -> float:
        R, C = self.shape
        return self.values.numel() / max(R * C, 1)

    def to_dense(self) -> Tensor:
        return diag_to_dense(self.values, self.offsets, self.shape)

    def mask(self) -> Tensor:
        """Boolean ``[R, C]`` mask of the diagonals."""
        return diag_mask(self.offsets, self.shape)


def diag_coords(offsets: Tensor, shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """(rows, cols), each ``[K, L]``: where entry ``t`` of each diagonal sits in the ``R x C`` matrix."""
    R, C = shape
    L = min(R, C)
    t = torch.arange(L, device=offsets.device)
    o = offsets.long()[:, None]
    if R >= C:
        return (t + o) % R, t.expand(o.shape[0], L)
    return t.expand(o.shape[0], L), (t + o) % C


def _check_offsets(offsets: Tensor, shape: Tuple[int, int]) -> None:
    R, C = shape
    if offsets.dim() != 1:
        raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= max(R, C)):
        raise ValueError(f"offsets must lie in [0, max(R, C)) = [0, {max(R, C)}), got values in "
                         f"[{int(offsets.min())}, {int(offsets.max())}]")
    if offsets.unique().numel() != offsets.numel():
        vals, counts = offsets.unique(return_counts=True)
        raise ValueError(f"offsets must be distinct, but offset {int(vals[counts > 1][0])} appears "
                         f"{int(counts.max())} times")


def diag_mask(offsets: Tensor, shape: Tuple[int, int]) -> Tensor:
    """Boolean ``[R, C]`` mask of the given diagonals."""
    _check_offsets(offsets, shape)
    rows, cols = diag_coords(offsets, shape)
    mask = torch.zeros(shape, dtype=torch.bool, device=offsets.device)
    mask[rows, cols] = True
    return mask


def diag_from_dense(dense: Tensor, offsets: Tensor) -> DiagSparse:
    """Reads the diagonals ``offsets`` out of ``dense [R, C]``."""
    _check_2d("dense", dense)
    shape = tuple(dense.shape)
    _check_offsets(offsets, shape)
    offsets = offsets.long().to(dense.device)
    rows, cols = diag_coords(offsets, shape)
    return DiagSparse(dense[rows, cols].contiguous(), offsets.contiguous(), shape)


def diag_to_dense(values: Tensor, offsets: Tensor, shape: Tuple[int, int]) -> Tensor:
    """Dense ``[R, C]`` matrix of a diagonal layer."""
    rows, cols = diag_coords(offsets.to(values.device), shape)
    dense = values.new_zeros(shape)
    dense.index_put_((rows.reshape(-1), cols.reshape(-1)), values.reshape(-1), accumulate=True)
    return dense
