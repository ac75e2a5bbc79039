// "x-stationary" tensor-core block kernel: the forward of a layer with a narrow input (fc1: 768 -> 3072) and dx of a
// layer with a narrow output (fc2's dx reads dy [B, 768]), fp16/bf16, square blocks of side kB = 16, 32 or 64.
// Same product as block_tc.h, organised so that every byte of the activation is read from global memory once:
//   out[b, dst(o*kB + n)] = bias[dst(.)] + sum_{q in line o} sum_k in_p[b, idx[q]*kB + k] * W_q(k, n)
//   forward: lines = block-rows (CSR), W_q(k, n) = V[q][n][k]
//   dx:      lines = block-columns (CSC), W_q(k, n) = V[blk[q]][k][n]
//
// CTA = kRows batch rows (64; 32 for kB = 64) x every output line, kWarps warps (8; 4 for kB = 64).
//  1. "stage" (all threads): the CTA's kRows x in_cols slice of `in` goes to shared memory once, 16 bytes per load,
//     rows read contiguously (coalesced). The input permutation is applied on the shared-memory side: input column c
//     is written to position in_scatter[c] (the inverse of the gather in_p[., k] = in[., perm[k]]), so global loads
//     stay 16-byte and only 2-byte shared stores scatter. Without a permutation the copy is cp.async, 16 bytes.
//     Rows past B are zero.
//  2. "warps" (each warp alone, no CTA-wide barrier after stage): warp w owns lines w, w + kWarps, ...; its weight
//     blocks stream through a private 2-slot ring in shared memory with cp.async (the next block is in flight while
//     the current one is multiplied). Per block: ldmatrix (A: the staged rows, B: the weight block, .trans for dx)
//     and mma.sync m16n8k16 into kRows x kB float accumulators held in registers. After a line's last block the
//     epilogue adds the bias in registers, converts, writes the kRows x kB tile to a per-warp staging area, and stores
//     whole rows of the line with 16-byte stores (scalar stores through out_scatter when the output is permuted).
// Index arithmetic is 32-bit with compile-time divisors inside the kernel (global row offsets are 64-bit products).
//
// The host emulation (csrc/emu/emulate.h) runs phase 1 per thread and phase 2 once per warp with the lane-parallel
// models of warp_sm80.h, so the staging with the permutation, the line schedule, the cp.async ring's addressing and
// waits (copies land only when their group is waited for), the ldmatrix addresses, the mma fragment layouts and the
// epilogue are executed and checked on the host; barriers (__syncwarp) and speed are left to the GPU
// (benchmarks/v2_sanitize.py under compute-sanitizer, tests/test_block_v2_cuda.py, gpu_ops.py).
#pragma once

#include "portable.h"
#include "block_warp.h"
#include "warp_sm80.h"

namespace padst::kern {

template <typename T>
struct BlockXsParams {
  const T* in = nullptr;                // [B, in_cols], 16-byte aligned, in_cols % 8 == 0
  const int32_t* in_scatter = nullptr;  // [in_cols], 16-byte aligned: staged place of input column c; null: identity
  const T* values = nullptr;            // [nnzb, kB, kB], 16-byte aligned
  const T* bias = nullptr;              // [out_cols] or null
  const int32_t* out_scatter = nullptr;  // [out_cols]: output column of product column r; null = identity
  T* out = nullptr;                      // [B, out_cols], 16-byte aligned
  const int32_t* ptr = nullptr;          // [lines + 1]
  const int32_t* idx = nullptr;          // input block-line of each block
  const int32_t* blk = nullptr;          // block index into values, or null (= position)
  int64_t B = 0;
  int32_t in_cols = 0, out_cols = 0, lines = 0;
};

// Shared memory a CTA may have on the GPUs this targets (H100/H200: 227 KB opt-in); the device launcher checks the
// actual device's limit.
inline constexpr int64_t kBlockXsMaxSmem = 227 * 1024;

template <typename T, bool kDx, int kB>
struct BlockXs {
  static_assert(kB == 16 || kB == 32 || kB == 64, "block side 16, 32 or 64");
  static_assert(sizeof(T) == 2, "fp16/bf16");
  using Params = BlockXsParams<T>;
  // 64 batch rows per CTA; 32 for kB = 64, where 64 x 64 float accumulators per warp would not fit in registers.
  static constexpr int kRows = kB == 64 ? 32 : 64;
  static constexpr int kWarps = kB == 64 ? 4 : 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPad = 8;                    // elements: 16 bytes, keeps ldmatrix rows off one bank
  static constexpr int kLd = kB + kPad;             // row stride of a weight slot and of the output staging
  static constexpr int kSlot = kB * kLd;            // elements per weight slot
  static constexpr int kStages = 2;
  static constexpr int kOst = kRows * kLd;          // elements of a warp's output staging
  static constexpr int kNT = kB / 8;                // n8 tiles per line
  static constexpr int kMT = kRows / 16;            // m16 tiles
  static constexpr int kAcc = kMT * kNT * 4;        // float accumulators per lane
  static constexpr int kChunks = kB / 8;            // 16-byte chunks per block row

