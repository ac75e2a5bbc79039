"""Checkpoints of sharded runs (FSDP2's ``fully_shard``, DDP or one process) through ``torch.distributed.checkpoint``.

A checkpoint is a folder: DCP's files with every tensor of the model (values, patterns, permutations, soft logits,
biases) and of the optimizer, each sharded the way the run held it, plus ``padst_meta.pt`` with what is not a
tensor of fixed shape: each :class:`~padst_ext.SparseLinear`'s extra state (structure, permutation phase, the soft
phase's clock and record) and the :class:`~padst_ext.DST` state (step, random generator, history). DCP reshards on
load, so a checkpoint saved on N ranks loads on N, on another number, or in one process without a process group::

    from padst_ext import distributed as pdist
    pdist.save(path, model, optimizer, dst)            # every rank (collective)

    model = build(); fully_shard(...)                  # the same model as at the start of the run
    pdist.prepare(path, model)                         # each layer's permutation phase, before the optimizer is built
    optimizer = torch.optim.AdamW(model.parameters(), ...)
    dst = DST(model, optimizer, ...)
    pdist.load(path, model, optimizer, dst)            # every rank (collective)

``prepare`` gives each layer the phase it had at the save (a hardened layer drops its soft logits and gains its
``perm`` buffer), so that the model holds the tensors the checkpoint has and the optimizer is built over the same
parameters. Without it, ``load`` hardens a soft layer that was saved hard (its logits stay in the optimizer, unused,
as in the run that hardened it: the optimizer built at the start of a run takes such a checkpoint); a layer saved
in its soft phase that is not soft now needs ``prepare`` before the optimizer is built, and ``load`` says so.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .nn import SparseLinear

__all__ = ["save", "prepare", "load", "META"]

META = "padst_meta.pt"
_EXTRA = "_extra_state"


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_on() else 0


def _split(msd: dict):
    extra = {k: v for k, v in msd.items() if k.endswith(_EXTRA)}
    return {k: v for k, v in msd.items() if not k.endswith(_EXTRA)}, extra


def _reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root module's parameters unsharded after a forward without backward (an evaluation): the
    state dicts name the sharded parameters the optimizer holds, so every FSDP module is resharded first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def _live_params(model: nn.Module, optimizer):
    """The optimizer's groups without the parameters the model no longer has (a hardened layer's soft logits: the
    optimizer keeps them, without gradients from then on), which DCP's state dicts cannot name; put back after."""
    if optimizer is None:
        yield
        return
    live = {id(p) for p in model.parameters()}
    kept = [g["params"] for g in optimizer.param_groups]
    dead = {p: optimizer.state.pop(p) for g in kept for p in g if id(p) not in live and p in optimizer.state}
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) in live]
    try:
        yield
    finally:
        for g, params in zip(optimizer.param_groups, kept):
            g["params"] = params
        optimizer.state.update(dead)


def _suspended(dst):
    """DCP's state-dict helpers step a fresh optimizer once (zero gradients, learning rate 0) to create its state:
    that step must not count for DST (an update, the permutations' clocks)."""
    return dst.suspended() if dst is not None else contextlib.nullcontext()


