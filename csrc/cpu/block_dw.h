// Block weight gradient: dV[k] = dz[:, rows(k)]^T x[:, cols(k)] (a [br x B] x [B x bc] product per block). Per tile of
// kDwTB batch rows, dz is packed transposed (zT[r][t], through the inverse output permutation) and x as rows
// (through the input permutation), once for all blocks; then every block accumulates RB rows x CV vectors in
// registers over the tile (per batch row: CV loads, RB broadcasts, RB*CV FMAs) into its float accumulator.
// Serves blocks whose width is a whole number of vectors (block_dw returns false otherwise).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "vec.h"

namespace padst::cpu::rk {

inline constexpr int64_t kDwTB = 32;
// Block rows per register tile (RB rows x CV vectors of accumulators): 16 accumulators for AVX-512 (32 registers),
// 12 for AVX2 and SSE2 (16 registers).
template <int VW, int CV>
inline constexpr int kDwRB = (VW >= 16 ? 16 : 12) / CV;

// One batch tile, packed once for all blocks: zT[r][t] = dy[b0 + t, dy_src(r)] for every output row r (the tile
// transposed, through the inverse output permutation) and xp[t][c] = x[b0 + t, x_src(c)] (rows, through the input
// permutation). Blocks k in [k0, k1) then accumulate dV[k] (floats, acc + k*br*bc) over the tile.
template <typename T>
struct DwTile {
  const float* zT;  // [R][kDwTB]
  const float* xp;  // [kDwTB][C]
  int64_t C, br, bc, tb;
  const int64_t* blk_rows;
  const int64_t* col_idx;
  float* acc;  // [nnzb][br][bc]
};

// acc[(r0+i)*bc + c0 + ...] += sum_t zT[(r0+i)*zld + t] * xg[t*xld + c0 + ...]: RB rows x CV vectors in registers
template <int VW, int RB, int CV>
PADST_ALWAYS_INLINE void dw_tile(const float* zT, int64_t zld, const float* xg, int64_t xld, int64_t bc, int64_t tb,
                                 int64_t r0, int64_t c0, float* acc) {
  using V = typename Vec<VW>::V;
  V a[RB][CV];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < CV; ++v) a[i][v] = Vec<VW>::load(acc + (r0 + i) * bc + c0 + v * VW);
  for (int64_t t = 0; t < tb; ++t) {
    V xv[CV];
    for (int v = 0; v < CV; ++v) xv[v] = Vec<VW>::load(xg + t * xld + c0 + v * VW);
    for (int i = 0; i < RB; ++i) {
      const float z = zT[(r0 + i) * zld + t];
      for (int v = 0; v < CV; ++v) a[i][v] += xv[v] * z;
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < CV; ++v) Vec<VW>::store(acc + (r0 + i) * bc + c0 + v * VW, a[i][v]);
}

template <int VW, int RB, int CV, typename T>
PADST_ALWAYS_INLINE void dw_body(const DwTile<T>& d, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const float* z = d.zT + d.blk_rows[k] * d.br * kDwTB;
    const float* x = d.xp + d.col_idx[k] * d.bc;
    float* acc = d.acc + k * d.br * d.bc;
    for (int64_t c0 = 0; c0 < d.bc; c0 += CV * VW) {
      int64_t r0 = 0;
      for (; r0 + RB <= d.br; r0 += RB) dw_tile<VW, RB, CV>(z, kDwTB, x, d.C, d.bc, d.tb, r0, c0, acc);
      for (; r0 < d.br; ++r0) dw_tile<VW, 1, CV>(z, kDwTB, x, d.C, d.bc, d.tb, r0, c0, acc);
    }
  }
}

// Block weight gradient for blocks whose width is a whole number of vectors; false when it cannot serve.
// blk_rows: block-row of each block; rows_map: the dy column of each output row (inverse output permutation, or
// null); cols_map: the x column of each input column (input permutation, or null). Batch tiles outside, blocks
// inside: each tile of dy and x is packed once (not once per block), the accumulators (nnz floats) stay in L2.
template <typename T>
bool block_dw(const T* dy, const T* x, int64_t B, int64_t R, int64_t C, int64_t br, int64_t bc, int64_t nnzb,
              const int64_t* blk_rows, const int64_t* col_idx, const int64_t* rows_map, const int64_t* cols_map,
              T* dv) {
  const Isa isa = current_isa();
  const int vw = vec_floats(isa);
  const int cv = bc % (2 * vw) == 0 ? 2 : (bc % vw == 0 ? 1 : 0);
  if (cv == 0) return false;
  const int64_t area = br * bc;
  std::vector<float> acc(static_cast<size_t>(nnzb * area), 0.0f);
  std::vector<float> zT(static_cast<size_t>(R * kDwTB)), xp(static_cast<size_t>(kDwTB * C));
  for (int64_t b0 = 0; b0 < B; b0 += kDwTB) {
    const int64_t tb = std::min(kDwTB, B - b0);
    // pack: zT by output rows, xp by batch rows
    at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t t = 0; t < kDwTB; ++t) {
        const T* dyr = dy + (b0 + t) * R;
        for (int64_t r = r0; r < r1; ++r)
          zT[r * kDwTB + t] = t < tb ? static_cast<float>(dyr[rows_map ? rows_map[r] : r]) : 0.0f;
      }
    });
    at::parallel_for(0, tb, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const T* xr = x + (b0 + t) * C;
        float* o = xp.data() + t * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<float>(xr[cols_map ? cols_map[c] : c]);
      }
    });
    const DwTile<T> d{zT.data(), xp.data(), C, br, bc, tb, blk_rows, col_idx, acc.data()};
    at::parallel_for(0, nnzb, 1, [&](int64_t k0, int64_t k1) {
      auto run = [&](auto cv_c) {
        dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
          constexpr int VW = decltype(k)::vw, CV = decltype(cv_c)::value;
          dw_body<VW, kDwRB<VW, CV>, CV>(d, k0, k1);
        });
      };
      cv == 2 ? run(std::integral_constant<int, 2>{}) : run(std::integral_constant<int, 1>{});
    });
  }
  at::parallel_for(0, nnzb * area, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) dv[e] = static_cast<T>(acc[e]);
  });
  return true;
}

}  // namespace padst::cpu::rk
