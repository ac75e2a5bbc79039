"""Layers: :class:`SparseLinear` (``y = S Π x``), :func:`sparsify` for model surgery, :func:`export` for inference.

A permuted layer starts in the *soft* phase: a learned doubly-stochastic matrix ``M`` (see
:mod:`padst_ext.permutation`) is applied as a dense ``d x d`` product, and the l1-l2 penalty (times a weight that
ramps up to ``perm_lambda``) pushes it towards a permutation. :meth:`SparseLinear.maybe_harden`, called after every
optimizer step (DST does it), rounds it once it has converged (mean per-row penalty under ``perm_delta`` and under
half of where it started) or at ``harden_step``; from then on the permutation is a frozen index fused into the
sparse kernel (for N:M, folded into the column indices).

What makes the permutation learn (measured on a planted permutation, ``benchmarks/perm_planted.py``):
  * the start (``perm_init="gradient"``): the layer runs unpermuted for its first ``perm_warmup`` training steps
    while summing the dense gradient ``G`` of its weight, then starts ``M`` from the assignment that the pattern
    would keep most of ``G`` under (:func:`padst_ext.permutation.assignment_scores`), softened;
  * the penalty weight ramps geometrically from ``perm_lambda / 1000`` to ``perm_lambda`` over ``perm_lambda_ramp``
    steps, so ``M`` first moves freely and then converges instead of hardening at a deadline;
  * the rounding (``harden_mode="weights"``) picks the permutation that keeps most of the soft layer's effective
    weight ``S M`` under the pattern and re-fits ``S`` to it, instead of rounding ``M`` alone and dropping what
    ``S`` had learned against it.
``perm_init="random", perm_lambda=1e-3, perm_lambda_ramp=0, harden_mode="matrix"`` is the paper's mode.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
import zlib
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import formats as F
from . import permutation as P
from ._sharding import copy_full_into, full_tensor, is_sharded
from .structures import Structure, check_int, make_structure

__all__ = ["SparseLinear", "sparsify", "export", "permutation_penalty", "harden_all", "SparsifyReport",
           "permutation_parameters", "param_groups", "permutation_report"]

PERM_SIDES = ("input", "output", "auto")



_PHASES = ("none", "soft", "hard")


class SparseLinear(nn.Module):
    """Drop-in for :class:`torch.nn.Linear` with a structured sparse weight and an optional learned permutation.

    Args:
        structure: ``"block"``, ``"nm"``, ``"diagonal"`` or ``"unstructured"`` (masked dense baseline).
        sparsity: fraction of zeros (the realised density is reported by :attr:`density`).
        block_size: block shape for ``"block"`` (int or pair), default 32x32.
        n, m: the N:M pattern (default: chosen from ``sparsity`` with M dividing ``in_features``).
        permute: learn a permutation.
        perm_side: ``"input"`` (x[:, perm]), ``"output"`` (y[:, perm]) or ``"auto"``: the smaller dimension, as in
            the paper; N:M always permutes its input.
        perm_init: soft matrix start: ``"gradient"`` (default: from the gradient of the first ``perm_warmup``
            training steps, during which the layer runs unpermuted), ``"uniform"``, ``"random"`` or ``"identity"``.
        perm_warmup, perm_init_scale: optimizer steps of gradient summed for the ``"gradient"`` start (counted by
            the clock, :meth:`maybe_harden`, which DST or :func:`harden_all` calls after every step; every backward
            pass of a step adds to the sum), and how peaked that start is (the logits are the standardised
            assignment score times this).
        perm_lambda, perm_lambda_ramp: the penalty weight, reached geometrically from ``perm_lambda / 1000`` over
            ``perm_lambda_ramp`` soft-phase steps (0: constant from the start; None: a quarter of training when
            :class:`~padst_ext.DST` knows its length, else 1000).
        perm_delta, harden_step: the soft matrix hardens once its mean per-row penalty is under ``perm_delta`` and
            under half of its value at the start of the soft phase (so an unmoved start never hardens), or at
            step ``harden_step`` at the latest (None: half of training under DST, else never); ``perm_delta=0``
            leaves only ``harden_step``.
        harden_mode: ``"weights"`` (default: the permutation keeping most of the effective weight ``S M`` under
            the pattern, with ``S`` re-fitted to it) or ``"matrix"`` (Hungarian rounding of ``M`` alone, the
            paper's).
        mask: an explicit boolean ``[out, in]`` pattern (else chosen at random, or from ``weight`` magnitudes by
            :meth:`from_dense`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, structure: str = "block",
                 sparsity: float = 0.9, block_size: Union[int, Tuple[int, int]] = (32, 32),
                 n: Optional[int] = None, m: Optional[int] = None, permute: bool = True, perm_side: str = "auto",
                 perm_init: str = "gradient", perm_warmup: int = 5, perm_init_scale: float = 2.0,
                 perm_lambda: float = 0.1, perm_lambda_ramp: Optional[int] = None, perm_delta: float = 0.22,
                 harden_step: Optional[int] = None, harden_mode: str = "weights", sinkhorn_iters: int = 20,
                 mask: Optional[Tensor] = None, seed: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.structure: Structure = make_structure(structure, out_features, in_features, sparsity, block_size, n, m)
        if perm_side not in PERM_SIDES:
            raise ValueError(f"perm_side must be one of {PERM_SIDES}, got {perm_side!r}")
        if not self.structure.supports_output_perm:
            if perm_side == "output":
                raise ValueError(f"{self.structure.describe()} groups run along the input: only an input permutation "
                                 f"adds expressivity (perm_side='output' is not supported for structure="
                                 f"{structure!r})")
            perm_side = "input"
        elif perm_side == "auto":
            perm_side = "input" if self.in_features <= self.out_features else "output"
        self.perm_side = perm_side
        if perm_init not in P.INITS:
            raise ValueError(f"perm_init must be one of {P.INITS}, got {perm_init!r}")
        if harden_mode not in P.HARDEN_MODES:
            raise ValueError(f"harden_mode must be one of {P.HARDEN_MODES}, got {harden_mode!r}")
        if isinstance(perm_warmup, bool) or int(perm_warmup) != perm_warmup or perm_warmup < 1:
            raise ValueError(f"perm_warmup must be an integer >= 1 (training steps of gradient for the start), got "
                             f"{perm_warmup!r}")
        if not float(perm_init_scale) > 0:
            raise ValueError(f"perm_init_scale must be positive, got {perm_init_scale}")
        if not float(perm_lambda) >= 0:
            raise ValueError(f"perm_lambda must be >= 0, got {perm_lambda}")
        if perm_lambda_ramp is not None and int(perm_lambda_ramp) < 0:
            raise ValueError(f"perm_lambda_ramp must be >= 0 (steps), got {perm_lambda_ramp}")
        if not 0 <= float(perm_delta) <= 1:
            raise ValueError(f"perm_delta must be in [0, 1] (a mean per-row penalty; 0: harden only at harden_step), "
                             f"got {perm_delta}")
        if harden_step is not None and (isinstance(harden_step, bool) or int(harden_step) != harden_step
                                        or harden_step < 0):
            raise ValueError(f"harden_step must be None or an integer step >= 0, got {harden_step!r}")
        self.perm_init, self.sinkhorn_iters = perm_init, int(sinkhorn_iters)
        self.perm_warmup, self.perm_init_scale = int(perm_warmup), float(perm_init_scale)
        self._seed = seed
        self.perm_lambda = float(perm_lambda)
        self.perm_lambda_ramp = None if perm_lambda_ramp is None else int(perm_lambda_ramp)
        self.perm_delta, self.harden_mode = float(perm_delta), harden_mode
        self.harden_step = None if harden_step is None else int(harden_step)
        self._product_hooks: "OrderedDict[int, Callable]" = OrderedDict()  # register_product_hook
        self.penalty_in_backward = False  # set by DST: the soft phase adds lambda * dP/dM in its backward
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        factory = dict(device=device, dtype=dtype or torch.get_default_dtype())

        # nn.Linear's initialisation of the dense matrix, then the pattern.
        bound = 1.0 / math.sqrt(self.in_features)
        dense = (torch.rand(self.out_features, self.in_features, generator=gen) * 2 - 1) * bound
        if mask is None:
            mask = self.structure.random_mask(gen)
        self._set_pattern(dense.to(**factory), mask.to(factory["device"]))
        if bias:
            self.bias = nn.Parameter((torch.rand(self.out_features, generator=gen) * 2 - 1).to(**factory) * bound)
        else:
            self.register_parameter("bias", None)

        self.phase = "none"
        self._reset_perm_state()
        if permute:
            self.phase = "soft"
            self.soft = P.SoftPermutation(self.perm_dim, init=perm_init, n_iters=self.sinkhorn_iters,
                                          generator=gen, **self._soft_factory(factory["device"], factory["dtype"]))
            self._begin_warmup()

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None, **kwargs) -> "SparseLinear":
        """A layer whose pattern keeps the largest-magnitude units of ``weight [out, in]`` (exact structure and
        count), with those weights and ``bias`` copied in."""
        out_f, in_f = weight.shape
        kwargs.setdefault("device", weight.device)
        kwargs.setdefault("dtype", weight.dtype)
        layer = cls(in_f, out_f, bias=bias is not None, **kwargs)
        with torch.no_grad():
            mask = layer.structure.make_mask(weight.detach().float())
            layer._set_pattern(weight.detach().to(layer.values.dtype), mask)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def _set_pattern(self, dense: Tensor, mask: Tensor) -> None:
        self.set_sparse(self.structure.pack(dense, mask))

    def set_sparse(self, weight: F.SparseWeight) -> None:
        """Hold ``weight`` (a sparse-weight object of this layer's structure and shape): its values go into the
        ``values`` parameter (the same Parameter object, so optimizers and DDP keep tracking it; in place when the
        shape allows) and its index tensors into the buffers."""
        values, buffers = weight.values, weight.index()
        if "values" in self._parameters:
            # same Parameter object (optimizers and DDP keep tracking it), in place when the shape allows
            if self.values.shape == values.shape:
                copy_full_into(self.values.data, values)
            else:
                self.values.data = values.detach().clone()
        else:
            self.values = nn.Parameter(values.detach().clone())
        for name, buf in buffers.items():
            old = self._buffers.get(name)
            if old is not None and old.shape == buf.shape and old.dtype == buf.dtype:
                old.copy_(buf)
            else:
                self.register_buffer(name, buf.clone())
        self._refresh_fused()

    @property
    def sparse(self) -> F.SparseWeight:
        """The structured weight ``S`` as its sparse-weight object (logical frame, no permutation), viewing this
        layer's ``values`` parameter and index buffers."""
        tensors = (self._parameters["values"],) + tuple(self._buffers[n] for n in self.structure.buffer_names)
        if is_sharded(tensors[0]):  # FSDP2 between steps: the values whole (not cached: the shards change)
            return self.structure.wrap(full_tensor(tensors[0]), dict(zip(self.structure.buffer_names, tensors[1:])))
        return self._cached("_sparse_cache", tensors, lambda: self.structure.wrap(
            tensors[0], dict(zip(self.structure.buffer_names, tensors[1:]))))

    def _cached(self, slot: str, tensors: tuple, make: Callable):
        """The object ``make()`` builds from ``tensors``, rebuilt when any of them is another tensor object (a new
        pattern, ``.to()``, a load); the object holds them, so in-place changes are seen and no id is reused."""
        key = tuple(map(id, tensors)) + (id(self.structure),)
        hit = self.__dict__.get(slot)
        if hit is None or hit[0] != key:
            hit = self.__dict__[slot] = (key, make())
        return hit[1]

    def pattern_mask(self) -> Tensor:
        """Boolean ``[out, in]`` mask of the structured weight's pattern (logical frame)."""
        return self.sparse.mask()

    def set_mask(self, mask: Tensor) -> None:
        """Move to a new pattern of the same structure: kept weights keep their values, new ones start at 0."""
        with torch.no_grad():
            self._set_pattern(self.sparse_weight().detach(), mask)

    def _structure_at(self, density: float) -> Structure:
        """This layer's kind of structure (same shape, block size or M) at another density; N:M takes the
        nearest N for its M."""
        return self.structure.at_density(density)

    def set_density(self, density: float, generator: Optional[torch.Generator] = None) -> None:
        """Re-allocate this layer to another density (e.g. ERK), with a fresh random pattern of that density.
        Only meaningful before training: the weights under the new pattern are the old ones where kept."""
        dense = self.sparse_weight().detach()  # read under the current structure, before it changes
        self.structure = self._structure_at(density)
        with torch.no_grad():
            self._set_pattern(dense, self.structure.random_mask(generator, device=dense.device))

    # -- permutation state --------------------------------------------------------------------------------
    @property
    def perm_dim(self) -> int:
        return self.in_features if self.perm_side == "input" else self.out_features

    def _hard_perms(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(in_perm, out_perm) of the hard phase."""
        return (self.perm, None) if self.perm_side == "input" else (None, self.perm)

    def _refresh_fused(self) -> None:
        """The hard permutation fused into the weight object (``with_perm``): what fusing makes anew (N:M's column
        indices with the permutation folded in: zero run-time cost) is kept as non-persistent buffers, rebuilt when
        the pattern or the permutation changes, and follows ``.to()``."""
        for slot in ("_sparse_cache", "_fused_cache"):  # they would keep replaced tensors alive
            self.__dict__.pop(slot, None)
        old = {n: self._buffers.pop(n) for n in [n for n in self._buffers if n.startswith("_fused_")]}
        self._fused_perm_fields: Tuple[str, ...] = ()
        if getattr(self, "phase", "none") != "hard":
            return
        base = self.sparse
        fused = base.with_perm(*self._hard_perms())
        perm_fields = []
        for f in dataclasses.fields(fused):
            new = getattr(fused, f.name)
            if f.name == "values" or not isinstance(new, Tensor) or new is getattr(base, f.name):
                continue
            if new is self.perm:
                perm_fields.append(f.name)
                continue
            prev = old.get("_fused_" + f.name)
            if prev is not None and (prev.shape, prev.dtype, prev.device) == (new.shape, new.dtype, new.device):
                new = prev.copy_(new)  # in place: a DST update does not hold two copies
            self.register_buffer("_fused_" + f.name, new, persistent=False)
        self._fused_perm_fields = tuple(perm_fields)
        self._fused_keys = tuple(self.structure.buffer_names) + tuple(n for n in self._buffers if n.startswith("_fused_"))

    def _fused_weight(self) -> F.SparseWeight:
        b = self._buffers
        tensors = (self._parameters["values"], b["perm"]) + tuple(b[n] for n in self._fused_keys)

        def make():
            fused = {n[len("_fused_"):]: b[n] for n in self._fused_keys if n.startswith("_fused_")}
            return dataclasses.replace(self.sparse, **fused, **{f: self.perm for f in self._fused_perm_fields})

        return self._cached("_fused_cache", tensors, make)

    def harden(self, reason: str = "manual", step: Optional[int] = None) -> Tensor:
        """Round the soft matrix to a permutation (Hungarian), freeze it and drop the soft matrix.

        ``harden_mode="weights"``: the permutation keeping most of the effective weight ``S M`` (``M S``) under the
        pattern, with the structured values re-fitted to it; ``"matrix"``: the rounding of ``M`` alone. A layer still
        in its gradient warm-up runs unpermuted, so it hardens to the identity. ``reason`` and ``step`` go into
        :attr:`perm_log` (``"converged"``, ``"deadline"``, ``"forced"``, ``"manual"``)."""
        if self.phase != "soft":
            raise RuntimeError(f"harden() needs the soft phase; this layer is in phase {self.phase!r}")
        log = self.perm_log
        warm = self.in_warmup
        if warm:
            perm = torch.arange(self.perm_dim, device=self.values.device)
        elif self.harden_mode == "weights":
            with torch.no_grad():
                # S M in the soft matrix's precision (float32, or float64), not the layer's (half/bfloat16)
                M = self.soft.matrix().detach()
                S = self.sparse_weight().detach().to(M.dtype)
                W = S @ M if self.perm_side == "input" else M @ S
                mask = self.pattern_mask()
                perm, S_new = P.weight_preserving_rounding(W, mask, self.perm_side)
                self._set_pattern(S_new.to(self.values.dtype), mask)
        else:
            perm = self.soft.harden()
        if not warm:
            with torch.no_grad():
                log["penalty_at_harden"] = float(self.soft.penalty("mean_row"))
        log.update(reason=reason, hardened_step=step, soft_steps=self._soft_steps)
        if log.get("start_perm") is not None:
            start = torch.tensor(log["start_perm"], device=perm.device)
            log["moved_from_start"] = float((perm != start).float().mean())
            log["moved_support_from_start"] = self._support_moved(perm, start)
        ident = torch.arange(perm.numel(), device=perm.device)
        log["moved_from_identity"] = int((perm != ident).sum()) / perm.numel()
        log["moved_support_from_identity"] = self._support_moved(perm, ident)
        self._drop_soft()
        self._end_warmup()
        self.phase = "hard"
        self.register_buffer("perm", perm.to(self.values.device))
        self._refresh_fused()
        return perm

    def _support_moved(self, perm_a: Tensor, perm_b: Tensor) -> float:
        """Share of the permuted side's units that the pattern treats differently under ``perm_a`` than under
        ``perm_b`` (an input read by another set of outputs, an output reading another structured row): index moves
        between equivalent positions (inside one block column) do not count."""
        with torch.no_grad():
            mask = self.pattern_mask()
            if self.perm_side == "input":
                a, b = mask[:, torch.argsort(perm_a)], mask[:, torch.argsort(perm_b)]
                return float((a != b).any(0).float().mean())
            return float((mask[perm_a] != mask[perm_b]).any(1).float().mean())

    @staticmethod
    def _soft_factory(device, dtype):
        """Sinkhorn in log space needs range and precision: the soft matrix is float32 (float64 for float64
        layers) whatever the layer's dtype, and is cast to the input's dtype where it is applied."""
        return dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def _drop_soft(self) -> None:
        self._modules.pop("soft", None)

    def maybe_harden(self, step: Optional[int] = None, harden: bool = True) -> bool:
        """The soft phase's clock: call after every optimizer step (DST does; or :func:`harden_all` with the step).
        Advances the penalty ramp, records the penalty in :attr:`perm_log`, and (unless ``harden`` is False) hardens
        when the soft matrix has converged (mean per-row penalty under ``perm_delta`` and under half its start) or at
        ``harden_step``. Returns whether it hardened."""
        if self.phase != "soft":
            return False
        due = harden and self.harden_step is not None and step is not None and step >= self.harden_step
        self._tick_warmup()
        if self.in_warmup:
            if due:
                self.harden("deadline", step)
                return True
            return False
        self._start_soft_phase()
        self._soft_steps += 1
        with torch.no_grad():
            pen = float(self.soft.penalty("mean_row"))
        log = self.perm_log
        if self._soft_steps % self.TRACE_EVERY == 0:
            log["trace"].append([self._soft_steps if step is None else int(step), round(pen, 5)])
        converged = harden and pen < self.perm_delta and pen <= 0.5 * log["start_penalty"]
        if converged or due:
            self.harden("converged" if converged else "deadline", step)
            return True
        return False

    def permutation_penalty(self) -> Tensor:
        """``lambda * P(M)`` in the soft phase (``lambda`` where the ramp is; see :meth:`maybe_harden`), else 0: add
        it to the loss unless DST adds its gradient already."""
        if not self.soft_active:
            return self.values.new_zeros(())
        return self.cur_lambda * self.soft.penalty()

    # -- the soft phase's state -----------------------------------------------------------------------------
    TRACE_EVERY = 10  # soft-phase steps between two penalty records in perm_log["trace"]

    def _reset_perm_state(self) -> None:
        self._warmup_seen = 0  # training steps (clock ticks with a gradient) summed so far
        self._grad_since_tick = False  # the warm-up hook saw a finite gradient since the last clock tick
        self._backwards_since_tick = 0  # warm-up backward passes since the last tick (to warn of a missing clock)
        self._perm_grad: Optional[Tensor] = None  # the warm-up's sum of dz.T @ x [out, in]; set: in the warm-up
        self._soft_steps = 0  # maybe_harden calls since the soft matrix started acting
        self.perm_log = dict(init=self.perm_init, start_penalty=None, start_perm=None, trace=[], reason=None,
                             hardened_step=None, soft_steps=None, penalty_at_harden=None, moved_from_start=None,
                             moved_support_from_start=None, moved_from_identity=None,
                             moved_support_from_identity=None)

    def _begin_warmup(self) -> None:
        if self.perm_init != "gradient":
            return
        self._warmup_seen = 0
        # float32 (float64 for float64 layers) whatever the layer's dtype. A plain attribute, not a buffer:
        # DistributedDataParallel broadcasts rank 0's buffers before every forward, which would overwrite each
        # rank's sum; it goes into the checkpoint through get_extra_state and follows the gradient's device.
        dt = torch.float64 if self.values.dtype == torch.float64 else torch.float32
        self._perm_grad = torch.zeros(self.out_features, self.in_features, dtype=dt, device=self.values.device)

    def _end_warmup(self) -> None:
        self._perm_grad = None
        self._grad_since_tick, self._backwards_since_tick = False, 0

    @property
    def perm_grad(self) -> Optional[Tensor]:
        """The gradient warm-up's running sum of the unpermuted weight's gradient ``dz.T @ x`` ``[out, in]``
        (None outside the warm-up)."""
        return self._perm_grad

    DEFAULT_RAMP = 1000  # penalty ramp in steps when neither the layer nor DST sets one

    @property
    def ramp_steps(self) -> int:
        return self.DEFAULT_RAMP if self.perm_lambda_ramp is None else self.perm_lambda_ramp

    @property
    def cur_lambda(self) -> float:
        """The penalty weight where the ramp is: ``perm_lambda / 1000`` rising to ``perm_lambda`` over
        :attr:`ramp_steps` soft-phase steps."""
        return P.lambda_ramp(self.perm_lambda, self._soft_steps, self.ramp_steps)

    @property
    def in_warmup(self) -> bool:
        """Still summing the gradient for the ``"gradient"`` start (the layer runs unpermuted meanwhile)."""
        return self.phase == "soft" and self._perm_grad is not None

    @property
    def soft_active(self) -> bool:
        """The soft matrix is what the forward applies."""
        return self.phase == "soft" and self._perm_grad is None

    WARMUP_CLOCK_WARN = 200  # warm-up backward passes without a clock tick before warning that none comes

    def _record_grad(self, dz: Tensor, x: Tensor) -> None:
        """Warm-up backward hook: sum the dense gradient ``dz.T @ x [out, in]`` of the (unpermuted) weight. Every
        backward pass of a step adds to the sum (gradient accumulation, a layer used twice); the step is counted by
        the clock (:meth:`maybe_harden`)."""
        buf = self._perm_grad
        if buf is None:
            return
        self._backwards_since_tick += 1
        if self._backwards_since_tick == self.WARMUP_CLOCK_WARN:
            warnings.warn(f"SparseLinear: {self.WARMUP_CLOCK_WARN} backward passes in the gradient warm-up and no "
                          "clock tick; the warm-up ends after perm_warmup optimizer steps counted by maybe_harden: "
                          "call padst_ext.harden_all(model, step) after each optimizer step, or train with DST",
                          stacklevel=2)
        if not bool(torch.isfinite(dz).all()):
            return  # a step that GradScaler skips is not a signal
        if buf.device != dz.device:  # the layer moved (e.g. .cuda()) during its warm-up
            buf = self._perm_grad = buf.to(dz.device)
        buf.add_(dz.to(buf.dtype).T @ x.to(buf.dtype))
        self._grad_since_tick = True

    def _tick_warmup(self) -> None:
        """One clock tick (an optimizer step) of the warm-up: count it if the layer got a finite gradient (on every
        rank, under torch.distributed), and start the soft matrix after ``perm_warmup`` counted steps."""
        if not self.in_warmup:
            return
        got = self._grad_since_tick
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if got else 0.0], device=self.values.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # the ranks count alike
            got = bool(flag.item() > 0)
        self._grad_since_tick, self._backwards_since_tick = False, 0
        if got:
            self._warmup_seen += 1
        self._maybe_finish_warmup()

    def _maybe_finish_warmup(self) -> None:
        """After ``perm_warmup`` counted steps: start the soft matrix from the gradient's assignment."""
        if not self.in_warmup or self._warmup_seen < self.perm_warmup:
            return
        G = self._perm_grad.to(self.values.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(G)  # every rank starts from the same matrix
        score = P.assignment_scores(G, self.pattern_mask(), self.perm_side)
        gen = torch.Generator().manual_seed(0 if self._seed is None else int(self._seed))  # same on every rank
        self.soft.assign(score, self.perm_init_scale, generator=gen)
        self._end_warmup()

    def _start_soft_phase(self) -> None:
        """Record where the soft matrix starts (penalty and rounding), once."""
        if self.perm_log["start_penalty"] is None:
            with torch.no_grad():
                M = self.soft.matrix()
                self.perm_log["start_penalty"] = float(P.l1_l2_penalty(M, "mean_row"))
                self.perm_log["start_perm"] = P.harden(M).tolist()

    # -- forward ------------------------------------------------------------------------------------------
    class Route(NamedTuple):
        """How the current phase computes ``y``: the sparse product ``z = weight.mm(x_in)`` with ``x_in`` the input or
        (``soft_in``) the soft matrix applied to it, then (``soft_out``) the soft matrix applied to ``z``. ``in_perm``
        / ``out_perm``: the hard permutation that ``weight`` has fused, for a dense gradient in the logical frame."""

        weight: F.SparseWeight
        soft_in: bool
        soft_out: bool
        in_perm: Optional[Tensor]
        out_perm: Optional[Tensor]

    def route(self) -> "SparseLinear.Route":
        """The one decision of what the forward computes in the current phase (hard: the permutation fused into the
        weight; soft: the soft matrix on the permuted side; none or the gradient warm-up: the plain product)."""
        if self.phase == "hard":
            return self.Route(self._fused_weight(), False, False, *self._hard_perms())
        soft = self.soft_active
        return self.Route(self.sparse, soft and self.perm_side == "input", soft and self.perm_side == "output",
                          None, None)

    def register_product_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(layer, x_in, z, in_perm, out_perm)`` after every forward's sparse product ``z = S Π x_in``
        (see :meth:`route`): ``x_in`` is what the structured weight multiplied (the soft matrix applied already on
        the input side), ``z`` its output (before an output-side soft matrix), so ``dz.T @ x_in`` with the
        permutations (``padst_ext.ops.dense_grad``) is the dense gradient of ``S`` in the logical frame. DST uses it
        to record RigL's grow score on its update steps. Returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._product_hooks)
        self._product_hooks[handle.id] = hook
        return handle

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        r = self.route()
        x_in = self.soft(x2, self._lam()) if r.soft_in else x2
        z = r.weight.mm(x_in, None if r.soft_out else self.bias)
        for hook in tuple(self._product_hooks.values()):
            hook(self, x_in, z, r.in_perm, r.out_perm)
        if self.in_warmup and self.training and z.requires_grad:
            xd = x2.detach()
            z.register_hook(lambda g: self._record_grad(g, xd))
        if r.soft_out:
            z = self.soft(z, self._lam())
            if self.bias is not None:
                z = z + self.bias
        # a 2-D input's output is returned as it is, not as a view (FSDP2 warns of views: an in-place op on one
        # would skip its pre-backward hook)
        return z if x.dim() == 2 else z.reshape(*lead, self.out_features)

    def _lam(self) -> float:
        return self.cur_lambda if self.penalty_in_backward else 0.0

    # -- introspection ------------------------------------------------------------------------------------
    def sparse_weight(self) -> Tensor:
        """The logical structured weight ``S [out, in]`` (dense copy)."""
        return self.sparse.to_dense()

    def dense_weight(self) -> Tensor:
        """The effective dense weight ``W`` of the current phase: ``y = x @ W.T + bias``."""
        S = self.sparse_weight()
        if not (self.phase == "hard" or self.soft_active):
            return S
        if self.phase == "soft":
            M = self.soft.matrix().to(S.dtype)  # float32 soft matrix applied in the layer's dtype
            return S @ M if self.perm_side == "input" else M @ S
        if self.perm_side == "input":
            return S[:, torch.argsort(self.perm)]
        return S[self.perm]

    @property
    def density(self) -> float:
        """Realised density of the structured weight."""
        return self.sparse.density

    def extra_repr(self) -> str:
        perm = "no permutation" if self.phase == "none" else f"{self.phase} {self.perm_side} permutation"
        if self.in_warmup:
            perm += f" (gradient warm-up, {self._warmup_seen}/{self.perm_warmup} steps)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"structure={self.structure.describe()}, density={self.density:.4f}, {perm}")

    # -- checkpoints --------------------------------------------------------------------------------------
    def get_extra_state(self):
        state = dict(config=self.structure.config(), phase=self.phase, perm_side=self.perm_side,
                     has_bias=self.bias is not None)
        if self.phase != "none":  # the soft phase's clock and record (plain values: weights_only loads them)
            state["perm"] = dict(warmup=self.in_warmup, warmup_seen=self._warmup_seen, soft_steps=self._soft_steps,
                                 log=copy.deepcopy(self.perm_log))
            if self.in_warmup:  # a tensor: weights_only loads it too
                state["perm"].update(perm_grad=self._perm_grad.detach().clone(),
                                     grad_since_tick=self._grad_since_tick)
        return state

    def set_extra_state(self, state):
        pass  # applied in _load_from_state_dict, before the tensors are loaded

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            mine = self.get_extra_state()
            for key in ("config", "perm_side", "has_bias"):
                if extra.get(key) != mine[key]:
                    raise ValueError(f"checkpoint for {prefix or 'SparseLinear'} does not match this layer: "
                                     f"{key} is {extra.get(key)!r} in the checkpoint but {mine[key]!r} here")
            self._set_phase(extra["phase"])
            self._load_perm_state(extra.get("perm"))
            # the pattern (and so the number of stored values) may differ from this layer's: take its shapes
            for name in ("values",) + tuple(self.structure.buffer_names) + (("perm",) if self.phase == "hard" else ()):
                src = state_dict.get(prefix + name)
                if src is None:
                    continue
                cur = getattr(self, name)
                if cur.shape != src.shape:
                    if name == "values":
                        self.values.data = torch.empty_like(src, dtype=cur.dtype, device=cur.device)
                    else:
                        self.register_buffer(name, torch.empty_like(src, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._validate_loaded(prefix)
        self._match_structure_to_values()
        self._refresh_fused()

    def _validate_loaded(self, prefix: str) -> None:
        """A loaded pattern and permutation pass the checks a constructed layer's do: a state dict is
        input like any other, and the N:M path folds the permutation into its indices without an op checking them."""
        where = prefix or "SparseLinear."
        try:
            if self.phase == "hard":
                F.check_permutation(self.perm.cpu(), self.perm_dim, f"{where}perm")
            self.sparse.validate(where)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"state dict for {where.rstrip('.')} does not hold a valid pattern: {e}") from None

    def _match_structure_to_values(self) -> None:
        """After loading a pattern of another density (e.g. ERK): the structure's counts follow the stored one (N:M's
        density is n/m, part of the config that was checked)."""
        density = self.sparse.density
        if abs(density - self.structure.density) > 1e-12:
            self.structure = self._structure_at(density)

    def _load_perm_state(self, perm_state: Optional[dict]) -> None:
        """The soft phase's clock from a checkpoint (one without it, written before it existed, resumes with the
        warm-up over, the ramp at its start and an empty record)."""
        self._reset_perm_state()
        if self.phase == "none":
            return
        st = perm_state or {}
        self._warmup_seen = int(st.get("warmup_seen", 0))
        self._soft_steps = int(st.get("soft_steps", 0))
        if "log" in st:
            self.perm_log = copy.deepcopy(st["log"])
        if self.phase == "soft" and st.get("warmup", False):
            grad = st.get("perm_grad")
            if not isinstance(grad, Tensor) or tuple(grad.shape) != (self.out_features, self.in_features):
                raise ValueError("checkpoint of a layer in its gradient warm-up has no perm_grad tensor of shape "
                                 f"{(self.out_features, self.in_features)}; got {getattr(grad, 'shape', grad)!r}")
            dt = torch.float64 if self.values.dtype == torch.float64 else torch.float32
            self._perm_grad = grad.to(device=self.values.device, dtype=dt).clone()
            self._grad_since_tick = bool(st.get("grad_since_tick", False))

    def _set_phase(self, phase: str) -> None:
        if phase not in _PHASES:
            raise ValueError(f"unknown permutation phase {phase!r} in checkpoint")
        if phase == self.phase:
            return
        factory = dict(device=self.values.device, dtype=self.values.dtype)
        self._drop_soft()
        if "perm" in self._buffers:
            del self._buffers["perm"]
        if phase == "soft":
            self.soft = P.SoftPermutation(self.perm_dim, init=self.perm_init, n_iters=self.sinkhorn_iters,
                                          **self._soft_factory(factory["device"], factory["dtype"]))
            warnings.warn("SparseLinear: loading a soft-phase checkpoint into a layer that had no soft matrix "
                          "created a new soft-permutation parameter; an optimizer built before this load does not "
                          "track it (build the optimizer after loading the model)", stacklevel=3)
        elif phase == "hard":
            self.register_buffer("perm", torch.arange(self.perm_dim, device=factory["device"]))
        self.phase = phase


# ----------------------------------------------------------------------------------------------------------
# Model-level helpers
# ----------------------------------------------------------------------------------------------------------


def permutation_penalty(model: nn.Module) -> Tensor:
    """Sum of every soft layer's ``lambda * P(M)`` (``lambda`` where its ramp towards ``perm_lambda`` is): add to the
    loss during the soft phase."""
    terms = [m.permutation_penalty() for m in model.modules() if isinstance(m, SparseLinear) and m.phase == "soft"]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()


def harden_all(model: nn.Module, step: Optional[int] = None, force: bool = False) -> List[str]:
    """Advance every soft layer's clock by one step (:meth:`SparseLinear.maybe_harden`: call it after every
    optimizer step when not using :class:`~padst_ext.DST`, which does it; with DST, calling it too would advance the
    clock twice per step) and harden those that are due, or all of them with ``force``; returns the names of the
    layers hardened."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear) and m.phase == "soft":
            if force:
                m.harden("forced", step)
                done.append(name)
            elif m.maybe_harden(step):
                done.append(name)
    return done


def permutation_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The soft permutations' logits of every :class:`SparseLinear` in ``model`` (those still soft)."""
    return [m.soft.logits for m in model.modules() if isinstance(m, SparseLinear) and m.phase == "soft"]


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, perm_lr: Optional[float] = None,
                 soft_steps: Optional[int] = None, perm_weight_decay: float = 0.0) -> List[dict]:
    """Optimizer parameter groups: every parameter with ``lr`` and ``weight_decay``, except the soft permutations'
    logits, which get their own group (named "permutations") with ``perm_lr`` and ``perm_weight_decay`` (default 0:
    weight decay pulls the logits towards the uniform matrix, away from a permutation). Without soft permutations,
    one group.

    ``perm_lr`` defaults to ``8 / soft_steps`` (within [0.01, 0.5]) when the number of steps the soft phase may
    last (to its deadline) is given, else 0.01: Adam moves a logit by about its learning rate per step, and taking
    a soft start to a permutation moves the logits by several units (a row's largest logit must clear the others
    by about ``log d + 2`` for the penalty to fall under 0.22).

        opt = torch.optim.AdamW(padst_ext.param_groups(model, lr=1e-3, weight_decay=0.05, soft_steps=5000), lr=1e-3)
    """
    if perm_lr is None:
        perm_lr = 1e-2 if soft_steps is None else min(0.5, max(1e-2, 8.0 / max(1, soft_steps)))
    elif not float(perm_lr) > 0:
        raise ValueError(f"perm_lr must be positive, got {perm_lr}")
    perm = {id(p) for p in permutation_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in perm]
    groups = [dict(params=rest, lr=lr, weight_decay=weight_decay)]
    if perm:
        groups.append(dict(params=[p for p in model.parameters() if id(p) in perm], lr=perm_lr,
                           weight_decay=perm_weight_decay, name="permutations"))
    return groups


def permutation_report(model: nn.Module) -> dict:
    """Per permuted layer, how its permutation was learned (:attr:`SparseLinear.perm_log`: where the penalty
    started, its trace, when and why it hardened, and how far the hard permutation is from the rounding of the
    soft phase's start and from the identity), with the phase; plus a summary over the layers."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear) and m.phase != "none":
            log = {k: v for k, v in m.perm_log.items() if k != "start_perm"}
            with torch.no_grad():
                pen = None if not m.soft_active else float(m.soft.penalty("mean_row"))
            layers[name] = dict(log, phase=m.phase, d=m.perm_dim, side=m.perm_side, penalty=pen)
    hard = [v for v in layers.values() if v["phase"] == "hard"]

    def mean(key):
        vals = [v[key] for v in hard if v.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    summary = dict(layers=len(layers), hardened=len(hard),
                   converged=sum(v["reason"] == "converged" for v in hard),
                   deadline=sum(v["reason"] == "deadline" for v in hard),
                   moved_from_start=mean("moved_from_start"),
                   moved_support_from_start=mean("moved_support_from_start"),
                   moved_from_identity=mean("moved_from_identity"),
                   moved_support_from_identity=mean("moved_support_from_identity"),
                   hardened_step=mean("hardened_step"))
    return dict(summary=summary, layers=layers)


@dataclass
class SparsifyReport:
    replaced: List[Tuple[str, str]] = field(default_factory=list)  # (name, description)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __str__(self) -> str:
        lines = [f"sparsify: replaced {len(self.replaced)} layers, kept {len(self.skipped)} dense"]
        lines += [f"  + {n}: {d}" for n, d in self.replaced]
        lines += [f"  = {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer storing its weight transposed, ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, p) or name == p for p in patterns or ())


def sparsify(model: nn.Module, structure: str = "block", sparsity: float = 0.9, *,
             include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
             dense_first_last: bool = True, from_weights: bool = True, **layer_kwargs) -> SparsifyReport:
    """Replace ``nn.Linear`` (and Hugging Face ``Conv1D``) layers of ``model`` in place by :class:`SparseLinear`.

    ``include`` / ``exclude`` are glob patterns on module names (``"blocks.*.mlp.*"``). The first and last
    eligible layers stay dense by default, and so do layers whose weight is shared with another module (tied
    embeddings) or whose shape the structure cannot tile. ``from_weights`` keeps the largest-magnitude units of
    the existing weights (else a random pattern); either way the kept weights are copied. A ``seed`` in
    ``layer_kwargs`` is turned into one seed per layer (from the seed and the layer's name). Returns a report.
    """
    report = SparsifyReport()
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and (isinstance(m, nn.Linear) or _is_conv1d(m)) and not isinstance(m, SparseLinear)]
    weight_users = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            weight_users[id(p)] = weight_users.get(id(p), 0) + 1
    first_last = {candidates[0][0], candidates[-1][0]} if candidates and dense_first_last else set()
    base_seed = layer_kwargs.pop("seed", None)
    for name, mod in candidates:
        if base_seed is not None:  # one seed per layer: same-shape layers must not start from one soft matrix
            layer_kwargs["seed"] = (int(base_seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 62)
        if include is not None and not _matches(name, include):
            report.skipped.append((name, "not included"))
            continue
        if _matches(name, exclude):
            report.skipped.append((name, "excluded"))
            continue
        if name in first_last:
            report.skipped.append((name, "first/last layer kept dense"))
            continue
        if weight_users.get(id(mod.weight), 0) > 1:
            report.skipped.append((name, "weight tied to another module"))
            continue
        weight = mod.weight.T if _is_conv1d(mod) else mod.weight
        try:
            new = SparseLinear.from_dense(weight, mod.bias, structure=structure, sparsity=sparsity, **layer_kwargs) \
                if from_weights else _random_like(weight, mod.bias, structure, sparsity, layer_kwargs)
        except ValueError as e:
            report.skipped.append((name, f"cannot sparsify: {e}"))
            continue
        new.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.replaced.append((name, new.extra_repr()))
    return report


def _random_like(weight, bias, structure, sparsity, kw) -> SparseLinear:
    layer = SparseLinear(weight.shape[1], weight.shape[0], bias=bias is not None, structure=structure,
                         sparsity=sparsity, device=weight.device, dtype=weight.dtype, **kw)
    with torch.no_grad():
        mask = layer.structure.random_mask(device=weight.device)
        layer._set_pattern(weight.detach(), mask)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


def export(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An inference copy of ``model``: every soft permutation hardened (Hungarian) into an index fused in the
    kernels, compressed weights only, gradients off, eval mode."""
    out = model if inplace else copy.deepcopy(model)
    harden_all(out, force=True)
    for m in out.modules():
        if isinstance(m, SparseLinear):  # no training-time state on an inference model
            m._product_hooks.clear()
            m.penalty_in_backward = False
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out
