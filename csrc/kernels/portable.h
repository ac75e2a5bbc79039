// Building blocks shared by the CUDA kernels and their host emulation.
//
// Every CUDA kernel of padst_ext is written as a "CTA body": plain functions of (block index, thread index)
// split into phases, with a __syncthreads() between phases on the device. The same bodies compile with the
// host C++ compiler, where csrc/kernels/emulate.h runs them thread by thread, phase by phase, over the whole
// grid. The index and tile logic of every kernel (BSR traversal with the permutation, N:M index folding and
// its transpose, diagonal addressing, batch splits) is therefore executed and tested on machines without a
// GPU (tests/test_cuda_emulation.py); only the launch itself and __syncthreads() are device-only.
//
// No CUDA or ATen headers here: the .cu files include this with nvcc, the emulation with the host compiler.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PADST_HD __host__ __device__ __forceinline__
#define PADST_UNROLL _Pragma("unroll")
#else
#define PADST_HD inline
#define PADST_UNROLL
#endif

namespace padst::kern {

// Numeric traits: the accumulation type and conversions. Specialised for float/double here, for the 16-bit
// types in csrc/cuda/device_types.cuh (__nv_bfloat16, __half) and csrc/emu/host_types.h (c10 types).
template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  PADST_HD static float to_acc(float v) { return v; }
  PADST_HD static float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  PADST_HD static double to_acc(double v) { return v; }
  PADST_HD static double from_acc(double v) { return v; }
};

template <typename T>
using acc_t = typename Num<T>::acc;

PADST_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
PADST_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
// Non-negative remainder for a in (-m, 2m): the diagonal offsets are validated to lie in [0, max(R, C)).
PADST_HD int64_t wrap(int64_t a, int64_t m) { return a >= m ? a - m : (a < 0 ? a + m : a); }

}  // namespace padst::kern
