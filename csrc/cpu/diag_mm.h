// The diagonal kernel (diagonal forward and dx): runs of consecutive outputs against runs of values and inputs,
// element-wise, MR batch rows per step; the values are first repacked by output chunk (DiagPacked) so that a chunk
// streams its values contiguously and meets no edge cases.
// Every diagonal maps a run of consecutive outputs u to consecutive value indices t and consecutive
// inputs w (kernels/entries.h DiagRows, with u the output index):
//   shifted form: t = (u - o) mod P (an entry only if t < L), w = t      (tall forward, wide dx)
//   direct form:  t = u,                                w = (u + o) mod P  (wide forward, tall dx)
// so a chunk of NRV*VW outputs takes, per diagonal, element-wise products of a vector of values and a vector
// of inputs, MR batch rows at a time (the values repacked per chunk, DiagPacked below).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "tiles.h"
#include "tune.h"
#include "tune_key.h"
#include "vec.h"

namespace padst::cpu::rk {

inline constexpr int64_t kDiagW = 64;  // at least the widest chunk of diag_chunk (NRV * VW)
// Batch rows x output vectors per diagonal step (each loaded value vector serves MR rows), by vector width:
// 16 accumulators for AVX-512 (32 registers), 12 for AVX2 and SSE2 (16 registers).
template <int VW>
inline constexpr int kDiagMR = VW >= 16 ? 8 : (VW == 8 ? 6 : 3);
constexpr int diag_nrv(int vw) { return vw == 4 ? 4 : 2; }
template <int VW>
inline constexpr int kDiagNRV = diag_nrv(VW);
// The register tiles a variant may take: at most 24 accumulators with AVX-512 (32 registers), 12 otherwise (16).
constexpr bool diag_fits(int mr, int nrv, int vw) { return mr * nrv <= (vw >= 16 ? 24 : 12); }

template <typename T>
struct DiagArgs {
  const T* in;
  int64_t in_cols;
  const int64_t* in_gather;
  const float* vals;  // [K][vld]: the L values of diagonal k in row k, as float
  int64_t vld;
  int64_t K, L, P;
  bool shifted;
  int64_t nout;
  Store<T> st;
  float* xbuf;  // [group][xld]: input rows, permuted, as float, [kDiagW zeros, x_p, kDiagW zeros]; xbuf points at
                // row 0's x_p
  int64_t xld;
  float* zrow;  // [group][nout] when st.scatter is set
  // shifted form: the offsets ascending and their diagonals, so that a chunk visits only the diagonals that reach
  // it (offsets in the circular window (u0 - L, u0 + W) mod P) instead of all K
  const int64_t* sorted = nullptr;
  const int64_t* order = nullptr;
  int64_t group = 0;  // rows packed at once (set by diag_mm)
  int64_t tile = 0;   // outputs per tile (set by diag_mm)
  // set by diag_mm: the values packed by chunk of W outputs (DiagPacked)
  const float* pv = nullptr;
  const int32_t* px = nullptr;
  const int64_t* pptr = nullptr;
};

// ---------------------------------------------------------------------------------------------------------
// The values repacked by output chunk: chunk c (outputs c*W .. c*W + W - 1) owns items pptr[c] .. pptr[c+1]; item i
// holds W values pv[i*W ..] (zero in lanes without an entry) and the input offset px[i] of its lane 0, so that the
// kernel reads one contiguous stream of values per chunk and one input vector per item and row, with no edge cases:
// lanes past the diagonal's end, before its start or past the wrap are zeros here, and the input rows carry
// kDiagW zeros on either side for the loads those lanes make.
//   shifted form: lane j of a diagonal with offset o is t = (u0 + j - o) mod P, an entry if t < L, input t; the
//                 lanes split where t wraps (one item per wrap count, only when P < L + W);
//   direct form:  lane j is t = u0 + j (an entry if t < L), input (t + o) mod P: one item, two where the input
//                 wraps.
// ---------------------------------------------------------------------------------------------------------
struct DiagPacked {
  std::vector<float> v;
  std::vector<int32_t> x;
  std::vector<int64_t> ptr;
};

template <typename T, typename F>
void diag_items(const DiagArgs<T>& a, int64_t W, int64_t u0, F&& emit /* (k, xoff, vbase, q_lo, q_hi) */) {
  if (!a.shifted) {
    // in ascending offsets, so that consecutive items read overlapping or nearby inputs (L1) instead of random ones
    for (int64_t j = 0; j < a.K; ++j) {
      const int64_t k = a.order[j];
      int64_t w0 = u0 + a.sorted[j];
      if (w0 >= a.P) w0 -= a.P;
      // lanes up to the input wrap, then (only when some lane there holds an entry) the rest from the row's start
      const int64_t split = std::min(W, a.P - w0);
      emit(k, w0, u0, int64_t{0}, split);
      if (split < W && u0 + split < a.L) emit(k, w0 - a.P, u0, split, W);
    }
    return;
  }
  // offsets in the circular window [u0 - L + 1, u0 + W - 1] reach the chunk: from the first sorted offset >= its
  // start, at most K of them
  int64_t s0 = u0 - a.L + 1;
  while (s0 < 0) s0 += a.P;
  const int64_t len = std::min(a.L + W - 1, a.P);
  const int64_t start = std::lower_bound(a.sorted, a.sorted + a.K, s0) - a.sorted;
  for (int64_t q = 0; q < a.K; ++q) {
    const int64_t j = start + q < a.K ? start + q : start + q - a.K;
    int64_t d = a.sorted[j] - s0;
    if (d < 0) d += a.P;
    if (d >= len) break;
    const int64_t k = a.order[j];
    int64_t ts = (u0 - a.sorted[j]) % a.P;  // lane 0's t, taken in (-P, P)
    if (ts >= a.L) ts -= a.P;
    // lanes [lo, hi) share one wrap count n = floor((ts + lane) / P): input and value index ts + lane - n * P
    for (int64_t lo = 0; lo < W;) {
      const int64_t t = ts + lo;
      const int64_t n = t >= 0 ? t / a.P : -((-t + a.P - 1) / a.P);
      const int64_t hi = std::min(W, (n + 1) * a.P - ts);
      const int64_t base = ts - n * a.P;
      if (base + lo < a.L) emit(k, base, base, lo, hi);  // some lane of the run holds an entry
      lo = hi;
    }
  }
}

template <typename T>
DiagPacked diag_pack_values(const DiagArgs<T>& a, int64_t W) {
  DiagPacked p;
  const int64_t nc = (a.nout + W - 1) / W;
  p.ptr.assign(nc + 1, 0);
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t n = 0;
      diag_items(a, W, c * W, [&](int64_t, int64_t, int64_t, int64_t, int64_t) { ++n; });
      p.ptr[c + 1] = n;
    }
  });
  for (int64_t c = 0; c < nc; ++c) p.ptr[c + 1] += p.ptr[c];
  p.v.assign(static_cast<size_t>(p.ptr[nc] * W), 0.0f);
  p.x.resize(static_cast<size_t>(p.ptr[nc]));
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t i = p.ptr[c];
      const int64_t u0 = c * W;
      diag_items(a, W, u0, [&](int64_t k, int64_t xoff, int64_t vbase, int64_t lo, int64_t hi) {
        // lanes j in [lo, hi) with an entry: 0 <= vbase + j < L and u0 + j < nout, one run
        const int64_t j0 = std::max(lo, -vbase), j1 = std::min({hi, a.L - vbase, a.nout - u0});
        if (j1 > j0) {
          std::memcpy(p.v.data() + i * W + j0, a.vals + k * a.vld + vbase + j0,
                      static_cast<size_t>(j1 - j0) * sizeof(float));
        }
        p.x[i++] = static_cast<int32_t>(xoff);
      });
    }
  });
  return p;
}

