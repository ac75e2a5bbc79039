// Plain C++ interface of the N:M CUDA kernels (csrc/cuda/nm_cuda.cu).
//
// No torch/ATen here: the .cu files stay free of ATen headers (a .cu that includes ATen costs ~30-40 s to
// compile, the same kernels without it ~5 s). Dtype dispatch, device guards, streams and op registration
// live in csrc/cuda/cuda_dispatch.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace padst::gpu {

// N:M forward, condensed layout:
//   x [B, C], values [R, K], col_idx [R, K] with entries in [0, C), bias [R] or nullptr, y [B, R]:
//   y[b, r] = sum_k values[r, k] * x[b, col_idx[r, k]] (+ bias[r])
// All arrays dense row-major (contiguous), on the current device; indices already validated.
// Accumulates in float for float / bfloat16 / half and in double for double.
// Enqueues on `stream` and returns the launch status (cudaGetLastError()).
template <typename T, typename I>
cudaError_t nm_mm_forward(const T* x, const T* values, const I* col_idx, const T* bias, T* y, int64_t B, int64_t C,
                          int64_t R, int64_t K, cudaStream_t stream);

#define PADST_NM_CUDA_FOR_EACH_TYPE(X) \
  X(float, int32_t)                    \
  X(float, int64_t)                    \
  X(double, int32_t)                   \
  X(double, int64_t)                   \
  X(__nv_bfloat16, int32_t)            \
  X(__nv_bfloat16, int64_t)            \
  X(__half, int32_t)                   \
  X(__half, int64_t)

#define PADST_NM_CUDA_EXTERN(T, I)                                                                              \
  extern template cudaError_t nm_mm_forward<T, I>(const T*, const T*, const I*, const T*, T*, int64_t, int64_t, \
                                                  int64_t, int64_t, cudaStream_t);
PADST_NM_CUDA_FOR_EACH_TYPE(PADST_NM_CUDA_EXTERN)
#undef PADST_NM_CUDA_EXTERN

}  // namespace padst::gpu
