// Sampled dense-dense product, the weight gradient of every structure (CTA body; see portable.h).
//
//   dv[e] = sum_b dy[b, dy_src(row(e))] * x[b, x_src(col(e))]       for every stored entry e of the pattern
//   dy_src(r) = dy_gather ? dy_gather[r] : r   (inverse output permutation)
//   x_src(c)  = x_gather ? x_gather[c] : c     (input permutation)
//
// The batch is split into `splits` contiguous chunks; thread (e, split) accumulates its chunk in the
// accumulation type and writes partial[split][e]; a second kernel (reduce) sums the partials in split order
// and converts. No atomics, so the result is deterministic. Consecutive threads take consecutive entries, which
// for every structure are consecutive columns of one row (blocks, diagonals) or one row's entries (N:M), so the
// dy load is a broadcast and the x loads of a warp fall within one row of x.
#pragma once

#include "portable.h"

namespace padst::kern {

template <typename T, typename F>
struct SddmmParams {
  const T* dy = nullptr;  // [B, R]
  const T* x = nullptr;   // [B, C]
  const int64_t* dy_gather = nullptr;
  const int64_t* x_gather = nullptr;
  acc_t<T>* partial = nullptr;  // [splits, nnz]
  T* out = nullptr;             // [nnz]
  int64_t B = 0, R = 0, C = 0, nnz = 0, splits = 1, chunk = 0;
  F entries;
};

inline constexpr int kSddmmThreads = 256;

// out[e] = sum of the split partials of entry e, in split order (deterministic).
template <typename T>
PADST_HD void reduce_partials(const acc_t<T>* partial, int64_t splits, int64_t nnz, T* out, int64_t e) {
  if (e >= nnz) return;
  acc_t<T> acc = acc_t<T>(0);
  for (int64_t s = 0; s < splits; ++s) acc += partial[s * nnz + e];
  out[e] = Num<T>::from_acc(acc);
}

template <typename T, typename F, int kThreads = kSddmmThreads>
struct Sddmm {
  using A = acc_t<T>;
  using Params = SddmmParams<T, F>;
  static constexpr int kBlockThreads = kThreads;

  PADST_HD static int64_t entry_tiles(const Params& p) { return ceil_div(p.nnz, kThreads); }
  PADST_HD static int64_t num_ctas(const Params& p) { return entry_tiles(p) * p.splits; }

  PADST_HD static void partial(const Params& p, int64_t cta, int tid) {
    const int64_t net = entry_tiles(p);
    const int64_t split = cta / net;
    const int64_t e = (cta - split * net) * kThreads + tid;
    if (e >= p.nnz) return;
    int64_t row, col;
    p.entries.rc(e, row, col);
    const int64_t rs = p.dy_gather ? p.dy_gather[row] : row;
    const int64_t cs = p.x_gather ? p.x_gather[col] : col;
    const int64_t b0 = split * p.chunk, b1 = min64(p.B, b0 + p.chunk);
    A acc = A(0);
    for (int64_t b = b0; b < b1; ++b) acc += Num<T>::to_acc(p.dy[b * p.R + rs]) * Num<T>::to_acc(p.x[b * p.C + cs]);
    p.partial[split * p.nnz + e] = acc;
  }

  PADST_HD static int64_t reduce_ctas(const Params& p) { return entry_tiles(p); }
  PADST_HD static void reduce(const Params& p, int64_t cta, int tid) {
    reduce_partials(p.partial, p.splits, p.nnz, p.out, cta * kThreads + tid);
  }

  // How many batch chunks: enough threads to fill the GPU (~2^20 in flight), chunks of at least 32 rows.
  static void plan(Params& p) {
    const int64_t want = p.nnz > 0 ? ceil_div(int64_t{1} << 20, p.nnz) : 1;
    const int64_t most = p.B > 0 ? ceil_div(p.B, 32) : 1;
    p.splits = want < 1 ? 1 : (want > most ? most : want);
    if (p.splits < 1) p.splits = 1;
    p.chunk = p.B > 0 ? ceil_div(p.B, p.splits) : 0;
    p.splits = p.chunk > 0 ? ceil_div(p.B, p.chunk) : 1;
  }
};

}  // namespace padst::kern
