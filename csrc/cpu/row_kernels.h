// Vectorised CPU kernels (float accumulation for float32, bfloat16 and float16 data; float64 keeps the scalar
// kernels in block.cpp / nm.cpp / diagonal.cpp). Bodies are always-inline templates compiled three times, for
// SSE2, AVX2+FMA and AVX-512, through the attributed wrappers of PADST_ROW_KERNEL_WRAPPERS (see isa.h), and the
// widest the CPU has runs. VW = 4 / 8 / 16 floats per vector.
//  - rows_body (N:M forward, N:M dx over a transposed pattern): tiles of kTB = 32 batch rows packed transposed
//    (xT[c][t], the input permutation gathered while packing); one output row at a time over its own entries,
//    split between two accumulator sets; one broadcast weight times kTB/VW vector FMAs per entry.
//  - mr_body (block forward and dx): the GEMM micro-kernel orientation, MR batch rows x NRV vectors of outputs of
//    one block line in registers, inputs read in place through the permutation, outputs stored as vectors.
//    block_body is the packed variant, kept for block sides that are not whole vectors (e.g. 12x20).
//  - diag_body (diagonal forward and dx): runs of consecutive outputs against runs of values and inputs,
//    element-wise, MR batch rows per step; the values are first repacked by output chunk (DiagPacked) so that a
//    chunk streams its values contiguously and meets no edge cases.
//  - dw_body (block dW): batch tiles of dy (transposed) and x packed once for all blocks, register tiles per block.
// Permuted outputs are written back by gathering from a row / tile buffer, never scattered value by value.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kernels/entries.h"
#include "isa.h"

