"""The four sparsity structures behind one small interface.

A structure knows how to pick an exact-density mask from scores (balanced where the kernels need it), how to
pack a dense matrix under that mask into its storage (a ``values`` tensor plus index buffers), how to unpack it,
and how to run the forward product with the permutations fused. Adding a structure means one class here (plus
its kernels); the layers, ``sparsify`` and DST only talk to this interface.

Frames: ``values`` and the index buffers always describe the *logical* weight ``S [R, C]`` (the permuted frame);
the layer computes ``y = (x[:, in_perm] @ S.T)[:, out_perm] + bias``.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import formats as F
from . import ops

__all__ = ["drop_grow", "row_counts", "Structure", "BlockStructure", "NMStructure", "DiagonalStructure", "UnstructuredStructure",
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
    supports_output_perm = True
    buffer_names: Tuple[str, ...] = ()

    def __init__(self, out_features: int, in_features: int, density: float):
        if out_features < 1 or in_features < 1:
            raise ValueError(f"features must be positive, got out={out_features}, in={in_features}")
        self.R, self.C = int(out_features), int(in_features)
        self.density = _check_density(density)

    # -- interface ---------------------------------------------------------------------------------------
    def make_mask(self, scores: Tensor) -> Tensor:
        """Boolean ``[R, C]`` mask of exactly the structure's count of non-zeros, keeping the highest scores."""
        raise NotImplementedError

    def pack(self, dense: Tensor, mask: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(values, index buffers) of ``dense`` restricted to ``mask``."""
        raise NotImplementedError

    def unpack(self, values: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
        """Dense ``[R, C]`` logical weight."""
        raise NotImplementedError

    def mm(self, x: Tensor, values: Tensor, buffers: Dict[str, Tensor], bias: Optional[Tensor],
           in_perm: Optional[Tensor], out_perm: Optional[Tensor]) -> Tensor:
        """``x [B, C] -> y [B, R]`` with the permutations fused."""
        raise NotImplementedError

    def config(self) -> dict:
        return dict(structure=self.name, out_features=self.R, in_features=self.C)

    def describe(self) -> str:
        return self.name

    def random_mask(self, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        return self.make_mask(torch.rand(self.R, self.C, generator=generator).to(device))

    def update_mask(self, mask: Tensor, w_abs: Tensor, g_score: Tensor, fraction: float) -> Tensor:
        """DST: the new ``[R, C]`` mask after dropping ``fraction`` of the active units (lowest ``w_abs``) and
        growing as many (highest ``g_score``: |dense gradient| for RigL, random for SET), at the structure's unit
        (block, diagonal, element within its N:M group, element) and with the exact same count per row/group."""
        raise NotImplementedError

    def check_mask(self, mask: Tensor) -> None:
        if mask.shape != (self.R, self.C):
            raise ValueError(f"mask must have shape {(self.R, self.C)}, got {tuple(mask.shape)}")


def drop_grow(active: Tensor, w_score: Tensor, g_score: Tensor, k: Tensor) -> Tensor:
    """One DST update on rows of units: in each row drop the ``k`` active units of lowest ``w_score`` and grow
    as many of highest ``g_score`` among the units that were inactive (a dropped unit is not regrown), so every
    row keeps its count exactly. ``active``/``w_score``/``g_score``: ``[rows, U]``; ``k``: ``[rows]``."""
    inactive = ~active
    k = torch.minimum(k, torch.minimum(active.sum(1), inactive.sum(1)))  # cannot move more than either side
    big = torch.finfo(torch.float32).max
    w = torch.where(active, w_score.float(), torch.full_like(w_score, big, dtype=torch.float32))
    g = torch.where(inactive, g_score.float(), torch.full_like(g_score, -big, dtype=torch.float32))
    drop_rank = torch.argsort(torch.argsort(w, dim=1, stable=True), dim=1, stable=True)
    grow_rank = torch.argsort(torch.argsort(-g, dim=1, stable=True), dim=1, stable=True)
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
    buffer_names = ("row_ptr", "col_idx", "col_ptr", "row_idx_t", "blk_t")

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

    def _blocks(self, t: Tensor) -> Tensor:
        return t.reshape(self.nbr, self.br, self.nbc, self.bc).sum((1, 3))

    def update_mask(self, mask, w_abs, g_score, fraction):
        active = self._blocks(mask.float()) > 0
        k = row_counts(active.sum(1), fraction)  # per block-row: rows stay balanced
        new = drop_grow(active, self._blocks(w_abs.float()), self._blocks(g_score.float()), k)
        return F.block_mask_to_dense(new, (self.br, self.bc))

    def pack(self, dense, mask):
        self.check_mask(mask)
        bmask = mask.reshape(self.nbr, self.br, self.nbc, self.bc).any(3).any(1)
        if not torch.equal(F.block_mask_to_dense(bmask, (self.br, self.bc)), mask.bool()):
            raise ValueError("mask is not made of whole blocks of size "f"{self.br}x{self.bc}")
        w = F.block_from_dense(dense, bmask, (self.br, self.bc))
        return w.values, dict(zip(self.buffer_names, w.meta()))

    def unpack(self, values, buffers):
        return F.block_to_dense(values, buffers["row_ptr"], buffers["col_idx"], (self.R, self.C))

    def mm(self, x, values, buffers, bias, in_perm, out_perm):
        return ops.block_mm(x, values, *(buffers[n] for n in self.buffer_names), bias, in_perm, out_perm)


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
    supports_output_perm = False
    buffer_names = ("col_idx",)

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

    def config(self):
        return dict(super().config(), n=self.n, m=self.m)

    def describe(self):
        return f"{self.n}:{self.m}"

    def make_mask(self, scores):
        s = scores.abs().reshape(self.R, self.C // self.m, self.m)
        idx = s.topk(self.n, dim=-1).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(self.R, self.C)

    def update_mask(self, mask, w_abs, g_score, fraction):
        R, G, m = self.R, self.C // self.m, self.m
        active = mask.bool()
        big = torch.finfo(torch.float32).max
        # drop per row (constant fan-in), the k smallest active weights of the row
        k = row_counts(active.sum(1), fraction)
        w = torch.where(active, w_abs.float(), torch.full_like(w_abs, big, dtype=torch.float32))
        drop = active & (torch.argsort(torch.argsort(w, dim=1, stable=True), dim=1, stable=True) < k[:, None])
        # regrow inside each group as many as it lost, so every group keeps exactly N: best gradient among the
        # originally inactive, then (only if a group runs out of those, m - n < dropped) the dropped ones
        kept = (active & ~drop).reshape(R, G, m)
        lost = drop.reshape(R, G, m).sum(-1)
        dev = mask.device
        score = torch.where(active.reshape(R, G, m), torch.full((R, G, m), -big, device=dev),
                            g_score.float().reshape(R, G, m))
        score = torch.where(drop.reshape(R, G, m), torch.full((R, G, m), -big / 2, device=dev), score)
        score = torch.where(kept, torch.full((R, G, m), float("-inf"), device=dev), score)
        rank = torch.argsort(torch.argsort(-score, dim=-1, stable=True), dim=-1, stable=True)
        grow = (rank < lost[..., None]) & ~kept
        return (kept | grow).reshape(R, self.C)

    def pack(self, dense, mask):
        self.check_mask(mask)
        w = F.nm_from_dense(dense, mask, self.n, self.m)
        return w.values, {"col_idx": w.col_idx}

    def unpack(self, values, buffers):
        return F.nm_to_dense(values, buffers["col_idx"], self.C)

    def mm(self, x, values, buffers, bias, in_perm, out_perm):
        if out_perm is not None:
            raise ValueError("N:M takes no output permutation")
        col = buffers["col_idx"]
        if in_perm is not None:  # the layer caches this fold; here for direct callers
            col = in_perm[col]
        return ops.nm_mm(x, values, col, self.n, self.m, bias)


class DiagonalStructure(Structure):
    """K wrap-around diagonals (DynaDiag-style), ``K = ceil(density * R * C / min(R, C))``."""

    name = "diagonal"
    buffer_names = ("offsets",)

    def __init__(self, out_features, in_features, density):
        super().__init__(out_features, in_features, density)
        self.L = min(self.R, self.C)
        self.num_offsets = max(self.R, self.C)
        self.K = max(1, min(self.num_offsets, math.ceil(self.density * self.R * self.C / self.L - 1e-9)))

    def describe(self):
        return f"diagonal K={self.K}"

    def make_mask(self, scores):
        all_offsets = torch.arange(self.num_offsets, device=scores.device)
        rows, cols = F.diag_coords(all_offsets, (self.R, self.C))
        per_diag = scores.abs()[rows, cols].sum(1)
        return F.diag_mask(per_diag.topk(self.K).indices, (self.R, self.C))

    def update_mask(self, mask, w_abs, g_score, fraction):
        all_offsets = torch.arange(self.num_offsets, device=mask.device)
        rows, cols = F.diag_coords(all_offsets, (self.R, self.C))
        active = mask[rows, cols].all(1)[None]
        k = row_counts(active.sum(1), fraction)
        new = drop_grow(active, w_abs.float()[rows, cols].sum(1)[None], g_score.float()[rows, cols].sum(1)[None], k)
        return F.diag_mask(all_offsets[new[0]], (self.R, self.C))

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
        w = F.diag_from_dense(dense, self.offsets_of(mask))
        return w.values, {"offsets": w.offsets}

    def unpack(self, values, buffers):
        return F.diag_to_dense(values, buffers["offsets"], (self.R, self.C))

    def mm(self, x, values, buffers, bias, in_perm, out_perm):
        return ops.diag_mm(x, values, buffers["offsets"], self.R, bias, in_perm, out_perm)


class UnstructuredStructure(Structure):
    """Masked dense weight: the unstructured RigL/SET accuracy baseline (no sparse kernel)."""

    name = "unstructured"
    buffer_names = ("mask",)

    def __init__(self, out_features, in_features, density):
        super().__init__(out_features, in_features, density)
        self.nnz = max(1, round(self.density * self.R * self.C))

    def make_mask(self, scores):
        flat = torch.zeros(self.R * self.C, dtype=torch.bool, device=scores.device)
        flat[scores.abs().reshape(-1).topk(self.nnz).indices] = True
        return flat.reshape(self.R, self.C)

    def update_mask(self, mask, w_abs, g_score, fraction):
        active = mask.bool().reshape(1, -1)
        k = row_counts(active.sum(1), fraction)
        return drop_grow(active, w_abs.reshape(1, -1), g_score.reshape(1, -1), k).reshape(self.R, self.C)

    def pack(self, dense, mask):
        self.check_mask(mask)
        mask = mask.to(device=dense.device, dtype=torch.bool)
        return dense * mask, {"mask": mask}

    def unpack(self, values, buffers):
        return values * buffers["mask"]

    def mm(self, x, values, buffers, bias, in_perm, out_perm):
        xp = x if in_perm is None else x[:, in_perm]
        y = xp @ (values * buffers["mask"]).T
        if out_perm is not None:
            y = y[:, out_perm]
        return y if bias is None else y + bias


STRUCTURES = {"block": BlockStructure, "nm": NMStructure, "diagonal": DiagonalStructure, "diag": DiagonalStructure,
              "unstructured": UnstructuredStructure}


def make_structure(structure: str, out_features: int, in_features: int, sparsity: Optional[float] = 0.9,
                   block_size=(32, 32), n: Optional[int] = None, m: Optional[int] = None) -> Structure:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(set(STRUCTURES))}, got {structure!r}")
    out_features, in_features = check_int("out_features", out_features), check_int("in_features", in_features)
    if sparsity is None and not (STRUCTURES[structure] is NMStructure and n is not None and m is not None):
        raise ValueError(f"sparsity must be a number in [0, 1) for structure={structure!r} (None only for N:M with n "
                         f"and m given), got None")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    density = None if sparsity is None else 1.0 - float(sparsity)
    if sparsity is not None and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    cls = STRUCTURES[structure]
    if cls is BlockStructure:
        return cls(out_features, in_features, density, block_size)
    if cls is NMStructure:
        return cls(out_features, in_features, density, n, m)
    return cls(out_features, in_features, density)