template <int VW, int NRV, int M, typename T>
PADST_ALWAYS_INLINE void diag_chunk(const DiagArgs<T>& a, const float* xg, int64_t u0, float* zout /* [M][W] */) {
  using V = typename Vec<VW>::V;
  constexpr int W = NRV * VW;
  V acc[M][NRV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NRV; ++v) acc[m][v] = V{};
  const int64_t c = u0 / W;
  for (int64_t i = a.pptr[c], e = a.pptr[c + 1]; i < e; ++i) {
    V wv[NRV];
    for (int v = 0; v < NRV; ++v) wv[v] = Vec<VW>::load(a.pv + i * W + v * VW);
    const float* xi = xg + a.px[i];
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < NRV; ++v) acc[m][v] += wv[v] * Vec<VW>::load(xi + m * a.xld + v * VW);
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NRV; ++v) Vec<VW>::store(zout + m * W + v * VW, acc[m][v]);
}

// Row i of the super-group starting at batch row b, permuted and as float, into xbuf + i * xld (see DiagArgs::xbuf).
template <typename T>
PADST_ALWAYS_INLINE void diag_pack(const DiagArgs<T>& a, int64_t b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = a.in + (b + i) * a.in_cols;
    float* xm = a.xbuf + i * a.xld;  // xbuf points kDiagW floats into the buffer: the front padding
    for (int64_t c = -kDiagW; c < 0; ++c) xm[c] = 0.0f;
    if (a.in_gather) {
      // random reads within a row defeat the hardware prefetcher: the next row is fetched meanwhile
      if (i + 1 < n) {
        const char* next = reinterpret_cast<const char*>(row + a.in_cols);
        for (int64_t p = 0; p < a.in_cols * static_cast<int64_t>(sizeof(T)); p += 64) __builtin_prefetch(next + p);
      }
      for (int64_t c = 0; c < a.in_cols; ++c) xm[c] = static_cast<float>(row[a.in_gather[c]]);
    } else {
      for (int64_t c = 0; c < a.in_cols; ++c) xm[c] = static_cast<float>(row[c]);
    }
    for (int64_t c = a.in_cols; c < a.xld - kDiagW; ++c) xm[c] = 0.0f;
  }
}

