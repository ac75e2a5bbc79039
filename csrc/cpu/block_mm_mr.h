// Block forward and dx in the GEMM micro-kernel orientation: MR batch rows x NRV*VW outputs of one block line in
// registers; per input column of a block, NRV weight vectors (the outputs of one block row/column contiguous in the
// weights) times MR scalars of the input rows (through the input permutation). The rows are read in place, or copied
// first (as float, permuted) into rows with a padded stride or into column-major register tiles; a panel of rows can
// run the lines chunk by chunk. Outputs are stored as vectors into the output rows (identity) or into a row buffer
// written back by gathering (permuted). Or (MrPlan::cols) the tile walks the blocks input block by input block,
// reading each input row once and in order, with its outputs in the row buffer. MrPlan is one variant; block_mm.h has
// the tuner choose one per shape class when the outputs of a block split into whole vectors, and runs its packed
// kernel otherwise (e.g. 12x20).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "tiles.h"
#include "tune.h"
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
  int64_t ostride = 1;    // stride between outputs (the unpacked kernel needs 1: vectors of outputs)
};

template <typename T>
struct MrArgs {
  const T* in;
  int64_t in_cols;
  const int64_t* in_gather;  // src(c) = in_gather[c], or c
  const BlockLine* L;
  int64_t lines;
  Store<T> st;               // st.gather: inverse of st.scatter (needed when scatter is set)
  float* zrow;               // [panel rows][lines * outer] when st.scatter is set
  float* xrow = nullptr;     // [panel + 1][xld]: the panel's input rows, permuted, as float, or null
  int64_t xld = 0;
  float* xt = nullptr;       // or the panel as register tiles: tile t's column c at xt[(t * in_cols + c) * MR + m]
  int pf = 0;                // MrPlan::pf
  int64_t rows = 0;          // batch rows of `in` (the last tile's prefetch stops there)
  const BlockLine* cols = nullptr;  // MrPlan::cols: the blocks by input block (idx: their line), else null
  int64_t ncols = 0;
};

// One variant of the kernel (tune.h chooses it per shape class; every variant sums in the same order).
struct MrPlan {
  int mr;      // batch rows per register tile
  int nrv;     // output vectors per register tile
  int pack;    // 0: pack the rows when it pays (see block_mm_mr), 1: always, 2: never (read in place),
               // 3: pack each register tile column-major (a tile's MR values of a column adjacent, as BLIS packs A)
  int panel;   // rows per panel, in register tiles: the panel's rows are packed once, then run line chunk by chunk
  int lt_kb;   // weights per line chunk in KB (0: every line in one chunk)
  bool cols = false;  // input block by input block (MrArgs::cols), accumulating into the tile's output rows in
                      // zrow (the others: line by line, in registers); the rows read in place, pack/pf/panel/lt unused
  int pf = 0;  // read in place: 1: prefetch the panel's rows into L2 first (a sequential stream), 2: prefetch the
               // next block's input lines while computing one (identity input), 3: prefetch the next register
               // tile's rows into L2, a slice per output group of this tile (a sequential stream hidden behind the
               // compute; the in-place reads of a tile then hit L2: fc1 90% 3-30% faster on the Xeon)
};

