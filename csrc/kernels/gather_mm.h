// Gathered sparse-times-dense product, the forward and dx kernel of every structure (CTA body; see portable.h).
//
//   out[b, dst(r)] = bias[dst(r)] + sum_{p in rows(r)} values[v(r, p)] * in[b, src(col(r, p))]
//   src(c) = in_gather ? in_gather[c] : c        (the input permutation, gathered while loading)
//   dst(r) = out_scatter ? out_scatter[r] : r    (the output permutation, scattered while storing)
//
// Tiling: a CTA owns kThreads consecutive output rows (one per thread) and kTB consecutive batch rows. Phase 1
// (stage) copies the CTA's kTB input rows, gathered through in_gather, into shared memory as xs[c][t] (the kTB
// values of a column contiguous), reading each input row coalesced; phase 2 (compute) has every thread walk its
// row's entries once, each value/index load reused for all kTB batch rows from shared memory, and store its kTB
// outputs (consecutive threads -> consecutive output columns). When kTB input rows do not fit in shared memory
// the CTA skips phase 1 and reads the input directly (`staged` false). The grid is 1-D, row tiles fastest, so
// the CTAs that share an input tile run together and find it in L2.
#pragma once

#include "portable.h"

namespace padst::kern {

template <typename T, typename E>
struct GatherMmParams {
  const T* in = nullptr;            // [B, in_cols]
  const int64_t* in_gather = nullptr;
  const T* values = nullptr;
  const T* bias = nullptr;          // indexed by output column, may be null
  const int64_t* out_scatter = nullptr;
  T* out = nullptr;                 // [B, out_cols]
  int64_t B = 0, in_cols = 0, out_cols = 0;
  bool staged = true;
  E rows;
};

// Batch rows per CTA: 16 for the 16-bit types, 8 for float/double (shared memory and registers).
template <typename T>
inline constexpr int kGatherTB = sizeof(T) == 2 ? 16 : 8;
inline constexpr int kGatherThreads = 128;

template <typename T, typename E, int kTB = kGatherTB<T>, int kThreads = kGatherThreads>
struct GatherMm {
  using A = acc_t<T>;
  using Params = GatherMmParams<T, E>;
  static constexpr int kTileB = kTB;
  static constexpr int kBlockThreads = kThreads;

  PADST_HD static int64_t row_tiles(const Params& p) { return ceil_div(p.out_cols, kThreads); }
  PADST_HD static int64_t num_ctas(const Params& p) { return row_tiles(p) * ceil_div(p.B, kTB); }
  // Phase 1 runs only when the CTA's kTB input rows fit in kMaxSmemBytes of shared memory.
  static constexpr int64_t kMaxSmemBytes = 96 * 1024;
  static constexpr bool fits(int64_t in_cols) {
    return in_cols * kTB * static_cast<int64_t>(sizeof(T)) <= kMaxSmemBytes;
  }
  static constexpr int64_t smem_bytes(int64_t in_cols) { return in_cols * kTB * static_cast<int64_t>(sizeof(T)); }

  // Phase 1: xs[c * kTB + t] = in[b0 + t, src(c)] (zero past the last batch row).
  PADST_HD static void stage(const Params& p, int64_t cta, int tid, T* xs) {
    const int64_t b0 = (cta / row_tiles(p)) * kTB;
    const int64_t n = p.in_cols * kTB;
    for (int64_t i = tid; i < n; i += kThreads) {
      const int64_t t = i / p.in_cols, c = i - t * p.in_cols;
      const int64_t b = b0 + t;
      const int64_t src = p.in_gather ? p.in_gather[c] : c;
      xs[c * kTB + t] = b < p.B ? p.in[b * p.in_cols + src] : Num<T>::from_acc(A(0));
    }
  }

  // Phase 2: one output row per thread, kTB batch rows.
  PADST_HD static void compute(const Params& p, int64_t cta, int tid, const T* xs) {
    const int64_t nrt = row_tiles(p);
    const int64_t b0 = (cta / nrt) * kTB;
    const int64_t r = (cta - (cta / nrt) * nrt) * kThreads + tid;
    if (r >= p.out_cols) return;
    const int64_t nb = min64(kTB, p.B - b0);
    A acc[kTB];
    for (int t = 0; t < kTB; ++t) acc[t] = A(0);
    const int64_t pe = p.rows.end(r);
    for (int64_t q = p.rows.begin(r); q < pe; ++q) {
      int64_t col, v;
      if (!p.rows.at(r, q, col, v)) continue;
      const A w = Num<T>::to_acc(p.values[v]);
      if (p.staged) {
        const T* xc = xs + col * kTB;
        PADST_UNROLL
        for (int t = 0; t < kTB; ++t) acc[t] += w * Num<T>::to_acc(xc[t]);
      } else {
        const int64_t src = p.in_gather ? p.in_gather[col] : col;
        PADST_UNROLL  // fully unrolled with a guard, so acc[] stays in registers
        for (int t = 0; t < kTB; ++t) {
          if (t < nb) acc[t] += w * Num<T>::to_acc(p.in[(b0 + t) * p.in_cols + src]);
        }
      }
    }
    const int64_t dst = p.out_scatter ? p.out_scatter[r] : r;
    const A bias = p.bias ? Num<T>::to_acc(p.bias[dst]) : A(0);
    PADST_UNROLL
    for (int t = 0; t < kTB; ++t) {
      if (t < nb) p.out[(b0 + t) * p.out_cols + dst] = Num<T>::from_acc(acc[t] + bias);
    }
  }
};

}  // namespace padst::kern
