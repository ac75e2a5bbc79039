"""Loading the compiled ops (``padst_ext._C``) with a readable error when they cannot work.

``padst_ext._C`` is an empty Python module whose shared library registers the ``padst::*`` ops with the
torch dispatcher when it is loaded. It is compiled against one specific torch: a different torch (another
release, or a CPU build instead of a CUDA one) fails with undefined symbols at best. ``load()`` checks the
build record ``padst_ext._build_info`` (written by CMake) against the running torch first.

``padst_ext._emu``, built beside it, registers the test-only ``padst_emu::*`` ops (the CUDA implementation of every
kernel op, run on the host through the kernel emulation). ``import padst_ext`` never loads it; tests call
``load_emulation()``.

This module must not import ``padst_ext.ops`` (which imports it).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = [
    "load",
    "load_emulation",
    "build_info",
    "WITH_CUDA",
    "CUDA_ARCHS",
    "HAVE_CUSPARSELT",
    "TORCH_VERSION",
    "TORCH_CUDA_VERSION",
]

REBUILD_HINT = (
    "Rebuild it against the torch in this environment, from the padst_ext source tree:\n"
    "    pip install --no-build-isolation -e .\n"
    "(--no-build-isolation makes the build use the installed torch; add PADST_WITH_CUDA=ON to require CUDA.)"
)

try:  # generated at build time; absent in a source tree that was never built
    from . import _build_info as _info
except ImportError:  # pragma: no cover - depends on the installation
    _info = None

# What the installed binary was built with (None when there is no build record).
TORCH_VERSION: str | None = getattr(_info, "TORCH_VERSION", None)
TORCH_CUDA_VERSION: str | None = getattr(_info, "TORCH_CUDA_VERSION", None)
WITH_CUDA: bool = bool(getattr(_info, "WITH_CUDA", False))
CUDA_ARCHS: str = getattr(_info, "CUDA_ARCHS", "")
HAVE_CUSPARSELT: bool = bool(getattr(_info, "HAVE_CUSPARSELT", False))

_loaded: ModuleType | None = None
_emulation: ModuleType | None = None


def build_info() -> dict[str, Any]:
    """The build record as a dict (empty when padst_ext was never built)."""
    if _info is None:
        return {}
    return {k: v for k, v in vars(_info).items() if k.isupper()}


def _split_version(version: str) -> tuple[str, str]:
    """'2.14.1+cu130' -> ('2.14.1', 'cu130'); '2.13.0' -> ('2.13.0', '')."""
    release, _, local = str(version).partition("+")
    return release, local


def _describe(version: str, cuda: str | None) -> str:
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU-only'} build)"


def load() -> ModuleType:
    """Import ``padst_ext._C`` (registering the ``padst::*`` ops) after checking it matches the running torch.

    Raises ImportError with what it was built against, what is running and how to rebuild.
    Idempotent: later calls return the already loaded module.
    """
    global _loaded
    if _loaded is not None:
        return _loaded

    import torch  # loads libtorch / libc10 (and CUDA libraries), which _C resolves against

    running = str(torch.__version__)
    running_desc = _describe(running, torch.version.cuda)
    if _info is None:
        raise ImportError(
            "padst_ext's compiled ops are missing (no padst_ext._build_info): padst_ext was not built or not "
            f"installed for this environment (running {running_desc}).\n{REBUILD_HINT}"
        )

    built_desc = _describe(_info.TORCH_VERSION, _info.TORCH_CUDA_VERSION)
    if _split_version(_info.TORCH_VERSION) != _split_version(running):
        raise ImportError(
            f"padst_ext was built against {built_desc}, but {running_desc} is running "
            f"({torch.__file__}).\nIts compiled ops only work with the torch they were built against.\n"
            f"{REBUILD_HINT}"
        )

    try:
        _loaded = importlib.import_module("padst_ext._C")
    except (ImportError, OSError) as e:
        raise ImportError(
            f"padst_ext's compiled ops (padst_ext._C) failed to load: {type(e).__name__}: {e}\n"
            f"It was built against {built_desc}; running {running_desc}. Undefined symbols or missing libraries "
            f"usually mean the binary is stale or was built for a different torch.\n{REBUILD_HINT}"
        ) from e
    return _loaded


def load_emulation() -> ModuleType:
    """Import the test-only ``padst_ext._emu`` (registering the ``padst_emu::*`` ops) after :func:`load`.

    ``torch.ops.padst_emu`` has the schemas of ``torch.ops.padst``'s kernel ops, takes CPU tensors and runs the CUDA
    host layer with every kernel emulated on the host: slow, for testing the CUDA path without a GPU.
    Raises ImportError like :func:`load`. Idempotent.
    """
    global _emulation
    if _emulation is not None:
        return _emulation
    load()  # checks the build against the running torch; _emu links against _C
    try:
        _emulation = importlib.import_module("padst_ext._emu")
    except (ImportError, OSError) as e:
        raise ImportError(
            f"padst_ext's emulation library (padst_ext._emu) failed to load: {type(e).__name__}: {e}\n"
            "Every build of padst_ext builds it beside padst_ext._C; a missing or stale one means the installed "
            f"binaries are incomplete or come from an older build.\n{REBUILD_HINT}"
        ) from e
    return _emulation
