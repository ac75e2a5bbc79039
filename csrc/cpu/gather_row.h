// One permuted output row: o[j] = z[g[j]] (+ bias[j]) for j < n, float32, with 32-bit indices. The block and
// diagonal kernels collect a permuted output's rows in a buffer (L1/L2) and write each row back by gathering
// (tiles.h: write_row). The scalar loop costs about two cycles per value (index load, dependent load, store); AVX2
// and AVX-512 gather 8 or 16 values per instruction and store whole vectors: on the Xeon, block32 fc2 90% (output
// permuted) 6-9% faster than the scalar write-back, about half of what the permuted output cost over the identity.
// Written with intrinsics in target-attributed functions, one overload per ISA tag (as gather_dot.h).
#pragma once

#include <cstdint>

#include "isa.h"

#if PADST_X86_DISPATCH
#include <immintrin.h>
#endif

namespace padst::cpu::gr {

inline void gather_row(IsaTag<Isa::kBase>, float* o, const float* z, const int32_t* g, const float* bias,
                       int64_t n) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) o[j] = z[g[j]] + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) o[j] = z[g[j]];
  }
}

#if PADST_X86_DISPATCH
PADST_TARGET_AVX2 inline void gather_row(IsaTag<Isa::kAvx2>, float* o, const float* z, const int32_t* g,
                                         const float* bias, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_i32gather_ps(z, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + j)), 4);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(o + j, v);
  }
  gather_row(IsaTag<Isa::kBase>{}, o + j, z, g + j, bias ? bias + j : nullptr, n - j);
}

PADST_TARGET_AVX512 inline void gather_row(IsaTag<Isa::kAvx512>, float* o, const float* z, const int32_t* g,
                                           const float* bias, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_i32gather_ps(_mm512_loadu_si512(g + j), z, 4);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    _mm512_storeu_ps(o + j, v);
  }
  gather_row(IsaTag<Isa::kBase>{}, o + j, z, g + j, bias ? bias + j : nullptr, n - j);
}
#endif

// The overload for `isa`, chosen at run time.
inline void gather_row(Isa isa, float* o, const float* z, const int32_t* g, const float* bias, int64_t n) {
#if PADST_X86_DISPATCH
  if (isa == Isa::kAvx512) return gather_row(IsaTag<Isa::kAvx512>{}, o, z, g, bias, n);
  if (isa == Isa::kAvx2) return gather_row(IsaTag<Isa::kAvx2>{}, o, z, g, bias, n);
#endif
  gather_row(IsaTag<Isa::kBase>{}, o, z, g, bias, n);
}

}  // namespace padst::cpu::gr
