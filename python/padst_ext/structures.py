"""Mask policies: how each structure picks, and during dynamic sparse training updates, its pattern.

A :class:`Structure` knows its shape, density and unit (block, N:M group element, diagonal, element): it picks an
exact-density mask from scores (balanced where the kernels need it), packs a dense matrix under a mask into its
sparse-weight object (:mod:`padst_ext.formats`: the values, the index tensors and the products), and computes a DST
update at its unit from the weight object and a grow score. Adding a structure means one weight object and one
policy here; the layers, ``sparsify`` and DST only talk to these two interfaces.

Frames: a weight object built here describes the *logical* weight ``S [R, C]`` (the permuted frame); the layer
computes ``y = (x[:, in_perm] @ S.T)[:, out_perm] + bias``.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import formats as F

__all__ = ["drop_grow", "row_counts", "Structure", "BlockStructure", "NMStructure", "DiagonalStructure", "UnstructuredStructure",
           "Semi24Structure",
           "make_structure", "STRUCTURES"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """value as an int, or TypeError / ValueError naming ``name``: an integer (not a bool, not 2.5) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not hasattr(value, "__index__") and not float(value).is_integer():
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


def _check_density(density: float) -> float:
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1] (sparsity in [0, 1)), got density {density}")
    return float(density)


