"""What the compiler made of the v2 block kernels (csrc/kernels/block_xs.h, block_rc.h), read from the built extension's
SASS with cuobjdump (it ships in the triton wheel that a CUDA torch installs). Needs no GPU: it runs in CI, which
builds with CUDA for sm_90a, and fails the suite when a kernel regresses to what made the old block kernel slow:
no tensor-core instruction, no 128-bit or asynchronous global load, a call into the 64-bit integer
division routine (kernels are built with every device function inlined, so the CALLs nvcc emits are its runtime
routines: 64-bit division and remainder), or registers spilled to local memory (what `ptxas -v` reports as spill
stores / loads: STL / LDL instructions and a non-zero stack or local frame in `cuobjdump -res-usage`).
Skipped when the extension was built without CUDA or no cuobjdump is found."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

import padst_ext
from padst_ext import _extension


def _cuobjdump() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = Path(root) / "backends" / "nvidia" / "bin" / "cuobjdump"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "cuobjdump").is_file():
        return str(Path(home) / "bin" / "cuobjdump")
    return None


def _library() -> str:
    from padst_ext import _C

    return _C.__file__


pytestmark = [
    pytest.mark.skipif(not _extension.build_info().get("WITH_CUDA"), reason="built without CUDA"),
    pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (triton wheel, PATH or CUDA_HOME)"),
]


@lru_cache(maxsize=None)
def _sass() -> dict[str, str]:
    """{mangled kernel name: its SASS} of the extension (every architecture it was built for, concatenated)."""
    out = subprocess.run([_cuobjdump(), "-sass", _library()], capture_output=True, text=True, check=True).stdout
    funcs: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            funcs.setdefault(name, "")
        elif name is not None:
            funcs[name] += line + "\n"
    return funcs


@lru_cache(maxsize=None)
def _res_usage() -> dict[str, str]:
    out = subprocess.run([_cuobjdump(), "-res-usage", _library()], capture_output=True, text=True,
                         check=True).stdout
    usage: dict[str, str] = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Function (\S+):", line)
        if m and i + 1 < len(lines):
            usage[m.group(1).rstrip(":")] = lines[i + 1]
    return usage


def _kernels(pattern: str) -> dict[str, str]:
    return {k: v for k, v in _sass().items() if re.search(pattern, k)}


def _opcodes(sass: str) -> list[str]:
    """The opcode (with modifiers) of every instruction, e.g. 'HMMA.16816.F32.BF16', 'LDGSTS.E.BYPASS.128'."""
    ops = []
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops.append(m.group(1))
    return ops


def _problems(sass: str, usage: str | None) -> list[str]:
    ops = _opcodes(sass)
    bad = []
    if not any(o.startswith(("HMMA", "HGMMA")) for o in ops):
        bad.append("no tensor-core instruction (HMMA/HGMMA)")
    if not any(o.startswith(("LDGSTS", "UTMALDG")) or (o.startswith("LDG") and o.endswith(".128")) for o in ops):
        bad.append("no 128-bit or asynchronous global load (LDG.E.128 / LDGSTS / UTMALDG)")
    calls = [o for o in ops if o.startswith("CALL")]
    if calls:
        bad.append(f"{len(calls)} CALL(s) into runtime routines (64-bit integer division / remainder)")
    spills = [o for o in ops if o.startswith(("LDL", "STL"))]
    if spills:
        bad.append(f"{len(spills)} local-memory accesses (register spills): {sorted(set(spills))}")
    if usage is not None:
        m_stack, m_local = re.search(r"STACK:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
        if (m_stack and int(m_stack.group(1))) or (m_local and int(m_local.group(1))):
            bad.append(f"stack / local frame: {usage.strip()}")
    return bad


V2_KERNELS = r"block_(xs|rc|gw)_kernel"


def test_every_v2_kernel_is_built():
    """2 dtypes x (forward, dx) x block sides 16 / 32 / 64 (x-stationary) and 16 / 32 (row-complete); the weight
    gradient for 2 dtypes x 16 / 32."""
    names = _kernels(V2_KERNELS)
    for dtype in ("13__nv_bfloat16", "6__half"):
        for dx in ("Lb0E", "Lb1E"):
            for kind, sides in (("BlockXs", (16, 32, 64)), ("BlockRc", (16, 32))):
                for kb in sides:
                    assert any(f"{kind}I{dtype}{dx}Li{kb}E" in n for n in names), (kind, dtype, dx, kb, sorted(names))
        for kb in (16, 32):
            assert any(f"BlockGwI{dtype}Li{kb}E" in n for n in names), (dtype, kb, sorted(names))


def test_v2_kernels_use_tensor_cores_wide_loads_no_division_no_spills():
    kernels = _kernels(V2_KERNELS)
    assert kernels
    usage = _res_usage()
    failures = {k: p for k, v in kernels.items() if (p := _problems(v, usage.get(k)))}
    assert not failures, "\n".join(f"{k}: {p}" for k, p in failures.items())
    # and the pieces of the design: ldmatrix (LDSM; .MT88, transposed, for dx's weights and both dW operands) and
    # 128-bit stores of output rows (the products; dW writes float partials)
    for k, v in kernels.items():
        ops = set(_opcodes(v))
        assert any(o.startswith("LDSM") for o in ops), k
        if "BlockGw" not in k:
            assert any(o.startswith("STG") and o.endswith(".128") for o in ops), k
        if "Lb1E" in k or "BlockGw" in k:
            assert any(o.startswith("LDSM") and ".MT88" in o for o in ops), k


def test_the_check_catches_what_it_looks_for():
    """The checker is not vacuous: the older block_tc kernel, with its runtime int64 index division and 2-byte loads,
    fails it (its disassembly found 24 calls to the division routine and no 128-bit load)."""
    old = _kernels(r"block_tc_kernel")
    assert old
    usage = _res_usage()
    for k, v in old.items():
        problems = _problems(v, usage.get(k))
        assert any("CALL" in p for p in problems), (k, problems)
        assert any("128-bit" in p for p in problems), (k, problems)


def test_permute_kernel_moves_16_bytes_without_division_or_spills():
    """The cuSPARSELt path's column permutation (csrc/kernels/permute_cols.h): 128-bit loads and stores of rows."""
    kernels = _kernels(r"permute_cols_kernel")
    assert len(kernels) >= 2, sorted(kernels)  # 2- and 4-byte elements
    usage = _res_usage()
    for k, v in kernels.items():
        ops = _opcodes(v)
        assert any(o.startswith("LDG") and o.endswith(".128") for o in ops), k
        assert any(o.startswith("STG") and o.endswith(".128") for o in ops), k
        problems = [p for p in _problems(v, usage.get(k)) if "tensor-core" not in p]
        assert not problems, (k, problems)


def test_rows_v2_reads_16_bytes_and_feeds_fmas_from_16_byte_shared_loads():
    """The v2 row kernels (csrc/kernels/rows_v2.h: N:M, its dx, diagonals, their dW): 128-bit global loads when
    staging x, 128-bit shared loads feeding the FMAs, no division routine, no spills."""
    kernels = _kernels(r"rows_(v2|gw)_kernel")
    # 3 dtypes x 3 batch-tile sizes x (N:M, N:M dx, diagonal; dW: N:M, diagonal)
    assert len(kernels) >= 45, sorted(kernels)
    usage = _res_usage()
    for k, v in kernels.items():
        ops = _opcodes(v)
        assert any(o.startswith("LDG") and o.endswith(".128") for o in ops), k
        assert any(o.startswith("LDS") and o.endswith(".128") for o in ops), k
        assert any(o.startswith("FFMA") for o in ops), k
        problems = [p for p in _problems(v, usage.get(k)) if "tensor-core" not in p]
        assert not problems, (k, problems)