// Rows pr .. pr+MR-1 of the panel (batch rows b ..), outputs o0 .. o0+NRV*VW of line `line`. MRS: the register
// tile height of the panel's column-major tiles (a.xt), of which these rows are part.
// The column loops are unrolled 4 times (#pragma GCC unroll 4): on the Xeon, 6-11% faster at fc2 90% (mr 12-14, in
// place) in four alternating runs against the rolled loop (mr_cols's loops stay rolled: 3-7% slower unrolled).
template <int VW, int NRV, int MR, int MRS, typename T>
PADST_ALWAYS_INLINE void mr_tile(const MrArgs<T>& a, int64_t b, int64_t pr, int64_t line, int64_t o0) {
  using V = typename Vec<VW>::V;
  const BlockLine& L = *a.L;
  V acc[MR][NRV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NRV; ++v) acc[m][v] = V{};
  if (a.xt) {  // column-major tiles: the MR values of a column adjacent, at fixed offsets from one pointer
    const float* base = a.xt + (pr / MRS) * a.in_cols * MRS + pr % MRS;
    for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
      const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
      const float* xq = base + L.idx[q] * L.inner * MRS;
#pragma GCC unroll 4
      for (int64_t i = 0; i < L.inner; ++i) {
        V w[NRV];
        for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * L.wstride + v * VW);
        for (int m = 0; m < MR; ++m) {
          const float xs = xq[i * MRS + m];  // a scalar operand: one broadcast folded into the load (vec.h)
          for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
        }
      }
    }
  } else if (a.xrow) {  // rows packed by mr_panel; pr: the tile's first row in the panel
    for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
      const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
      const float* xq = a.xrow + pr * a.xld + L.idx[q] * L.inner;
#pragma GCC unroll 4
      for (int64_t i = 0; i < L.inner; ++i) {
        V w[NRV];
        for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * L.wstride + v * VW);
        for (int m = 0; m < MR; ++m) {
          const float xs = xq[m * a.xld + i];
          for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
        }
      }
    }
  } else if (a.in_gather) {  // in place, through the permutation (one index load per input column for MR rows)
    const T* rows[MR];
    for (int m = 0; m < MR; ++m) rows[m] = a.in + (b + m) * a.in_cols;
    for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
      const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
      const int64_t* g = a.in_gather + L.idx[q] * L.inner;
#pragma GCC unroll 4
      for (int64_t i = 0; i < L.inner; ++i) {
        V w[NRV];
        for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * L.wstride + v * VW);
        const int64_t src = g[i];
        for (int m = 0; m < MR; ++m) {
          const float xs = static_cast<float>(rows[m][src]);
          for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
        }
      }
    }
  } else {  // in place, identity: the rows are in_cols apart, addressed in groups of 3 (base[k] + j * in_cols), so
            // that a tile takes (MR + 2) / 3 base pointers and 3 column counters, not MR row pointers (which GCC
            // spilled from MR = 8 on, at one reload per row and column step: fc2 90% 7% slower at MR = 12)
    constexpr int G = (MR + 2) / 3;
    const int64_t s = a.in_cols;
    const T* base[G];
    for (int k = 0; k < G; ++k) base[k] = a.in + (b + 3 * k) * s;
    for (int64_t q = L.ptr[line]; q < L.ptr[line + 1]; ++q) {
      const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0;
      const int64_t c0 = L.idx[q] * L.inner;
      if (a.pf == 2 && q + 1 < L.ptr[line + 1]) {  // the next block's columns of the tile's rows
        const int64_t cn = L.idx[q + 1] * L.inner;
        for (int m = 0; m < MR; ++m)
          for (int64_t c = 0; c < L.inner; c += 64 / static_cast<int64_t>(sizeof(T)))
            __builtin_prefetch(base[m / 3] + (m % 3) * s + cn + c, 0, 3);
      }
      const T* bq[G];
      for (int k = 0; k < G; ++k) bq[k] = base[k] + c0;
#pragma GCC unroll 4
      for (int64_t i = 0; i < L.inner; ++i) {
        V w[NRV];
        for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * L.wstride + v * VW);
        for (int m = 0; m < MR; ++m) {
          const float xs = static_cast<float>(bq[m / 3][i + (m % 3) * s]);
          for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
        }
      }
    }
  }
  const int64_t r0 = line * L.outer + o0;
  const int64_t ld = a.lines * L.outer;
  for (int m = 0; m < MR; ++m) {
    if (a.st.scatter) {
      for (int v = 0; v < NRV; ++v) Vec<VW>::store(a.zrow + (pr + m) * ld + r0 + v * VW, acc[m][v]);
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

// Lines [l0, l1) for the rows pr .. pr+M-1 of the panel (batch rows b ..): output groups of NRV*VW.
// No lambdas here: a lambda's body would not inherit the caller's target attribute (it would be compiled for the
// baseline ISA).
template <int VW, int NRV, int M, int MRS, typename T>
PADST_ALWAYS_INLINE void mr_lines(const MrArgs<T>& a, int64_t b, int64_t pr, int64_t l0, int64_t l1) {
  // pf = 3: the next tile's rows into L2, a slice before each output group, spread over this tile's work (one copy
  // of mr_tile: a second inlined copy made GCC spill a weight vector in both). Prefetching this tile's output rows
  // for writing as well, and storing a permuted output straight from the registers instead of through zrow, were
  // tried: no faster, and 7-20% slower, at fc2 on the Xeon.
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t slice = 0;
  if (a.pf == 3 && l0 == 0) {
    p = reinterpret_cast<const char*>(a.in + (b + M) * a.in_cols);
    end = reinterpret_cast<const char*>(a.in + std::min(b + 2 * M, a.rows) * a.in_cols);
    const int64_t groups = (l1 - l0) * (a.L->outer / (NRV * VW));
    slice = end > p ? ((end - p) / groups + 63) / 64 * 64 : 0;
  }
  for (int64_t line = l0; line < l1; ++line)
    for (int64_t o0 = 0; o0 < a.L->outer; o0 += NRV * VW) {
      for (int64_t off = 0; off < slice && p < end; off += 64, p += 64) __builtin_prefetch(p, 0, 2);
      mr_tile<VW, NRV, M, MRS>(a, b, pr, line, o0);
    }
}

// MrPlan::cols: rows pr .. pr+MR-1 of the panel (batch rows b ..), every output of the tile accumulated in zrow, input
// block by input block: each input row is read once, in order (the line-by-line kernel reads a tile's rows in its
// blocks' random order, about once per block at 95%: from DRAM, what the hardware prefetchers cannot predict), and
// a block's outputs are loaded from zrow and stored back around its columns. The same sums in the same order as
// mr_tile: a line's blocks come in ascending input block, each block's columns in order, from +0.
template <int VW, int NRV, int MR, typename T>
PADST_ALWAYS_INLINE void mr_cols(const MrArgs<T>& a, int64_t b, int64_t pr) {
  using V = typename Vec<VW>::V;
  const BlockLine& L = *a.L;
  const BlockLine& K = *a.cols;
  const int64_t ld = a.lines * L.outer;
  float* z = a.zrow + pr * ld;
  std::memset(z, 0, sizeof(float) * MR * ld);
  constexpr int G = (MR + 2) / 3;  // identity rows: in groups of 3 (see mr_tile)
  const int64_t s = a.in_cols;
  const T* base[G];
  for (int k = 0; k < G; ++k) base[k] = a.in + (b + 3 * k) * s;
  for (int64_t cb = 0; cb < a.ncols; ++cb) {
    const int64_t c0 = cb * K.inner;
    for (int64_t q = K.ptr[cb]; q < K.ptr[cb + 1]; ++q) {
      const float* wb = K.w + (K.blk ? K.blk[q] : q) * K.wblock;
      float* zl = z + K.idx[q] * L.outer;
      for (int64_t o0 = 0; o0 < L.outer; o0 += NRV * VW) {
        V acc[MR][NRV];
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NRV; ++v) acc[m][v] = Vec<VW>::load(zl + m * ld + o0 + v * VW);
        const float* wq = wb + o0;
        if (a.in_gather) {
          const int64_t* g = a.in_gather + c0;
          for (int64_t i = 0; i < K.inner; ++i) {
            V w[NRV];
            for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * K.wstride + v * VW);
            const int64_t src = g[i];
            for (int m = 0; m < MR; ++m) {
              const float xs = static_cast<float>(base[m / 3][src + (m % 3) * s]);
              for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
            }
          }
        } else {
          const T* bq[G];
          for (int k = 0; k < G; ++k) bq[k] = base[k] + c0;
          for (int64_t i = 0; i < K.inner; ++i) {
            V w[NRV];
            for (int v = 0; v < NRV; ++v) w[v] = Vec<VW>::load(wq + i * K.wstride + v * VW);
            for (int m = 0; m < MR; ++m) {
              const float xs = static_cast<float>(bq[m / 3][i + (m % 3) * s]);
              for (int v = 0; v < NRV; ++v) acc[m][v] += w[v] * xs;
            }
          }
        }
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NRV; ++v) Vec<VW>::store(zl + m * ld + o0 + v * VW, acc[m][v]);
      }
    }
  }
}

