// Block forward and dx without packing: the GEMM micro-kernel orientation. MR batch rows x NRV*VW outputs of one
// block line in registers; per input column of a block, NRV weight vectors (the outputs of one block row/column are
// contiguous in the weights) times MR scalars read straight from the input rows (through the input permutation).
// Outputs are stored as vectors into the output rows (identity) or into a row buffer that is written back by gathering
// (permuted). Neither the input nor the output is transposed, which is what the packed kernels pay for most.
// block_mm.h runs it when the outputs of a block split into whole vectors, its packed kernel otherwise (e.g. 12x20).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "tiles.h"
#include "vec.h"

namespace padst::cpu::rk {

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

}  // namespace padst::cpu::rk
