// The v2 row kernel on CUDA cores for the structures whose every output row holds K entries at computed or
// stored columns: the N:M forward and dx (the latter through an ELL form of the transpose) and the diagonal forward and
// dx,
//   out[b, dst(r)] = bias[dst(r)] + sum_k values[v(k, r)] * x[b, src(col(k, r))]     (entries that exist)
// with the entries given by E (NmEntries: col_idx transposed; DiagEntries: arithmetic on the offsets), src the input
// permutation and dst the output permutation (diagonals; N:M folds its permutation into col_idx). These structures
// cannot use tensor cores, so the kernel is built to reach the CUDA cores' FMA rate instead of the memory system's:
//  - values and indices are read [K][R]-major (consecutive rows on consecutive lanes: coalesced; N:M reads them
//    transposed, uint16 indices; a diagonal's values are stored that way), two adjacent rows per thread;
//  - a CTA stages kTB batch rows of x once, transposed and in float ([C][kTB], so that the kTB values one index
//    selects are contiguous), with 16-byte global loads and the input permutation applied on the shared-memory side
//    (column c goes to in_scatter[c]), and reuses them for every output row: each index then feeds kTB FMAs through
//    kTB / 4 16-byte shared loads;
//  - each thread keeps a 2 x kTB register tile of accumulators; 32-bit indexing, no division in the inner loop.
// kTB = 32, 16 or 8 batch rows, the most whose [C][kTB] floats fit in 96 KB (C <= 768, 1,536, 3,072). Rows past B are
// zero. The host emulation (csrc/emu/emulate.h) runs "stage" then "rows" per thread.
#pragma once

#include "portable.h"
#include "sddmm.h"
#include "warp_sm80.h"

namespace padst::kern {

// N:M: entry k of row r is column it[k * R + r] (uint16), value k * R + r of the transposed values.
struct NmEntries {
  const uint16_t* it = nullptr;  // [K, R]
  int32_t R = 0;
  PADST_HD bool at(int k, int r, int& col, int& v) const {
    v = k * R + r;
    col = it[v];
    return true;
  }
};

// N:M dx: the transpose in ELL form, [D][C] (D = the most entries of one input column): entry k of output column c is
// forward row row[k * C + c] (uint16; 0xFFFF: no entry), value k * C + c of the values gathered into the same layout.
struct EllEntries {
  const uint16_t* row = nullptr;  // [D, C]
  int32_t C = 0;
  PADST_HD bool at(int k, int c, int& col, int& v) const {
    v = k * C + c;
    const uint16_t r = row[v];
    if (r == 0xFFFFu) return false;
    col = r;
    return true;
  }
};

// Diagonals (see DiagRows in entries.h): K diagonals of L values at offsets in [0, P), P = max(R, C).
//   direct  (wide forward, tall dx): row r is entry t = r of every diagonal, col = (r + o) mod P
//   shifted (tall forward, wide dx): row r is entry t = (r - o) mod P of each diagonal, if t < L; col = t
struct DiagEntries {
  const int32_t* off = nullptr;  // [K]
  int32_t L = 0, P = 0;
  bool shifted = false;
  PADST_HD bool at(int k, int r, int& col, int& v) const {
    const int o = off[k];
    if (shifted) {
      int t = r - o;
      if (t < 0) t += P;
      if (t >= L) return false;
      col = t;
      v = k * L + t;
    } else {
      int c = r + o;
      if (c >= P) c -= P;
      col = c;
      v = k * L + r;
    }
    return true;
  }
};

// Both row kernels' staging (thread tid of kThreads): xs[pos(c)][t] = x[b0 + t, c] as float for t < kTB, pos the
// input permutation's place of column c (in_scatter, null: c), rows at or past b1 zero. 16-byte global loads.
template <typename T, int kTB, int kThreads>
PADST_WARP_HD void stage_rows(const T* x, int32_t C, const int32_t* in_scatter, int64_t b0, int64_t b1, int tid,
                              float* xs) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int nv = C / kVec;
  for (int t = 0; t < kTB; ++t) {
    const int64_t b = b0 + t;
    for (int cv = tid; cv < nv; cv += kThreads) {
      if (b < b1) {
        const sm80::V16 v = sm80::load16(x + b * C + cv * kVec);
        PADST_UNROLL
        for (int j = 0; j < kVec; ++j) {
          const int c = cv * kVec + j, pos = in_scatter ? in_scatter[c] : c;
          xs[pos * kTB + t] = Num<T>::to_acc(sm80::elem<T>(v, j));
        }
      } else {
        PADST_UNROLL
        for (int j = 0; j < kVec; ++j) xs[(cv * kVec + j) * kTB + t] = 0.0f;
      }
    }
  }
}

