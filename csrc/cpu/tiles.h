// The packed batch tile of the row-walking kernels (rows_mm.h, and block_mm.h's packed variant): TB batch rows (kTB
// = 32 unless a tuned variant says otherwise: the N:M kernel's TB is one of its variant's parameters) of the input
// packed transposed (xT[c][t], the input permutation gathered while packing), the Store that takes
// results to the output (through the output permutation; also used by block_mm_mr.h and diag_mm.h), and drive(),
// which runs a kernel over every tile of the batch.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gather_row.h"
#include "isa.h"
#include "vec.h"

namespace padst::cpu::rk {

inline constexpr int64_t kTB = 32;

// xT[c*kTB + t] = in[b0 + t, gather ? gather[c] : c] as float, zero for t >= tb.
// Identity: by strips of columns (below). Permuted: row by row (measured faster: a permuted column order would touch
// 32 new input lines per column).
template <int64_t TB = kTB, typename T>
PADST_ALWAYS_INLINE void pack_body(const T* in, int64_t in_cols, const int64_t* gather, int64_t b0, int64_t tb,
                                   float* xT) {
  const T* base = in + b0 * in_cols;
  if (gather) {
    // Row by row: the gathered reads stay within one input row (L1), the index array is read once per row.
    for (int64_t t = 0; t < TB; ++t) {
      const T* row = base + t * in_cols;
      if (t < tb) {
        for (int64_t c = 0; c < in_cols; ++c) xT[c * TB + t] = static_cast<float>(row[gather[c]]);
      } else {
        for (int64_t c = 0; c < in_cols; ++c) xT[c * TB + t] = 0.0f;
      }
    }
    return;
  }
  // Identity: strips of 16 columns, each input row's strip read as one contiguous run, the strip's packed columns
  // (16 x 128 bytes) staying in L1. Reading a whole column at a time instead strides by the row length, and with
  // rows a multiple of 4 KB long (3072 floats) all 32 reads of a column fall into one L1 set: measured 40% of the
  // N:M forward at 1024x3072 that way.
  constexpr int64_t kStrip = 16;
  for (int64_t c0 = 0; c0 < in_cols; c0 += kStrip) {
    const int64_t cn = in_cols - c0 < kStrip ? in_cols - c0 : kStrip;
    float* out = xT + c0 * TB;
    for (int64_t t = 0; t < TB; ++t) {
      if (t < tb) {
        const T* row = base + t * in_cols + c0;
        for (int64_t j = 0; j < cn; ++j) out[j * TB + t] = static_cast<float>(row[j]);
      } else {
        for (int64_t j = 0; j < cn; ++j) out[j * TB + t] = 0.0f;
      }
    }
  }
}

// pack_body compiled for `isa` (one per element type, shared by every driver).
template <int64_t TB = kTB, typename T>
void pack_tile(Isa isa, const T* in, int64_t in_cols, const int64_t* gather, int64_t b0, int64_t tb, float* xT) {
  dispatch_isa(isa, [&](auto) PADST_ISA_BODY { pack_body<TB>(in, in_cols, gather, b0, tb, xT); });
}

// Where results go: out[(b0 + t) * out_cols + dst(r)] = acc + bias[dst(r)].
template <typename T>
struct Store {
  T* out;
  int64_t out_cols;
  const int64_t* scatter;  // dst(r) = scatter[r], or r
  const T* bias;           // by destination column, may be null
  const int64_t* gather = nullptr;  // the inverse of scatter (out column j holds row gather[j])
  const int32_t* gather32 = nullptr;  // the same as int32 (write_row's vector gathers), or null
  float* zfull = nullptr;           // set by drive(): the whole tile [kTB][out_cols], written back by gathering
};

// Results are collected per group of output rows in a small tile z[t][j] (t the batch row, j the row in the
// group) and then written batch row by batch row: contiguous runs of the output for the identity permutation,
// instead of one 4-byte store per cache line of a column of `out`.
inline constexpr int64_t kZW = 64;  // rows per output group (a block line is at most kZW rows, else split)

template <int VW, int64_t TB = kTB>
PADST_ALWAYS_INLINE void put(float* z, int64_t j, const typename Vec<VW>::V* acc) {
  constexpr int NV = TB / VW;
  alignas(64) float tmp[TB];
  for (int v = 0; v < NV; ++v) Vec<VW>::store(tmp + v * VW, acc[v]);
  for (int64_t t = 0; t < TB; ++t) z[t * kZW + j] = tmp[t];
}

// out[b0 + t, dst(r0 + j)] = z[t][j] + bias[dst(r0 + j)] for j < n, t < tb.
template <typename T>
PADST_ALWAYS_INLINE void flush(const Store<T>& s, int64_t r0, int64_t n, int64_t b0, int64_t tb, const float* z) {
  if (s.zfull) {  // permuted output, collected whole and written back by write_back()
    for (int64_t t = 0; t < tb; ++t) std::memcpy(s.zfull + t * s.out_cols + r0, z + t * kZW, n * sizeof(float));
    return;
  }
  for (int64_t t = 0; t < tb; ++t) {
    T* o = s.out + (b0 + t) * s.out_cols;
    const float* zt = z + t * kZW;
    if (s.scatter) {
      const int64_t* d = s.scatter + r0;
      if (s.bias) {
        for (int64_t j = 0; j < n; ++j) o[d[j]] = static_cast<T>(zt[j] + static_cast<float>(s.bias[d[j]]));
      } else {
        for (int64_t j = 0; j < n; ++j) o[d[j]] = static_cast<T>(zt[j]);
      }
    } else {
      T* oo = o + r0;
      if (s.bias) {
        const T* bb = s.bias + r0;
        for (int64_t j = 0; j < n; ++j) oo[j] = static_cast<T>(zt[j] + static_cast<float>(bb[j]));
      } else {
        for (int64_t j = 0; j < n; ++j) oo[j] = static_cast<T>(zt[j]);
      }
    }
  }
}

// One permuted output row: o[j] = z[gather[j]] + bias[j], j < out_cols, z a row of results in output-row order.
// float32 with 32-bit indices through vector gathers (gather_row.h, compiled for `isa`), else one value at a time.
template <typename T>
inline void write_row(Isa isa, const Store<T>& s, T* o, const float* z) {
  if constexpr (std::is_same_v<T, float>) {
    if (s.gather32) {
      gr::gather_row(isa, o, z, s.gather32, s.bias, s.out_cols);
      return;
    }
  }
  if (s.bias) {
    for (int64_t j = 0; j < s.out_cols; ++j) o[j] = static_cast<T>(z[s.gather[j]] + static_cast<float>(s.bias[j]));
  } else {
    for (int64_t j = 0; j < s.out_cols; ++j) o[j] = static_cast<T>(z[s.gather[j]]);
  }
}

// A permuted output tile: out[b0 + t, j] = zfull[t][gather[j]] + bias[j], batch rows [t0, t1). Scattering the
// results one by one would write-allocate a new cache line per value; gathering from the tile (in L2) writes
// the output rows contiguously.
template <typename T>
void write_back(Isa isa, const Store<T>& s, int64_t b0, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) write_row(isa, s, s.out + (b0 + t) * s.out_cols, s.zfull + t * s.out_cols);
}