// Outputs [u0, u1) of the M packed rows at xg (batch rows b..b+M-1).
template <int VW, int NRV, int M, typename T>
PADST_ALWAYS_INLINE void diag_rows(const DiagArgs<T>& a, const float* xg, int64_t b, int64_t zb, int64_t u0, int64_t u1) {
  constexpr int W = NRV * VW;
  alignas(64) float z[M * W];
  for (; u0 < u1; u0 += W) {
    diag_chunk<VW, NRV, M>(a, xg, u0, z);
    const int64_t n = a.nout - u0 < W ? a.nout - u0 : W;
    for (int m = 0; m < M; ++m) {
      if (a.st.scatter) {
        std::memcpy(a.zrow + (zb + m) * a.nout + u0, z + m * W, n * sizeof(float));
      } else {
        T* o = a.st.out + (b + m) * a.st.out_cols + u0;
        const float* zm = z + m * W;
        if (a.st.bias) {
          for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(zm[j] + static_cast<float>(a.st.bias[u0 + j]));
        } else {
          for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(zm[j]);
        }
      }
    }
  }
}

// Super-groups of a.group rows are packed once; then output tiles of a.tile outputs outside, groups of MR rows
// inside, so that the values a tile reaches (a.tile / P of them in the shifted form) stay in L2 for every group.
template <int VW, int MR, typename T>
PADST_ALWAYS_INLINE void diag_body(const DiagArgs<T>& a, int64_t b0, int64_t b1) {
  constexpr int NRV = kDiagNRV<VW>;
  constexpr int W = NRV * VW;
  const int64_t tile = (a.tile + W - 1) / W * W;
  for (int64_t sb = b0; sb < b1; sb += a.group) {
    const int64_t sn = std::min<int64_t>(a.group, b1 - sb);
    diag_pack(a, sb, sn);
    for (int64_t u0 = 0; u0 < a.nout; u0 += tile) {
      const int64_t u1 = std::min(u0 + tile, a.nout);
      int64_t i = 0;
      for (; i + MR <= sn; i += MR) diag_rows<VW, NRV, MR>(a, a.xbuf + i * a.xld, sb + i, i, u0, u1);
      for (; i < sn; ++i) diag_rows<VW, NRV, 1>(a, a.xbuf + i * a.xld, sb + i, i, u0, u1);
    }
    if (a.st.scatter) {
      for (int64_t i = 0; i < sn; ++i)
        write_row(isa_of_width(VW), a.st, a.st.out + (sb + i) * a.st.out_cols, a.zrow + i * a.nout);
    }
  }
}

