"""The build: which kernels are registered, and the import-time torch check."""

from __future__ import annotations

import pytest
import torch

import padst_ext
from padst_ext import _extension

OPS = ["block_mm", "block_mm_t", "block_sddmm", "block_transpose_meta", "nm_mm", "nm_mm_t", "nm_sddmm", "diag_mm", "diag_mm_t",
       "diag_sddmm", "dense_grad"]
# The CUDA kernels this build provides so far (the full CUDA set is a separate issue).
CUDA_OPS = ["nm_mm", "dense_grad"]


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
