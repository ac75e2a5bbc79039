"""Learned permutations: a soft doubly-stochastic matrix, the l1-l2 penalty that drives it to a permutation,
and Hungarian hardening.

Convention, shared with the ops: a permutation ``perm`` acts on the last dimension as ``x[..., perm]``, i.e.
``x @ P.T`` with ``P[i, perm[i]] = 1``. A soft matrix ``M`` (rows and columns summing to one) acts the same way,
``x @ M.T``, so ``M -> P`` recovers the hard layer exactly.

Paper mode (PA-DST, following AutoShuffleNet): ``M = sinkhorn(logits)``, ``loss += lam * penalty(M)`` with
``penalty(M) = sum_i (|M_i:|_1 - |M_i:|_2) + sum_j (|M_:j|_1 - |M_:j|_2)`` (zero iff ``M`` is a permutation),
and once the mean per-row penalty falls under ``delta`` (or at a scheduled step) ``M`` is rounded to a true
permutation with the Hungarian algorithm (never row-argmax, which is not a bijection).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ._sharding import copy_full_into, full_tensor

__all__ = ["sinkhorn", "l1_l2_penalty", "l1_l2_penalty_grad", "with_penalty_grad", "harden", "assignment",
           "assignment_scores", "assignment_logits", "weight_preserving_rounding", "lambda_ramp", "SoftPermutation",
           "INITS", "HARDEN_MODES"]

INITS = ("gradient", "uniform", "random", "identity")
HARDEN_MODES = ("weights", "matrix")


def sinkhorn(logits: Tensor, n_iters: int = 20, tau: float = 1.0) -> Tensor:
    """Doubly-stochastic matrix from ``logits [d, d]`` by alternating row and column normalisation in log
    space (stable for any logit scale). The result's columns sum to one exactly, its rows to within the
    convergence of ``n_iters`` iterations."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square matrix, got shape {tuple(logits.shape)}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    z = logits / tau
    for _ in range(n_iters):
        z = z - torch.logsumexp(z, dim=1, keepdim=True)
        z = z - torch.logsumexp(z, dim=0, keepdim=True)
    return z.exp()


