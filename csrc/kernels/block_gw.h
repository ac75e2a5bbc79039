// The v2 tensor-core weight gradient of the block structure, fp16/bf16, square blocks kB = 16 or 32:
//   dV[q][r][c] = sum_b dz[b, i*kB + r] * x_p[b, j*kB + c]        for each block q = (i, j)
// with dz[., r] = dy[., dy_gather[r]] (the inverse output permutation) and x_p[., c] = x[., x_gather[c]] (the input
// permutation).
// A grouped GEMM per block-row with split-K over the batch: CTA = (block-row i, batch split s, group g of the row's
// blocks; kGroup = 8 warps x kPerWarp blocks per group). Per 64 batch rows, the CTA stages the row's dz tile once
// (shared by every block of the row) and each warp the x tiles of its blocks, double-buffered with cp.async (16-byte
// runs of the unpermuted operands; an element gather through the permutation otherwise, whose cost the benchmark
// shows); each warp accumulates its blocks' kB x kB products in registers with ldmatrix.trans (both operands are
// stored batch-major) and mma.sync m16n8k16. At the end each warp writes its float tiles to partial[s][q], and a second
// kernel sums the splits in order (reduce_partials): deterministic, like the kernels it replaces.
// The host emulation runs the phases ("stage" per thread, "mma" and "store" per warp) with the lane-parallel models.
#pragma once

#include "block_warp.h"
#include "portable.h"
#include "sddmm.h"
#include "warp_sm80.h"

namespace padst::kern {

template <typename T>
struct BlockGwParams {
  const T* dy = nullptr;               // [B, R], 16-byte aligned, R % 8 == 0
  const T* x = nullptr;                // [B, C], 16-byte aligned, C % 8 == 0
  const int32_t* dy_gather = nullptr;  // [R] or null: dz[., r] = dy[., dy_gather[r]]
  const int32_t* x_gather = nullptr;   // [C] or null: x_p[., c] = x[., x_gather[c]]
  const int32_t* row_ptr = nullptr;    // [rows + 1]
  const int32_t* col_idx = nullptr;    // [nnzb]
  float* partial = nullptr;            // [splits, nnzb * kB * kB]
  T* out = nullptr;                    // [nnzb, kB, kB]
  int64_t B = 0, chunk = 0;
  int32_t R = 0, C = 0, rows = 0, nnzb = 0, groups = 1, splits = 1;
};

template <typename T, int kB>
struct BlockGw {
  static_assert(kB == 16 || kB == 32, "block side 16 or 32");
  static_assert(sizeof(T) == 2, "fp16/bf16");
  using Params = BlockGwParams<T>;
  static constexpr int kRows = 64;  // batch rows per stage
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPerWarp = kB == 16 ? 4 : 2;  // blocks per warp: 32 / 64 float accumulators per lane
  static constexpr int kGroup = kWarps * kPerWarp;
  static constexpr int kLd = kB + 8;
  static constexpr int kTile = kRows * kLd;  // elements of one staged tile (dz or one block's x)
  static constexpr int kStage = kTile * (1 + kGroup);
  static constexpr int kMT = kB / 16, kNT = kB / 8;
  static constexpr int kBlockAcc = kMT * kNT * 4;
  static constexpr int kAcc = kPerWarp * kBlockAcc;
  static constexpr int kChunks = kB / 8;

  static int64_t smem_bytes() { return 2 * kStage * static_cast<int64_t>(sizeof(T)); }
  // Batch splits: about 512 CTAs, chunks of at least 256 rows. groups = ceil(most blocks in a row / kGroup).
  static void plan(Params& p, int64_t max_row_blocks) {
    p.groups = static_cast<int32_t>(max_row_blocks > 0 ? ceil_div(max_row_blocks, kGroup) : 1);
    const int64_t base = static_cast<int64_t>(p.rows) * p.groups;
    const int64_t want = base > 0 ? ceil_div(512, base) : 1, most = p.B > 0 ? ceil_div(p.B, 256) : 1;
    int64_t splits = want < most ? want : most;
    if (splits < 1) splits = 1;
    p.chunk = p.B > 0 ? ceil_div(p.B, splits) : 0;
    p.splits = static_cast<int32_t>(p.chunk > 0 ? ceil_div(p.B, p.chunk) : 1);
  }
  PADST_HD static int64_t num_ctas(const Params& p) {
    return static_cast<int64_t>(p.rows) * p.splits * p.groups;
  }
  // CTA -> (block-row, split, group): row fastest, so concurrent CTAs share the same batch rows in L2.
  // 32-bit (the grid is below 2^31 CTAs; a 64-bit division would be a runtime-library call), once per CTA.
  PADST_HD static void decode(const Params& p, int64_t cta, int& row, int& split, int& group) {
    const uint32_t c = static_cast<uint32_t>(cta), rows = static_cast<uint32_t>(p.rows);
    const uint32_t splits = static_cast<uint32_t>(p.splits), rest = c / rows;
    row = static_cast<int>(c - rest * rows);
    split = static_cast<int>(rest % splits);
    group = static_cast<int>(rest / splits);
  }
  // This CTA's blocks: [q0, q1) of the row; warp w has q0 + w + kWarps * m for m < kPerWarp (those < q1).
  PADST_HD static void blocks(const Params& p, int row, int group, int& q0, int& q1) {
    q0 = p.row_ptr[row] + group * kGroup;
    const int end = p.row_ptr[row + 1];
    q1 = q0 + kGroup < end ? q0 + kGroup : end;
  }
  PADST_HD static T* dz_tile(T* smem, int buf) { return smem + buf * kStage; }
  PADST_HD static T* x_tile(T* smem, int buf, int warp, int m) {
    return smem + buf * kStage + kTile * (1 + warp * kPerWarp + m);
  }