// A panel of n batch rows from b: its rows packed (when a.xrow is set), then line chunk by line chunk (lt lines),
// register tile by register tile, then the finished rows written back (permuted output).
template <int VW, int NRV, int MR, typename T>
PADST_ALWAYS_INLINE void mr_panel(const MrArgs<T>& a, int64_t b, int64_t n, int64_t lt) {
  const BlockLine& L = *a.L;
  const int64_t ld = a.lines * L.outer;
  // The rows as float, permuted, into rows xld apart. Read in place, rows a multiple of 4 KB long (3072 floats) put
  // the M values that one column step reads into a single L1 set.
  if (a.xt) {  // column-major register tiles: per column, one index and the tile's MR rows, stored side by side
    for (int64_t t0 = 0; t0 < n; t0 += MR) {
      float* tile = a.xt + (t0 / MR) * a.in_cols * MR;
      const T* r0 = a.in + (b + t0) * a.in_cols;
      if (t0 + MR <= n) {
        // rows addressed in groups of 3 from (MR + 2) / 3 bases (as mr_tile's identity reads): few registers
        constexpr int G = (MR + 2) / 3;
        const int64_t s = a.in_cols;
        const T* base[G];
        for (int k = 0; k < G; ++k) base[k] = r0 + 3 * k * s;
        for (int64_t c = 0; c < a.in_cols; ++c) {
          const int64_t src = a.in_gather ? a.in_gather[c] : c;
          float* tc = tile + c * MR;
          for (int m = 0; m < MR; ++m) tc[m] = static_cast<float>(base[m / 3][src + (m % 3) * s]);
        }
      } else {
        for (int64_t m = 0; m < n - t0; ++m)
          for (int64_t c = 0; c < a.in_cols; ++c)
            tile[c * MR + m] = static_cast<float>(r0[m * a.in_cols + (a.in_gather ? a.in_gather[c] : c)]);
      }
    }
  } else if (a.xrow) {
    for (int64_t m = 0; m < n; ++m) {
      const T* row = a.in + (b + m) * a.in_cols;
      float* xm = a.xrow + m * a.xld;
      if (a.in_gather) {
        float* tmp = a.xrow + n * a.xld;  // the row in order first (a sequential read), then gathered from L1
        for (int64_t c = 0; c < a.in_cols; ++c) tmp[c] = static_cast<float>(row[c]);
        for (int64_t c = 0; c < a.in_cols; ++c) xm[c] = tmp[a.in_gather[c]];
      } else {
        for (int64_t c = 0; c < a.in_cols; ++c) xm[c] = static_cast<float>(row[c]);
      }
    }
  }
  if (a.cols) {  // input block by input block into zrow, then written out (below, or here for the identity)
    int64_t r = 0;
    for (; r + MR <= n; r += MR) mr_cols<VW, NRV, MR>(a, b + r, r);
    for (; r < n; ++r) mr_cols<VW, NRV, 1>(a, b + r, r);
    if (!a.st.scatter) {
      for (int64_t m = 0; m < n; ++m) {
        T* o = a.st.out + (b + m) * a.st.out_cols;
        const float* z = a.zrow + m * ld;
        for (int64_t j = 0; j < ld; ++j)
          o[j] = static_cast<T>(z[j] + (a.st.bias ? static_cast<float>(a.st.bias[j]) : 0.0f));
      }
    }
  } else {
    if (a.pf == 1 && !a.xt && !a.xrow) {  // the panel's rows into L2, as one sequential stream
      const char* p0 = reinterpret_cast<const char*>(a.in + b * a.in_cols);
      const int64_t bytes = n * a.in_cols * static_cast<int64_t>(sizeof(T));
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p0 + off, 0, 2);
    }
    for (int64_t l0 = 0; l0 < a.lines; l0 += lt) {
      const int64_t l1 = std::min(a.lines, l0 + lt);
      int64_t r = 0;
      for (; r + MR <= n; r += MR) mr_lines<VW, NRV, MR, MR>(a, b + r, r, l0, l1);
      for (; r < n; ++r) mr_lines<VW, NRV, 1, MR>(a, b + r, r, l0, l1);
    }
  }
  if (a.st.scatter) {  // write back the finished rows by gathering
    for (int64_t m = 0; m < n; ++m)
      write_row(isa_of_width(VW), a.st, a.st.out + (b + m) * a.st.out_cols, a.zrow + m * ld);
  }
}

