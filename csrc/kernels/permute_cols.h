// Column permutation of a row-major matrix, out[r, c] = in[r, idx[c]] (a gather; a scatter out[:, p[j]] = in[:, j] is
// the gather with idx = inverse(p)), for the one place where padst applies a permutation as a pass of its own: the
// dense operand of the cuSPARSELt 2:4 matmul, which cuSPARSELt reads through a pointer only (csrc/cuda/cusparselt.cpp).
// Instead of index_select's 2- or 4-byte gathers from global memory, each warp copies one whole row into shared memory
// with 16-byte loads, gathers from there, and writes the permuted row with 16-byte stores. CTA = kWarps rows.
// Serves rows of at most kMaxCols elements whose byte width is a multiple of 16, on 16-byte aligned storage; the
// host emulation (csrc/emu/emulate.h) runs the same warp body lane-parallel.
#pragma once

#include "portable.h"
#include "warp_sm80.h"

namespace padst::kern {

template <typename T>
struct PermuteColsParams {
  const T* in = nullptr;       // [rows, ld_in]
  T* out = nullptr;            // [rows, ld_out]
  const int32_t* idx = nullptr;  // [cols], 16-byte aligned
  int64_t rows = 0, ld_in = 0, ld_out = 0;
  int32_t cols = 0;
};

template <typename T>
struct PermuteCols {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "2- or 4-byte elements");
  using Params = PermuteColsParams<T>;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  static constexpr int64_t kMaxSmem = 96 * 1024;
  static constexpr int64_t kMaxCols = kMaxSmem / kWarps / static_cast<int64_t>(sizeof(T));

  static bool serves(int64_t cols, int64_t ld_in, int64_t ld_out) {
    return cols > 0 && cols <= kMaxCols && cols % kVec == 0 && ld_in % kVec == 0 && ld_out % kVec == 0;
  }
  static int64_t smem_bytes(int32_t cols) { return static_cast<int64_t>(kWarps) * cols * sizeof(T); }
  PADST_HD static int64_t num_ctas(const Params& p) { return ceil_div(p.rows, kWarps); }

  // Warp `warp` of CTA `cta`: row cta * kWarps + warp, staged in `row` (cols elements of shared memory).
  PADST_WARP_HD static void warp_row(const Params& p, int64_t cta, int warp, int lane, T* row) {
    const int64_t r = cta * kWarps + warp;
    if (r >= p.rows) return;
    const int n16 = p.cols / kVec;
    const T* src = p.in + r * p.ld_in;
    T* dst = p.out + r * p.ld_out;
    sm80::each_lane(lane, [&](int l) {
      for (int i = l; i < n16; i += 32) sm80::store16(row + i * kVec, sm80::load16(src + i * kVec));
    });
    sm80::syncwarp();
    sm80::each_lane(lane, [&](int l) {
      for (int i = l; i < n16; i += 32) {
        T e[kVec];
        PADST_UNROLL
        for (int h = 0; h < kVec; h += 4) {  // 4 indices per 16-byte load
          const sm80::V16 ix = sm80::load16(p.idx + i * kVec + h);
          PADST_UNROLL
          for (int j = 0; j < 4 && h + j < kVec; ++j) e[h + j] = row[ix.w[j]];
        }
        sm80::V16 v;
        std::memcpy(&v, e, 16);
        sm80::store16(dst + i * kVec, v);
      }
    });
  }
};

}  // namespace padst::kern