  // Copies (kRows x kB) of src's columns col0.. (through gather) for batch rows b0.. (< b1) into tile; zero rows
  // past b1.
  PADST_WARP_HD static void copy_tile(const T* src, int32_t ld_src, const int32_t* gather, int col0, int64_t b0,
                                      int64_t b1, T* tile, int i0, int step) {
    if (gather == nullptr) {
      for (int i = i0; i < kRows * kChunks; i += step) {
        const int t = i / kChunks, c8 = i % kChunks;
        const int64_t b = b0 + t;
        T* dst = tile + t * kLd + c8 * 8;
        if (b < b1) {
          sm80::cp_async_16(dst, src + b * ld_src + col0 + c8 * 8);
        } else {
          sm80::store16(dst, sm80::V16{{0u, 0u, 0u, 0u}});
        }
      }
    } else {
      for (int i = i0; i < kRows * kB; i += step) {
        const int t = i / kB, c = i % kB;
        const int64_t b = b0 + t;
        tile[t * kLd + c] = b < b1 ? src[b * ld_src + gather[col0 + c]] : Num<T>::from_acc(0.0f);
      }
    }
  }

  // Phase "stage" (thread tid): the dz tile (all threads) and warp tid / 32's x tiles for batch rows [b0, b0 + 64).
  PADST_WARP_HD static void stage(const Params& p, int row, int q0, int q1, int64_t b0, int64_t b1, int tid, T* smem,
                                  int buf) {
    copy_tile(p.dy, p.R, p.dy_gather, row * kB, b0, b1, dz_tile(smem, buf), tid, kThreads);
    const int warp = tid / 32, lane = tid % 32;
    PADST_UNROLL
    for (int m = 0; m < kPerWarp; ++m) {
      const int q = q0 + warp + kWarps * m;
      if (q < q1) copy_tile(p.x, p.C, p.x_gather, p.col_idx[q] * kB, b0, b1, x_tile(smem, buf, warp, m), lane, 32);
    }
    sm80::cp_async_commit();
  }

  // Phase "mma" (warp): acc[m] += dz^T x_m over the staged 64 rows.
  PADST_WARP_HD static void mma(int q0, int q1, int warp, int lane, const T* smem, int buf, sm80::WAcc<kAcc>& acc) {
    const T* dz = smem + buf * kStage;
    PADST_UNROLL
    for (int m = 0; m < kPerWarp; ++m) {
      if (q0 + warp + kWarps * m >= q1) break;
      const T* xt = smem + buf * kStage + kTile * (1 + warp * kPerWarp + m);
      PADST_UNROLL
      for (int kk = 0; kk < kRows / 16; ++kk) {
        sm80::WReg<4> fa[kMT];
        PADST_UNROLL
        for (int mi = 0; mi < kMT; ++mi)  // A(m, k) = dz[k][m]: stored k-major, transposed on load
          sm80::ldsm_x4_trans<T>(fa[mi], lane, [&](int l) {
            return dz + (kk * 16 + ((l >> 4) & 1) * 8 + (l & 7)) * kLd + mi * 16 + ((l >> 3) & 1) * 8;
          });
        PADST_UNROLL
        for (int np = 0; np < kNT / 2; ++np) {
          sm80::WReg<4> fb;  // B(k, n) = x[k][n]: (k, n), (k+8, n), (k, n+8), (k+8, n+8), transposed on load
          sm80::ldsm_x4_trans<T>(fb, lane, [&](int l) {
            return xt + (kk * 16 + (l & 7) + ((l >> 3) & 1) * 8) * kLd + np * 16 + (l >> 4) * 8;
          });
          PADST_UNROLL
          for (int mi = 0; mi < kMT; ++mi) {
            sm80::mma_16816<T>(acc, m * kBlockAcc + (mi * kNT + 2 * np) * 4, fa[mi], 0, fb, 0, lane);
            sm80::mma_16816<T>(acc, m * kBlockAcc + (mi * kNT + 2 * np + 1) * 4, fa[mi], 0, fb, 2, lane);
          }
        }
      }
    }
  }

  // Phase "store" (warp): its blocks' float tiles to partial[split][q].
  PADST_WARP_HD static void store(const Params& p, int split, int q0, int q1, int warp, int lane,
                                  const sm80::WAcc<kAcc>& acc) {
    const int64_t area = kB * kB, nnz = static_cast<int64_t>(p.nnzb) * area;
    sm80::each_lane(lane, [&](int l) {
      const float* v = acc.lane(l);
      PADST_UNROLL
      for (int m = 0; m < kPerWarp; ++m) {
        const int q = q0 + warp + kWarps * m;
        if (q >= q1) break;
        float* dst = p.partial + split * nnz + q * area;
        PADST_UNROLL
        for (int mi = 0; mi < kMT; ++mi)
          PADST_UNROLL
        for (int ni = 0; ni < kNT; ++ni)
          PADST_UNROLL
        for (int i = 0; i < 4; ++i)
          dst[(mi * 16 + sm80::acc_row(l, i)) * kB + ni * 8 + sm80::acc_col(l, i)] =
              v[m * kBlockAcc + (mi * kNT + ni) * 4 + i];
      }
    });
  }

  static constexpr int kReduceThreads = 256;
  PADST_HD static int64_t reduce_ctas(const Params& p) {
    return ceil_div(static_cast<int64_t>(p.nnzb) * kB * kB, kReduceThreads);
  }
  PADST_HD static void reduce(const Params& p, int64_t cta, int tid) {
    reduce_partials(p.partial, p.splits, static_cast<int64_t>(p.nnzb) * kB * kB, p.out, cta * kReduceThreads + tid);
  }
};

}  // namespace padst::kern
