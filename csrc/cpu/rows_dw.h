// Weight gradient over row functors (N:M, diagonals): dv[v(r, q)] = sum_b dz[b, r] * x_p[b, col(r, q)]. Per batch
// tile of tb rows (tb up to 256, chosen so that the packed x tile fits in L2), dz and x are packed transposed
// (zT[r][t], xT[c][t], through their permutations); each entry is then a tb-long dot product of two contiguous
// vectors (tb/VW FMAs into two accumulator sets), reduced once per tile into a float accumulator.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "vec.h"

namespace padst::cpu::rk {

template <int VW, typename E>
PADST_ALWAYS_INLINE void rows_dw_body(const float* zT, const float* xT, int64_t ld, const E& rows, int64_t r0,
                                      int64_t r1, float* acc) {
  using V = typename Vec<VW>::V;
  for (int64_t r = r0; r < r1; ++r) {
    const float* z = zT + r * ld;
    const int64_t e = rows.end(r);
    for (int64_t q = rows.begin(r); q < e; ++q) {
      int64_t col = 0, v = 0;
      if (!rows.at(r, q, col, v)) continue;
      const float* xc = xT + col * ld;
      V p0 = V{}, p1 = V{};
      int64_t t = 0;
      for (; t + 2 * VW <= ld; t += 2 * VW) {
        p0 += Vec<VW>::load(z + t) * Vec<VW>::load(xc + t);
        p1 += Vec<VW>::load(z + t + VW) * Vec<VW>::load(xc + t + VW);
      }
      for (; t < ld; t += VW) p0 += Vec<VW>::load(z + t) * Vec<VW>::load(xc + t);
      p0 += p1;
      alignas(64) float f[VW];
      Vec<VW>::store(f, p0);
      float sum = 0.0f;
      for (int i = 0; i < VW; ++i) sum += f[i];
      acc[v] += sum;
    }
  }
}

// rows_dw_body compiled for `isa` (one per entry type, whatever the data type).
template <typename E>
void rows_dw_tile(Isa isa, const float* zT, const float* xT, int64_t ld, const E& rows, int64_t r0, int64_t r1,
                  float* acc) {
  dispatch_isa(isa, [&](auto k) PADST_ISA_BODY { rows_dw_body<decltype(k)::vw>(zT, xT, ld, rows, r0, r1, acc); });
}

// The driver of rows_dw_body: out [nnz] (T). Threads split the rows (each entry belongs to one row).
template <typename T, typename E>
void rows_dw(const T* dy, const T* x, int64_t B, int64_t R, int64_t C, const int64_t* dy_gather,
             const int64_t* x_gather, const E& rows, int64_t nnz, T* out) {
  const Isa isa = current_isa();
  // the packed x tile within ~768 KB of L2; a multiple of 32 rows
  int64_t TB = 256;
  while (TB > 32 && C * TB * static_cast<int64_t>(sizeof(float)) > (768 << 10)) TB /= 2;
  std::vector<float> acc(static_cast<size_t>(nnz), 0.0f);
  c10::DataPtr buf = c10::GetCPUAllocator()->allocate(static_cast<size_t>((R + C) * TB) * sizeof(float) + 64);
  float* zT = static_cast<float*>(buf.get());
  float* xT = zT + R * TB;
  for (int64_t b0 = 0; b0 < B; b0 += TB) {
    const int64_t tb = std::min(TB, B - b0);
    const int64_t ld = (tb + 31) / 32 * 32;  // zero-padded to whole vectors
    at::parallel_for(0, R + C, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const bool isz = i < R;
        const int64_t c = isz ? i : i - R, w = isz ? R : C;
        const int64_t* g = isz ? dy_gather : x_gather;
        const T* col = (isz ? dy : x) + b0 * w + (g ? g[c] : c);
        float* o = (isz ? zT : xT) + c * ld;
        int64_t t = 0;
        for (; t < tb; ++t) o[t] = static_cast<float>(col[t * w]);
        for (; t < ld; ++t) o[t] = 0.0f;
      }
    });
    at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
      rows_dw_tile(isa, zT, xT, ld, rows, r0, r1, acc.data());
    });
  }
  at::parallel_for(0, nnz, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) out[e] = static_cast<T>(acc[e]);
  });
}

}  // namespace padst::cpu::rk
