// Backend<false> of the CUDA host layer (host_dispatch.h): every kernel is launched on the GPU, on the current
// stream of the data's device, through the ATen-free launchers of launch.h; the launch status is checked.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "cuda/host_dispatch.h"
#include "cuda/launch.h"

namespace padst::impl {

template <typename S>
struct DeviceType {
  using type = S;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) && sizeof(at::Half) == sizeof(__half));

template <>
struct Backend<false> {
  template <typename S>
  using type = typename DeviceType<S>::type;
  struct Guard {
    explicit Guard(const at::Tensor& t) : g(t.device()) {}
    c10::cuda::CUDAGuard g;
  };
  static void check_device(const char* op, const char* what, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.is_cuda(), op, ": the CUDA kernel got ", what, " on ", t.device());
  }
  template <typename T, typename E>
  static void gather_mm(const kern::GatherMmParams<T, E>& p) {
    C10_CUDA_CHECK(gpu::gather_mm(p, at::cuda::getCurrentCUDAStream()));
  }
  template <typename T, typename F>
  static void sddmm(kern::SddmmParams<T, F> p, const at::Tensor& ref) {
    kern::Sddmm<T, F>::plan(p);
    const auto acc = std::is_same_v<kern::acc_t<T>, double> ? at::kDouble : at::kFloat;
    auto partial = at::empty({p.splits * p.nnz}, ref.options().dtype(acc));
    p.partial = reinterpret_cast<kern::acc_t<T>*>(partial.mutable_data_ptr());
    C10_CUDA_CHECK(gpu::sddmm(p, at::cuda::getCurrentCUDAStream()));
  }
  template <typename T, bool kDx, int kOut16>
  static void block_tc(const kern::BlockTcParams<T>& p) {
    C10_CUDA_CHECK((gpu::block_tc<T, kDx, kOut16>(p, at::cuda::getCurrentCUDAStream())));
  }
  template <typename T, bool kDx, int kB>
  static void block_xs(const kern::BlockXsParams<T>& p) {
    C10_CUDA_CHECK((gpu::block_xs<T, kDx, kB>(p, at::cuda::getCurrentCUDAStream())));
  }
  template <typename T, bool kDx, int kB>
  static void block_rc(const kern::BlockRcParams<T>& p) {
    C10_CUDA_CHECK((gpu::block_rc<T, kDx, kB>(p, at::cuda::getCurrentCUDAStream())));
  }
  template <typename T, int kB>
  static void block_gw(kern::BlockGwParams<T> p, int64_t max_row_blocks, const at::Tensor& ref) {
    kern::BlockGw<T, kB>::plan(p, max_row_blocks);
    const int64_t n = static_cast<int64_t>(p.splits) * p.nnzb * kB * kB;
    at::Tensor partial = at::empty({n}, ref.options().dtype(at::kFloat));
    p.partial = partial.mutable_data_ptr<float>();
    C10_CUDA_CHECK((gpu::block_gw<T, kB>(p, at::cuda::getCurrentCUDAStream())));
  }
  static int64_t block_v2_max_smem() { return gpu::block_v2_max_smem(); }
  template <typename T, typename E>
  static void rows_v2(const kern::RowsV2Params<T, E>& p) {
    C10_CUDA_CHECK((gpu::rows_v2<T, E>(p, at::cuda::getCurrentCUDAStream())));
  }
  template <typename T, typename E>
  static void rows_gw(kern::RowsGwParams<T, E> p, const at::Tensor& ref) {
    switch (kern::rows_v2_tile(p.C)) {  // the batch-tile size only matters for the split plan's minimum chunk
      case 32: kern::RowsGw<T, E, 32>::plan(p); break;
      case 16: kern::RowsGw<T, E, 16>::plan(p); break;
      default: kern::RowsGw<T, E, 8>::plan(p); break;
    }
    at::Tensor partial = at::empty({static_cast<int64_t>(p.splits) * p.nnz}, ref.options().dtype(at::kFloat));
    p.partial = partial.mutable_data_ptr<float>();
    C10_CUDA_CHECK((gpu::rows_gw<T, E>(p, at::cuda::getCurrentCUDAStream())));
  }
  template <typename T>
  static void block_sddmm_tc(kern::BlockSddmmTcParams<T> p, const at::Tensor& ref) {
    kern::BlockSddmmTc<T>::plan(p);
    at::Tensor partial = at::empty({p.splits * p.nnzb * p.br * p.bc}, ref.options().dtype(at::kFloat));
    p.partial = partial.mutable_data_ptr<float>();
    C10_CUDA_CHECK(gpu::block_sddmm_tc<T>(p, at::cuda::getCurrentCUDAStream()));
  }
  static std::pair<at::Tensor, at::Tensor> nm_transpose(const at::Tensor& col_idx64, int64_t C) {
    const int64_t nnz = col_idx64.numel();
    TORCH_CHECK_VALUE(nnz <= std::numeric_limits<int>::max(), "padst::nm_mm_t: the CUDA transpose sorts at most ",
                      std::numeric_limits<int>::max(), " indices (cub), got ", nnz);
    auto opts = col_idx64.options();
    auto keys = at::empty({nnz}, opts), ent_in = at::empty({nnz}, opts), ent = at::empty({nnz}, opts);
    auto ptr = at::empty({C + 1}, opts);
    const size_t bytes = gpu::nm_transpose_temp_bytes(nnz, C);
    auto temp = at::empty({static_cast<int64_t>(bytes) + 1}, opts.dtype(at::kByte));
    C10_CUDA_CHECK(gpu::nm_transpose(col_idx64.const_data_ptr<int64_t>(), nnz, C, keys.mutable_data_ptr<int64_t>(),
                                     ent_in.mutable_data_ptr<int64_t>(), ent.mutable_data_ptr<int64_t>(),
                                     ptr.mutable_data_ptr<int64_t>(), temp.mutable_data_ptr(), bytes,
                                     at::cuda::getCurrentCUDAStream()));
    return {ent, ptr};
  }
};

}  // namespace padst::impl
