// The SIMD vector of the vectorised CPU kernels (rows_mm.h, rows_dw.h, block_mm.h, block_mm_mr.h, block_dw.h,
// diag_mm.h): VW floats, 4 (SSE2), 8 (AVX2) or 16 (AVX-512), as a GCC/Clang vector extension. Those kernels serve
// float32, bfloat16 and float16 data with float accumulation (float64 keeps the scalar kernels of block.cpp, nm.cpp
// and diagonal.cpp); their bodies are always-inline templates on VW, compiled once per ISA by dispatch_isa (isa.h).
// Permuted outputs are written back by gathering from a row / tile buffer, never scattered value by value.
#pragma once

#include <cstring>

#include "isa.h"

namespace padst::cpu::rk {

// GCC/Clang vector extensions (the vector_size attribute is not applied to a dependent alias, hence the
// concrete typedefs).
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
template <int VW>
struct VecType;
template <>
struct VecType<4> {
  using type = f32x4;
};
template <>
struct VecType<8> {
  using type = f32x8;
};
template <>
struct VecType<16> {
  using type = f32x16;
};

template <int VW>
struct Vec {
  using V = typename VecType<VW>::type;
  static_assert(sizeof(V) == VW * sizeof(float));
  static PADST_ALWAYS_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static PADST_ALWAYS_INLINE V bcast(float s) { return V{} + s; }
  static PADST_ALWAYS_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

}  // namespace padst::cpu::rk
