// CUDA backend registration of the padst kernel ops. The implementations (validation, metadata upload, dtype
// dispatch, device guard, current stream, launch status checks) are in csrc/cuda/host_dispatch.h, shared with the
// host emulation, and csrc/cuda/cuda_backend.h; the kernels live in ATen-free .cu files behind plain C++ launchers
// (csrc/cuda/launch.h).
#include <torch/library.h>

#include "cuda/cuda_backend.h"

namespace padst::gpu {
namespace {

// Metadata op: computed on the host (it is O(nnz_blocks) and runs only when the pattern changes), returned on
// the device of the input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_transpose_meta_cuda(const at::Tensor& row_ptr,
                                                                          const at::Tensor& col_idx,
                                                                          int64_t num_block_cols) {
  static const auto cpu_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("padst::block_transpose_meta", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                     const at::Tensor&, const at::Tensor&, int64_t)>();
  TORCH_CHECK_VALUE(col_idx.device() == row_ptr.device(), "padst::block_transpose_meta: col_idx is on ",
                    col_idx.device(), " but row_ptr is on ", row_ptr.device());
  auto [cp, ri, bt] = cpu_op.call(row_ptr.cpu(), col_idx.cpu(), num_block_cols);
  const auto dev = row_ptr.device();
  return {cp.to(dev), ri.to(dev), bt.to(dev)};
}

}  // namespace
}  // namespace padst::gpu

TORCH_LIBRARY_IMPL(padst, CUDA, m) {
  namespace I = padst::impl;
  m.impl("block_mm", &I::block_mm<false>);
  m.impl("block_mm_t", &I::block_mm_t<false>);
  m.impl("block_sddmm", &I::block_sddmm<false>);
  m.impl("block_transpose_meta", &padst::gpu::block_transpose_meta_cuda);
  m.impl("nm_mm", &I::nm_mm<false>);
  m.impl("nm_mm_t", &I::nm_mm_t<false>);
  m.impl("nm_sddmm", &I::nm_sddmm<false>);
  m.impl("diag_mm", &I::diag_mm<false>);
  m.impl("diag_mm_t", &I::diag_mm_t<false>);
  m.impl("diag_sddmm", &I::diag_sddmm<false>);
}