class Structure:
    """Base class. ``R`` = out_features, ``C`` = in_features."""

    name = "?"
    weight_cls = F.SparseWeight
    options: Tuple[str, ...] = ()  # the make_structure arguments the class takes besides its density

    def __init__(self, out_features: int, in_features: int, density: float):
        if out_features < 1 or in_features < 1:
            raise ValueError(f"features must be positive, got out={out_features}, in={in_features}")
        self.R, self.C = int(out_features), int(in_features)
        self.density = _check_density(density)

    @classmethod
    def fixes_density(cls, **options) -> bool:
        """Whether these make_structure options fix the density by themselves (N:M's n and m)."""
        return False

    @property
    def supports_output_perm(self) -> bool:
        return self.weight_cls.supports_output_perm

    @property
    def buffer_names(self) -> Tuple[str, ...]:
        """The weight object's index tensors (a layer's buffers)."""
        return self.weight_cls.index_names

    # -- interface ---------------------------------------------------------------------------------------
    def make_mask(self, scores: Tensor) -> Tensor:
        """Boolean ``[R, C]`` mask of exactly the structure's count of non-zeros, keeping the highest scores."""
        raise NotImplementedError

    def pack(self, dense: Tensor, mask: Tensor) -> F.SparseWeight:
        """The weight object holding ``dense`` restricted to ``mask``."""
        raise NotImplementedError

    def wrap(self, values: Tensor, index: Dict[str, Tensor]) -> F.SparseWeight:
        """The weight object of stored ``values`` and index tensors (a layer's parameter and buffers)."""
        return self.weight_cls(values, *(index[n] for n in self.buffer_names), (self.R, self.C))

    def update(self, weight: F.SparseWeight, g_score: Tensor, fraction: float) -> Tensor:
        """DST: the new pattern, in ``weight.units()`` form, after dropping ``fraction`` of the active units (lowest
        ``|values|`` summed over the unit) and growing as many (highest ``g_score [R, C]``, summed over the unit:
        |dense gradient| for RigL, random for SET), with the exact same count per row/group. ``g_score`` is the only
        ``[R, C]`` tensor involved; the caller's copy may be overwritten."""
        raise NotImplementedError

    def update_mask(self, mask: Tensor, w_abs: Tensor, g_score: Tensor, fraction: float) -> Tensor:
        """:meth:`update` on dense inputs (``[R, C]`` mask, weight magnitudes and grow score): the new ``[R, C]``
        mask. For tests and one-off use; DST calls :meth:`update` on the weight object."""
        w = self.pack(w_abs, mask)
        return w.remap(self.update(w, g_score.clone(), fraction))[0].mask()

    def config(self) -> dict:
        return dict(structure=self.name, out_features=self.R, in_features=self.C)

    def describe(self) -> str:
        return self.name

    def at_density(self, density: float) -> "Structure":
        """The same kind of structure (shape, block size or M) at another density."""
        return type(self)(self.R, self.C, density)

    def random_mask(self, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        return self.make_mask(torch.rand(self.R, self.C, generator=generator).to(device))

    def check_mask(self, mask: Tensor) -> None:
        if mask.shape != (self.R, self.C):
            raise ValueError(f"mask must have shape {(self.R, self.C)}, got {tuple(mask.shape)}")


def _rank(scores: Tensor, dim: int) -> Tensor:
    """Each entry's place in the stable ascending order along ``dim`` (what ``argsort(argsort(scores))`` gives, with
    one sort)."""
    order = torch.argsort(scores, dim=dim, stable=True)
    shape = [1] * scores.dim()
    shape[dim] = scores.shape[dim]
    ar = torch.arange(scores.shape[dim], device=scores.device).reshape(shape).expand_as(order)
    return torch.empty_like(order).scatter_(dim, order, ar)


def drop_grow(active: Tensor, w_score: Tensor, g_score: Tensor, k: Tensor) -> Tensor:
    """One DST update on rows of units: in each row drop the ``k`` active units of lowest ``w_score`` and grow
    as many of highest ``g_score`` among the units that were inactive (a dropped unit is not regrown), so every
    row keeps its count exactly. ``active``/``w_score``/``g_score``: ``[rows, U]``; ``k``: ``[rows]``."""
    inactive = ~active
    k = torch.minimum(k, torch.minimum(active.sum(1), inactive.sum(1)))  # cannot move more than either side
    big = torch.finfo(torch.float32).max
    w = torch.where(active, w_score.float(), torch.full_like(w_score, big, dtype=torch.float32))
    g = torch.where(inactive, g_score.float(), torch.full_like(g_score, -big, dtype=torch.float32))
    drop_rank = _rank(w, 1)
    grow_rank = _rank(-g, 1)
    drop = active & (drop_rank < k[:, None])
    grow = inactive & (grow_rank < k[:, None])
    return (active & ~drop) | grow


def row_counts(active_per_row: Tensor, fraction: float) -> Tensor:
    """How many units each row moves: ``round(fraction * total)`` in all, spread over the rows in proportion to
    their active counts (floor each, the remainder to the largest fractional parts; ties by row index), so that
    small per-row counts still move (rounding each row alone would round 0.5 down to 0 everywhere)."""
    quota = fraction * active_per_row.double()
    k = quota.floor().long()
    deficit = int(round(fraction * float(active_per_row.sum()))) - int(k.sum())
    if deficit > 0:
        order = torch.argsort(-(quota - k), stable=True)
        k[order[:deficit]] += 1
    return k


class BlockStructure(Structure):
    """Blocks of ``block_size`` (BSR storage), balanced: every block-row holds the same number of blocks
    (ragged by at most one). Empty output rows are what made block sparsity lose accuracy (design notes)."""

    name = "block"
    weight_cls = F.BlockSparse
    options = ("block_size",)

    def __init__(self, out_features, in_features, density, block_size=(32, 32)):
        super().__init__(out_features, in_features, density)
        if isinstance(block_size, numbers.Real) and not isinstance(block_size, bool):
            block_size = (block_size, block_size)
        if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
            raise TypeError(f"block_size must be an integer or a pair of integers, got {block_size!r}")
        br, bc = (check_int("block_size", b) for b in block_size)
        if br < 1 or bc < 1 or self.R % br or self.C % bc:
            raise ValueError(f"block size {br}x{bc} must divide the weight shape {self.R}x{self.C} "
                             f"(out_features x in_features)")
        self.br, self.bc = br, bc
        self.nbr, self.nbc = self.R // br, self.C // bc
        self.nnzb = max(1, min(self.nbr * self.nbc, round(self.density * self.nbr * self.nbc)))

    def config(self):
        return dict(super().config(), block_size=(self.br, self.bc))

    def describe(self):
        return f"block {self.br}x{self.bc}"

    def at_density(self, density):
        return type(self)(self.R, self.C, density, (self.br, self.bc))

    def make_mask(self, scores):
        bs = scores.abs().reshape(self.nbr, self.br, self.nbc, self.bc).sum((1, 3))
        base, extra = divmod(self.nnzb, self.nbr)
        # rows that get one block more: those whose best remaining block scores highest
        sorted_scores, order = bs.sort(dim=1, descending=True)
        per_row = torch.full((self.nbr,), base, dtype=torch.long, device=scores.device)
        if extra:
            nxt = sorted_scores[:, base] if base < self.nbc else torch.zeros(self.nbr, device=scores.device)
            per_row[nxt.topk(extra).indices] += 1
        keep = torch.arange(self.nbc, device=scores.device)[None, :] < per_row[:, None]
        bmask = torch.zeros_like(keep).scatter_(1, order, keep)
        return F.block_mask_to_dense(bmask, (self.br, self.bc))

    def update(self, weight, g_score, fraction):
        active = weight.units()
        k = row_counts(active.sum(1), fraction)  # per block-row: rows stay balanced
        g_units = g_score.reshape(self.nbr, self.br, self.nbc, self.bc).float().sum((1, 3))
        return drop_grow(active, weight.unit_scores(weight.values.abs()), g_units, k)

    def pack(self, dense, mask):
        self.check_mask(mask)
        bmask = mask.reshape(self.nbr, self.br, self.nbc, self.bc).any(3).any(1)
        if not torch.equal(F.block_mask_to_dense(bmask, (self.br, self.bc)), mask.bool()):
            raise ValueError("mask is not made of whole blocks of size "f"{self.br}x{self.bc}")
        return F.block_from_dense(dense, bmask, (self.br, self.bc))


def _nm_from_density(C: int, density: float) -> Tuple[int, int]:
    """The N:M (M dividing C, M <= 64) whose N/M is closest to ``density``; exact matches preferred."""
    best = None
    for m in range(2, min(C, 64) + 1):
        if C % m:
            continue
        n = max(1, min(m - 1, round(density * m)))
        err = abs(n / m - density)
        if best is None or err < best[0] - 1e-12:
            best = (err, n, m)
    if best is None:
        raise ValueError(f"no N:M pattern fits in_features={C}; pass n and m explicitly")
    return best[1], best[2]


class NMStructure(Structure):
    """N non-zeros in every group of M consecutive inputs of every row (constant fan-in). Only an input
    permutation adds expressivity (a row permutation of an N:M matrix is still N:M), so none on the output."""

    name = "nm"
    weight_cls = F.NMSparse
    options = ("n", "m")

    def __init__(self, out_features, in_features, density=None, n=None, m=None):
        if n is None or m is None:
            if density is None:
                raise ValueError("N:M needs n and m, or a density to choose them from")
            n, m = _nm_from_density(in_features, density)
        n, m = int(n), int(m)
        if not (1 <= n < m):
            raise ValueError(f"N:M sparsity needs 1 <= N < M, got N={n}, M={m}")
        if in_features % m:
            raise ValueError(f"M={m} does not divide in_features {in_features}")
        super().__init__(out_features, in_features, n / m)
        self.n, self.m = n, m
        self.K = in_features // m * n

    @classmethod
    def fixes_density(cls, n=None, m=None, **_):
        return n is not None and m is not None

    def config(self):
        return dict(super().config(), n=self.n, m=self.m)

    def describe(self):
        return f"{self.n}:{self.m}"

    def at_density(self, density):
        """The nearest N for this M."""
        return type(self)(self.R, self.C, None, max(1, min(self.m - 1, round(density * self.m))), self.m)

    def wrap(self, values, index):
        return self.weight_cls(values, index["col_idx"], self.n, self.m, (self.R, self.C))

    def make_mask(self, scores):
        s = scores.abs().reshape(self.R, self.C // self.m, self.m)
        idx = s.topk(self.n, dim=-1).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(self.R, self.C)

    def update(self, weight, g_score, fraction):
        R, K, G, m = self.R, self.K, self.C // self.m, self.m
        col = weight.units().long()  # [R, K] logical columns, increasing along each row
        big = torch.finfo(torch.float32).max
        # drop per row (constant fan-in) the k smallest active weights of the row (ties: lower column first)
        k = row_counts(torch.full((R,), K, dtype=torch.long), fraction).to(col.device)
        # regrow inside each group as many as it lost, so every group keeps exactly N: best gradient among the
        # originally inactive, then (only if a group runs out of those, m - n < dropped) the dropped ones. Row
        # chunks bound the work tensors (a float32 and a bool [rows, C]) to a fraction of one dense R x C.
        new_col = torch.empty_like(col)
        for r0, r1 in weight.row_chunks(4):
            rows, c = r1 - r0, col[r0:r1]
            drop = _rank(weight.values[r0:r1].abs().float(), 1) < k[r0:r1, None]  # [rows, K]
            # scores of the row's C inputs: the gradient where inactive, below every real score where dropped,
            # -inf where kept (never regrown)
            score = g_score[r0:r1].float().clone()
            score.scatter_(1, c, torch.where(drop, -big / 2, float("-inf")))
            score = score.reshape(rows, G, m)
            lost = torch.zeros(rows, G, dtype=torch.long, device=col.device).scatter_add_(1, c // m, drop.long())
            new = torch.zeros(rows, self.C, dtype=torch.bool, device=col.device).scatter_(1, c, ~drop)
            grown = new.view(rows, G, m)
            # the lost[g] best of each group, ties to the lower index (argmax returns the first maximum)
            for i in range(int(lost.max()) if lost.numel() else 0):
                best = score.argmax(-1, keepdim=True)
                grown.scatter_(-1, best, (lost > i)[..., None] | grown.gather(-1, best))
                score.scatter_(-1, best, float("-inf"))
            new_col[r0:r1] = torch.nonzero(new)[:, 1].reshape(rows, K)
            del score, new, grown  # before the next chunk's
        return new_col

    def pack(self, dense, mask):
        self.check_mask(mask)
        return F.nm_from_dense(dense, mask, self.n, self.m)


class DiagonalStructure(Structure):
    """K wrap-around diagonals (DynaDiag-style), ``K = ceil(density * R * C / min(R, C))``."""

    name = "diagonal"
    weight_cls = F.DiagSparse

    def __init__(self, out_features, in_features, density):
        super().__init__(out_features, in_features, density)
        self.L = min(self.R, self.C)
        self.num_offsets = max(self.R, self.C)
        self.K = max(1, min(self.num_offsets, math.ceil(self.density * self.R * self.C / self.L - 1e-9)))

    def describe(self):
        return f"diagonal K={self.K}"

    def make_mask(self, scores):
        per_diag = F.DiagSparse.dense_unit_scores(scores.abs())
        return F.diag_mask(per_diag.topk(self.K).indices, (self.R, self.C))

    def update(self, weight, g_score, fraction):
        active = weight.units()[None]
        k = row_counts(active.sum(1), fraction)
        w_units = weight.unit_scores(weight.values.abs())[None]
        return drop_grow(active, w_units, F.DiagSparse.dense_unit_scores(g_score)[None], k)[0]

    def offsets_of(self, mask: Tensor) -> Tensor:
        all_offsets = torch.arange(self.num_offsets, device=mask.device)
        rows, cols = F.diag_coords(all_offsets, (self.R, self.C))
        on = mask[rows, cols]
        full, empty = on.all(1), ~on.any(1)
        if not bool((full | empty).all()):
            raise ValueError("mask is not made of whole wrap-around diagonals")
        return all_offsets[full]

    def pack(self, dense, mask):
        self.check_mask(mask)
        return F.diag_from_dense(dense, self.offsets_of(mask))


class UnstructuredStructure(Structure):
    """Masked dense weight: the unstructured RigL/SET accuracy baseline (no sparse kernel)."""

    name = "unstructured"
    weight_cls = F.MaskedDense

    def __init__(self, out_features, in_features, density):
        super().__init__(out_features, in_features, density)
        self.nnz = max(1, round(self.density * self.R * self.C))

    def make_mask(self, scores):
        flat = torch.zeros(self.R * self.C, dtype=torch.bool, device=scores.device)
        flat[scores.abs().reshape(-1).topk(self.nnz).indices] = True
        return flat.reshape(self.R, self.C)

    def update(self, weight, g_score, fraction):
        active = weight.units().reshape(1, -1)
        k = row_counts(active.sum(1), fraction)
        w_abs = weight.to_dense().abs().reshape(1, -1)
        return drop_grow(active, w_abs, g_score.reshape(1, -1), k).reshape(self.R, self.C)

    def pack(self, dense, mask):
        self.check_mask(mask)
        mask = mask.to(device=dense.device, dtype=torch.bool)
        return F.MaskedDense(dense * mask, mask, (self.R, self.C))


class Semi24Structure(NMStructure):
    """2:4 (default; 1:2 suits float32) run through cuSPARSELt where it can serve (:class:`padst_ext.formats.Semi24Sparse`),
    the N:M kernels elsewhere; the mask policy is N:M's."""

    name = "2:4"
    weight_cls = F.Semi24Sparse

    def __init__(self, out_features, in_features, density=None, n=None, m=None):
        n, m = (2, 4) if n is None and m is None else (n, m)
        super().__init__(out_features, in_features, None, n, m)

    @classmethod
    def fixes_density(cls, **_):
        return True

    def describe(self):
        return f"{self.n}:{self.m} (cuSPARSELt)"

    def at_density(self, density):
        raise ValueError(f"structure '2:4' has the fixed density {self.n}:{self.m}")


STRUCTURES = {"block": BlockStructure, "nm": NMStructure, "diagonal": DiagonalStructure, "diag": DiagonalStructure,
              "unstructured": UnstructuredStructure, "2:4": Semi24Structure}


def make_structure(structure: str, out_features: int, in_features: int, sparsity: Optional[float] = 0.9,
                   block_size=(32, 32), n: Optional[int] = None, m: Optional[int] = None) -> Structure:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(set(STRUCTURES))}, got {structure!r}")
    out_features, in_features = check_int("out_features", out_features), check_int("in_features", in_features)
    cls = STRUCTURES[structure]
    given = dict(block_size=block_size, n=n, m=m)
    if sparsity is None and not cls.fixes_density(**given):
        raise ValueError(f"sparsity must be a number in [0, 1) for structure={structure!r} (None only for N:M with n "
                         f"and m given), got None")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    density = None if sparsity is None else 1.0 - float(sparsity)
    if sparsity is not None and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return cls(out_features, in_features, density, **{k: given[k] for k in cls.options})