namespace padst::cpu::rk {

inline constexpr int64_t kTB = 32;

// GCC/Clang vector extensions (the vector_size attribute is not applied to a dependent alias, hence the
// concrete typedefs).
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
template <int VW>
struct VecType;
template <>
struct VecType<4> {
  using type = f32x4;
};
template <>
struct VecType<8> {
  using type = f32x8;
};
template <>
struct VecType<16> {
  using type = f32x16;
};

template <int VW>
struct Vec {
  using V = typename VecType<VW>::type;
  static_assert(sizeof(V) == VW * sizeof(float));
  static PADST_ALWAYS_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static PADST_ALWAYS_INLINE V bcast(float s) { return V{} + s; }
  static PADST_ALWAYS_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

// xT[c*kTB + t] = in[b0 + t, gather ? gather[c] : c] as float, zero for t >= tb.
// Identity: by strips of columns (below). Permuted: row by row (measured faster: a permuted column order would touch
// 32 new input lines per column).
template <typename T>
PADST_ALWAYS_INLINE void pack_body(const T* in, int64_t in_cols, const int64_t* gather, int64_t b0, int64_t tb,
                                   float* xT) {
  const T* base = in + b0 * in_cols;
  if (gather) {
    // Row by row: the gathered reads stay within one input row (L1), the index array is read once per row.
    for (int64_t t = 0; t < kTB; ++t) {
      const T* row = base + t * in_cols;
      if (t < tb) {
        for (int64_t c = 0; c < in_cols; ++c) xT[c * kTB + t] = static_cast<float>(row[gather[c]]);
      } else {
        for (int64_t c = 0; c < in_cols; ++c) xT[c * kTB + t] = 0.0f;
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
    float* out = xT + c0 * kTB;
    for (int64_t t = 0; t < kTB; ++t) {
      if (t < tb) {
        const T* row = base + t * in_cols + c0;
        for (int64_t j = 0; j < cn; ++j) out[j * kTB + t] = static_cast<float>(row[j]);
      } else {
        for (int64_t j = 0; j < cn; ++j) out[j * kTB + t] = 0.0f;
      }
    }
  }
}

// pack_body compiled for `isa` (one per element type, shared by every driver).
template <typename T>
void pack_tile(Isa isa, const T* in, int64_t in_cols, const int64_t* gather, int64_t b0, int64_t tb, float* xT) {
  dispatch_isa(isa, [&](auto) PADST_ISA_BODY { pack_body(in, in_cols, gather, b0, tb, xT); });
}

// Where results go: out[(b0 + t) * out_cols + dst(r)] = acc + bias[dst(r)].
template <typename T>
struct Store {
  T* out;
  int64_t out_cols;
  const int64_t* scatter;  // dst(r) = scatter[r], or r
  const T* bias;           // by destination column, may be null
  const int64_t* gather = nullptr;  // the inverse of scatter (out column j holds row gather[j])
  float* zfull = nullptr;           // set by drive(): the whole tile [kTB][out_cols], written back by gathering
};

// Results are collected per group of output rows in a small tile z[t][j] (t the batch row, j the row in the
// group) and then written batch row by batch row: contiguous runs of the output for the identity permutation,
// instead of one 4-byte store per cache line of a column of `out`.
inline constexpr int64_t kZW = 64;  // rows per output group (a block line is at most kZW rows, else split)

template <int VW>
PADST_ALWAYS_INLINE void put(float* z, int64_t j, const typename Vec<VW>::V* acc) {
  constexpr int NV = kTB / VW;
  alignas(64) float tmp[kTB];
  for (int v = 0; v < NV; ++v) Vec<VW>::store(tmp + v * VW, acc[v]);
  for (int64_t t = 0; t < kTB; ++t) z[t * kZW + j] = tmp[t];
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

// A permuted output tile: out[b0 + t, j] = zfull[t][gather[j]] + bias[j], batch rows [t0, t1). Scattering the
// results one by one would write-allocate a new cache line per value; gathering from the tile (in L2) writes
// the output rows contiguously.
template <typename T>
void write_back(const Store<T>& s, int64_t b0, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    T* o = s.out + (b0 + t) * s.out_cols;
    const float* zt = s.zfull + t * s.out_cols;
    if (s.bias) {
      for (int64_t j = 0; j < s.out_cols; ++j) o[j] = static_cast<T>(zt[s.gather[j]] + static_cast<float>(s.bias[j]));
    } else {
      for (int64_t j = 0; j < s.out_cols; ++j) o[j] = static_cast<T>(zt[s.gather[j]]);
    }
  }
}

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


// Rows of a column-sorted (transposed) pattern: row c holds entries ptr[c] .. ptr[c+1]; entry p reads input column
// src[p] and value val[p] (both precomputed, so no division per entry).
struct CscRows {
  const int64_t* ptr;
  const int64_t* src;
  const int64_t* val;
  int64_t begin(int64_t c) const { return ptr[c]; }
  int64_t end(int64_t c) const { return ptr[c + 1]; }
  bool at(int64_t, int64_t p, int64_t& col, int64_t& v) const {
    col = src[p];
    v = val[p];
    return true;
  }
};

// A line of blocks (a block-row forward, a block-column for dx): for each of its blocks q, `inner` input
// columns starting at column xcol(q), and weights w(q)[i * wstride + n] for inner index i and output n.
struct BlockLine {
  const int64_t* ptr;     // [lines + 1]
  const int64_t* idx;     // input block-line of each block
  const int64_t* blk;     // index into the weights, or null (= position)
  const float* w;         // weights, float
  int64_t inner;          // bc forward, br dx
  int64_t outer;          // br forward, bc dx: the outputs of one block
  int64_t wstride;        // stride between inner indices in a block's weights
  int64_t wblock;         // floats per block
};

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

// ---------------------------------------------------------------------------------------------------------
// Blocks without packing: the GEMM micro-kernel orientation. MR batch rows x NRV*VW outputs of one block line in
// registers; per input column of a block, NRV weight vectors (the outputs of one block row/column are contiguous
// in the weights) times MR scalars read straight from the input rows (through the input permutation). Outputs
// are stored as vectors into the output rows (identity) or into a row buffer that is written back by gathering
// (permuted). Neither the input nor the output is transposed, which is what the packed kernels pay for most.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct MrArgs {
  const T* in;
  int64_t in_cols;
  const int64_t* in_gather;  // src(c) = in_gather[c], or c
  const BlockLine* L;
  int64_t lines;
  Store<T> st;               // st.gather: inverse of st.scatter (needed when scatter is set)
  float* zrow;               // [MR][lines * outer] when st.scatter is set
  float* xrow = nullptr;     // [MR + 1][xld]: the group's input rows, permuted, as float, or null: read in place
  int64_t xld = 0;
};

template <int VW, int NRV, int MR, typename T>
PADST_ALWAYS_INLINE void mr_tile(const MrArgs<T>& a, int64_t b, int64_t line, int64_t o0) {
  using V = typename Vec<VW>::V;
  const BlockLine& L = *a.L;
  V acc[MR][NRV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NRV; ++v) acc[m][v] = V{};
  if (a.xrow) {  // rows packed by mr_rows
    for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
      const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
      const float* xq = a.xrow + L.idx[q] * L.inner;
      for (int64_t i = 0; i < L.inner; ++i) {
        V w[NRV];
        for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * L.wstride + v * VW);
        for (int m = 0; m < MR; ++m) {
          const V xs = Vec<VW>::bcast(xq[m * a.xld + i]);
          for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
        }
      }
    }
  } else {  // in place, through the permutation (one index load per input column for MR rows)
    const T* rows[MR];
    for (int m = 0; m < MR; ++m) rows[m] = a.in + (b + m) * a.in_cols;
    for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
      const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
      const int64_t c0 = L.idx[q] * L.inner;
      const int64_t* g = a.in_gather ? a.in_gather + c0 : nullptr;
      for (int64_t i = 0; i < L.inner; ++i) {
        V w[NRV];
        for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * L.wstride + v * VW);
        const int64_t src = g ? g[i] : c0 + i;
        for (int m = 0; m < MR; ++m) {
          const float xs = static_cast<float>(rows[m][src]);
          for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
        }
      }
    }
  }
  const int64_t r0 = line * L.outer + o0;
  const int64_t ld = a.lines * L.outer;
  for (int m = 0; m < MR; ++m) {
    if (a.st.scatter) {
      for (int v = 0; v < NRV; ++v) Vec<VW>::store(a.zrow + m * ld + r0 + v * VW, acc[m][v]);
    } else {
      T* o = a.st.out + (b + m) * a.st.out_cols + r0;
      alignas(64) float tmp[NRV * VW];
      for (int v = 0; v < NRV; ++v) {
        V r = acc[m][v];
        if (a.st.bias) {
          alignas(64) float bb[VW];
          for (int l = 0; l < VW; ++l) bb[l] = static_cast<float>(a.st.bias[r0 + v * VW + l]);
          r += Vec<VW>::load(bb);
        }
        Vec<VW>::store(tmp + v * VW, r);
      }
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(o, tmp, sizeof(tmp));
      } else {
        for (int l = 0; l < NRV * VW; ++l) o[l] = static_cast<T>(tmp[l]);
      }
    }
  }
}