  PADST_HD static int ldx(const Params& p) { return p.in_cols + kPad; }
  static int64_t smem_bytes(int64_t in_cols) {
    return (kRows * (in_cols + kPad) + kWarps * (kStages * kSlot + kOst)) * static_cast<int64_t>(sizeof(T));
  }
  PADST_HD static int64_t num_ctas(const Params& p) { return ceil_div(p.B, kRows); }

  // Shared memory carve-up: [xs: kRows x ldx][ring: kWarps x kStages x kSlot][ost: kWarps x kOst].
  PADST_HD static T* ring(const Params& p, T* xs, int warp) {
    return xs + kRows * ldx(p) + warp * (kStages * kSlot);
  }
  PADST_HD static T* ost(const Params& p, T* xs, int warp) {
    return xs + kRows * ldx(p) + kWarps * (kStages * kSlot) + warp * kOst;
  }

  using V16 = sm80::V16;

  // Phase 1 (thread tid of the CTA): xs[t][pos(c)] = in[b0 + t, c].
  PADST_WARP_HD static void stage(const Params& p, int64_t cta, int tid, T* xs) {
    const int warp = tid / 32, lane = tid % 32, n8 = p.in_cols / 8, ld = ldx(p);
    const int64_t b0 = cta * kRows;
    for (int t = warp; t < kRows; t += kWarps) {
      const int64_t b = b0 + t;
      T* dst = xs + t * ld;
      if (b >= p.B) {
        const V16 z = {{0u, 0u, 0u, 0u}};
        for (int c8 = lane; c8 < n8; c8 += 32) sm80::store16(dst + c8 * 8, z);
        continue;
      }
      const T* src = p.in + b * p.in_cols;
      if (p.in_scatter == nullptr) {
        for (int c8 = lane; c8 < n8; c8 += 32) sm80::cp_async_16(dst + c8 * 8, src + c8 * 8);
      } else {
        for (int c8 = lane; c8 < n8; c8 += 32) {
          const V16 v = sm80::load16(src + c8 * 8);
          const V16 pos[2] = {sm80::load16(p.in_scatter + c8 * 8), sm80::load16(p.in_scatter + c8 * 8 + 4)};
          PADST_UNROLL
          for (int j = 0; j < 8; ++j) dst[pos[j >> 2].w[j & 3]] = sm80::elem16<T>(v, j);
        }
      }
    }
    sm80::cp_async_commit();
  }

  // The first block at or after (line o, block q) in warp w's sequence of lines o, o + kWarps, ...; false if none.
  PADST_HD static bool next_block(const Params& p, int& o, int& q) {
    while (o < p.lines) {
      if (q < p.ptr[o + 1]) return true;
      o += kWarps;
      if (o < p.lines) q = p.ptr[o];
    }
    return false;
  }

  // acc += A (the kRows rows of xs at columns col0..col0+kB) x W (the slot).
  PADST_WARP_HD static void multiply(const Params& p, const T* xs, int col0, const T* slot, sm80::WAcc<kAcc>& acc,
                                     int lane) {
    warp_block_mma<T, kDx, kB, kMT>(xs + col0, ldx(p), slot, acc, 0, lane);
  }