// Registers the tile may take: MR*NRV accumulators, NRV weight vectors and a broadcast (32 vector registers with
// AVX-512, 16 otherwise).
constexpr bool mr_fits(int mr, int nrv, int vw) { return mr * nrv + nrv + 1 <= (vw >= 16 ? 32 : 16); }

// The variants block_mm_mr can run: the register tile fits and splits the block's outputs into whole vectors.
inline bool mr_plan_valid(const MrPlan& p, int vw, int64_t outer) {
  return mr_fits(p.mr, p.nrv, vw) && outer % (p.nrv * vw) == 0;
}

// Whether a variant reads its input rows in place (pack = 2, or 0 and it does not pay), else it copies them first
// (rows with a padded stride, or column-major tiles for pack = 3). Packing the rows costs one pass over them; by
// default (pack = 0) it is done for every identity input (a plain copy, and conversion once instead of per use), and
// for a permuted one whose rows alias in L1 (a multiple of 4 KB); otherwise a permuted input is read in place (at 95%
// sparsity a column is used about once: a separate gathering pass would cost more than the index loads).
inline bool mr_reads_in_place(const MrPlan& p, bool gathered, int64_t row_bytes) {
  return p.pack == 2 || (p.pack == 0 && gathered && row_bytes % 4096 != 0);
}

