// Every padst schema, declared once. Backends register implementations in their own files
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(padst, CPU), csrc/cuda/*_dispatch.cpp with CUDA);
// fake (meta) kernels and autograd formulas live in python/padst_ext/ops.py.
//
// Conventions (see docs in python/padst_ext/ops.py and the README op table):
//   x [B, C] input, y [B, R] output, S [R, C] the structured weight.
//   in_perm  (optional, a bijection of 0..C-1):  x_p = x[:, in_perm]
//   out_perm (optional, a bijection of 0..R-1):  y   = (x_p @ S.T)[:, out_perm] (+ bias)
//   *_mm_t ops return dx for dy [B, R]; *_sddmm ops return dS on the active pattern only.
#include <torch/library.h>

TORCH_LIBRARY(padst, m) {
  // Block-sparse (BSR) weight: values [nnzb, br, bc]; CSR block metadata row_ptr/col_idx and its CSC
  // transpose col_ptr/row_idx_t/blk_t (precomputed, used by the dx kernel).
  m.def(
      "block_mm(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, Tensor row_idx_t, "
      "Tensor blk_t, Tensor? bias=None, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor");
  m.def(
      "block_mm_t(Tensor dy, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, Tensor row_idx_t, "
      "Tensor blk_t, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor");
  // CSC metadata (col_ptr, row_idx_t, blk_t) of a CSR block pattern, rebuilt only when the pattern changes.
  m.def("block_transpose_meta(Tensor row_ptr, Tensor col_idx, int num_block_cols) -> (Tensor, Tensor, Tensor)");
  m.def(
      "block_sddmm(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, int block_rows, int block_cols, "
      "Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor");

  // N:M along the input dimension, condensed: values/col_idx [R, C*n/m]. An input permutation is folded
  // into col_idx (col_idx = perm[logical index]), so these ops take none.
  m.def("nm_mm(Tensor x, Tensor values, Tensor col_idx, int n, int m, Tensor? bias=None) -> Tensor");
  m.def("nm_mm_t(Tensor dy, Tensor values, Tensor col_idx, int n, int m) -> Tensor");
  m.def("nm_sddmm(Tensor dy, Tensor x, Tensor col_idx, int n, int m) -> Tensor");

  // Wrap-around diagonals: values [K, min(R, C)], offsets [K] in [0, max(R, C)).
  m.def(
      "diag_mm(Tensor x, Tensor values, Tensor offsets, int out_features, Tensor? bias=None, "
      "Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor");
  m.def(
      "diag_mm_t(Tensor dy, Tensor values, Tensor offsets, int in_features, Tensor? in_perm=None, "
      "Tensor? out_perm=None) -> Tensor");
  m.def("diag_sddmm(Tensor dy, Tensor x, Tensor offsets, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor");

  // Dense weight gradient in the permuted frame, dy[:, inv(out_perm)].T @ x[:, in_perm]: RigL's grow score.
  m.def("dense_grad(Tensor dy, Tensor x, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor");
}