// Diagonal forward / dx (see DiagArgs): the values repacked by chunk (DiagPacked), a.xbuf / a.zrow allocated here.
// The variant (tune.h) is chosen per shape class: batch rows per step (mr), the values each output tile reaches
// (tile_kb of L2), and the rows packed at once (group; 0: 64 in the shifted form with an identity output, else mr).
template <typename T>
void diag_mm(const DiagArgs<T>& proto, int64_t B) {
  const Isa isa = current_isa();
  const int vw = vec_floats(isa);
  const int def_mr = vw >= 16 ? kDiagMR<16> : (vw == 8 ? kDiagMR<8> : kDiagMR<4>);
  const int nrv = diag_nrv(vw);
  const tune::Space space{{"mr", "tile_kb", "group"},
                          {{3, 4, 6, 8, 12}, {256, 64, 1024}, {0, 16, 64}},
                          {def_mr == 3 ? 0 : (def_mr == 6 ? 2 : 3), 0, 0}};
  auto group_of = [&](const tune::Point& p) -> int64_t {
    return p[2] != 0 ? p[2] : (proto.shifted && !proto.st.scatter ? 64 : std::max<int64_t>(kDiagMR<16>, p[0]));
  };
  // accumulators within the register budget of kDiagFits; whole register tiles in a group
  auto valid = [&](const tune::Point& p) { return diag_fits(p[0], nrv, vw) && group_of(p) >= p[0]; };
  const int64_t W = nrv * vw;  // outputs per chunk
  const DiagPacked packed = diag_pack_values(proto, W);
  // Output tiles sized so the values they reach (about K * L * tile / P floats in the shifted form, K * tile in the
  // direct form) take tile_kb of L2; the shifted form packs 64 rows at once (64 short rows in L2) so each tile's
  // values serve them all; the direct form reads a whole (long) input row per chunk, so it packs MR rows.
  const int64_t vbytes = proto.shifted ? proto.K * proto.L * 4 / proto.P : proto.K * 4;  // per output
  auto run = [&](const tune::Point& p) {
    const int64_t MR = p[0], group = group_of(p);
    const int64_t tile = std::max<int64_t>(kDiagW, (int64_t{p[1]} << 10) / std::max<int64_t>(vbytes, 1));
    const int64_t grain = std::max<int64_t>(MR, (B / (4 * at::get_num_threads()) / MR) * MR);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      DiagArgs<T> a = proto;
      a.group = group;
      a.tile = tile;
      a.pv = packed.v.data();
      a.px = packed.x.data();
      a.pptr = packed.ptr.data();
      a.xld = (proto.in_cols + 2 * kDiagW + 15) / 16 * 16;
      const size_t xb = static_cast<size_t>(group * a.xld),
                   zb = proto.st.scatter ? static_cast<size_t>(group * proto.nout) : 0;
      c10::DataPtr buf = c10::GetCPUAllocator()->allocate((xb + zb) * sizeof(float) + 64);
      a.xbuf = static_cast<float*>(buf.get()) + kDiagW;
      a.zrow = zb ? static_cast<float*>(buf.get()) + xb : nullptr;
      auto body = [&](auto mr_c) {
        bool ran = false;
        dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
          constexpr int VW = decltype(k)::vw, M = decltype(mr_c)::value;
          if constexpr (diag_fits(M, kDiagNRV<VW>, VW)) {
            diag_body<VW, M>(a, b0, b1);
            ran = true;
          }
        });
        TORCH_INTERNAL_ASSERT(ran, "diag_mm: variant mr=", MR, " has no kernel for this ISA");
      };
      tune::with_value<3, 4, 6, 8, 12>("diag_mm mr", p[0], body);
    });
  };
  const std::string shape = "in" + std::to_string(proto.in_cols) + " out" + std::to_string(proto.nout) + " K" +
                            std::to_string(proto.K) + " L" + std::to_string(proto.L) + " P" +
                            std::to_string(proto.P) + (proto.shifted ? " shifted" : " direct") +
                            (proto.in_gather ? " gin" : "") + (proto.st.scatter ? " gout" : "");
  tune::choose(tune_key<T>("diag_mm", B, shape), space, valid, run);
}

}  // namespace padst::cpu::rk
