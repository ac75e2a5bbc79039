// The warp-level product of one weight block, shared by the tensor-core block kernels block_xs.h and block_rc.h:
//   acc[acc_off + (mi * kB/8 + ni) * 4 + i] += A (16 kMT rows x kB, row-major at a, leading dimension lda)
//                                              x W (kB x kB, a weight slot in shared memory, leading dimension kB + 8)
// forward (kDx = false): W(k, n) = slot[n][k] (the block as stored, V[n][k]); dx (kDx = true): W(k, n) = slot[k][n].
// ldmatrix for both operands (.trans for the dx weight), mma.sync m16n8k16 with float accumulators; accumulator i of
// lane l of tile (mi, ni) is element (mi*16 + acc_row(l, i), ni*8 + acc_col(l, i)) of the kRows x kB product.
#pragma once

#include "warp_sm80.h"

namespace padst::kern {

template <typename T, bool kDx, int kB, int kMT, int kNAcc>
PADST_WARP_HD void warp_block_mma(const T* a, int lda, const T* slot, sm80::WAcc<kNAcc>& acc, int acc_off, int lane) {
  constexpr int kNT = kB / 8, kKT = kB / 16, kLd = kB + 8;
  PADST_UNROLL
  for (int kk = 0; kk < kKT; ++kk) {
    sm80::WReg<4> fa[kMT];
    PADST_UNROLL
    for (int mi = 0; mi < kMT; ++mi)  // 8x8 matrices (rows 0-7, k), (rows 8-15, k), (rows 0-7, k+8), (rows 8-15, k+8)
      sm80::ldsm_x4<T>(fa[mi], lane, [&](int l) { return a + (mi * 16 + (l & 15)) * lda + kk * 16 + (l >> 4) * 8; });
    PADST_UNROLL
    for (int np = 0; np < kNT / 2; ++np) {
      sm80::WReg<4> fb;
      if constexpr (!kDx) {  // slot[n][k]: (n, k), (n, k+8), (n+8, k), (n+8, k+8)
        sm80::ldsm_x4<T>(fb, lane, [&](int l) {
          return slot + (np * 16 + (l & 7) + ((l >> 4) << 3)) * kLd + kk * 16 + ((l >> 3) & 1) * 8;
        });
      } else {  // slot[k][n], transposed on load: (k, n), (k+8, n), (k, n+8), (k+8, n+8)
        sm80::ldsm_x4_trans<T>(fb, lane, [&](int l) {
          return slot + (kk * 16 + (l & 7) + ((l >> 3) & 1) * 8) * kLd + np * 16 + (l >> 4) * 8;
        });
      }
      PADST_UNROLL
      for (int mi = 0; mi < kMT; ++mi) {
        sm80::mma_16816<T>(acc, acc_off + (mi * kNT + 2 * np) * 4, fa[mi], 0, fb, 0, lane);
        sm80::mma_16816<T>(acc, acc_off + (mi * kNT + 2 * np + 1) * 4, fa[mi], 0, fb, 2, lane);
      }
    }
  }
}

// Starts the cp.async copy of block blk's kB x kB values into a slot (rows padded to kB + 8), 16 bytes per lane-step.
template <typename T, int kB>
PADST_WARP_HD void warp_fetch_block(const T* values, int blk, T* slot, int lane) {
  constexpr int kChunks = kB / 8, kLd = kB + 8;
  const T* src = values + static_cast<int64_t>(blk) * (kB * kB);
  sm80::each_lane(lane, [&](int l) {
    for (int i = l; i < kB * kChunks; i += 32)
      sm80::cp_async_16(slot + (i / kChunks) * kLd + (i % kChunks) * 8, src + i * 8);
  });
}

}  // namespace padst::kern