// The driver: out rows [0, nrows) for the whole batch, tiles of kTB batch rows. `run(xT, r0, r1, b0, tb, st)`
// computes rows [r0, r1) of one packed tile. Many tiles: threads take whole tiles (each packs its own); few tiles
// (small batches): the tile is packed once and threads split the rows. A permuted output (st.gather set) whose
// tile fits in 4 MB is collected whole and written back by gathering.
template <int64_t TB = kTB, typename T, typename Run>
void drive(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, int64_t nrows, int64_t row_grain,
           const Store<T>& st, const Run& run) {
  const Isa isa = current_isa();
  auto pack = [&](int64_t b0, int64_t tb, float* xT) { pack_tile<TB>(isa, in, in_cols, gather, b0, tb, xT); };
  const bool whole = st.gather != nullptr && st.out_cols * TB * static_cast<int64_t>(sizeof(float)) <= (4 << 20);
  const size_t xbytes = static_cast<size_t>(in_cols * TB) * sizeof(float) + 64;
  const size_t zbytes = whole ? static_cast<size_t>(st.out_cols * TB) * sizeof(float) + 64 : 0;
  const int64_t nbt = (B + TB - 1) / TB;
  if (nbt >= 2 * at::get_num_threads()) {
    at::parallel_for(0, nbt, 1, [&](int64_t begin, int64_t end) {
      c10::DataPtr buf = c10::GetCPUAllocator()->allocate(xbytes + zbytes);
      float* xT = static_cast<float*>(buf.get());
      Store<T> s = st;
      s.zfull = whole ? xT + in_cols * TB + 16 : nullptr;
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b0 = bt * TB, tb = std::min(TB, B - b0);
        pack(b0, tb, xT);
        run(xT, 0, nrows, b0, tb, s);
        if (whole) write_back(isa, s, b0, 0, tb);
      }
    });
    return;
  }
  c10::DataPtr buf = c10::GetCPUAllocator()->allocate(xbytes + zbytes);
  float* xT = static_cast<float*>(buf.get());
  Store<T> s = st;
  s.zfull = whole ? xT + in_cols * TB + 16 : nullptr;
  for (int64_t bt = 0; bt < nbt; ++bt) {
    const int64_t b0 = bt * TB, tb = std::min(TB, B - b0);
    pack(b0, tb, xT);
    at::parallel_for(0, nrows, row_grain, [&](int64_t r0, int64_t r1) { run(xT, r0, r1, b0, tb, s); });
    if (whole) at::parallel_for(0, tb, 1, [&](int64_t t0, int64_t t1) { write_back(isa, s, b0, t0, t1); });
  }
}

}  // namespace padst::cpu::rk
