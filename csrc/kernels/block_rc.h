// "Row-complete" tensor-core block kernel: the forward of a layer with a narrow output (fc2: 3072 -> 768) and dx of
// a layer with a narrow input (fc1's dx writes dx [B, 768] from dy [B, 3072]), fp16/bf16, square blocks kB = 16 or
// 32, at most kMaxOut output columns. Where the input is too wide to stage whole (the x-stationary kernel's case,
// block_xs.h), each CTA owns whole output rows instead:
//   out[b, dst(o*kB + n)] = bias[dst(.)] + sum_{q in line o} sum_k in[b, src(idx[q]*kB + k)] * W_q(k, n)
//   (lines, W_q as in block_xs.h: forward CSR with W_q(k, n) = V[q][n][k]; dx CSC with W_q(k, n) = V[blk[q]][k][n])
//
// CTA = 32 batch rows x all out_cols outputs, 8 warps; warp w owns lines w, w + 8, ... (at most kLinesPerWarp), with
// float accumulators for all of them in registers (96 per lane at 768 outputs).
//  1. "lines" (each warp alone): for each block of its lines, a private 2-slot cp.async ring holds the weight block
//     and the block's 32 x kB input tile (kB * 2 = 32 or 64-byte runs of each input row: cp.async, 16 bytes; with an
//     input permutation the tile is gathered element by element through in_gather, the permutation's measured cost).
//     ldmatrix + mma.sync as in block_xs.h. After its last block each line's accumulators get the bias in
//     registers and go, converted, into the CTA's output staging [32][out_cols + 8] at their output columns
//     (through out_scatter: the output permutation costs 2-byte shared stores, not scattered global ones).
//  2. "store" (after a CTA barrier; each warp its rows): whole output rows with 16-byte stores, coalesced.
// The host emulation runs phase 1 once per warp with the lane-parallel models of warp_sm80.h, then phase 2; see
// block_xs.h for what that covers.
#pragma once

#include "block_warp.h"
#include "portable.h"
#include "warp_sm80.h"

namespace padst::kern {

template <typename T>
struct BlockRcParams {
  const T* in = nullptr;                 // [B, in_cols], 16-byte aligned, in_cols % 8 == 0
  const int32_t* in_gather = nullptr;    // [in_cols]: in_p[., k] = in[., in_gather[k]]; null = identity
  const T* values = nullptr;             // [nnzb, kB, kB], 16-byte aligned
  const T* bias = nullptr;               // [out_cols] or null
  const int32_t* out_scatter = nullptr;  // [out_cols]: output column of product column r; null = identity
  T* out = nullptr;                      // [B, out_cols], 16-byte aligned
  const int32_t* ptr = nullptr;          // [lines + 1]
  const int32_t* idx = nullptr;          // input block-line of each block
  const int32_t* blk = nullptr;          // block index into values, or null (= position)
  int64_t B = 0;
  int32_t in_cols = 0, out_cols = 0, lines = 0;
};

template <typename T, bool kDx, int kB>
struct BlockRc {
  static_assert(kB == 16 || kB == 32, "block side 16 or 32");
  static_assert(sizeof(T) == 2, "fp16/bf16");
  using Params = BlockRcParams<T>;
  static constexpr int kRows = 32;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPad = 8;
  static constexpr int kLd = kB + kPad;                 // row stride of the weight and input slots
  static constexpr int kSlot = kB * kLd + kRows * kLd;  // one ring slot: weight block, then the input tile
  static constexpr int kStages = 2;
  static constexpr int kMT = kRows / 16;
  static constexpr int kNT = kB / 8;
  static constexpr int kLineAcc = kMT * kNT * 4;           // accumulators per lane for one line
  static constexpr int kMaxOut = 768;                      // 96 float accumulators per lane
  static constexpr int kLinesPerWarp = kMaxOut / (kWarps * kB);
  static constexpr int kAcc = kLinesPerWarp * kLineAcc;
  static constexpr int kChunks = kB / 8;                   // 16-byte chunks per kB-wide row

  PADST_HD static bool serves(int64_t out_cols) { return out_cols > 0 && out_cols <= kMaxOut; }
  PADST_HD static int ldo(const Params& p) { return p.out_cols + kPad; }
  static int64_t smem_bytes(int64_t out_cols) {
    return (kWarps * kStages * kSlot + kRows * (out_cols + kPad)) * static_cast<int64_t>(sizeof(T));
  }
  PADST_HD static int64_t num_ctas(const Params& p) { return ceil_div(p.B, kRows); }
  // Shared memory: [ring: kWarps x kStages x kSlot][output staging: kRows x ldo].
  PADST_HD static T* ring(T* smem, int warp) { return smem + warp * (kStages * kSlot); }
  PADST_HD static T* ostage(T* smem) { return smem + kWarps * kStages * kSlot; }

  // The first block at or after (line-slot li, block q) in warp w's lines w + li * kWarps; false if none.
  PADST_HD static bool next_block(const Params& p, int warp, int& li, int& q) {
    while (li < kLinesPerWarp) {
      const int o = warp + li * kWarps;
      if (o >= p.lines) return false;
      if (q < p.ptr[o + 1]) return true;
      ++li;
      const int o2 = warp + li * kWarps;
      if (li < kLinesPerWarp && o2 < p.lines) q = p.ptr[o2];
    }
    return false;
  }