def _safe_l2(sq: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at zero: a row or column of zeros must not poison training."""
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def l1_l2_penalty(M: Tensor, reduction: str = "sum") -> Tensor:
    """AutoShuffleNet's exact penalty ``sum_i (|M_i:|_1 - |M_i:|_2) + sum_j (|M_:j|_1 - |M_:j|_2)``.

    Zero exactly when ``M`` is a permutation matrix (for doubly-stochastic ``M``), positive otherwise.
    ``reduction="mean_row"`` divides by ``2 d`` (the per-row/column average that the hardening threshold
    ``delta`` is compared with)."""
    if M.dim() != 2:
        raise ValueError(f"M must be 2-D, got shape {tuple(M.shape)}")
    A = M.abs()
    rows = A.sum(1) - _safe_l2((M * M).sum(1))
    cols = A.sum(0) - _safe_l2((M * M).sum(0))
    total = rows.sum() + cols.sum()
    if reduction == "sum":
        return total
    if reduction == "mean_row":
        return total / (2 * M.shape[0])
    raise ValueError(f"reduction must be 'sum' or 'mean_row', got {reduction!r}")


def l1_l2_penalty_grad(M: Tensor) -> Tensor:
    """Closed-form gradient of :func:`l1_l2_penalty` (sum reduction): ``2 sign(M) - M / |M_i:|_2 - M / |M_:j|_2``,
    with 0 in place of the second and third terms where a row or column is all zeros."""
    rn = _safe_l2((M * M).sum(1, keepdim=True))
    cn = _safe_l2((M * M).sum(0, keepdim=True))
    inv_r = torch.where(rn > 0, 1 / torch.where(rn > 0, rn, torch.ones_like(rn)), torch.zeros_like(rn))
    inv_c = torch.where(cn > 0, 1 / torch.where(cn > 0, cn, torch.ones_like(cn)), torch.zeros_like(cn))
    return 2 * torch.sign(M) - M * inv_r - M * inv_c


class _WithPenaltyGrad(torch.autograd.Function):
    """Identity on M whose backward adds ``lam * dP/dM``: the penalty's gradient rides on the loss's own pass
    back through Sinkhorn instead of a second Sinkhorn forward and backward per step."""

    @staticmethod
    def forward(ctx, M, lam):
        ctx.save_for_backward(M)
        ctx.lam = lam
        return M.view_as(M)

    @staticmethod
    def backward(ctx, grad):
        (M,) = ctx.saved_tensors
        return grad + ctx.lam * l1_l2_penalty_grad(M.detach()), None


def with_penalty_grad(M: Tensor, lam: float) -> Tensor:
    return _WithPenaltyGrad.apply(M, lam)


def assignment(score: Tensor) -> Tensor:
    """The bijection maximising ``sum_i score[i, perm[i]]`` (Hungarian algorithm, scipy's
    ``linear_sum_assignment``): ``perm [d]`` int64 on ``score``'s device."""
    if score.dim() != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"the score must be a square matrix, got shape {tuple(score.shape)}")
    W = score.detach().double().cpu().numpy()
    if not np.isfinite(W).all():
        raise ValueError("the matrix holds non-finite values; cannot round it to a permutation")
    rows, cols = linear_sum_assignment(W, maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(score.device)


def harden(M: Tensor) -> Tensor:
    """The permutation closest to ``M`` (maximum total weight, Hungarian algorithm): ``perm [d]`` int64 with
    ``perm[i] = j`` where ``M[i, j]`` is selected. Always a bijection."""
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
    return assignment(M)


def assignment_scores(W: Tensor, mask: Tensor, side: str) -> Tensor:
    """How much of a dense ``W [R, C]`` each placement keeps under the pattern ``mask [R, C]``.

    ``side="input"``: ``[C, C]``, entry ``[j, c] = sum_i mask[i, j] W[i, c]^2``, the energy that input ``c`` brings
    to position ``j`` (the rows that read position ``j``); ``side="output"``: ``[R, R]``, entry
    ``[r, i] = sum_c W[r, c]^2 mask[i, c]``, what output ``r`` keeps when it reads the structured row ``i``. The
    permutation that keeps the most is the assignment of this matrix (a linear assignment problem, exact)."""
    if W.shape != mask.shape:
        raise ValueError(f"W {tuple(W.shape)} and mask {tuple(mask.shape)} must have the same shape")
    sq = W.detach().double().square()
    m = mask.to(sq.dtype)
    if side == "input":
        return m.T @ sq
    if side == "output":
        return sq @ m.T
    raise ValueError(f"side must be 'input' or 'output', got {side!r}")


def weight_preserving_rounding(W: Tensor, mask: Tensor, side: str) -> Tuple[Tensor, Tensor]:
    """Round an effective dense weight ``W [R, C]`` (the soft layer's ``S M`` or ``M S``) to a hard layer that
    keeps as much of it as the pattern allows: the permutation maximising the kept energy
    (:func:`assignment_scores`, Hungarian) and the structured weight re-fitted to it, ``(perm, S_new [R, C])`` with
    ``S_new`` zero off ``mask``. For input-side ``perm``: ``x[:, perm] @ S_new.T`` is ``x @ W.T`` restricted to what
    the pattern keeps; for output-side, ``(x @ S_new.T)[:, perm]``."""
    perm = assignment(assignment_scores(W, mask, side))
    if side == "input":
        S_new = W[:, perm]
    else:
        S_new = W[torch.argsort(perm)]
    return perm, S_new * mask.to(W.dtype)


def assignment_logits(score: Tensor, scale: float = 2.0, noise: float = 1e-2,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Soft-matrix logits that favour the high entries of ``score [d, d]`` as much as the score separates them: the
    score with its row and column means removed (Sinkhorn ignores them), over its standard deviation, times
    ``scale``, plus ``noise`` times a standard normal draw, so that positions that score alike (those of one block
    column) are not held together by symmetry. A score that singles out one placement per row gives a peaked
    start; one that barely does (a network at initialisation) a soft one that the soft phase can still move."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    s = score.detach().double()
    s = s - s.mean(1, keepdim=True) - s.mean(0, keepdim=True) + s.mean()
    std = s.std()
    z = s / std if std > 0 else torch.zeros_like(s)
    eps = torch.randn(score.shape, generator=generator).to(z)
    return (scale * z + noise * eps).float()


def lambda_ramp(lam: float, step: int, ramp_steps: int, start_factor: float = 1e-3) -> float:
    """Penalty weight ``step`` steps into the soft phase: rising geometrically from ``lam * start_factor`` to ``lam``
    over ``ramp_steps`` steps, then ``lam`` (constant ``lam`` when ``ramp_steps`` is 0)."""
    if ramp_steps <= 0:
        return lam
    t = min(1.0, max(0, step) / ramp_steps)
    return lam * start_factor ** (1.0 - t)


class SoftPermutation(nn.Module):
    """A learnable ``d x d`` doubly-stochastic matrix ``M = sinkhorn(logits / tau)`` acting as ``x @ M.T``.

    ``init`` decides whether anything is learned (``benchmarks/perm_planted.py`` measures each start on a planted
    permutation):
      * ``"gradient"`` (the layers' default) and ``"uniform"``: logits = small noise, M close to the uniform 1/d
        matrix (where the paper code's start, a random non-negative matrix Sinkhorn-normalised, lands for large d).
        With ``"gradient"`` the owning :class:`~padst_ext.nn.SparseLinear` replaces them after its first training
        steps by :meth:`assign` from the gradient (it runs unpermuted until then, so the uniform matrix that
        averages the inputs away is never applied);
      * ``"random"``: Gaussian logits of standard deviation ``random_scale`` (5), a random, fairly peaked
        matrix (mean per-row penalty 0.37-0.48). It barely moves: on a planted permutation the hardened one kept
        86-96 % of the rounding of this start;
      * ``"identity"``: logits = ``identity_scale * I`` + small noise (keeps the unpermuted layer at start; under
        the penalty it never left the identity in a measured run).
    """

    def __init__(self, d: int, init: str = "random", n_iters: int = 20, tau: float = 1.0,
                 identity_scale: float = 5.0, random_scale: float = 5.0, noise: float = 1e-2,
                 generator: Optional[torch.Generator] = None, device=None, dtype=None):
        super().__init__()
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.d, self.init, self.n_iters, self.tau = d, init, n_iters, tau
        g = generator  # a CPU generator: draw on the CPU, then move (same numbers on every device)
        if init == "random":
            logits = random_scale * torch.randn(d, d, generator=g)
        elif init == "identity":
            logits = identity_scale * torch.eye(d) + noise * torch.randn(d, d, generator=g)
        else:
            logits = noise * torch.randn(d, d, generator=g)
        self.logits = nn.Parameter(logits.to(device=device, dtype=dtype or torch.float32))

    @torch.no_grad()
    def assign(self, score: Tensor, scale: float = 2.0, generator: Optional[torch.Generator] = None) -> None:
        """Restart from :func:`assignment_logits` of ``score [d, d]`` (in place: optimizers keep the parameter)."""
        if score.shape != (self.d, self.d):
            raise ValueError(f"score must have shape {(self.d, self.d)}, got {tuple(score.shape)}")
        copy_full_into(self.logits, assignment_logits(score, scale, generator=generator).to(self.logits.dtype))

    def matrix(self) -> Tensor:
        return sinkhorn(full_tensor(self.logits), self.n_iters, self.tau)  # whole, if FSDP2 shards the logits

    def forward(self, x: Tensor, penalty_lambda: float = 0.0) -> Tensor:
        """``x @ M.T`` along the last dimension (``x[..., perm]`` in the hard limit). With ``penalty_lambda``, the
        backward pass also adds ``penalty_lambda * dP/dlogits`` (as if ``penalty_lambda * P(M)`` were in the loss,
        once per forward)."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected last dimension {self.d}, got shape {tuple(x.shape)}")
        M = self.matrix()
        if penalty_lambda and torch.is_grad_enabled() and M.requires_grad:
            M = with_penalty_grad(M, penalty_lambda)
        return x @ M.T.to(x.dtype)

    def penalty(self, reduction: str = "sum") -> Tensor:
        return l1_l2_penalty(self.matrix(), reduction)

    def harden(self) -> Tensor:
        return harden(self.matrix())

    def extra_repr(self) -> str:
        return f"d={self.d}, init={self.init!r}, n_iters={self.n_iters}, tau={self.tau}"


def expected_random_penalty(d: int) -> float:
    """Per-row penalty of the uniform matrix (the largest a doubly-stochastic matrix can have): 1 - 1/sqrt(d)."""
    return 1.0 - 1.0 / math.sqrt(d)
