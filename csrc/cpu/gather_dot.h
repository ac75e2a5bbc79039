// Batch-1 N:M forward for float32: y[r] = bias[r] + sum_k v[r][k] * x[idx[r][k]], with the column indices as uint16
// (a cached compact copy of col_idx, nm.cpp). One token is memory- and instruction-bound: the scalar loop costs about
// two cycles per nonzero (index load, dependent gathered load, value load, FMA); the AVX2 / AVX-512 variants load 8 or
// 16 indices at once, widen them and gather. Unlike the row kernels these are written with intrinsics, directly in
// target-attributed functions (an always-inline body without the attribute cannot call the intrinsics), one overload
// of dot() per ISA tag, which dispatch_isa (isa.h) picks.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "isa.h"

#if PADST_X86_DISPATCH
#include <immintrin.h>
#endif

namespace padst::cpu::gd {

inline float dot(IsaTag<Isa::kBase>, const float* v, const uint16_t* idx, const float* x, int64_t K) {
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four partial sums: one dependent chain would bound the loop by latency
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int j = 0; j < 4; ++j) acc[j] += v[k + j] * x[idx[k + j]];
  for (; k < K; ++k) acc[0] += v[k] * x[idx[k]];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

#if PADST_X86_DISPATCH
PADST_TARGET_AVX2 inline float dot(IsaTag<Isa::kAvx2>, const float* v, const uint16_t* idx, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k)));
    const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k + 8)));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k), _mm256_i32gather_ps(x, i0, 4), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k + 8), _mm256_i32gather_ps(x, i1, 4), a1);
  }
  for (; k + 8 <= K; k += 8) {
    const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k)));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k), _mm256_i32gather_ps(x, i0, 4), a0);
  }
  alignas(32) float s[8];
  _mm256_store_ps(s, _mm256_add_ps(a0, a1));
  float acc = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; k < K; ++k) acc += v[k] * x[idx[k]];
  return acc;
}

PADST_TARGET_AVX512 inline float dot(IsaTag<Isa::kAvx512>, const float* v, const uint16_t* idx, const float* x,
                                     int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k)));
    const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k + 16)));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k), _mm512_i32gather_ps(i0, x, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k + 16), _mm512_i32gather_ps(i1, x, 4), a1);
  }
  if (k + 16 <= K) {
    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k)));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k), _mm512_i32gather_ps(i0, x, 4), a0);
    k += 16;
  }
  if (k < K) {  // the last K % 16 lanes under a mask
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, idx + k));
    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x, 4);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, v + k), xv, a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

inline void nm_gemv(const float* x, const float* v, const uint16_t* idx, int64_t R, int64_t K, const float* bias,
                    float* y) {
  const Isa isa = current_isa();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {  // the rows of a chunk in one call, dot() inlined
      for (int64_t r = r0; r < r1; ++r) y[r] = (bias ? bias[r] : 0.0f) + dot(k, v + r * K, idx + r * K, x, K);
    });
  });
}

}  // namespace padst::cpu::gd
