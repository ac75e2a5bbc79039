// CUDA backend registration for padst ops: dtype dispatch, device guard, stream, launch check.
// Kernels live in ATen-free .cu files (csrc/cuda/*.cu) behind plain C++ launchers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cuda/nm_cuda.h"

namespace padst::gpu {
namespace {

// ATen scalar type -> the CUDA type the kernels are instantiated for (same size and bit layout).
template <typename T>
struct DeviceType {
  using type = T;
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

template <typename D, typename T>
const D* ptr(const at::Tensor& t) {
  return reinterpret_cast<const D*>(t.const_data_ptr<T>());
}

at::Tensor nm_mm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx, int64_t n, int64_t m,
                      const std::optional<at::Tensor>& bias) {
  check_nm_mm_args(x, values, col_idx, bias, n, m);
  TORCH_CHECK_VALUE(x.is_cuda(), "padst::nm_mm: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor xc = x.contiguous();
  const at::Tensor vc = values.contiguous();
  const at::Tensor ic = col_idx.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const int64_t B = xc.size(0), C = xc.size(1), R = vc.size(0), K = vc.size(1);

  at::Tensor y = at::empty({B, R}, xc.options());
  if (y.numel() == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "padst::nm_mm (CUDA)", [&] {
    using D = typename DeviceType<scalar_t>::type;
    AT_DISPATCH_INDEX_TYPES(ic.scalar_type(), "padst::nm_mm (CUDA)", [&] {
      const cudaError_t status = nm_mm_forward<D, index_t>(
          ptr<D, scalar_t>(xc), ptr<D, scalar_t>(vc), ic.const_data_ptr<index_t>(),
          bc.has_value() ? ptr<D, scalar_t>(*bc) : nullptr, reinterpret_cast<D*>(y.mutable_data_ptr<scalar_t>()), B,
          C, R, K, stream);
      C10_CUDA_CHECK(status);  // launch configuration errors; asynchronous faults surface at the next sync
    });
  });
  return y;
}

}  // namespace
}  // namespace padst::gpu

TORCH_LIBRARY_IMPL(padst, CUDA, m) { m.impl("nm_mm", &padst::gpu::nm_mm_cuda); }