// The unpacked block kernel for one variant (mr_plan_valid). Threads take whole panels.
template <typename T>
void block_mm_mr(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, const BlockLine& L, int64_t lines,
                 const Store<T>& st, const MrPlan& plan, const BlockLine* cols = nullptr, int64_t ncols = 0) {
  TORCH_INTERNAL_ASSERT(!plan.cols || cols, "block_mm: the input-block order needs the blocks by input block");
  const Isa isa = current_isa();
  const int64_t ld = lines * L.outer;
  const int64_t P = static_cast<int64_t>(plan.mr) * plan.panel;
  const int64_t npan = (B + P - 1) / P;
  const int64_t wline = std::max<int64_t>(1, (L.ptr[lines] - L.ptr[0]) * L.wblock * 4 / std::max<int64_t>(1, lines));
  const int64_t lt = plan.lt_kb == 0 ? lines : std::max<int64_t>(1, plan.lt_kb * 1024 / wline);
  const bool pack = !plan.cols && plan.pack != 3 && !mr_reads_in_place(plan, gather != nullptr, in_cols * sizeof(T));
  const bool tiles = !plan.cols && plan.pack == 3;
  const int64_t grain = std::max<int64_t>(1, npan / (4 * at::get_num_threads()));
  at::parallel_for(0, npan, grain, [&](int64_t p0, int64_t p1) {
    MrArgs<T> a{in, in_cols, gather, &L, lines, st, nullptr};
    a.xld = (in_cols + 15) / 16 * 16 + 16;  // not a multiple of 4 KB: the rows' columns fall into different L1 sets
    const size_t xb = tiles ? static_cast<size_t>(P * in_cols) : pack ? static_cast<size_t>((P + 1) * a.xld) : 0;
    const size_t zb = st.scatter || plan.cols ? static_cast<size_t>(P * ld) : 0;
    c10::DataPtr buf = c10::GetCPUAllocator()->allocate((xb + zb) * sizeof(float) + 64);
    a.xrow = pack ? static_cast<float*>(buf.get()) : nullptr;
    a.xt = tiles ? static_cast<float*>(buf.get()) : nullptr;
    a.pf = plan.cols ? 0 : plan.pf;
    a.cols = plan.cols ? cols : nullptr;
    a.ncols = ncols;
    a.rows = B;
    a.zrow = zb ? static_cast<float*>(buf.get()) + xb : nullptr;
    const int64_t b1 = std::min(B, p1 * P);
    auto run = [&](auto nrv_c, auto mr_c) {
      bool ran = false;
      dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
        constexpr int VW = decltype(k)::vw, NRV = decltype(nrv_c)::value, MR = decltype(mr_c)::value;
        if constexpr (mr_fits(MR, NRV, VW)) {
          for (int64_t b = p0 * P; b < b1; b += P) mr_panel<VW, NRV, MR>(a, b, std::min(P, b1 - b), lt);
          ran = true;
        }
      });
      TORCH_INTERNAL_ASSERT(ran, "block_mm: variant mr=", plan.mr, " nrv=", plan.nrv, " has no kernel for this ISA");
    };
    tune::with_value<1, 2, 4>("block_mm nrv", plan.nrv, [&](auto nrv_c) {
      tune::with_value<4, 6, 8, 12, 14>("block_mm mr", plan.mr, [&](auto mr_c) { run(nrv_c, mr_c); });
    });
  });
}

}  // namespace padst::cpu::rk
