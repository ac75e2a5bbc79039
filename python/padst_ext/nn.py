"""Layers: :class:`SparseLinear` (``y = S Π x``), :func:`sparsify` for model surgery, :func:`export` for inference.

A permuted layer starts in the *soft* phase: a learned doubly-stochastic matrix ``M`` (see
:mod:`padst_ext.permutation`) is applied as a dense ``d x d`` product, and ``permutation_penalty`` (times
``perm_lambda``) pushes it towards a permutation. :meth:`SparseLinear.maybe_harden` rounds it with the Hungarian
algorithm once the mean per-row penalty falls under ``perm_delta`` (or at ``harden_step``); from then on the
permutation is a frozen index fused into the sparse kernel (for N:M, folded into the column indices).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import permutation as P
from .structures import NMStructure, Structure, make_structure

__all__ = ["SparseLinear", "sparsify", "export", "permutation_penalty", "harden_all", "SparsifyReport"]

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
        perm_init: soft matrix initialisation, ``"random"`` (default), ``"identity"`` or ``"uniform"``.
        perm_lambda, perm_delta, harden_step: penalty weight, hardening threshold on the mean per-row penalty,
            and an optional step at which to harden regardless.
        mask: an explicit boolean ``[out, in]`` pattern (else chosen at random, or from ``weight`` magnitudes by
            :meth:`from_dense`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, structure: str = "block",
                 sparsity: float = 0.9, block_size: Union[int, Tuple[int, int]] = (32, 32),
                 n: Optional[int] = None, m: Optional[int] = None, permute: bool = True, perm_side: str = "auto",
                 perm_init: str = "random", perm_lambda: float = 1e-3, perm_delta: float = 0.22,
                 harden_step: Optional[int] = None, sinkhorn_iters: int = 20, mask: Optional[Tensor] = None,
                 seed: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.structure: Structure = make_structure(structure, out_features, in_features, sparsity, block_size, n, m)
        if perm_side not in PERM_SIDES:
            raise ValueError(f"perm_side must be one of {PERM_SIDES}, got {perm_side!r}")
        if isinstance(self.structure, NMStructure):
            if perm_side == "output":
                raise ValueError("N:M groups run along the input: only an input permutation adds expressivity "
                                 "(perm_side='output' is not supported for structure='nm')")
            perm_side = "input"
        elif perm_side == "auto":
            perm_side = "input" if self.in_features <= self.out_features else "output"
        self.perm_side = perm_side
        self.perm_init, self.sinkhorn_iters = perm_init, int(sinkhorn_iters)
        self.perm_lambda, self.perm_delta = float(perm_lambda), float(perm_delta)
        self.harden_step = harden_step
        self._dst_capture: Optional[list] = None  # set by DST on its update steps
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
        if permute:
            self.phase = "soft"
            self.soft = P.SoftPermutation(self.perm_dim, init=perm_init, n_iters=self.sinkhorn_iters,
                                          generator=gen, **self._soft_factory(factory["device"], factory["dtype"]))

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
        values, buffers = self.structure.pack(dense, mask)
        if "values" in self._parameters:
            # same Parameter object (optimizers and DDP keep tracking it), in place when the shape allows
            if self.values.shape == values.shape:
                self.values.data.copy_(values)
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
        self._refresh_folded()

    def pattern_mask(self) -> Tensor:
        """Boolean ``[out, in]`` mask of the structured weight's pattern (logical frame)."""
        ones = torch.ones_like(self.values, dtype=torch.float32)
        return self.structure.unpack(ones, self._buffers_dict()) != 0

    def set_mask(self, mask: Tensor) -> None:
        """Move to a new pattern of the same structure: kept weights keep their values, new ones start at 0."""
        with torch.no_grad():
            self._set_pattern(self.sparse_weight().detach(), mask)

    def transport(self, tensor: Tensor, old_buffers: dict, new_mask: Tensor) -> Tensor:
        """Re-lay a tensor shaped like ``values`` (e.g. an optimizer moment) from the old pattern to ``new_mask``:
        entries of kept units move with them, grown units get 0, dropped units vanish."""
        dense = self.structure.unpack(tensor, old_buffers)
        packed, _ = self.structure.pack(dense * new_mask.to(dense.dtype), new_mask)
        return packed

    def _structure_at(self, density: float) -> Structure:
        """This layer's kind of structure (same shape, block size or M) at another density; N:M takes the
        nearest N for its M."""
        cfg = self.structure.config()
        kw = {k: cfg[k] for k in ("block_size",) if k in cfg}
        if cfg["structure"] == "nm":
            m = cfg["m"]
            kw.update(n=max(1, min(m - 1, round(density * m))), m=m)
        return make_structure(cfg["structure"], self.out_features, self.in_features, 1.0 - density, **kw)

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

    def _refresh_folded(self) -> None:
        """N:M with a hard permutation: the permutation lives in the column indices (zero run-time cost)."""
        if isinstance(self.structure, NMStructure) and getattr(self, "phase", "none") == "hard":
            self.register_buffer("col_idx_folded", self.perm[self.col_idx], persistent=False)
        elif "col_idx_folded" in self._buffers:
            del self._buffers["col_idx_folded"]

    def harden(self) -> Tensor:
        """Round the soft matrix to a permutation (Hungarian), freeze it and drop the soft matrix."""
        if self.phase != "soft":
            raise RuntimeError(f"harden() needs the soft phase; this layer is in phase {self.phase!r}")
        perm = self.soft.harden()
        self._drop_soft()
        self.phase = "hard"
        self.register_buffer("perm", perm.to(self.values.device))
        self._refresh_folded()
        return perm

    @staticmethod
    def _soft_factory(device, dtype):
        """Sinkhorn in log space needs range and precision: the soft matrix is float32 (float64 for float64
        layers) whatever the layer's dtype, and is cast to the input's dtype where it is applied."""
        return dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def _drop_soft(self) -> None:
        self._modules.pop("soft", None)

    def maybe_harden(self, step: Optional[int] = None) -> bool:
        """Harden when the mean per-row penalty is under ``perm_delta`` or ``step >= harden_step``."""
        if self.phase != "soft":
            return False
        due = self.harden_step is not None and step is not None and step >= self.harden_step
        if due or self.soft.penalty("mean_row").item() < self.perm_delta:
            self.harden()
            return True
        return False

    def permutation_penalty(self) -> Tensor:
        """``perm_lambda * P(M)`` in the soft phase, else 0: add it to the loss."""
        if self.phase != "soft":
            return self.values.new_zeros(())
        return self.perm_lambda * self.soft.penalty()

    # -- forward ------------------------------------------------------------------------------------------
    def _buffers_dict(self):
        return {n: getattr(self, n) for n in self.structure.buffer_names}

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bufs = self._buffers_dict()
        if self._dst_capture is not None and torch.is_grad_enabled():
            return self._forward_capturing(x2, bufs).reshape(*lead, self.out_features)
        if self.phase == "hard":
            if isinstance(self.structure, NMStructure):
                bufs = dict(bufs, col_idx=self.col_idx_folded)
                y = self.structure.mm(x2, self.values, bufs, self.bias, None, None)
            elif self.perm_side == "input":
                y = self.structure.mm(x2, self.values, bufs, self.bias, self.perm, None)
            else:
                y = self.structure.mm(x2, self.values, bufs, self.bias, None, self.perm)
        elif self.phase == "soft" and self.perm_side == "input":
            y = self.structure.mm(self.soft(x2, self._lam()), self.values, bufs, self.bias, None, None)
        elif self.phase == "soft":
            y = self.soft(self.structure.mm(x2, self.values, bufs, None, None, None), self._lam())
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self.structure.mm(x2, self.values, bufs, self.bias, None, None)
        return y.reshape(*lead, self.out_features)

    def _lam(self) -> float:
        return self.perm_lambda if self.penalty_in_backward else 0.0

    def _forward_capturing(self, x2: Tensor, bufs) -> Tensor:
        """Forward that records the sparse product's input and output gradient, so that DST can form the dense
        weight gradient dz.T @ x_p (RigL's grow score) on the update steps only."""
        in_perm = out_perm = None
        if self.phase == "hard":
            if isinstance(self.structure, NMStructure):
                in_perm = self.perm
            elif self.perm_side == "input":
                in_perm = self.perm
            else:
                out_perm = self.perm
        x_in = self.soft(x2, self._lam()) if (self.phase == "soft" and self.perm_side == "input") else x2
        soft_out = self.phase == "soft" and self.perm_side == "output"
        z = self.structure.mm(x_in, self.values, bufs, None if soft_out else self.bias, in_perm, out_perm)
        record = {"x": x_in.detach(), "in_perm": in_perm, "out_perm": out_perm}
        self._dst_capture.append(record)
        if z.requires_grad:
            z.register_hook(lambda g: record.__setitem__("dz", g.detach()))
        if soft_out:
            z = self.soft(z, self._lam())
            if self.bias is not None:
                z = z + self.bias
        return z

    def dense_grad_from_capture(self) -> Optional[Tensor]:
        """Sum over the recorded forwards of ``dz.T @ x_p`` in the logical frame, ``[out, in]``."""
        from . import ops

        total = None
        for rec in self._dst_capture or ():
            # a forward without backward, or the inf/NaN gradients of a step that GradScaler skipped (the
            # optimizer step hooks never ran, so its records are still here): not a grow signal
            if "dz" not in rec or not bool(torch.isfinite(rec["dz"]).all()):
                continue
            g = ops.dense_grad(rec["dz"].to(rec["x"].dtype), rec["x"], rec["in_perm"], rec["out_perm"])
            total = g if total is None else total + g
        return total

    # -- introspection ------------------------------------------------------------------------------------
    def sparse_weight(self) -> Tensor:
        """The logical structured weight ``S [out, in]`` (dense copy)."""
        return self.structure.unpack(self.values, self._buffers_dict())

    def dense_weight(self) -> Tensor:
        """The effective dense weight ``W`` of the current phase: ``y = x @ W.T + bias``."""
        S = self.sparse_weight()
        if self.phase == "none":
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
        if self.structure.name == "unstructured":
            return float(self.mask.sum()) / self.mask.numel()
        return self.values.numel() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        perm = "no permutation" if self.phase == "none" else f"{self.phase} {self.perm_side} permutation"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"structure={self.structure.describe()}, density={self.density:.4f}, {perm}")

    # -- checkpoints --------------------------------------------------------------------------------------
    def get_extra_state(self):
        return dict(config=self.structure.config(), phase=self.phase, perm_side=self.perm_side,
                    has_bias=self.bias is not None)

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
        self._match_structure_to_values()
        self._refresh_folded()

    def _match_structure_to_values(self) -> None:
        """After loading a pattern of another density (e.g. ERK): the structure's counts follow the stored one."""
        cfg = self.structure.config()
        R, C = self.out_features, self.in_features
        if cfg["structure"] == "nm":
            return  # its density is n/m, part of the config that was checked
        if cfg["structure"] == "unstructured":
            density = float(self.mask.sum()) / (R * C)
        else:
            density = self.values.numel() / (R * C)
        if abs(density - self.structure.density) > 1e-12:
            self.structure = self._structure_at(density)

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
    """Sum of every soft layer's ``perm_lambda * P(M)``: add to the loss during the soft phase."""
    terms = [m.permutation_penalty() for m in model.modules() if isinstance(m, SparseLinear) and m.phase == "soft"]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()


def harden_all(model: nn.Module, step: Optional[int] = None, force: bool = False) -> List[str]:
    """Harden every soft layer that is due (or all of them with ``force``); returns their names."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear) and m.phase == "soft":
            if force:
                m.harden()
                done.append(name)
            elif m.maybe_harden(step):
                done.append(name)
    return done


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
    the existing weights (else a random pattern); either way the kept weights are copied. Returns a report.
    """
    report = SparsifyReport()
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and (isinstance(m, nn.Linear) or _is_conv1d(m)) and not isinstance(m, SparseLinear)]
    weight_users = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            weight_users[id(p)] = weight_users.get(id(p), 0) + 1
    first_last = {candidates[0][0], candidates[-1][0]} if candidates and dense_first_last else set()
    for name, mod in candidates:
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
            m._dst_capture = None
            m.penalty_in_backward = False
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out
