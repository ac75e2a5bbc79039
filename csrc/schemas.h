// The schema of every padst op, written once. csrc/ops.cpp declares them in the `padst` library;
// csrc/emu/emu_ops.cpp declares the kernel ops again in `padst_emu`, the host emulation of the CUDA kernels
// (tests only), so both libraries take exactly the same arguments.
#pragma once

#define PADST_SCHEMA_BLOCK_MM                                                                              \
  "block_mm(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, Tensor row_idx_t, " \
  "Tensor blk_t, Tensor? bias=None, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor"
#define PADST_SCHEMA_BLOCK_MM_T                                                                              \
  "block_mm_t(Tensor dy, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, Tensor row_idx_t, " \
  "Tensor blk_t, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor"
#define PADST_SCHEMA_BLOCK_TRANSPOSE_META \
  "block_transpose_meta(Tensor row_ptr, Tensor col_idx, int num_block_cols) -> (Tensor, Tensor, Tensor)"
#define PADST_SCHEMA_BLOCK_SDDMM                                                                   \
  "block_sddmm(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, int block_rows, int block_cols, " \
  "Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor"

#define PADST_SCHEMA_NM_MM "nm_mm(Tensor x, Tensor values, Tensor col_idx, int n, int m, Tensor? bias=None) -> Tensor"
#define PADST_SCHEMA_NM_MM_T "nm_mm_t(Tensor dy, Tensor values, Tensor col_idx, int n, int m) -> Tensor"
#define PADST_SCHEMA_NM_SDDMM "nm_sddmm(Tensor dy, Tensor x, Tensor col_idx, int n, int m) -> Tensor"

#define PADST_SCHEMA_DIAG_MM                                                                 \
  "diag_mm(Tensor x, Tensor values, Tensor offsets, int out_features, Tensor? bias=None, " \
  "Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor"
#define PADST_SCHEMA_DIAG_MM_T                                                                \
  "diag_mm_t(Tensor dy, Tensor values, Tensor offsets, int in_features, Tensor? in_perm=None, " \
  "Tensor? out_perm=None) -> Tensor"
#define PADST_SCHEMA_DIAG_SDDMM \
  "diag_sddmm(Tensor dy, Tensor x, Tensor offsets, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor"

#define PADST_SCHEMA_DENSE_GRAD \
  "dense_grad(Tensor dy, Tensor x, Tensor? in_perm=None, Tensor? out_perm=None) -> Tensor"