// Batch rows b .. b+M-1: every line, output groups of NRV*VW (L.outer a multiple of it). No lambdas here: a
// lambda's body would not inherit the caller's target attribute (it would be compiled for the baseline ISA).
template <int VW, int NRV, int M, typename T>
PADST_ALWAYS_INLINE void mr_rows(const MrArgs<T>& a, int64_t b) {
  const BlockLine& L = *a.L;
  const int64_t ld = a.lines * L.outer;
  // The M input rows as float, permuted, into rows xld apart (when block_mm_mr set a.xrow). Read in place, rows a
  // multiple of 4 KB long (3072 floats) put the M values that one column step reads into a single L1 set.
  if (a.xrow) {
    for (int m = 0; m < M; ++m) {
      const T* row = a.in + (b + m) * a.in_cols;
      float* xm = a.xrow + m * a.xld;
      if (a.in_gather) {
        float* tmp = a.xrow + M * a.xld;  // the row in order first (a sequential read), then gathered from L1
        for (int64_t c = 0; c < a.in_cols; ++c) tmp[c] = static_cast<float>(row[c]);
        for (int64_t c = 0; c < a.in_cols; ++c) xm[c] = tmp[a.in_gather[c]];
      } else {
        for (int64_t c = 0; c < a.in_cols; ++c) xm[c] = static_cast<float>(row[c]);
      }
    }
  }
  for (int64_t line = 0; line < a.lines; ++line)
    for (int64_t o0 = 0; o0 < L.outer; o0 += NRV * VW) mr_tile<VW, NRV, M>(a, b, line, o0);
  if (a.st.scatter) {  // write back the M finished rows by gathering
    for (int m = 0; m < M; ++m) {
      T* o = a.st.out + (b + m) * a.st.out_cols;
      const float* z = a.zrow + m * ld;
      for (int64_t j = 0; j < ld; ++j) {
        const float bias = a.st.bias ? static_cast<float>(a.st.bias[j]) : 0.0f;
        o[j] = static_cast<T>(z[a.st.gather[j]] + bias);
      }
    }
  }
}

