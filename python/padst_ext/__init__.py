"""padst_ext: permutation-augmented dynamic sparse training (PA-DST) for PyTorch.

Every sparse linear layer computes ``y = S Π x``: a structured sparse weight ``S`` (block, N:M or diagonal)
composed with one learned permutation ``Π``, fused into the kernels.
"""

from . import _extension

_extension.load()

from . import formats, ops, reference  # noqa: E402

__version__ = "0.1.0"
WITH_CUDA = _extension.WITH_CUDA

__all__ = ["formats", "ops", "reference", "WITH_CUDA", "__version__"]
