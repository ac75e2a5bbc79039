"""Dynamic sparse training: RigL and SET for every structure, as an optimizer wrapper.

``DST(model, optimizer, ...)`` attaches to the optimizer with ``register_step_pre_hook`` /
``register_step_post_hook``; the training loop stays ``loss.backward(); optimizer.step()``. Every
``update_interval`` steps until ``end`` it drops the ``fraction`` of each layer's active units with the smallest
weights and grows as many (RigL: largest dense-gradient norm, computed on that step only; SET: at random),
unit by unit of the structure (block, diagonal, element of an N:M group, element), so the structure and the
count stay exact. Grown weights start at zero; the optimizer state moves with the kept units and is zero for
grown ones. Soft permutations get their penalty gradient in their own backward pass (no change to the user's
loss) and harden on their own schedule in the post-hook.
"""

from __future__ import annotations

import contextlib

import math
import numbers
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._sharding import copy_full_into, full_tensor
from .nn import SparseLinear
from .structures import check_int

__all__ = ["DST", "erk_densities", "apply_erk"]

ALGORITHMS = ("rigl", "set", "static")
SCHEDULES = ("cosine", "constant", "linear")


def erk_densities(shapes: List[Tuple[int, int]], density: float, erk_power: float = 1.0) -> List[float]:
    """Erdős–Rényi(-Kernel) allocation for linear layers ``[(out, in), ...]``: density of layer l proportional to
    ``((out + in) / (out * in)) ** erk_power``, scaled so that the total number of non-zeros is ``density`` times
    the total size; layers that would exceed 1 are made dense and the rest re-scaled."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = [o * i for o, i in shapes]
    raw = [((o + i) / (o * i)) ** erk_power for o, i in shapes]
    dense = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[j] for j in dense)
        denom = sum(raw[j] * sizes[j] for j in range(len(shapes)) if j not in dense)
        if denom <= 0:
            return [1.0] * len(shapes)
        eps = budget / denom
        over = [j for j in range(len(shapes)) if j not in dense and eps * raw[j] > 1]
        if not over:
            return [1.0 if j in dense else eps * raw[j] for j in range(len(shapes))]
        dense.update(over)


def apply_erk(model: nn.Module, seed: int = 0, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Re-allocate the total density of ``model``'s SparseLinear layers by ERK (fresh seeded random patterns of the
    new densities). Call it before training and before wrapping the model in DDP; returns the new densities."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    shapes = [(m.out_features, m.in_features) for _, m in layers]
    total = sum(o * i for o, i in shapes)
    density = sum(m.density * m.out_features * m.in_features for _, m in layers) / total
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    for (_, layer), d in zip(layers, erk_densities(shapes, density)):
        layer.set_density(min(d, 1.0), generator=gen)
    return {n: m.density for n, m in layers}


class DST:
    """RigL / SET / static sparse training for the :class:`~padst_ext.nn.SparseLinear` layers of ``model``.

    Args:
        algorithm: ``"rigl"`` (grow by dense-gradient magnitude), ``"set"`` (grow at random) or ``"static"``.
        update_interval: steps between updates (ΔT).
        drop_fraction: initial fraction of active units replaced per update (α), decayed by ``drop_schedule``.
        end: last update step, as a fraction of ``total_steps`` (< 1) or an absolute step (>= 1).
        distribution: ``"uniform"`` keeps each layer's density; ``"erk"`` re-allocates the layers' total density
            across layers (at construction, before training).
        dense_first_last: require the model's first and last linear layers to be dense (ValueError otherwise).
        perm_ramp, harden_at: for the soft permutations whose layer leaves them unset (``perm_lambda_ramp`` /
            ``harden_step`` None): the penalty ramps up over ``perm_ramp`` of ``total_steps`` and the permutation
            hardens at ``harden_at`` of it at the latest (None: no deadline). Layers harden earlier once converged.
        add_permutation_penalty: the soft permutations' backward adds ``lambda * dP/dlogits`` to their
            gradients (once per forward, as if the penalty were in each forward's loss); set False if the loss
            already includes :func:`padst_ext.nn.permutation_penalty`.
        process_group: under torch.distributed, the group over which grow scores are summed so that every rank
            makes the identical update (default: the world group when initialised). Wrap the model in DDP with
            ``find_unused_parameters=True`` when it has soft permutations: their logits stop being used once
            they harden.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: str = "rigl",
                 update_interval: int = 100, drop_fraction: float = 0.3, drop_schedule: str = "cosine",
                 end: float = 0.75, total_steps: Optional[int] = None, distribution: str = "uniform",
                 dense_first_last: bool = True, seed: int = 0, add_permutation_penalty: bool = True,
                 harden: bool = True, perm_ramp: float = 0.25, harden_at: Optional[float] = 0.5,
                 process_group=None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if drop_schedule not in SCHEDULES:
            raise ValueError(f"drop_schedule must be one of {SCHEDULES}, got {drop_schedule!r}")
        if distribution not in ("uniform", "erk"):
            raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
        update_interval = check_int("update_interval", update_interval)
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps)
        if isinstance(end, bool) or not isinstance(end, numbers.Real) or not end > 0:
            raise ValueError(f"end must be a fraction of total_steps in (0, 1) or an absolute step >= 1, got {end!r}")
        if not 0 <= drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        if total_steps is None and end < 1:
            raise ValueError("end is a fraction of total_steps: pass total_steps (or an absolute end step >= 1)")
        if not 0 <= perm_ramp <= 1:
            raise ValueError(f"perm_ramp must be a fraction of training in [0, 1], got {perm_ramp}")
        if harden_at is not None and not 0 <= harden_at <= 1:
            raise ValueError(f"harden_at must be a fraction of training in [0, 1] (or None), got {harden_at}")
        self.model, self.optimizer = model, optimizer
        self.algorithm, self.update_interval = algorithm, int(update_interval)
        self.drop_fraction, self.drop_schedule = float(drop_fraction), drop_schedule
        self.total_steps = total_steps
        self.end_step = int(end * total_steps) if end < 1 else int(end)
        if self.end_step < 1:
            raise ValueError(f"end={end!r} of total_steps={total_steps} stops the updates at step {self.end_step}: no "
                             f"update would happen (the stop step must be >= 1)")
        self.distribution, self.dense_first_last = distribution, dense_first_last
        self.add_permutation_penalty, self.harden = add_permutation_penalty, harden
        self.process_group = process_group
        self.layers: List[Tuple[str, SparseLinear]] = [(n, m) for n, m in model.named_modules()
                                                       if isinstance(m, SparseLinear)]
        if not self.layers:
            raise ValueError("the model has no SparseLinear layers (use padst_ext.sparsify first)")
        if dense_first_last:
            linear = [(n, m) for n, m in model.named_modules()
                      if isinstance(m, (nn.Linear, SparseLinear)) or type(m).__name__ == "Conv1D"]
            for n, m in {linear[0][0]: linear[0][1], linear[-1][0]: linear[-1][1]}.items():
                if isinstance(m, SparseLinear):
                    raise ValueError(f"layer {n!r} is the model's first or last linear layer and is sparse, but "
                                     "dense_first_last=True (the RigL default) keeps those dense: build the model "
                                     "with padst_ext.sparsify (which leaves them dense) or pass "
                                     "dense_first_last=False")
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # optimizer steps completed
        self.history: List[Dict] = []
        self._grow_scores: Optional[List[Tensor]] = None  # set in the pre-hook of an update step
        self._captures: Optional[List[List[dict]]] = None  # per layer, the product records of an update step
        self._capture_handles: List = []
        if distribution == "erk":
            self._apply_erk()
        # The penalty's gradient is added by each soft layer's backward (no second Sinkhorn pass per step).
        for _, layer in self.layers:
            layer.penalty_in_backward = add_permutation_penalty
            if total_steps is not None and layer.phase == "soft":  # the schedule in this run's steps, if unset
                if layer.perm_lambda_ramp is None:
                    layer.perm_lambda_ramp = int(perm_ramp * total_steps)
                if layer.harden_step is None and harden_at is not None:
                    layer.harden_step = int(harden_at * total_steps)
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        self._arm(self.step)

    @contextlib.contextmanager
    def suspended(self):
        """Optimizer steps inside do not count for DST (no update, no clock): for code that steps the optimizer
        for its own purposes, as ``torch.distributed.checkpoint``'s state-dict helpers do (a zero-gradient step at
        learning rate 0 to create a fresh optimizer's state)."""
        for h in self._hooks:
            h.remove()
        self._disarm()
        try:
            yield self
        finally:
            self._hooks = [self.optimizer.register_step_pre_hook(self._pre_step),
                           self.optimizer.register_step_post_hook(self._post_step)]
            self._arm(self.step)

    # -- schedule ---------------------------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        """Whether the update runs after optimizer step number ``step`` (0-based)."""
        t = step + 1
        return self.algorithm != "static" and t % self.update_interval == 0 and t <= self.end_step

    def fraction(self, step: int) -> float:
        t = step + 1
        if self.drop_schedule == "constant":
            return self.drop_fraction
        progress = min(1.0, t / max(1, self.end_step))
        if self.drop_schedule == "linear":
            return self.drop_fraction * (1 - progress)
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * progress))

    # -- hooks ------------------------------------------------------------------------------------------------
    def _arm(self, step: int) -> None:
        """On a RigL update step, record every forward's sparse product (its input, and its output's gradient in
        the backward pass) through the layers' product hooks; on other steps record nothing."""
        self._disarm()
        if not (self.algorithm == "rigl" and self.is_update_step(step)):
            return
        self._captures = [[] for _ in self.layers]
        for (_, layer), records in zip(self.layers, self._captures):
            self._capture_handles.append(layer.register_product_hook(self._recorder(records)))

    def _disarm(self) -> None:
        for h in self._capture_handles:
            h.remove()
        self._capture_handles, self._captures = [], None

    @staticmethod
    def _recorder(records: List[dict]):
        def record(layer, x_in, z, in_perm, out_perm):
            if not torch.is_grad_enabled():
                return
            rec = {"x": x_in.detach(), "in_perm": in_perm, "out_perm": out_perm}
            records.append(rec)
            if z.requires_grad:
                z.register_hook(lambda g: rec.__setitem__("dz", g.detach()))
        return record

    @staticmethod
    def _dense_grad(records: List[dict]) -> Optional[Tensor]:
        """Sum over the recorded forwards of ``dz.T @ x_in`` in the logical frame, ``[out, in]`` float32."""
        from . import ops

        total = None
        for rec in records:
            # a forward without backward, or the inf/NaN gradients of a step that GradScaler skipped (the
            # optimizer step hooks never ran, so its records are still here): not a grow signal
            if "dz" not in rec or not bool(torch.isfinite(rec["dz"]).all()):
                continue
            g = ops.dense_grad(rec["dz"].to(rec["x"].dtype), rec["x"], rec["in_perm"], rec["out_perm"])
            total = g.float() if total is None else total.add_(g)
        return total

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.is_update_step(self.step):
            self._grow_scores = self._compute_grow_scores()

    def _post_step(self, optimizer, args, kwargs) -> None:
        step = self.step
        if self.is_update_step(step):
            self._update(step, self._grow_scores)
            self._grow_scores = None
        for _, layer in self.layers:  # the soft phases' clock (penalty ramp, record), and hardening if allowed
            if layer.phase == "soft":
                layer.maybe_harden(step + 1, harden=self.harden)
        self.step += 1
        self._arm(self.step)

    # -- the update -------------------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _compute_grow_scores(self) -> List[Tensor]:
        scores = []
        for i, (name, layer) in enumerate(self.layers):
            shape = (layer.out_features, layer.in_features)
            if self.algorithm == "rigl":
                g = self._dense_grad(self._captures[i]) if self._captures is not None else None
                if g is None:
                    raise RuntimeError(f"DST: no gradient was recorded for layer {name!r} on update step "
                                       f"{self.step}; call loss.backward() before optimizer.step()")
                if self._distributed():  # the global gradient first, then its magnitude
                    torch.distributed.all_reduce(g, group=self.process_group)
                g = g.abs_()
            else:  # SET: the same seeded draw on every rank
                g = torch.rand(shape, generator=self.generator).to(layer.values.device)
            scores.append(g)
        return scores

    @torch.no_grad()
    def _update(self, step: int, grow_scores: List[Tensor]) -> None:
        """Per layer: the new pattern at the structure's unit, then the weight on it and every optimizer moment moved
        by one gather through the slot map (grown units zero); the grow score is the only dense ``R x C`` tensor."""
        frac = self.fraction(step)
        record = {"step": step + 1, "fraction": frac, "layers": {}}
        for i, (name, layer) in enumerate(self.layers):
            # under FSDP2 the values and their moments are sharded DTensors: the update works on them whole (the
            # same on every rank) and each rank writes back its shard
            w = layer.sparse  # whole (gathered) when FSDP2 shards the values
            g, grow_scores[i] = grow_scores[i].to(w.values.device), None  # dropped once used
            new_w, slot = w.remap(layer.structure.update(w, g, frac))
            del g
            state = self.optimizer.state.get(layer.values, {})
            for k, v in state.items():
                if isinstance(v, Tensor) and v.shape == layer.values.shape:
                    moved = w.move(full_tensor(v), slot)
                    if moved.shape == v.shape:
                        copy_full_into(v, moved)
                    else:
                        state[k] = moved
            layer.set_sparse(new_w)
            grown = new_w.nnz - int((slot >= 0).sum()) * new_w.unit_numel
            record["layers"][name] = {"grown": grown, "density": layer.density}
            del w, new_w, slot  # before the next layer's update: one layer's work at a time
        self.history.append(record)
        self._disarm()

    def _apply_erk(self) -> None:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            raise ValueError("distribution='erk' changes the layers' sizes, which a DistributedDataParallel "
                             "wrapper cannot follow: call padst_ext.dst.apply_erk(model, seed=...) before wrapping "
                             "the model, then DST(ddp_model, ...) with the default distribution")
        apply_erk(self.model, generator=self.generator)

    # -- introspection and checkpoints --------------------------------------------------------------------------
    def regularization(self) -> Tensor:
        """Current total permutation penalty (``sum lambda * P(M)`` over soft layers, lambda where each layer's ramp
        is), for logging."""
        with torch.no_grad():
            vals = [layer.permutation_penalty() for _, layer in self.layers if layer.phase == "soft"]
        return torch.stack(vals).sum() if vals else torch.zeros(())

    def densities(self) -> Dict[str, float]:
        return {name: layer.density for name, layer in self.layers}

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state(), "history": list(self.history),
                "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self._config():
            raise ValueError(f"DST state was saved with config {state.get('config')} but this DST has "
                             f"{self._config()}")
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self._arm(self.step)

    def _config(self) -> dict:
        return dict(algorithm=self.algorithm, update_interval=self.update_interval, drop_fraction=self.drop_fraction,
                    drop_schedule=self.drop_schedule, end_step=self.end_step,
                    layers=[n[len("module."):] if n.startswith("module.") else n for n, _ in self.layers])

    def remove(self) -> None:
        """Detach from the optimizer."""
        for h in self._hooks:
            h.remove()
        self._disarm()
        for _, layer in self.layers:
            layer.penalty_in_backward = False