template <int VW, int NRV, int MR, typename T>
PADST_ALWAYS_INLINE void mr_body(const MrArgs<T>& a, int64_t b0, int64_t b1) {
  int64_t b = b0;
  for (; b + MR <= b1; b += MR) mr_rows<VW, NRV, MR>(a, b);
  for (; b < b1; ++b) mr_rows<VW, NRV, 1>(a, b);
}

template <int VW>
inline constexpr int kMR = 6;  // batch rows per register tile (12 measured no faster with AVX-512, and worse permuted)
inline constexpr int kMRMax = 6;  // the most rows any variant takes: buffer sizes
static_assert(kMR<4> <= kMRMax && kMR<8> <= kMRMax && kMR<16> <= kMRMax);

inline constexpr int64_t kDiagW = 64;  // at least the widest chunk of diag_chunk (NRV * VW)
// Batch rows x output vectors per diagonal step (each loaded value vector serves MR rows), by vector width:
// 16 accumulators for AVX-512 (32 registers), 12 for AVX2 and SSE2 (16 registers).
template <int VW>
inline constexpr int kDiagMR = VW >= 16 ? 8 : (VW == 8 ? 6 : 3);
constexpr int diag_nrv(int vw) { return vw == 4 ? 4 : 2; }
template <int VW>
inline constexpr int kDiagNRV = diag_nrv(VW);

