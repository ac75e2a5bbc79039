"""Per-machine tuning of the CPU kernels.

The vectorised CPU kernels have variants (register tile, packing, row panel, line chunk, prefetching, ...) whose
best choice depends on the micro-architecture: a tile tuned on an AMD EPYC ran at half the speed-up on an Intel
Xeon. As oneDNN, FBGEMM and ATLAS do, the variant is chosen on the machine that runs it: the first call of a shape
class (ISA, dtype, threads, batch size class, the layer's shape, sparsity and permutation sides) times the
candidates on that call's own data (coordinate descent under a time budget, a few hundred ms at most) and keeps the
fastest; later calls of the class look the choice up. Every variant sums in the same order, so the choice never
changes a result: outputs are the same, element for element, with tuning on or off.

Families tuned (float32, bfloat16, float16; batches of 8 rows or more): the block forward and dx kernel
(``block_mm`` / ``block_mm_t``: register tile, packing, row panel, line chunk, prefetching, or the packed kernel),
the N:M forward and dx (``nm_mm`` / ``nm_mm_t``: batch tile, prefetch distance) and the diagonal forward and dx
(``diag_mm``: rows per step, output tile, rows packed at once). The weight-gradient kernels run their fixed
variant. Calls whose default variant takes under 20 us keep it unmeasured (call overhead dominates them).

Switches:
  ``PADST_CPU_TUNE=0``         tuning off: every call runs the fixed default variant (deterministic choice of kernel)
  ``PADST_CPU_TUNE_CACHE=F``   keep the choices in the JSON file F across processes, per CPU model and ISA: loaded
                               when padst_ext is imported, written back (merged) when the process exits
and in code ``set_enabled`` / ``disabled()``, ``choices()``, ``clear()``, ``save`` / ``load``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

__all__ = ["enabled", "set_enabled", "disabled", "choices", "clear", "machine_id", "save", "load", "CACHE_ENV",
           "ENABLE_ENV"]

ENABLE_ENV = "PADST_CPU_TUNE"
CACHE_ENV = "PADST_CPU_TUNE_CACHE"
_FORMAT = 1


def _op(action: str, arg: str = "") -> str:
    return torch.ops.padst._cpu_tune(action, arg)


def enabled() -> bool:
    """Whether the first call of a new shape class measures its variants (else the default variant runs)."""
    return _op("enabled") == "1"


def set_enabled(flag: bool | None) -> None:
    """Turns tuning on or off for this process; ``None`` goes back to the ``PADST_CPU_TUNE`` environment variable.
    Choices already made are kept (and used again when tuning is back on)."""
    _op("env" if flag is None else ("on" if flag else "off"))


@contextlib.contextmanager
def disabled():
    """Runs the block with tuning off (every call the default variant), restoring the previous state after."""
    was = enabled()
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(was)


def choices() -> list[dict]:
    """The choice made for each shape class: ``key``, ``variant``, and for those measured in this process
    ``default_ms`` / ``best_ms`` (kernel time of the default and of the chosen variant on the first call's data),
    ``tune_ms`` (time spent measuring) and ``tried`` (variants measured); ``None`` for choices loaded from a cache."""
    out = []
    for line in _op("dump").splitlines():
        key, variant, d_ms, b_ms, t_ms, tried = line.split("\t")
        measured = float(t_ms) >= 0
        out.append(dict(key=key, variant=variant, default_ms=float(d_ms) if measured else None,
                        best_ms=float(b_ms) if measured else None, tune_ms=float(t_ms) if measured else None,
                        tried=int(tried) if measured else None))
    return out


def clear() -> None:
    """Forgets every choice: the next call of each shape class measures again (when tuning is on)."""
    _op("clear")


def machine_id() -> str:
    """What a cached choice is valid for: the CPU model and the ISA the kernels use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} | {torch.ops.padst._cpu_isa()}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": _FORMAT, "machines": {}}
    except (OSError, ValueError) as e:
        raise ValueError(f"padst_ext.tuning: cannot read the tuning cache {str(path)!r}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("machines"), dict):
        raise ValueError(f"padst_ext.tuning: {str(path)!r} is not a padst_ext tuning cache (format {_FORMAT})")
    return data


def load(path: str | os.PathLike) -> int:
    """Loads the choices recorded in ``path`` for this machine (``machine_id()``); returns how many. Choices already
    made in this process are kept."""
    entries = _read(Path(path))["machines"].get(machine_id(), {})
    have = {c["key"] for c in choices()}
    n = 0
    for key, variant in entries.items():
        if "\t" in key or "\t" in variant or "\n" in key + variant:
            raise ValueError(f"padst_ext.tuning: malformed entry {key!r}: {variant!r} in {str(path)!r}")
        if key not in have:
            _op("set", f"{key}\t{variant}")
            n += 1
    return n


def save(path: str | os.PathLike) -> int:
    """Merges this process's choices into ``path`` under this machine's id (written atomically); returns how many
    it holds for this machine."""
    path = Path(path)
    data = _read(path)
    mine = data["machines"].setdefault(machine_id(), {})
    mine.update({c["key"]: c["variant"] for c in choices()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return len(mine)


def _setup_from_env() -> None:
    """At import: load PADST_CPU_TUNE_CACHE and save back to it at exit. A file that cannot be read as a cache is
    left alone (a warning names it): importing padst_ext never fails over it, and it is never overwritten."""
    path = os.environ.get(CACHE_ENV)
    if not path:
        return
    try:
        load(path)
    except (OSError, ValueError) as e:
        import warnings

        warnings.warn(f"{CACHE_ENV}={path!r} is not used: {e}", stacklevel=2)
        return
    atexit.register(_save_at_exit, path)


def _save_at_exit(path: str) -> None:
    try:
        save(path)
    except (OSError, ValueError) as e:  # never fail a finished run over its cache
        import warnings

        warnings.warn(f"padst_ext.tuning: could not save the tuning cache {path!r}: {e}", stacklevel=1)
