// A 16x16x16 warp-level tensor-core product, D += A B with fp16/bf16 operands in shared memory and a float
// accumulator: nvcuda::wmma on the device; a plain matrix product on the host (the emulation). WMMA's contract is
// stated on whole matrices (the fragment layout is the compiler's business), so the host version is a faithful
// model of it. Warp-collective: on the device all 32 lanes call with the same arguments; the emulation calls
// once per warp.
//   A: 16x16 at a, row-major (element (m, k) at a[m*lda + k]) or column-major (a[k*lda + m]), by kAColMajor
//   B: 16x16 at b, row-major (element (k, n) at b[k*ldb + n]) or column-major (b[n*ldb + k]), by kBColMajor
//   acc store: 16x16 row-major floats at out (leading dimension ldo)
// Alignment (device): a, b, out 32-byte aligned; lda, ldb multiples of 8 elements, ldo a multiple of 4.
#pragma once

#include <type_traits>

#include "portable.h"

#if defined(__CUDACC__)
#include <mma.h>
#define PADST_WARP_FN __device__ __forceinline__
#else
#define PADST_WARP_FN inline
#endif

namespace padst::kern {

#if defined(__CUDACC__)
template <typename T, bool kBColMajor, bool kAColMajor = false>
struct WarpMma {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using ALayout = std::conditional_t<kAColMajor, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  using BLayout = std::conditional_t<kBColMajor, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  PADST_WARP_FN static void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  PADST_WARP_FN static void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
    nvcuda::wmma::load_matrix_sync(fa, a, lda);
    nvcuda::wmma::load_matrix_sync(fb, b, ldb);
    nvcuda::wmma::mma_sync(c, fa, fb, c);
  }
  PADST_WARP_FN static void store(float* out, int ldo, const Acc& c) {
    nvcuda::wmma::store_matrix_sync(out, c, ldo, nvcuda::wmma::mem_row_major);
  }
};
#else
template <typename T, bool kBColMajor, bool kAColMajor = false>
struct WarpMma {
  struct Acc {
    float v[256];
  };
  static void zero(Acc& c) {
    for (float& x : c.v) x = 0.0f;
  }
  static void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) {
          const T bv = kBColMajor ? b[j * ldb + k] : b[k * ldb + j];
          const T av = kAColMajor ? a[k * lda + i] : a[i * lda + k];
          s += Num<T>::to_acc(av) * Num<T>::to_acc(bv);
        }
        c.v[i * 16 + j] += s;
      }
  }
  static void store(float* out, int ldo, const Acc& c) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) out[i * ldo + j] = c.v[i * 16 + j];
  }
};
#endif

}  // namespace padst::kern