template <typename T, typename E>
struct RowsV2Params {
  const T* x = nullptr;                  // [B, C], 16-byte aligned, C % (16 / sizeof(T)) == 0
  const int32_t* in_scatter = nullptr;   // [C]: staged position of input column c; null = identity
  const T* values = nullptr;             // indexed by the entries' v
  const T* bias = nullptr;               // [R] (by output column) or null
  const int32_t* out_scatter = nullptr;  // [R]: output column of row r; null = identity
  T* out = nullptr;                      // [B, R]
  int64_t B = 0;
  int32_t C = 0, R = 0, K = 0;
  E entries;
};

inline constexpr int64_t kRowsV2Smem = 96 * 1024;

// The batch rows per CTA for an input of C columns: 32, 16 or 8, or 0 when even 8 do not fit.
PADST_HD int rows_v2_tile(int64_t C) {
  for (int tb = 32; tb >= 8; tb /= 2)
    if (C * tb * 4 <= kRowsV2Smem) return tb;
  return 0;
}

template <typename T, typename E, int kTB>
struct RowsV2 {
  static_assert(kTB == 8 || kTB == 16 || kTB == 32, "8, 16 or 32 batch rows");
  using Params = RowsV2Params<T, E>;
  static constexpr int kThreads = 256;
  static constexpr int kRPT = 2;  // adjacent rows per thread
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));

  static bool serves(int64_t C, int64_t R) { return C % kVec == 0 && R % kRPT == 0 && rows_v2_tile(C) == kTB; }
  static int64_t smem_bytes(int64_t C) { return C * kTB * 4; }
  PADST_HD static int64_t num_ctas(const Params& p) { return ceil_div(p.B, kTB); }

  // Phase "stage" (thread tid): xs[pos(c)][t] = x[b0 + t, c] as float.
  PADST_WARP_HD static void stage(const Params& p, int64_t cta, int tid, float* xs) {
    stage_rows<T, kTB, kThreads>(p.x, p.C, p.in_scatter, cta * kTB, p.B, tid, xs);
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
      for (int k = 0; k < p.K; ++k) {
        PADST_UNROLL
        for (int j = 0; j < kRPT; ++j) {
          int col, vi;
          if (!p.entries.at(k, r0 + j, col, vi)) continue;
          const float v = Num<T>::to_acc(p.values[vi]);
          const float* xr = xs + col * kTB;
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
      int dst[kRPT];
      float bias[kRPT];
      PADST_UNROLL
      for (int j = 0; j < kRPT; ++j) {
        dst[j] = p.out_scatter ? p.out_scatter[r0 + j] : r0 + j;
        bias[j] = p.bias ? Num<T>::to_acc(p.bias[dst[j]]) : 0.0f;
      }
      for (int t = 0; t < kTB; ++t) {
        const int64_t b = b0 + t;
        if (b >= p.B) break;
        T* o = p.out + b * p.R;
        PADST_UNROLL
        for (int j = 0; j < kRPT; ++j) o[dst[j]] = Num<T>::from_acc(acc[j][t] + bias[j]);
      }
    }
  }
};

}  // namespace padst::kern

