// Every padst schema, declared once. Backends register implementations in their own files
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(padst, CPU), csrc/cuda/*_dispatch.cpp with CUDA); the schema strings
// are in csrc/schemas.h;
// fake (meta) kernels and autograd formulas live in python/padst_ext/ops.py.
//
// Conventions (see docs in python/padst_ext/ops.py and the README op table):
//   x [B, C] input, y [B, R] output, S [R, C] the structured weight.
//   in_perm  (optional, a bijection of 0..C-1):  x_p = x[:, in_perm]
//   out_perm (optional, a bijection of 0..R-1):  y   = (x_p @ S.T)[:, out_perm] (+ bias)
//   *_mm_t ops return dx for dy [B, R]; *_sddmm ops return dS on the active pattern only.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(padst, m) {
  // Block-sparse (BSR) weight: values [nnzb, br, bc]; CSR block metadata row_ptr/col_idx and its CSC
  // transpose col_ptr/row_idx_t/blk_t (precomputed, used by the dx kernel).
  m.def(PADST_SCHEMA_BLOCK_MM);
  m.def(PADST_SCHEMA_BLOCK_MM_T);
  // CSC metadata (col_ptr, row_idx_t, blk_t) of a CSR block pattern, rebuilt only when the pattern changes.
  m.def(PADST_SCHEMA_BLOCK_TRANSPOSE_META);
  m.def(PADST_SCHEMA_BLOCK_SDDMM);

  // N:M along the input dimension, condensed: values/col_idx [R, C*n/m]. An input permutation is folded
  // into col_idx (col_idx = perm[logical index]), so these ops take none.
  m.def(PADST_SCHEMA_NM_MM);
  m.def(PADST_SCHEMA_NM_MM_T);
  m.def(PADST_SCHEMA_NM_SDDMM);

  // Wrap-around diagonals: values [K, min(R, C)], offsets [K] in [0, max(R, C)).
  m.def(PADST_SCHEMA_DIAG_MM);
  m.def(PADST_SCHEMA_DIAG_MM_T);
  m.def(PADST_SCHEMA_DIAG_SDDMM);

  // Dense weight gradient in the permuted frame, dy[:, inv(out_perm)].T @ x[:, in_perm]: RigL's grow score.
  m.def(PADST_SCHEMA_DENSE_GRAD);
}
