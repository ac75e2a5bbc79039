// The SIMD vector of the vectorised CPU kernels (rows_mm.h, rows_dw.h, block_mm.h, block_mm_mr.h, block_dw.h,
// diag_mm.h): VW floats, 4 (SSE2), 8 (AVX2) or 16 (AVX-512), as a GCC/Clang vector extension. Those kernels serve
// float32, bfloat16 and float16 data with float accumulation (float64 keeps the scalar kernels of block.cpp, nm.cpp
// and diagonal.cpp); their bodies are always-inline templates on VW, compiled once per ISA by dispatch_isa (isa.h).
// Permuted outputs are written back by gathering from a row / tile buffer, never scattered value by value.
#pragma once

#include <cstdint>
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
  // Every lane s (+0 for s = -0). It costs a scalar add before the broadcast (adding +0 is not an identity for -0,
  // and the other spellings GCC turns into lane-by-lane inserts): hot loops multiply by the scalar instead
  // (`v * s`), which GCC compiles to a broadcast folded into the load.
  static PADST_ALWAYS_INLINE V bcast(float s) { return V{} + s; }
  static PADST_ALWAYS_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

// out[j * ldo + i] = a[i * lda + j] for an 8x8 tile of floats: three butterfly stages of two-vector shuffles (32-bit
// pairs, 64-bit, 128-bit), the way AVX code transposes (unpack, shuffle, permute2f128); compiled per ISA by inlining.
PADST_ALWAYS_INLINE void transpose8x8(const float* a, int64_t lda, float* o, int64_t ldo) {
  f32x8 r[8], s[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], a + i * lda, sizeof(f32x8));
  for (int i = 0; i < 8; i += 2) {
    s[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
    s[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int h = 0; h < 8; h += 4) {   // rows h .. h+3
    for (int c = 0; c < 2; ++c) {    // even (s[h], s[h+2]) / odd (s[h+1], s[h+3]) columns
      u[h + c] = __builtin_shufflevector(s[h + c], s[h + c + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[h + c + 2] = __builtin_shufflevector(s[h + c], s[h + c + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  // u[k] (k < 4) holds rows 0-3 of columns k and k+4, u[k+4] rows 4-7 of them (k: 0 -> 0/4, 1 -> 1/5, 2 -> 2/6, 3 -> 3/7)
  for (int k = 0; k < 4; ++k) {
    const f32x8 lo = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const f32x8 hi = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(o + k * ldo, &lo, sizeof(f32x8));
    std::memcpy(o + (k + 4) * ldo, &hi, sizeof(f32x8));
  }
}

}  // namespace padst::cpu::rk