def _state_dicts(model: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


@contextlib.contextmanager
def _dcp_state(model: nn.Module, optimizer, dst):
    """The state DCP saves or loads in place (``{"model": tensors, "optim": ...}``) and the model's extra states
    (not tensors of fixed shape: padst_meta.pt), built from the resharded model with the optimizer's live
    parameters and DST suspended; the context stays open while DCP and the setters use them."""
    _reshard(model)
    with _live_params(model, optimizer), _suspended(dst):
        msd, osd = _state_dicts(model, optimizer)
        tensors, extra = _split(msd)
        state = {"model": tensors}
        if osd is not None:
            state["optim"] = osd
        yield state, extra


def save(path: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, dst=None) -> None:
    """Writes the checkpoint folder ``path``: on every rank of a distributed run (a collective), or in one process.
    Call it between steps (after ``optimizer.step()``), not while a DST update's gradients are being gathered."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    with _dcp_state(model, optimizer, dst) as (state, extra), _quiet_single_process():
        dcp.save(state, checkpoint_id=str(path), no_dist=not _dist_on())
    if _rank() == 0:
        meta = {"version": 1, "extra": extra, "dst": dst.state_dict() if dst is not None else None,
                "world_size": torch.distributed.get_world_size() if _dist_on() else 1}
        tmp = path / (META + ".tmp")
        torch.save(meta, tmp)
        os.replace(tmp, path / META)
    if _dist_on():
        torch.distributed.barrier()


def _meta(path: Path) -> dict:
    f = path / META
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a padst_ext.distributed checkpoint: it has no {META}")
    meta = torch.load(f, weights_only=True)
    if not isinstance(meta, dict) or meta.get("version") != 1 or not isinstance(meta.get("extra"), dict):
        raise ValueError(f"{f} is not a padst_ext.distributed checkpoint's metadata (version 1)")
    return meta


def _layers(model: nn.Module, extra: dict):
    """(name, layer, its extra state) for every SparseLinear of the checkpoint, checked against the model."""
    mine = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    saved = {k[: -len(_EXTRA)].rstrip("."): v for k, v in extra.items()}
    saved = {k: v for k, v in saved.items() if isinstance(v, dict) and "phase" in v}
    if set(saved) != set(mine):
        raise ValueError(f"checkpoint's SparseLinear layers {sorted(saved)} are not this model's {sorted(mine)}")
    for name in sorted(mine):
        here = mine[name].get_extra_state()
        for key in ("config", "perm_side", "has_bias"):
            if saved[name].get(key) != here[key]:
                raise ValueError(f"checkpoint for {name} does not match this layer: {key} is "
                                 f"{saved[name].get(key)!r} in the checkpoint but {here[key]!r} here")
    return [(name, mine[name], saved[name]) for name in sorted(mine)]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group is up: that is what padst asks of it here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def prepare(path: os.PathLike, model: nn.Module) -> None:
    """Gives each SparseLinear of ``model`` the permutation phase it had in the checkpoint ``path`` (so that the model
    holds the checkpoint's tensors): call it before building the optimizer. No collective."""
    for name, layer, ex in _layers(model, _meta(Path(path))["extra"]):
        layer._set_phase(ex["phase"])


def load(path: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, dst=None) -> None:
    """Loads the checkpoint folder ``path`` into ``model`` (and ``optimizer``, ``dst``) as they are sharded now: on
    every rank of a distributed run (a collective), or in one process. The layers' phases must match the checkpoint's
    (:func:`prepare`, before the optimizer is built); without an optimizer, ``load`` sets them itself. Without
    ``dst`` the checkpoint's DST state is not read (a model loaded for evaluation or export); a DST attached to the
    optimizer must be given (a fresh optimizer is stepped once, at learning rate 0, to create its state, and DST
    must not count that step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    meta = _meta(path)
    for name, layer, ex in _layers(model, meta["extra"]):
        if layer.phase != ex["phase"]:
            # a soft layer saved hard drops its logits (the optimizer keeps them unused, as in the run that hardened
            # it); a layer saved soft needs its logits in the optimizer, so before the optimizer is built
            if optimizer is not None and ex["phase"] == "soft":
                raise ValueError(f"layer {name!r} is in its {layer.phase!r} permutation phase but was saved in "
                                 f"'soft': call padst_ext.distributed.prepare(path, model) before building the "
                                 "optimizer")
            layer._set_phase(ex["phase"])
    if dst is not None and meta["dst"] is None:
        raise ValueError(f"checkpoint {path} has no DST state to load into dst (it was saved without one)")
    with _dcp_state(model, optimizer, dst) as (state, _):
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _dist_on())
        # the extra states (phase, clocks, records) with the tensors: SparseLinear's loader checks the pattern and
        # the permutation it is given as it does for any state dict
        full = dict(state["model"])
        full.update(meta["extra"])
        set_model_state_dict(model, full, options=StateDictOptions(strict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])
    if dst is not None:
        dst.load_state_dict(meta["dst"])
