// Argument validation shared by every backend of every padst op.
//
// Each op validates its metadata in full before touching data: a malformed index would otherwise be an
// out-of-bounds read (a crash) or, worse, a silently wrong answer. Metadata is small next to the data
// (O(nnz_blocks + R + C) for block/diagonal, one pass over the N:M indices), so checking it on every call
// costs little. Messages name the op, the argument and the offending value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace padst {

// Exported from padst_ext._C for the emulation module (export.h).
#pragma GCC visibility push(default)

// Everything below throws c10::Error subclasses that Python sees as ValueError / TypeError / IndexError.

// x must be a 2-D floating tensor; returns nothing, throws with `what` in the message.
void check_matrix(const char* op, const char* what, const at::Tensor& t);
void check_same_dtype(const char* op, const char* what, const at::Tensor& t, const at::Tensor& ref);
void check_same_device(const char* op, const char* what, const at::Tensor& t, const at::Tensor& ref);
void check_index_tensor(const char* op, const char* what, const at::Tensor& t, int64_t dim);
void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& ref, int64_t n);

// A validated permutation of 0..n-1 held on the CPU as int64, with its inverse.
// `fwd` is the identity when the optional tensor is absent.
struct Perm {
  std::vector<int64_t> fwd;
  std::vector<int64_t> inv;
  std::vector<int32_t> fwd32, inv32;  // the same as int32, for the CPU kernels' vector gathers (empty when identity)
  bool identity = true;
  size_t bytes() const {
    return (fwd.size() + inv.size()) * sizeof(int64_t) + (fwd32.size() + inv32.size()) * sizeof(int32_t);
  }
};
inline size_t nbytes(const at::Tensor& t) { return t.defined() ? t.nbytes() : 0; }
Perm check_perm(const char* op, const char* what, const std::optional<at::Tensor>& perm, int64_t n,
                const at::Tensor& ref);

// Block-sparse (BSR) metadata, validated and held as int64 CPU tensors.
//   row_ptr [R/br + 1], col_idx [nnzb]: CSR over blocks, col_idx strictly increasing within a block-row
//   col_ptr [C/bc + 1], row_idx_t [nnzb], blk_t [nnzb]: the same pattern in CSC order; blk_t[p] is the
//   index (into values / col_idx) of the p-th block in column-major order.
struct BlockMeta {
  int64_t R = 0, C = 0, br = 0, bc = 0, nbr = 0, nbc = 0, nnzb = 0;
  at::Tensor row_ptr, col_idx, col_ptr, row_idx_t, blk_t;  // int64, contiguous, CPU
  at::Tensor blk_row;  // [nnzb] block-row of each block (derived)
  size_t bytes() const {
    return nbytes(row_ptr) + nbytes(col_idx) + nbytes(col_ptr) + nbytes(row_idx_t) + nbytes(blk_t) + nbytes(blk_row);
  }
};
// Validates the CSR part; C is the number of input features.
BlockMeta check_block_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t br,
                          int64_t bc, int64_t R, int64_t C, const at::Tensor& ref);
// Also validates the CSC part against the CSR part (same pattern, blk_t a bijection).
void check_block_csc(const char* op, BlockMeta& meta, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                     const at::Tensor& blk_t);

// N:M: validates n, m, shapes and that every index lies in [0, C). Works on any device.
void check_nm(const char* op, const at::Tensor& values_or_grad, const at::Tensor& col_idx, int64_t n, int64_t m,
              int64_t R, int64_t C, const at::Tensor& ref);
void check_nm_mm_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                      const std::optional<at::Tensor>& bias, int64_t n, int64_t m);

// Diagonal: offsets [K] in [0, max(R, C)); returns them as int64 CPU.
at::Tensor check_diag_offsets(const char* op, const at::Tensor& offsets, int64_t R, int64_t C, const at::Tensor& ref);

// Block ops: validates row_ptr (1-D, non-empty) and the CSR pattern for blocks br x bc with C input features.
BlockMeta block_setup(const char* op, const at::Tensor& ref, int64_t br, int64_t bc, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, int64_t C);
// values [nnz_blocks, br, bc] with the dtype and device of ref.
void check_block_values(const char* op, const at::Tensor& values, const at::Tensor& ref);
// values [K, min(R, C)] with the dtype and device of ref, one offset per diagonal.
void check_diag_values(const char* op, const at::Tensor& values, const at::Tensor& offsets, int64_t R, int64_t C,
                       const at::Tensor& ref);

// ---------------------------------------------------------------------------------------------------------
// Whole-op validation, shared by every backend (the caller checks the device kind itself). Each returns the
// validated metadata the kernels need, on the CPU.
// ---------------------------------------------------------------------------------------------------------
// dy [B, R] and x [B, C] of a weight-gradient op: matrices of one dtype and device with the same batch.
void check_grad_pair(const char* op, const at::Tensor& dy, const at::Tensor& x);

struct BlockProblem {
  BlockMeta m;
  Perm pin, pout;
  size_t bytes() const { return m.bytes() + pin.bytes() + pout.bytes(); }
};
BlockProblem validate_block_mm(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                               const at::Tensor& blk_t, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm);
BlockProblem validate_block_mm_t(const char* op, const at::Tensor& dy, const at::Tensor& values,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                 const at::Tensor& row_idx_t, const at::Tensor& blk_t,
                                 const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm);
BlockProblem validate_block_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, int64_t block_rows, int64_t block_cols,
                                  const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm);

struct NmProblem {
  int64_t R = 0, C = 0, K = 0;
};
NmProblem validate_nm_mm_t(const char* op, const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_idx,
                           int64_t n, int64_t m);
NmProblem validate_nm_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& col_idx,
                            int64_t n, int64_t m);

struct DiagProblem {
  at::Tensor off;  // int64 CPU
  Perm pin, pout;
  int64_t R = 0, C = 0;
  size_t bytes() const { return nbytes(off) + pin.bytes() + pout.bytes(); }
};
DiagProblem validate_diag_mm(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets,
                             int64_t out_features, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm);
DiagProblem validate_diag_mm_t(const char* op, const at::Tensor& dy, const at::Tensor& values,
                               const at::Tensor& offsets, int64_t in_features, const std::optional<at::Tensor>& in_perm,
                               const std::optional<at::Tensor>& out_perm);
DiagProblem validate_diag_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm);

#pragma GCC visibility pop

}  // namespace padst
