// The row kernel (N:M forward, N:M dx over the transposed pattern): out[b, dst(r)] = bias + sum over the entries of
// row r of values * in_p, the entries given by a row walker (kernels/entries.h). Per packed tile of kTB batch rows
// (tiles.h), one output row at a time over its own entries, split between two accumulator sets: one broadcast weight
// times kTB/VW vector FMAs per entry.
#pragma once

#include <cstdint>

#include "isa.h"
#include "tiles.h"
#include "vec.h"

namespace padst::cpu::rk {

inline constexpr int64_t kAhead = 8;  // prefetch distance in entries (rows_body)

// Rows r in [r0, r1), each over its own entries (kernels/entries.h functors: begin/end/at).
template <int VW, typename T, typename E>
PADST_ALWAYS_INLINE void rows_body(const float* xT, const float* vals, const E& rows, int64_t r0, int64_t r1,
                                   const Store<T>& st, int64_t b0, int64_t tb) {
  using V = typename Vec<VW>::V;
  constexpr int NV = kTB / VW;
  alignas(64) float z[kTB * kZW];
  for (int64_t r = r0; r < r1; ++r) {
    V a[NV], b[NV];
    for (int j = 0; j < NV; ++j) a[j] = b[j] = V{};
    const int64_t e = rows.end(r);
    int64_t q = rows.begin(r);
    for (; q + 1 < e; q += 2) {
      int64_t c0 = 0, v0 = 0, c1 = 0, v1 = 0;
      const bool ok0 = rows.at(r, q, c0, v0), ok1 = rows.at(r, q + 1, c1, v1);
      if (q + kAhead < e) {  // the packed columns come from L2 in a random order: fetch a few entries ahead
        int64_t cp = 0, vp = 0;
        if (rows.at(r, q + kAhead, cp, vp)) {
          __builtin_prefetch(xT + cp * kTB);
          __builtin_prefetch(xT + cp * kTB + 16);
        }
      }
      const V w0 = Vec<VW>::bcast(ok0 ? vals[v0] : 0.0f), w1 = Vec<VW>::bcast(ok1 ? vals[v1] : 0.0f);
      const float* x0 = xT + (ok0 ? c0 : 0) * kTB;
      const float* x1 = xT + (ok1 ? c1 : 0) * kTB;
      for (int j = 0; j < NV; ++j) {
        a[j] += w0 * Vec<VW>::load(x0 + j * VW);
        b[j] += w1 * Vec<VW>::load(x1 + j * VW);
      }
    }
    if (q < e) {
      int64_t c0 = 0, v0 = 0;
      if (rows.at(r, q, c0, v0)) {
        const V w0 = Vec<VW>::bcast(vals[v0]);
        for (int j = 0; j < NV; ++j) a[j] += w0 * Vec<VW>::load(xT + c0 * kTB + j * VW);
      }
    }
    for (int j = 0; j < NV; ++j) a[j] += b[j];
    const int64_t g0 = r0 + ((r - r0) / kZW) * kZW;
    put<VW>(z, r - g0, a);
    if (r + 1 == r1 || r + 1 - g0 == kZW) flush(st, g0, r + 1 - g0, b0, tb, z);
  }
}

// rows over a functor, dispatched on the ISA.
template <typename T, typename E>
void rows_mm(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, const float* vals, const E& rows,
             int64_t nrows, const Store<T>& st) {
  const Isa isa = current_isa();
  drive(in, B, in_cols, gather, nrows, 16, st,
        [&](const float* xT, int64_t r0, int64_t r1, int64_t b0, int64_t tb, const Store<T>& s) {
          dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
            rows_body<decltype(k)::vw>(xT, vals, rows, r0, r1, s, b0, tb);
          });
        });
}

}  // namespace padst::cpu::rk
