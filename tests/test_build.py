"""The build: which kernels are registered, and the import-time torch check."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import padst_ext
from padst_ext import _extension

OPS = ["block_mm", "block_mm_t", "block_sddmm", "block_transpose_meta", "nm_mm", "nm_mm_t", "nm_sddmm", "diag_mm", "diag_mm_t",
       "diag_sddmm", "dense_grad"]
# Every op with a CUDA kernel (seen registered on an H200 by benchmarks/gpu_suite.sh).
CUDA_OPS = ["block_mm", "block_mm_t", "block_sddmm", "nm_mm", "nm_mm_t", "nm_sddmm", "diag_mm", "diag_mm_t",
            "diag_sddmm", "dense_grad"]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"padst::{op}", key)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert has_kernel(op, "CPU")


@pytest.mark.parametrize("op", ["block_mm", "nm_mm", "diag_mm"])
def test_autograd_registered(op):
    assert has_kernel(op, "Autograd") or has_kernel(op, "AutogradCPU")


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_registered(op):
    if not padst_ext.WITH_CUDA:
        pytest.skip("padst_ext was built without CUDA")
    assert has_kernel(op, "CUDA"), f"padst::{op} has no CUDA kernel although the build has CUDA"


def test_build_info_matches_running_torch():
    info = _extension.build_info()
    assert info["TORCH_VERSION"] == torch.__version__
    assert info["WITH_CUDA"] == padst_ext.WITH_CUDA
    if info["WITH_CUDA"]:
        assert torch.version.cuda is not None


def test_mismatched_torch_gives_readable_error(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension._info, "TORCH_VERSION", "1.0.0+cpu")
    with pytest.raises(ImportError, match=r"(?s)built against torch 1\.0\.0\+cpu.*pip install --no-build-isolation"):
        _extension.load()


EMU_OPS = ["block_mm", "block_mm_t", "block_sddmm", "nm_mm", "nm_mm_t", "nm_sddmm", "diag_mm", "diag_mm_t", "diag_sddmm"]


def test_import_does_not_load_the_emulation():
    """The padst_emu ops (the CUDA path emulated on the host, for tests) live in padst_ext._emu, which `import
    padst_ext` does not load: a fresh interpreter has none of them until load_emulation() is called."""
    script = textwrap.dedent("""
        import sys
        import torch
        import padst_ext
        from padst_ext import _extension

        def emu_ops():
            return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("padst_emu::"))

        assert "padst_ext._emu" not in sys.modules, "import padst_ext loaded padst_ext._emu"
        assert emu_ops() == [], f"import padst_ext registered {emu_ops()}"
        module = _extension.load_emulation()
        assert sys.modules["padst_ext._emu"] is module and _extension.load_emulation() is module
        print(" ".join(emu_ops()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    registered = res.stdout.split()
    assert [op for op in EMU_OPS if f"padst_emu::{op}" not in registered] == [], registered


def test_missing_emulation_gives_readable_error(monkeypatch):
    import_module = importlib.import_module

    def without_emu(name, *args, **kwargs):
        if name == "padst_ext._emu":
            raise ImportError("simulated: _emu.so not found")
        return import_module(name, *args, **kwargs)

    monkeypatch.setattr(_extension, "_emulation", None)
    monkeypatch.setattr(importlib, "import_module", without_emu)
    with pytest.raises(ImportError, match=r"(?s)padst_ext\._emu\) failed to load.*simulated.*--no-build-isolation"):
        _extension.load_emulation()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic section: Linux only")
@pytest.mark.parametrize("module", ["padst_ext._C", "padst_ext._emu"])
def test_extension_uses_the_shared_cxx_runtime(module):
    """_C (and _emu) must bind to the process's libstdc++.so.6, never carry a static copy: a private libstdc++ beside
    torch's crashed formatting any integer into an error message (seen with a GCC that has no shared libstdc++)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    so = importlib.util.find_spec(module).origin
    dynamic = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic, f"{so} does not link libstdc++.so dynamically:\n{dynamic}"
    symbols = subprocess.run([readelf, "-sW", so], capture_output=True, text=True, check=True).stdout
    # std::ostream::_M_insert<long>: in the shared runtime it is an undefined (UND) import, in a static copy defined
    carried = [ln for ln in symbols.splitlines() if "_ZNSo9_M_insertIlEERSoT_" in ln and " UND " not in ln]
    assert not carried, f"{so} carries its own libstdc++ code: {carried}"
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        torch.ops.padst._lt24_lru_trace(0, [1])  # an integer formatted into a message by the extension
