// Block forward and dx: block_mm() runs the unpacked kernel (block_mm_mr.h) when a block's outputs split into whole
// vectors, else the packed kernel here, kept for block sides that are not whole vectors (e.g. 12x20): per packed tile
// of kTB batch rows (tiles.h), NR outputs of a block line at a time against kTB/VW vectors of inputs.
#pragma once

#include <cstdint>

#include "block_mm_mr.h"
#include "isa.h"
#include "tiles.h"
#include "vec.h"

namespace padst::cpu::rk {

// Outputs o0 .. o0+NR-1 of line `line` (o0 + NR <= outer).
template <int VW, int NR>
PADST_ALWAYS_INLINE void block_group(const float* xT, const BlockLine& L, int64_t line, int64_t o0, int64_t zo,
                                     float* z) {
  using V = typename Vec<VW>::V;
  constexpr int NV = kTB / VW;
  V acc[NR][NV];
  for (int n = 0; n < NR; ++n)
    for (int j = 0; j < NV; ++j) acc[n][j] = V{};
  for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
    const float* xq = xT + L.idx[q] * L.inner * kTB;
    const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
    for (int64_t i = 0; i < L.inner; ++i) {
      V xv[NV];
      for (int j = 0; j < NV; ++j) xv[j] = Vec<VW>::load(xq + i * kTB + j * VW);
      const float* wi = wq + i * L.wstride;
      for (int n = 0; n < NR; ++n) {
        const float w = wi[n];  // vector * scalar: a broadcast the compiler can fold into the FMA's memory operand
        for (int j = 0; j < NV; ++j) acc[n][j] += xv[j] * w;
      }
    }
  }
  for (int n = 0; n < NR; ++n) put<VW>(z, o0 - zo + n, acc[n]);
}

template <int VW, int NR, typename T>
PADST_ALWAYS_INLINE void block_body(const float* xT, const BlockLine& L, int64_t l0, int64_t l1, const Store<T>& st,
                                    int64_t b0, int64_t tb) {
  alignas(64) float z[kTB * kZW];
  for (int64_t line = l0; line < l1; ++line) {
    // the line's outputs in chunks of kZW
    for (int64_t zo = 0; zo < L.outer; zo += kZW) {
      const int64_t ze = zo + kZW < L.outer ? zo + kZW : L.outer;
      int64_t o = zo;
      for (; o + NR <= ze; o += NR) block_group<VW, NR>(xT, L, line, o, zo, z);
      for (; o < ze; ++o) block_group<VW, 1>(xT, L, line, o, zo, z);
      flush(st, line * L.outer + zo, ze - zo, b0, tb, z);
    }
  }
}

// Rows per group in block_body: enough FMA chains in flight with the fewest registers.
template <int VW>
inline constexpr int kBlockNR = VW >= 16 ? 8 : (VW == 8 ? 2 : 1);

// Block lines, dispatched on the ISA; `lines` lines of L.outer outputs each.
template <typename T>
void block_mm(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, const BlockLine& L, int64_t lines,
              const Store<T>& st) {
  if (block_mm_mr(in, B, in_cols, gather, L, lines, st)) return;
  const Isa isa = current_isa();
  drive(in, B, in_cols, gather, lines, 1, st,
        [&](const float* xT, int64_t l0, int64_t l1, int64_t b0, int64_t tb, const Store<T>& s) {
          dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
            constexpr int VW = decltype(k)::vw;
            block_body<VW, kBlockNR<VW>>(xT, L, l0, l1, s, b0, tb);
          });
        });
}

}  // namespace padst::cpu::rk
