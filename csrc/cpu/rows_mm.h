// The row kernel (N:M forward, N:M dx over the transposed pattern): out[b, dst(r)] = bias + sum over the entries of
// row r of values * in_p, the entries given by a row walker (kernels/entries.h). Per packed tile of kTB batch rows
// (tiles.h), one output row at a time over its own entries, split between two accumulator sets: one broadcast weight
// times kTB/VW vector FMAs per entry.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "isa.h"
#include "tiles.h"
#include "tune.h"
#include "tune_key.h"
#include "vec.h"

namespace padst::cpu::rk {

inline constexpr int64_t kAhead = 8;  // default prefetch distance in entries (rows_body)

// Rows r in [r0, r1), each over its own entries (kernels/entries.h functors: begin/end/at), on a packed tile of TB
// batch rows; `ahead`: prefetch distance in entries (0: none).
template <int VW, int64_t TB, typename T, typename E>
PADST_ALWAYS_INLINE void rows_body(const float* xT, const float* vals, const E& rows, int64_t r0, int64_t r1,
                                   const Store<T>& st, int64_t b0, int64_t tb, int64_t ahead) {
  using V = typename Vec<VW>::V;
  constexpr int NV = TB / VW >= 1 ? TB / VW : 1;
  static_assert(TB % VW == 0, "the batch tile is whole vectors");
  alignas(64) float z[TB * kZW];
  for (int64_t r = r0; r < r1; ++r) {
    V a[NV], b[NV];
    for (int j = 0; j < NV; ++j) a[j] = b[j] = V{};
    const int64_t e = rows.end(r);
    int64_t q = rows.begin(r);
    for (; q + 1 < e; q += 2) {
      int64_t c0 = 0, v0 = 0, c1 = 0, v1 = 0;
      const bool ok0 = rows.at(r, q, c0, v0), ok1 = rows.at(r, q + 1, c1, v1);
      if (ahead && q + ahead < e) {  // the packed columns come from L2 in a random order: fetch a few entries ahead
        int64_t cp = 0, vp = 0;
        if (rows.at(r, q + ahead, cp, vp))
          for (int64_t l = 0; l < TB; l += 16) __builtin_prefetch(xT + cp * TB + l);
      }
      const float w0 = ok0 ? vals[v0] : 0.0f, w1 = ok1 ? vals[v1] : 0.0f;  // scalar operands (vec.h bcast)
      const float* x0 = xT + (ok0 ? c0 : 0) * TB;
      const float* x1 = xT + (ok1 ? c1 : 0) * TB;
      for (int j = 0; j < NV; ++j) {
        a[j] += Vec<VW>::load(x0 + j * VW) * w0;
        b[j] += Vec<VW>::load(x1 + j * VW) * w1;
      }
    }
    if (q < e) {
      int64_t c0 = 0, v0 = 0;
      if (rows.at(r, q, c0, v0)) {
        const float w0 = vals[v0];
        for (int j = 0; j < NV; ++j) a[j] += Vec<VW>::load(xT + c0 * TB + j * VW) * w0;
      }
    }
    for (int j = 0; j < NV; ++j) a[j] += b[j];
    const int64_t g0 = r0 + ((r - r0) / kZW) * kZW;
    put<VW, TB>(z, r - g0, a);
    if (r + 1 == r1 || r + 1 - g0 == kZW) flush(st, g0, r + 1 - g0, b0, tb, z);
  }
}

// rows over a functor, dispatched on the ISA. The variant (tune.h) is chosen per shape class of `family`: the batch
// tile (16, 32 or 64 rows: its packed columns are what every entry loads, from L1 or L2 depending on its size) and
// the prefetch distance.
template <typename T, typename E>
void rows_mm(const char* family, const T* in, int64_t B, int64_t in_cols, const int64_t* gather, const float* vals,
             const E& rows, int64_t nrows, const Store<T>& st) {
  const Isa isa = current_isa();
  const int vw = vec_floats(isa);
  const tune::Space space{{"tb", "ahead"}, {{32, 16, 64}, {8, 0, 4, 16}}, {0, 0}};
  auto valid = [&](const tune::Point& p) { return p[0] % vw == 0; };
  auto run = [&](auto tb_c, int64_t ahead) {
    constexpr int64_t TB = decltype(tb_c)::value;
    drive<TB>(in, B, in_cols, gather, nrows, 16, st,
              [&](const float* xT, int64_t r0, int64_t r1, int64_t b0, int64_t tb, const Store<T>& s) {
                dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
                  constexpr int VW = decltype(k)::vw;
                  if constexpr (TB % VW == 0) rows_body<VW, TB>(xT, vals, rows, r0, r1, s, b0, tb, ahead);
                });
              });
  };
  const int64_t nnz = nrows ? rows.end(nrows - 1) - rows.begin(0) : 0;
  const std::string shape = "in" + std::to_string(in_cols) + " rows" + std::to_string(nrows) + " nnz" +
                            std::to_string(nnz) + (gather ? " gin" : "") + (st.scatter ? " gout" : "");
  tune::choose(tune_key<T>(family, B, shape), space, valid, [&](const tune::Point& p) {
    tune::with_value<16, 32, 64>("nm_mm tb", p[0], [&](auto tb_c) { run(tb_c, p[1]); });
  });
}

}  // namespace padst::cpu::rk