// ---------------------------------------------------------------------------------------------------------
// Diagonals. Every diagonal maps a run of consecutive outputs u to consecutive value indices t and consecutive
// inputs w (kernels/entries.h DiagRows, with u the output index):
//   shifted form: t = (u - o) mod P (an entry only if t < L), w = t      (tall forward, wide dx)
//   direct form:  t = u,                                w = (u + o) mod P  (wide forward, tall dx)
// so a chunk of NRV*VW outputs takes, per diagonal, element-wise products of a vector of values and a vector
// of inputs, MR batch rows at a time (the values repacked per chunk, DiagPacked below).
// ---------------------------------------------------------------------------------------------------------
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
      for (int64_t i = 0; i < sn; ++i) {
        T* o = a.st.out + (sb + i) * a.st.out_cols;
        const float* zm = a.zrow + i * a.nout;
        for (int64_t j = 0; j < a.nout; ++j) {
          const float bias = a.st.bias ? static_cast<float>(a.st.bias[j]) : 0.0f;
          o[j] = static_cast<T>(zm[a.st.gather[j]] + bias);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Block weight gradient: dV[k] = dz[:, rows(k)]^T x[:, cols(k)] (a [br x B] x [B x bc] product per block). Per tile of
// kDwTB batch rows, dz is packed transposed (zT[r][t], through the inverse output permutation) and x as rows
// (through the input permutation), once for all blocks; then every block accumulates RB rows x CV vectors in
// registers over the tile (per batch row: CV loads, RB broadcasts, RB*CV FMAs) into its float accumulator.
// ---------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------
// Weight gradient over row functors (N:M, diagonals): dv[v(r, q)] = sum_b dz[b, r] * x_p[b, col(r, q)]. Per batch
// tile of tb rows (tb up to 256, chosen so that the packed x tile fits in L2), dz and x are packed transposed
// (zT[r][t], xT[c][t], through their permutations); each entry is then a tb-long dot product of two contiguous
// vectors (tb/VW FMAs into two accumulator sets), reduced once per tile into a float accumulator.
// ---------------------------------------------------------------------------------------------------------
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

// The driver: out rows [0, nrows) for the whole batch, tiles of kTB batch rows. `run(xT, r0, r1, b0, tb, st)`
// computes rows [r0, r1) of one packed tile. Many tiles: threads take whole tiles (each packs its own); few tiles
// (small batches): the tile is packed once and threads split the rows. A permuted output (st.gather set) whose
// tile fits in 4 MB is collected whole and written back by gathering.
template <typename T, typename Run>
void drive(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, int64_t nrows, int64_t row_grain,
           const Store<T>& st, const Run& run) {
  const Isa isa = current_isa();
  auto pack = [&](int64_t b0, int64_t tb, float* xT) { pack_tile(isa, in, in_cols, gather, b0, tb, xT); };
  const bool whole = st.gather != nullptr && st.out_cols * kTB * static_cast<int64_t>(sizeof(float)) <= (4 << 20);
  const size_t xbytes = static_cast<size_t>(in_cols * kTB) * sizeof(float) + 64;
  const size_t zbytes = whole ? static_cast<size_t>(st.out_cols * kTB) * sizeof(float) + 64 : 0;
  const int64_t nbt = (B + kTB - 1) / kTB;
  if (nbt >= 2 * at::get_num_threads()) {
    at::parallel_for(0, nbt, 1, [&](int64_t begin, int64_t end) {
      c10::DataPtr buf = c10::GetCPUAllocator()->allocate(xbytes + zbytes);
      float* xT = static_cast<float*>(buf.get());
      Store<T> s = st;
      s.zfull = whole ? xT + in_cols * kTB + 16 : nullptr;
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b0 = bt * kTB, tb = std::min(kTB, B - b0);
        pack(b0, tb, xT);
        run(xT, 0, nrows, b0, tb, s);
        if (whole) write_back(s, b0, 0, tb);
      }
    });
    return;
  }
  c10::DataPtr buf = c10::GetCPUAllocator()->allocate(xbytes + zbytes);
  float* xT = static_cast<float*>(buf.get());
  Store<T> s = st;
  s.zfull = whole ? xT + in_cols * kTB + 16 : nullptr;
  for (int64_t bt = 0; bt < nbt; ++bt) {
    const int64_t b0 = bt * kTB, tb = std::min(kTB, B - b0);
    pack(b0, tb, xT);
    at::parallel_for(0, nrows, row_grain, [&](int64_t r0, int64_t r1) { run(xT, r0, r1, b0, tb, s); });
    if (whole) at::parallel_for(0, tb, 1, [&](int64_t t0, int64_t t1) { write_back(s, b0, t0, t1); });
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

// The unpacked block kernel, when the outputs of a block split into whole vectors; false when it cannot serve.
template <typename T>
bool block_mm_mr(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, const BlockLine& L, int64_t lines,
                 const Store<T>& st) {
  const Isa isa = current_isa();
  const int vw = vec_floats(isa);
  const int nrv = L.outer % (2 * vw) == 0 ? 2 : (L.outer % vw == 0 ? 1 : 0);
  if (nrv == 0 || B < kMRMax) return false;
  const int64_t ld = lines * L.outer;
  const int64_t grain = std::max<int64_t>(kMRMax, (B / (4 * at::get_num_threads()) / kMRMax) * kMRMax);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    MrArgs<T> a{in, in_cols, gather, &L, lines, st, nullptr};
    // Packing the rows of each group costs one pass over them; it pays for every identity input (a plain copy, and
    // conversion once instead of per use), and for a permuted one whose rows alias in L1 (a multiple of 4 KB);
    // otherwise a permuted input is read in place (at 95% sparsity a column is used about once: a separate
    // gathering pass would cost more than the index loads).
    const bool pack = gather == nullptr || (in_cols * static_cast<int64_t>(sizeof(T))) % 4096 == 0;
    a.xld = (in_cols + 15) / 16 * 16 + 16;  // not a multiple of 4 KB: the rows' columns fall into different L1 sets
    const size_t xb = pack ? static_cast<size_t>((kMRMax + 1) * a.xld) : 0;
    const size_t zb = st.scatter ? static_cast<size_t>(kMRMax * ld) : 0;
    c10::DataPtr buf = c10::GetCPUAllocator()->allocate((xb + zb) * sizeof(float) + 64);
    a.xrow = pack ? static_cast<float*>(buf.get()) : nullptr;
    a.zrow = zb ? static_cast<float*>(buf.get()) + xb : nullptr;
    auto run = [&](auto nrv_c) {
      dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
        constexpr int VW = decltype(k)::vw;
        mr_body<VW, decltype(nrv_c)::value, kMR<VW>>(a, b0, b1);
      });
    };
    nrv == 2 ? run(std::integral_constant<int, 2>{}) : run(std::integral_constant<int, 1>{});
  });
  return true;
}