  // Starts the copies of block q: its values into the slot's weight part, its 32 x kB input tile into the rest.
  PADST_WARP_HD static void fetch(const Params& p, int64_t cta, int q, T* slot, int lane) {
    warp_fetch_block<T, kB>(p.values, p.blk ? p.blk[q] : q, slot, lane);
    T* tile = slot + kB * kLd;
    const int c0 = p.idx[q] * kB;
    const int64_t b0 = cta * kRows;
    sm80::each_lane(lane, [&](int l) {
      if (p.in_gather == nullptr) {
        for (int i = l; i < kRows * kChunks; i += 32) {
          const int row = i / kChunks, c8 = i % kChunks;
          const int64_t b = b0 + row;
          T* dst = tile + row * kLd + c8 * 8;
          if (b < p.B) {
            sm80::cp_async_16(dst, p.in + b * p.in_cols + c0 + c8 * 8);
          } else {
            sm80::store16(dst, sm80::V16{{0u, 0u, 0u, 0u}});
          }
        }
      } else {
        for (int i = l; i < kRows * kB; i += 32) {
          const int row = i / kB, k = i % kB;
          const int64_t b = b0 + row;
          tile[row * kLd + k] = b < p.B ? p.in[b * p.in_cols + p.in_gather[c0 + k]] : Num<T>::from_acc(0.0f);
        }
      }
    });
  }

  // Line-slot li's accumulators, with the bias, into the output staging at their output columns.
  PADST_WARP_HD static void stage_line(const Params& p, int o, int li, const sm80::WAcc<kAcc>& acc, T* os, int lane) {
    const int r0 = o * kB, ld = ldo(p);
    sm80::each_lane(lane, [&](int l) {
      const float* v = acc.lane(l) + li * kLineAcc;
      PADST_UNROLL
      for (int ni = 0; ni < kNT; ++ni) {
        const int col = ni * 8 + sm80::acc_col(l, 0);  // even; the pair is (col, col + 1)
        const int d0 = p.out_scatter ? p.out_scatter[r0 + col] : r0 + col;
        const int d1 = p.out_scatter ? p.out_scatter[r0 + col + 1] : r0 + col + 1;
        const float b0 = p.bias ? Num<T>::to_acc(p.bias[d0]) : 0.0f, b1 = p.bias ? Num<T>::to_acc(p.bias[d1]) : 0.0f;
        PADST_UNROLL
        for (int mi = 0; mi < kMT; ++mi)
          PADST_UNROLL
        for (int h = 0; h < 2; ++h) {  // accumulators (2h, 2h + 1): rows g and g + 8
          const int row = mi * 16 + sm80::acc_row(l, 2 * h), a = (mi * kNT + ni) * 4 + 2 * h;
          const T lo = Num<T>::from_acc(v[a] + b0), hi = Num<T>::from_acc(v[a + 1] + b1);
          if (p.out_scatter) {
            os[row * ld + d0] = lo;
            os[row * ld + d1] = hi;
          } else {
            sm80::store_pair(os + row * ld + d0, lo, hi);
          }
        }
      }
    });
  }

  // Phase 1 (warp `warp`; lane as in block_xs.h).
  PADST_WARP_HD static void warp_lines(const Params& p, int64_t cta, int warp, int lane, T* ring_w, T* os) {
    sm80::WAcc<kAcc> acc;
    acc.zero();
    int fl = 0, fq = warp < p.lines ? p.ptr[warp] : 0;  // next block to fetch
    int s = 0;
    if (next_block(p, warp, fl, fq)) fetch(p, cta, fq, ring_w, lane);
    sm80::cp_async_commit();
    // unrolled: a compile-time li keeps every line's accumulators in registers (a runtime one puts them on the stack)
    PADST_UNROLL
    for (int li = 0; li < kLinesPerWarp; ++li) {
      const int o = warp + li * kWarps;
      if (o >= p.lines) break;
      for (int q = p.ptr[o]; q < p.ptr[o + 1]; ++q) {
        int nl = li, nq = q + 1;
        if (next_block(p, warp, nl, nq)) fetch(p, cta, nq, ring_w + (s ^ 1) * kSlot, lane);
        sm80::cp_async_commit();
        sm80::cp_async_wait<1>();
        sm80::syncwarp();
        const T* slot = ring_w + s * kSlot;
        warp_block_mma<T, kDx, kB, kMT>(slot + kB * kLd, kLd, slot, acc, li * kLineAcc, lane);
        sm80::syncwarp();
        s ^= 1;
      }
      stage_line(p, o, li, acc, os, lane);
    }
    sm80::cp_async_wait<0>();
  }

  // Phase 2 (warp `warp`, after every warp's phase 1): rows warp, warp + kWarps, ... of the staging to `out`.
  PADST_WARP_HD static void store_rows(const Params& p, int64_t cta, int warp, int lane, const T* os) {
    const int n8 = p.out_cols / 8, ld = ldo(p);
    const int64_t b0 = cta * kRows;
    sm80::each_lane(lane, [&](int l) {
      for (int row = warp; row < kRows; row += kWarps) {
        const int64_t b = b0 + row;
        if (b >= p.B) break;
        for (int c8 = l; c8 < n8; c8 += 32)
          sm80::store16(p.out + b * p.out_cols + c8 * 8, sm80::load16(os + row * ld + c8 * 8));
      }
    });
  }
};

}  // namespace padst::kern
