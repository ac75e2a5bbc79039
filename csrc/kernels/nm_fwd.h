// The v2 N:M forward on CUDA cores (issue 17): y[b, r] = bias[r] + sum_k values[r, k] * x[b, col_idx[r, k]], the input
// permutation already folded into col_idx. N:M cannot use tensor cores, so this kernel is built to reach the CUDA
// cores' FMA rate instead of the memory system's:
//  - values and indices are read transposed, [K][R] (consecutive rows on consecutive lanes: coalesced), two adjacent
//    rows per thread, indices as uint16 when the input is at most 65,536 wide;
//  - a CTA stages kTB batch rows of x once, transposed and in float ([C][kTB], so that the kTB values one index
//    selects are contiguous), and reuses them for every output row: each index then feeds kTB FMAs through kTB / 4
//    16-byte shared loads;
//  - each thread keeps a 2 x kTB register tile of accumulators; 32-bit indexing, no division in the inner loop.
// kTB = 32, 16 or 8 batch rows, the most whose [C][kTB] floats fit in 96 KB (C <= 768, 1,536, 3,072). Rows past B are
// zero. The host emulation (csrc/emu/emulate.h) runs "stage" then "rows" per thread.
#pragma once

#include "portable.h"
#include "warp_sm80.h"

namespace padst::kern {

template <typename T, typename I>
struct NmFwdParams {
  const T* x = nullptr;     // [B, C], 16-byte aligned, C % (16 / sizeof(T)) == 0
  const T* vt = nullptr;    // [K, R]: values transposed
  const I* it = nullptr;    // [K, R]: col_idx transposed (the permutation folded in)
  const T* bias = nullptr;  // [R] or null
  T* out = nullptr;         // [B, R]
  int64_t B = 0;
  int32_t C = 0, R = 0, K = 0;
};

inline constexpr int64_t kNmFwdSmem = 96 * 1024;

// The batch rows per CTA for an input of C columns: 32, 16 or 8, or 0 when even 8 do not fit.
PADST_HD int nm_fwd_rows(int64_t C) {
  for (int tb = 32; tb >= 8; tb /= 2)
    if (C * tb * 4 <= kNmFwdSmem) return tb;
  return 0;
}

template <typename T, typename I, int kTB>
struct NmFwd {
  static_assert(kTB == 8 || kTB == 16 || kTB == 32, "8, 16 or 32 batch rows");
  using Params = NmFwdParams<T, I>;
  static constexpr int kThreads = 256;
  static constexpr int kRPT = 2;  // adjacent rows per thread
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));

  static bool serves(int64_t C, int64_t R) { return C % kVec == 0 && R % kRPT == 0 && nm_fwd_rows(C) == kTB; }
  static int64_t smem_bytes(int64_t C) { return C * kTB * 4; }
  PADST_HD static int64_t num_ctas(const Params& p) { return ceil_div(p.B, kTB); }

  // Phase "stage" (thread tid): xs[c][t] = x[b0 + t, c] as float.
  PADST_WARP_HD static void stage(const Params& p, int64_t cta, int tid, float* xs) {
    const int nv = p.C / kVec;
    const int64_t b0 = cta * kTB;
    for (int t = 0; t < kTB; ++t) {
      const int64_t b = b0 + t;
      for (int cv = tid; cv < nv; cv += kThreads) {
        if (b < p.B) {
          const sm80::V16 v = sm80::load16(p.x + b * p.C + cv * kVec);
          PADST_UNROLL
          for (int j = 0; j < kVec; ++j) xs[(cv * kVec + j) * kTB + t] = Num<T>::to_acc(sm80::elem<T>(v, j));
        } else {
          PADST_UNROLL
          for (int j = 0; j < kVec; ++j) xs[(cv * kVec + j) * kTB + t] = 0.0f;
        }
      }
    }
  }

  // Phase "rows" (thread tid): rows r0, r0 + 1 for r0 = 2 tid, 2 tid + 2 kThreads, ...
  PADST_WARP_HD static void rows(const Params& p, int64_t cta, int tid, const float* xs) {
    const int64_t b0 = cta * kTB;
    for (int r0 = tid * kRPT; r0 < p.R; r0 += kThreads * kRPT) {
      float acc[kRPT][kTB];
      PADST_UNROLL
      for (int j = 0; j < kRPT; ++j)
        PADST_UNROLL
      for (int t = 0; t < kTB; ++t) acc[j][t] = 0.0f;
      const T* vk = p.vt + r0;
      const I* ik = p.it + r0;
      for (int k = 0; k < p.K; ++k, vk += p.R, ik += p.R) {
        PADST_UNROLL
        for (int j = 0; j < kRPT; ++j) {
          const float v = Num<T>::to_acc(vk[j]);
          const float* xr = xs + static_cast<int32_t>(ik[j]) * kTB;
          PADST_UNROLL
          for (int t = 0; t < kTB; t += 4) {
            float q[4];
            sm80::lds4(q, xr + t);
            acc[j][t] += v * q[0];
            acc[j][t + 1] += v * q[1];
            acc[j][t + 2] += v * q[2];
            acc[j][t + 3] += v * q[3];
          }
        }
      }
      float bias[kRPT];
      PADST_UNROLL
      for (int j = 0; j < kRPT; ++j) bias[j] = p.bias ? Num<T>::to_acc(p.bias[r0 + j]) : 0.0f;
      PADST_UNROLL
      for (int t = 0; t < kTB; ++t) {
        const int64_t b = b0 + t;
        if (b >= p.B) break;
        T* o = p.out + b * p.R + r0;
        PADST_UNROLL
        for (int j = 0; j < kRPT; ++j) o[j] = Num<T>::from_acc(acc[j][t] + bias[j]);
      }
    }
  }
};

}  // namespace padst::kern