  // Line o's epilogue: bias, convert, stage the kRows x kB tile, store rows. Each lane adds the bias of its 2 kNT
  // columns (loaded once per line) and writes pairs of adjacent columns as one 32-bit shared store.
  PADST_WARP_HD static void epilogue(const Params& p, int64_t cta, int o, const sm80::WAcc<kAcc>& acc, T* os,
                                     int lane) {
    const int r0 = o * kB;
    sm80::each_lane(lane, [&](int l) {
      const float* v = acc.lane(l);
      PADST_UNROLL
      for (int ni = 0; ni < kNT; ++ni) {
        const int col = ni * 8 + sm80::acc_col(l, 0);  // even; the pair is (col, col + 1)
        float b0 = 0.0f, b1 = 0.0f;
        if (p.bias) {
          const int r = r0 + col;
          b0 = Num<T>::to_acc(p.bias[p.out_scatter ? p.out_scatter[r] : r]);
          b1 = Num<T>::to_acc(p.bias[p.out_scatter ? p.out_scatter[r + 1] : r + 1]);
        }
        PADST_UNROLL
        for (int mi = 0; mi < kMT; ++mi)
          PADST_UNROLL
        for (int h = 0; h < 2; ++h) {  // accumulators (2h, 2h + 1): rows g and g + 8
          const int row = mi * 16 + sm80::acc_row(l, 2 * h), a = (mi * kNT + ni) * 4 + 2 * h;
          sm80::store_pair(os + row * kLd + col, Num<T>::from_acc(v[a] + b0), Num<T>::from_acc(v[a + 1] + b1));
        }
      }
    });
    sm80::syncwarp();
    const int64_t b0 = cta * kRows;
    sm80::each_lane(lane, [&](int l) {
      if (p.out_scatter == nullptr) {
        for (int i = l; i < kRows * kChunks; i += 32) {
          const int row = i / kChunks, c8 = i % kChunks;
          const int64_t b = b0 + row;
          if (b < p.B) sm80::store16(p.out + b * p.out_cols + r0 + c8 * 8, sm80::load16(os + row * kLd + c8 * 8));
        }
      } else {
        for (int i = l; i < kRows * kB; i += 32) {
          const int row = i / kB, c = i % kB;
          const int64_t b = b0 + row;
          if (b < p.B) p.out[b * p.out_cols + p.out_scatter[r0 + c]] = os[row * kLd + c];
        }
      }
    });
    sm80::syncwarp();  // the staging is reused by the next line
  }

  // Phase 2 (warp `warp`; lane = its lane on the device, sm80::kAllLanes on the host).
  PADST_WARP_HD static void warp_lines(const Params& p, int64_t cta, int warp, int lane, const T* xs, T* ring_w,
                                       T* os) {
    sm80::WAcc<kAcc> acc;
    int fo = warp, fq = warp < p.lines ? p.ptr[warp] : 0;  // next block to fetch
    int s = 0;
    if (next_block(p, fo, fq)) warp_fetch_block<T, kB>(p.values, p.blk ? p.blk[fq] : fq, ring_w, lane);
    sm80::cp_async_commit();
    for (int o = warp; o < p.lines; o += kWarps) {
      acc.zero();
      for (int q = p.ptr[o]; q < p.ptr[o + 1]; ++q) {
        int no = o, nq = q + 1;  // prefetch the block after q into the other slot
        if (next_block(p, no, nq))
          warp_fetch_block<T, kB>(p.values, p.blk ? p.blk[nq] : nq, ring_w + (s ^ 1) * kSlot, lane);
        sm80::cp_async_commit();
        sm80::cp_async_wait<1>();  // block q's group has landed
        sm80::syncwarp();
        multiply(p, xs, p.idx[q] * kB, ring_w + s * kSlot, acc, lane);
        sm80::syncwarp();  // every lane is done with slot s before it is refilled
        s ^= 1;
      }
      epilogue(p, cta, o, acc, os, lane);
    }
    sm80::cp_async_wait<0>();
  }
};

}  // namespace padst::kern