// Diagonal forward / dx (see DiagArgs): the values repacked by chunk (DiagPacked), a.xbuf / a.zrow allocated here.
template <typename T>
void diag_mm(const DiagArgs<T>& proto, int64_t B) {
  constexpr int64_t MR = kDiagMR<16>;  // the most rows any variant takes at once
  static_assert(kDiagMR<4> <= MR && kDiagMR<8> <= MR, "the per-thread buffers are sized for kDiagMR<16> rows");
  const Isa isa = current_isa();
  const int64_t grain = std::max<int64_t>(MR, (B / (4 * at::get_num_threads()) / MR) * MR);
  // Output tiles sized so the values they reach (about K * L * tile / P floats in the shifted form, K * tile in the
  // direct form) take ~256 KB of L2; the shifted form packs 64 rows at once (64 short rows in L2) so each tile's
  // values serve them all; the direct form reads a whole (long) input row per chunk, so it packs MR rows.
  const int64_t vbytes = proto.shifted ? proto.K * proto.L * 4 / proto.P : proto.K * 4;  // per output
  const int64_t tile = std::max<int64_t>(kDiagW, (256 << 10) / std::max<int64_t>(vbytes, 1));
  const int64_t group = proto.shifted && !proto.st.scatter ? 64 : MR;
  const int64_t W = diag_nrv(vec_floats(isa)) * vec_floats(isa);  // outputs per chunk of the variant that runs
  const DiagPacked packed = diag_pack_values(proto, W);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    DiagArgs<T> a = proto;
    a.group = group;
    a.tile = tile;
    a.pv = packed.v.data();
    a.px = packed.x.data();
    a.pptr = packed.ptr.data();
    a.xld = (proto.in_cols + 2 * kDiagW + 15) / 16 * 16;
    const size_t xb = static_cast<size_t>(group * a.xld), zb = proto.st.scatter ? static_cast<size_t>(group * proto.nout) : 0;
    c10::DataPtr buf = c10::GetCPUAllocator()->allocate((xb + zb) * sizeof(float) + 64);
    a.xbuf = static_cast<float*>(buf.get()) + kDiagW;
    a.zrow = zb ? static_cast<float*>(buf.get()) + xb : nullptr;
    dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
      constexpr int VW = decltype(k)::vw;
      diag_body<VW, kDiagMR<VW>>(a, b0, b1);
    });
  });
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
