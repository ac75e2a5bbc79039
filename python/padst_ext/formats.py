"""The sparse-weight objects (one per structure, one interface: :class:`SparseWeight`), their storage formats and
the conversions dense+mask <-> storage.

The formats are the kernels' contract:

* :class:`BlockSparse` -- BSR-like: ``values [nnzb, br, bc]``, ``row_ptr [R/br + 1]``, ``col_idx [nnzb]``
  (strictly increasing within a block-row) plus the CSC transpose ``col_ptr [C/bc + 1]``,
  ``row_idx_t [nnzb]``, ``blk_t [nnzb]`` used by the dx kernel, rebuilt only when the pattern changes.
* :class:`NMSparse` -- N:M along the input dimension, condensed: ``values [R, K]``, ``col_idx [R, K]`` with
  ``K = C * n / m``. An input permutation is folded into ``col_idx`` (``col_idx = perm[logical index]``).
* :class:`Semi24Sparse` -- 2:4 (1:2 for float32) on cuSPARSELt: the N:M storage, input permutation carried.
* :class:`MaskedDense` -- the unstructured baseline: ``values [R, C]`` under a boolean ``mask``.
* :class:`DiagSparse` -- wrap-around diagonals: ``values [K, min(R, C)]``, ``offsets [K]`` in
  ``[0, max(R, C))``; entry ``t`` of diagonal ``k`` sits at ``((t + o_k) % R, t)`` if ``R >= C`` else
  ``(t, (t + o_k) % C)``.

All conversions are plain PyTorch (they run once per pattern change, not per step).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "SparseWeight",
    "BlockSparse",
    "Semi24Sparse",
    "MaskedDense",
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
# The sparse-weight objects: one per structure, one interface
# ----------------------------------------------------------------------------------------------------------


class SparseWeight:
    """A structured sparse weight ``S [R, C]``: stored values, the index tensors of its pattern and the permutations
    it is applied with, held together; every structure answers the same calls.

    Products (``impl``: the op namespace, :mod:`padst_ext.ops` by default or :mod:`padst_ext.reference`;
    ``values``: another tensor laid out like :attr:`values`, e.g. a fresh leaf or an optimizer moment):

    * :meth:`mm` -- ``y = (x[:, in_perm] @ S.T)[:, out_perm] + bias``, differentiable in ``x``, values and bias;
    * :meth:`mm_t` -- ``dx`` of that product for ``dy``; :meth:`sddmm` -- ``dvalues`` for ``dy`` and ``x``.

    Pattern: :meth:`to_dense` and :meth:`mask` (the matrix and pattern as the kernels read it), :meth:`with_perm`
    (the same weight applied with permutations: N:M folds an input permutation into its column indices, the others
    carry it), and for dynamic sparse training :meth:`units` (the pattern at the structure's unit: block grid,
    logical N:M columns, diagonal offsets, element mask), :meth:`remap` (the weight on a new pattern of units and
    the slot map from its stored positions to the old ones, -1 for grown units) and :meth:`move` (one gather through
    that map, zero where grown) -- no dense ``R x C`` matrix is formed.

    Instances are immutable values: :meth:`replace` and :meth:`to` return new ones.
    """

    index_names: Tuple[str, ...] = ()  # the index tensors, in the order the ops take them
    op_names: Tuple[str, ...] = ()  # the padst ops of mm, mm_t and sddmm (none: plain PyTorch)
    supports_output_perm = True

    # -- housekeeping ---------------------------------------------------------------------------------------
    def replace(self, **changes) -> "SparseWeight":
        return dataclasses.replace(self, **changes)

    def index(self) -> Dict[str, Tensor]:
        """The pattern's index tensors by name (the buffers a layer registers)."""
        return {n: getattr(self, n) for n in self.index_names}

    def to(self, device=None, dtype=None) -> "SparseWeight":
        """Moved to ``device``; floating tensors (values) cast to ``dtype``, index tensors keep theirs."""
        def conv(t):
            if not isinstance(t, Tensor):
                return t
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)

        return dataclasses.replace(self, **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def map_index(self, fn) -> "SparseWeight":
        """``fn`` applied to every index tensor (e.g. ``Tensor.int``)."""
        return dataclasses.replace(self, **{n: fn(t) for n, t in self.index().items()})

    @property
    def nnz(self) -> int:
        """Stored (structurally non-zero) entries."""
        return self.values.numel()

    @property
    def density(self) -> float:
        R, C = self.shape
        return self.nnz / max(R * C, 1)

    @property
    def unit_numel(self) -> int:
        """Entries per unit of the pattern (a block, a diagonal, one element)."""
        return 1

    def _v(self, values: Optional[Tensor]) -> Tensor:
        return self.values if values is None else values

    # -- interface ----------------------------------------------------------------------------------------
    def mm(self, x: Tensor, bias: Optional[Tensor] = None, *, values: Optional[Tensor] = None, impl=None) -> Tensor:
        raise NotImplementedError

    def mm_t(self, dy: Tensor, *, values: Optional[Tensor] = None, impl=None) -> Tensor:
        raise NotImplementedError

    def sddmm(self, dy: Tensor, x: Tensor, *, impl=None) -> Tensor:
        raise NotImplementedError

    def to_dense(self, values: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def mask(self) -> Tensor:
        """Boolean ``[R, C]`` pattern of :meth:`to_dense`."""
        return self.to_dense(torch.ones_like(self.values, dtype=torch.float32)) != 0

    def with_perm(self, in_perm: Optional[Tensor] = None, out_perm: Optional[Tensor] = None) -> "SparseWeight":
        if out_perm is not None and not self.supports_output_perm:
            raise ValueError(f"{type(self).__name__} takes no output permutation")
        return dataclasses.replace(self, in_perm=in_perm, out_perm=out_perm)

    def units(self) -> Tensor:
        raise NotImplementedError

    def remap(self, units: Tensor) -> Tuple["SparseWeight", Tensor]:
        raise NotImplementedError

    @staticmethod
    def move(t: Tensor, slot: Tensor) -> Tensor:
        """``t`` (laid out like the old values) laid out on the new pattern: ``out[i] = t[slot[i]]`` along the stored
        units, 0 where ``slot[i] < 0``; data only (no autograd history)."""
        out = t.detach().index_select(0, slot.clamp(min=0))
        return out.masked_fill_((slot < 0).reshape(slot.shape + (1,) * (t.dim() - 1)), 0)

    def validate(self, where: str = "") -> None:
        """ValueError unless the index tensors describe a valid pattern of this structure and shape."""


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparse(SparseWeight):
    """BSR blocks with the CSC transpose metadata the ``dx`` kernel walks. Units: blocks (``[R/br, C/bc]`` grid)."""

    values: Tensor  # [nnzb, br, bc]
    row_ptr: Tensor  # [R/br + 1] int64
    col_idx: Tensor  # [nnzb] int64
    col_ptr: Tensor  # [C/bc + 1] int64
    row_idx_t: Tensor  # [nnzb] int64, block-row of each block in CSC order
    blk_t: Tensor  # [nnzb] int64, index into values of each block in CSC order
    shape: Tuple[int, int]  # (R, C)
    in_perm: Optional[Tensor] = None
    out_perm: Optional[Tensor] = None

    index_names = ("row_ptr", "col_idx", "col_ptr", "row_idx_t", "blk_t")
    op_names = ("block_mm", "block_mm_t", "block_sddmm")

    @property
    def block_size(self) -> Tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def unit_numel(self) -> int:
        br, bc = self.block_size
        return br * bc

    def meta(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(row_ptr, col_idx, col_ptr, row_idx_t, blk_t), in the order the ops take them."""
        return self.row_ptr, self.col_idx, self.col_ptr, self.row_idx_t, self.blk_t

    def mm(self, x, bias=None, *, values=None, impl=None):
        return (impl or _ops()).block_mm(x, self._v(values), *self.meta(), bias, self.in_perm, self.out_perm)

    def mm_t(self, dy, *, values=None, impl=None):
        return (impl or _ops()).block_mm_t(dy, self._v(values), *self.meta(), self.in_perm, self.out_perm)

    def sddmm(self, dy, x, *, impl=None):
        br, bc = self.block_size
        return (impl or _ops()).block_sddmm(dy, x, self.row_ptr, self.col_idx, br, bc, self.in_perm, self.out_perm)

    def to_dense(self, values=None):
        return block_to_dense(self._v(values), self.row_ptr, self.col_idx, self.shape)

    def units(self) -> Tensor:
        """Boolean ``[R/br, C/bc]`` grid of the stored blocks."""
        br, bc = self.block_size
        R, C = self.shape
        grid = torch.zeros(R // br, C // bc, dtype=torch.bool, device=self.values.device)
        grid[self._block_rows(), self.col_idx.long()] = True
        return grid

    def unit_scores(self, t: Tensor) -> Tensor:
        """Per block of the grid, the sum of ``t`` (laid out like values) over the block (0 for absent blocks)."""
        br, bc = self.block_size
        R, C = self.shape
        grid = torch.zeros(R // br, C // bc, dtype=torch.float32, device=t.device)
        grid[self._block_rows(), self.col_idx.long()] = t.float().sum((1, 2))
        return grid

    def _block_rows(self) -> Tensor:
        nbr = self.row_ptr.numel() - 1
        return torch.repeat_interleave(torch.arange(nbr, device=self.row_ptr.device), self.row_ptr.long().diff())

    def remap(self, units):
        br, bc = self.block_size
        R, C = self.shape
        old_slot = torch.full((R // br, C // bc), -1, dtype=torch.long, device=self.values.device)
        old_slot[self._block_rows(), self.col_idx.long()] = torch.arange(self.col_idx.numel(),
                                                                         device=self.values.device)
        rows, meta = _block_pattern(units.to(self.values.device), C // bc)
        slot = old_slot[rows, meta[1]]
        new = dataclasses.replace(self, values=self.move(self.values, slot), **dict(zip(self.index_names, meta)))
        return new, slot

    def validate(self, where=""):
        R, C = self.shape
        br, bc = self.block_size
        cp, ri, bt = block_transpose_meta(self.row_ptr.cpu(), self.col_idx.cpu(), C // bc)
        if not (torch.equal(cp, self.col_ptr.cpu().long()) and torch.equal(ri, self.row_idx_t.cpu().long())
                and torch.equal(bt, self.blk_t.cpu().long())):
            raise ValueError(f"{where}col_ptr / row_idx_t / blk_t do not describe the pattern of row_ptr and "
                             f"col_idx (rebuild them with padst_ext.formats.block_transpose_meta)")
        if self.values.shape != (self.col_idx.numel(), br, bc):
            raise ValueError(f"{where}values has shape {tuple(self.values.shape)}, the pattern needs "
                             f"{(self.col_idx.numel(), br, bc)}")


@dataclasses.dataclass(frozen=True, eq=False)
class NMSparse(SparseWeight):
    """N:M along the input, condensed; an input permutation is folded into ``col_idx`` (``perm[logical index]``).
    Units: elements, each row's ``K`` logical columns in increasing order."""

    values: Tensor  # [R, K]
    col_idx: Tensor  # [R, K], permutation folded in
    n: int
    m: int
    shape: Tuple[int, int]  # (R, C)

    index_names = ("col_idx",)
    op_names = ("nm_mm", "nm_mm_t", "nm_sddmm")
    supports_output_perm = False

    @property
    def density(self) -> float:
        return self.n / self.m

    def mm(self, x, bias=None, *, values=None, impl=None):
        return (impl or _ops()).nm_mm(x, self._v(values), self.col_idx, self.n, self.m, bias)

    def mm_t(self, dy, *, values=None, impl=None):
        return (impl or _ops()).nm_mm_t(dy, self._v(values), self.col_idx, self.n, self.m)

    def sddmm(self, dy, x, *, impl=None):
        return (impl or _ops()).nm_sddmm(dy, x, self.col_idx, self.n, self.m)

    def to_dense(self, values=None):
        """The effective dense weight ``S @ P`` (so that ``x @ W.T == x[:, perm] @ S.T``)."""
        return nm_to_dense(self._v(values), self.col_idx, self.shape[1])

    def with_perm(self, in_perm=None, out_perm=None):
        if out_perm is not None:
            raise ValueError("N:M takes no output permutation (a row permutation of an N:M matrix is still N:M)")
        if in_perm is None:
            return self
        return dataclasses.replace(self, col_idx=in_perm.to(self.col_idx.device)[self.col_idx.long()].to(
            self.col_idx.dtype))

    def units(self) -> Tensor:
        """The ``[R, K]`` columns (logical frame, increasing along each row)."""
        return self.col_idx

    def row_chunks(self, parts: int):
        """About ``parts`` row ranges: DST's per-row work on ``[rows, C]`` tensors runs a range at a time, so those
        stay a fraction of one dense ``R x C``."""
        return _row_ranges(self.shape[0], parts)

    def remap(self, units):
        R, C = self.shape
        new_col = units.to(device=self.col_idx.device, dtype=self.col_idx.dtype)
        K = self.col_idx.shape[1]
        slot = torch.empty(new_col.shape, dtype=torch.long, device=new_col.device)
        ar = torch.arange(K, device=new_col.device)
        for r0, r1 in self.row_chunks(8):  # where each old column sat in its row, [rows, C] int64
            pos = torch.full((r1 - r0, C), -1, dtype=torch.long, device=new_col.device)
            pos.scatter_(1, self.col_idx[r0:r1].long(), ar.expand(r1 - r0, K))
            slot[r0:r1] = pos.gather(1, new_col[r0:r1].long())
            del pos  # before the next chunk's
        return dataclasses.replace(self, values=self.move(self.values, slot), col_idx=new_col.contiguous()), slot

    @staticmethod
    def move(t, slot):
        t = t.detach()
        out = torch.empty(slot.shape, dtype=t.dtype, device=t.device)
        for r0, r1 in _row_ranges(slot.shape[0], 16):  # row chunks: the clamped index is a small temporary
            s = slot[r0:r1]
            torch.gather(t[r0:r1], 1, s.clamp(min=0), out=out[r0:r1])
            out[r0:r1].masked_fill_(s < 0, 0)
        return out

    def validate(self, where=""):
        R, C = self.shape
        n, m, ci = self.n, self.m, self.col_idx.cpu()
        if ci.dtype not in (torch.int32, torch.int64) or ci.dim() != 2 or ci.shape[0] != R:
            raise ValueError(f"{where}col_idx must be an int32/int64 [{R}, K] tensor, got {ci.dtype} "
                             f"{tuple(ci.shape)}")
        if ci.numel() and (int(ci.min()) < 0 or int(ci.max()) >= C):
            raise ValueError(f"{where}col_idx holds values in [{int(ci.min())}, {int(ci.max())}], outside "
                             f"[0, {C})")
        ones = torch.ones_like(ci, dtype=torch.int32)
        mask = torch.zeros(R, C, dtype=torch.int32).scatter_add_(1, ci.long(), ones)
        if ci.shape[1] != C // m * n:
            raise ValueError(f"{where}col_idx has {ci.shape[1]} entries per row; {n}:{m} of {C} inputs has "
                             f"{C // m * n}")
        if mask.numel() and int(mask.max()) > 1:
            raise ValueError(f"{where}col_idx repeats a column in row {int(torch.nonzero(mask > 1)[0, 0])}")
        check_nm_mask(mask.bool(), n, m)


@dataclasses.dataclass(frozen=True, eq=False)
class Semi24Sparse(NMSparse):
    """2:4 (1:2 for float32) through cuSPARSELt (:func:`padst_ext.semi_structured.lt24_linear`), which reads the
    input permutation as a gather, so it is carried rather than folded; the N:M kernels where cuSPARSELt cannot
    serve. ``dx`` and ``dW`` run the N:M kernels with the permutation folded."""

    in_perm: Optional[Tensor] = None

    def mm(self, x, bias=None, *, values=None, impl=None):
        if impl is not None:
            return self._folded().mm(x, bias, values=values, impl=impl)
        from .semi_structured import lt24_linear

        return lt24_linear(x, self._v(values), self.col_idx, self.n, self.m, self.shape[1], self.in_perm, bias)

    def mm_t(self, dy, *, values=None, impl=None):
        return self._folded().mm_t(dy, values=values, impl=impl)

    def sddmm(self, dy, x, *, impl=None):
        return self._folded().sddmm(dy, x, impl=impl)

    def to_dense(self, values=None):
        """The logical ``S`` (the permutation is carried, not folded)."""
        return nm_to_dense(self._v(values), self.col_idx, self.shape[1])

    def _folded(self) -> NMSparse:
        return NMSparse(self.values, self.col_idx, self.n, self.m, self.shape).with_perm(self.in_perm)

    def with_perm(self, in_perm=None, out_perm=None):
        if out_perm is not None:
            raise ValueError("N:M takes no output permutation (a row permutation of an N:M matrix is still N:M)")
        return dataclasses.replace(self, in_perm=in_perm)


@dataclasses.dataclass(frozen=True, eq=False)
class DiagSparse(SparseWeight):
    """Wrap-around diagonals. Units: the ``max(R, C)`` diagonals (offsets)."""

    values: Tensor  # [K, min(R, C)]
    offsets: Tensor  # [K] int64
    shape: Tuple[int, int]  # (R, C)
    in_perm: Optional[Tensor] = None
    out_perm: Optional[Tensor] = None

    index_names = ("offsets",)
    op_names = ("diag_mm", "diag_mm_t", "diag_sddmm")
    OFFSET_PARTS = 16  # dense_unit_scores reads the diagonals in about this many chunks

    @property
    def unit_numel(self) -> int:
        return min(self.shape)

    def mm(self, x, bias=None, *, values=None, impl=None):
        return (impl or _ops()).diag_mm(x, self._v(values), self.offsets, self.shape[0], bias, self.in_perm,
                                        self.out_perm)

    def mm_t(self, dy, *, values=None, impl=None):
        return (impl or _ops()).diag_mm_t(dy, self._v(values), self.offsets, self.shape[1], self.in_perm,
                                          self.out_perm)

    def sddmm(self, dy, x, *, impl=None):
        return (impl or _ops()).diag_sddmm(dy, x, self.offsets, self.in_perm, self.out_perm)

    def to_dense(self, values=None):
        return diag_to_dense(self._v(values), self.offsets, self.shape)

    def mask(self):
        return diag_mask(self.offsets, self.shape)

    def units(self) -> Tensor:
        """Boolean ``[max(R, C)]``: which diagonals are stored."""
        on = torch.zeros(max(self.shape), dtype=torch.bool, device=self.offsets.device)
        on[self.offsets.long()] = True
        return on

    def unit_scores(self, t: Tensor) -> Tensor:
        """Per diagonal, the sum of ``t`` (laid out like values) along it (0 for absent diagonals)."""
        out = torch.zeros(max(self.shape), dtype=torch.float32, device=t.device)
        out[self.offsets.long()] = t.float().sum(1)
        return out

    @classmethod
    def dense_unit_scores(cls, dense: Tensor) -> Tensor:
        """Per diagonal of all ``max(R, C)``, the sum of ``dense [R, C]`` along it, a chunk of diagonals at a time (so
        the gathered entries and their coordinates stay a fraction of one dense ``R x C``)."""
        U = max(dense.shape)
        out = torch.empty(U, dtype=torch.float32, device=dense.device)
        step = max(1, -(-U // cls.OFFSET_PARTS))
        for u0 in range(0, U, step):
            offs = torch.arange(u0, min(U, u0 + step), device=dense.device)
            rows, cols = diag_coords(offs, tuple(dense.shape))
            out[u0:u0 + offs.numel()] = dense[rows, cols].float().sum(1)
        return out

    def remap(self, units):
        U = max(self.shape)
        old_slot = torch.full((U,), -1, dtype=torch.long, device=self.offsets.device)
        old_slot[self.offsets.long()] = torch.arange(self.offsets.numel(), device=self.offsets.device)
        offsets = torch.nonzero(units.to(self.offsets.device)).reshape(-1)
        slot = old_slot[offsets]
        return dataclasses.replace(self, values=self.move(self.values, slot),
                                   offsets=offsets.to(self.offsets.dtype).contiguous()), slot

    def validate(self, where=""):
        try:
            _check_offsets(self.offsets.cpu(), self.shape)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedDense(SparseWeight):
    """A dense weight under an element mask: the unstructured RigL/SET baseline (dense products, no sparse kernel).
    Units: elements (the ``[R, C]`` mask)."""

    values: Tensor  # [R, C]; zero off the mask
    mask_: Tensor  # [R, C] bool
    shape: Tuple[int, int]
    in_perm: Optional[Tensor] = None
    out_perm: Optional[Tensor] = None

    index_names = ("mask",)

    @property
    def nnz(self) -> int:
        return int(self.mask_.sum())

    def index(self):
        return {"mask": self.mask_}

    def map_index(self, fn):
        return dataclasses.replace(self, mask_=fn(self.mask_))

    def _w(self, values):
        return self._v(values) * self.mask_

    # the products are the dense ones of padst_ext.reference on the masked matrix (there is no kernel to call)
    def mm(self, x, bias=None, *, values=None, impl=None):
        from . import reference

        return reference.linear(x, self._w(values), bias, self.in_perm, self.out_perm)

    def mm_t(self, dy, *, values=None, impl=None):
        from . import reference

        return reference.linear_t(dy, self._w(values), self.in_perm, self.out_perm)

    def sddmm(self, dy, x, *, impl=None):
        from . import reference

        return reference.dense_grad(dy, x, self.in_perm, self.out_perm) * self.mask_

    def to_dense(self, values=None):
        return self._w(values)

    def mask(self):
        return self.mask_.clone()  # a copy, like every structure's: the layer updates its buffer in place

    def units(self):
        return self.mask_

    def remap(self, units):
        new = units.to(device=self.mask_.device, dtype=torch.bool)
        keep = new & self.mask_
        slot = torch.where(keep, torch.arange(keep.numel(), device=keep.device).reshape(keep.shape), -1)
        return dataclasses.replace(self, values=self.move(self.values, slot), mask_=new), slot

    @staticmethod
    def move(t, slot):
        return torch.where(slot >= 0, t.detach(), torch.zeros((), dtype=t.dtype, device=t.device))


def _row_ranges(R: int, parts: int):
    """``[(r0, r1), ...]``: about ``parts`` equal ranges covering ``0..R``."""
    step = max(1, -(-R // parts))
    return [(r, min(R, r + step)) for r in range(0, R, step)]


_OPS = None


def _ops():
    global _OPS
    if _OPS is None:
        from . import ops

        _OPS = ops
    return _OPS


def _block_pattern(units: Tensor, num_block_cols: int) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """(block-row of each block, (row_ptr, col_idx, col_ptr, row_idx_t, blk_t)) of the block grid ``units``: the CSR
    (row-major: sorted columns) and its CSC transpose, built once."""
    units = units.to(torch.bool)
    rows, cols = torch.nonzero(units, as_tuple=True)
    row_ptr = torch.zeros(units.shape[0] + 1, dtype=torch.long, device=units.device)
    row_ptr[1:] = torch.cumsum(units.sum(1), 0)
    col_idx = cols.contiguous()
    return rows, (row_ptr, col_idx, *block_transpose_meta(row_ptr, col_idx, num_block_cols))


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
    rows, meta = _block_pattern(block_mask, C // bc)
    return BlockSparse(blocks[rows, meta[1]].contiguous(), *meta, (R, C))


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
