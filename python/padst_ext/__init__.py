"""padst_ext: permutation-augmented dynamic sparse training (PA-DST) for PyTorch.

Every sparse linear layer computes ``y = S Π x``: a structured sparse weight ``S`` (block, N:M or diagonal)
composed with one learned permutation ``Π``, fused into the kernels.
"""

from . import _extension

_extension.load()

from . import formats, ops, permutation, reference, structures  # noqa: E402
from . import nn  # noqa: E402
from .nn import (SparseLinear, export, harden_all, param_groups, permutation_parameters,  # noqa: E402
                 permutation_penalty, permutation_report, sparsify)
from . import dst  # noqa: E402
from . import semi_structured  # noqa: E402
from . import tuning  # noqa: E402
from .dst import DST  # noqa: E402
from . import distributed  # noqa: E402

__version__ = "0.1.0"
tuning._setup_from_env()
WITH_CUDA = _extension.WITH_CUDA

__all__ = ["formats", "ops", "permutation", "reference", "structures", "nn", "dst", "semi_structured", "tuning", "distributed", "DST", "SparseLinear", "sparsify", "export",
           "harden_all", "permutation_penalty", "permutation_parameters", "permutation_report", "param_groups", "WITH_CUDA", "__version__"]
