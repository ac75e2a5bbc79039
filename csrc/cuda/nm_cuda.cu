// N:M structured-sparse forward on CUDA: y = x @ S.T with S stored condensed (values/col_idx [R, K]).
// Deliberately simple (the build/plumbing proof); see nm_cuda.h for the contract. No torch headers here.
#include "nm_cuda.h"

#include <algorithm>

namespace padst::gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);  // round to nearest even
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half(v);
}

// One warp per output element y[b, r]; warps with consecutive ids take consecutive rows r of one batch row b,
// so values/col_idx stream through coalesced (lanes split k) and x[b, :] stays in cache.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    nm_mm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ values, const I* __restrict__ col_idx,
                     const T* __restrict__ bias, T* __restrict__ y, int64_t B, int64_t C, int64_t R, int64_t K) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t total = B * R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; w < total;
       w += stride) {  // w is uniform across the warp, so the full-mask shuffles below are safe
    const int64_t b = w / R;
    const int64_t r = w - b * R;
    const T* xb = x + b * C;
    const T* vr = values + r * K;
    const I* ir = col_idx + r * K;
    A acc = A(0);
    for (int64_t k = lane; k < K; k += kWarp) {
      acc += to_acc(vr[k]) * to_acc(xb[static_cast<int64_t>(ir[k])]);
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    if (lane == 0) {
      if (bias != nullptr) acc += to_acc(bias[r]);
      y[w] = from_acc<T>(acc);
    }
  }
}

}  // namespace

template <typename T, typename I>
cudaError_t nm_mm_forward(const T* x, const T* values, const I* col_idx, const T* bias, T* y, int64_t B, int64_t C,
                          int64_t R, int64_t K, cudaStream_t stream) {
  const int64_t total = B * R;
  if (total <= 0) return cudaSuccess;
  const int64_t blocks_needed = (total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(blocks_needed, int64_t{1} << 20));
  nm_mm_fwd_kernel<T, I><<<blocks, kThreads, 0, stream>>>(x, values, col_idx, bias, y, B, C, R, K);
  return cudaGetLastError();
}

#define PADST_NM_CUDA_INSTANTIATE(T, I)                                                                   \
  template cudaError_t nm_mm_forward<T, I>(const T*, const T*, const I*, const T*, T*, int64_t, int64_t, \
                                           int64_t, int64_t, cudaStream_t);
PADST_NM_CUDA_FOR_EACH_TYPE(PADST_NM_CUDA_INSTANTIATE)
#undef PADST_NM_CUDA_INSTANTIATE

}  // namespace padst::gpu