namespace padst::kern {

// N:M for the weight gradient: entry k of row r reads column it[k * R + r] and writes dV[r, k] (values' own layout).
struct NmGwEntries {
  const uint16_t* it = nullptr;  // [K, R]
  int32_t R = 0, K = 0;
  PADST_HD bool at(int k, int r, int& col, int& v) const {
    col = it[k * R + r];
    v = r * K + k;
    return true;
  }
};

// The v2 weight gradient of the same structures on CUDA cores:
//   dV[v(k, r)] = sum_b dy[b, dst(r)] * x[b, src(col(k, r))]
// CTA = (tile of kThreads x kRPT rows, batch split). Per group of kKG entries, the CTA walks its split kTB batch rows
// at a time: x staged as in RowsV2 (floats, [C][kTB], the permutation on the shared-memory side), each thread's dy values
// for its rows held in registers, and each entry's kTB products summed from 16-byte shared loads into a per-entry
// register accumulator. The splits' float partials are summed in a fixed order afterwards (deterministic). Up to 162
// registers with 32 batch rows (one CTA of 256 threads per SM; the kernel is launched with __launch_bounds__(256, 1),
// under the default cap of 128 it spilled).
template <typename T, typename E>
struct RowsGwParams {
  const T* dy = nullptr;                // [B, R]
  const int32_t* dy_gather = nullptr;   // [R] or null: dz[., r] = dy[., dy_gather[r]]
  const T* x = nullptr;                 // [B, C], 16-byte aligned, C % (16 / sizeof(T)) == 0
  const int32_t* in_scatter = nullptr;  // [C] or null: staged place of x column c
  float* partial = nullptr;             // [splits, nnz]
  T* out = nullptr;                     // [nnz]
  int64_t B = 0, chunk = 0;
  int32_t C = 0, R = 0, K = 0, nnz = 0, splits = 1;
  E entries;
};

template <typename T, typename E, int kTB>
struct RowsGw {
  static_assert(kTB == 8 || kTB == 16 || kTB == 32, "8, 16 or 32 batch rows");
  using Params = RowsGwParams<T, E>;
  static constexpr int kThreads = 256;
  static constexpr int kRPT = 2;
  static constexpr int kKG = 16;  // entries per group: kRPT x kKG float accumulators per thread
  static constexpr int kTBRows = kTB;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));

  static bool serves(int64_t C, int64_t R) { return C % kVec == 0 && R % kRPT == 0 && rows_v2_tile(C) == kTB; }
  static int64_t smem_bytes(int64_t C) { return C * kTB * 4; }
  PADST_HD static int64_t row_tiles(const Params& p) { return ceil_div(p.R, kThreads * kRPT); }
  PADST_HD static int64_t num_ctas(const Params& p) { return row_tiles(p) * p.splits; }
  // About two waves of 132 SMs, splits of at least 4 batch tiles.
  static void plan(Params& p) {
    const int64_t tiles = row_tiles(p), want = ceil_div(264, tiles), most = p.B > 0 ? ceil_div(p.B, 4 * kTB) : 1;
    int64_t s = want < most ? want : most;
    if (s < 1) s = 1;
    p.chunk = p.B > 0 ? ceil_div(p.B, s) : 0;
    p.splits = static_cast<int32_t>(p.chunk > 0 ? ceil_div(p.B, p.chunk) : 1);
  }

  // Phase "stage": x rows [b0, b0 + kTB) of the split (zero past b1), as RowsV2 stages them.
  PADST_WARP_HD static void stage(const Params& p, int64_t b0, int64_t b1, int tid, float* xs) {
    stage_rows<T, kTB, kThreads>(p.x, p.C, p.in_scatter, b0, b1, tid, xs);
  }

  // Phase "accumulate" (thread tid): acc[j][kk] += sum_t dz[b0 + t, r0 + j] x_p[b0 + t, col(k0 + kk, r0 + j)].
  PADST_WARP_HD static void accumulate(const Params& p, int64_t tile, int k0, int64_t b0, int64_t b1, int tid,
                                       const float* xs, float (&acc)[kRPT][kKG]) {
    const int r0 = static_cast<int>(tile) * kThreads * kRPT + tid * kRPT;
    if (r0 >= p.R) return;
    float dz[kRPT][kTB];
    PADST_UNROLL
    for (int j = 0; j < kRPT; ++j) {
      const int src = p.dy_gather ? p.dy_gather[r0 + j] : r0 + j;
      PADST_UNROLL
      for (int t = 0; t < kTB; ++t) dz[j][t] = b0 + t < b1 ? Num<T>::to_acc(p.dy[(b0 + t) * p.R + src]) : 0.0f;
    }
    PADST_UNROLL
    for (int kk = 0; kk < kKG; ++kk) {
      PADST_UNROLL
      for (int j = 0; j < kRPT; ++j) {
        int col, v;
        if (k0 + kk >= p.K || !p.entries.at(k0 + kk, r0 + j, col, v)) continue;  // (a guard, not a break: acc stays
        const float* xr = xs + col * kTB;                                          // in registers)
        float s = 0.0f;
        PADST_UNROLL
        for (int t = 0; t < kTB; t += 4) {
          float q[4];
          sm80::lds4(q, xr + t);
          s += dz[j][t] * q[0] + dz[j][t + 1] * q[1] + dz[j][t + 2] * q[2] + dz[j][t + 3] * q[3];
        }
        acc[j][kk] += s;
      }
    }
  }

  // Phase "store" (thread tid): the group's accumulators to partial[split][v].
  PADST_WARP_HD static void store(const Params& p, int64_t tile, int split, int k0, int tid,
                                  const float (&acc)[kRPT][kKG]) {
    const int r0 = static_cast<int>(tile) * kThreads * kRPT + tid * kRPT;
    if (r0 >= p.R) return;
    float* dst = p.partial + static_cast<int64_t>(split) * p.nnz;
    PADST_UNROLL
    for (int kk = 0; kk < kKG; ++kk) {
      PADST_UNROLL
      for (int j = 0; j < kRPT; ++j) {
        int col, v;
        if (k0 + kk < p.K && p.entries.at(k0 + kk, r0 + j, col, v)) dst[v] = acc[j][kk];
      }
    }
  }

  static constexpr int kReduceThreads = 256;
  PADST_HD static int64_t reduce_ctas(const Params& p) { return ceil_div(p.nnz, kReduceThreads); }
  PADST_HD static void reduce(const Params& p, int64_t cta, int tid) {
    reduce_partials(p.partial, p.splits, p.nnz, p.out, cta * kReduceThreads + tid);
  }
};

}  // namespace padst::kern
