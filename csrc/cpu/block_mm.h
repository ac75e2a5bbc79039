// Block forward and dx: block_mm() has the tuner (tune.h) choose, per shape class, between the variants of the
// unpacked kernel (block_mm_mr.h) and the packed kernel here, when a block's outputs split into whole vectors; the
// packed kernel alone otherwise (e.g. 12x20 blocks): per packed tile of kTB batch rows (tiles.h), NR outputs of a
// block line at a time against kTB/VW vectors of inputs, the weights read as scalars at any output stride.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "block_mm_mr.h"
#include "isa.h"
#include "tiles.h"
#include "tune.h"
#include "tune_key.h"
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
    const float* wq = L.w + (L.blk ? L.blk[q] : q) * L.wblock + o0 * L.ostride;
    for (int64_t i = 0; i < L.inner; ++i) {
      V xv[NV];
      for (int j = 0; j < NV; ++j) xv[j] = Vec<VW>::load(xq + i * kTB + j * VW);
      const float* wi = wq + i * L.wstride;
      for (int n = 0; n < NR; ++n) {
        const float w = wi[n * L.ostride];  // vector * scalar: a broadcast folded into the FMA's memory operand
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

// Block lines, dispatched on the ISA; `lines` lines of L.outer outputs each. The variant (tune.h) is chosen per
// shape class among: the unpacked kernel (block_mm_mr.h; register tile mr x nrv vectors, packing, row panel, line
// chunk, prefetch), the same register tile walking the blocks input block by input block (kern=2, when `cols` gives
// the blocks by input block: ncols input blocks, idx = their line) and the packed one above (kern=1). The packed one
// is the only kernel for outputs that are not whole vectors.
// L's weights may have strided outputs (L.ostride > 1: a forward's blocks as stored, [br][bc]); the packed kernel
// reads them as they are, the unpacked one reads output-contiguous weights: `contiguous()` returns them (a float
// tensor, [blocks][inner][outer]), made by each run of an unpacked variant that needs them, so that the tuner
// counts their cost (at a batch of a few rows it is most of the call).
template <typename T, typename Contiguous>
void block_mm(const T* in, int64_t B, int64_t in_cols, const int64_t* gather, const BlockLine& L, int64_t lines,
              const Store<T>& st, const Contiguous& contiguous, const BlockLine* cols = nullptr, int64_t ncols = 0) {
  const Isa isa = current_isa();
  const int vw = vec_floats(isa);
  auto packed = [&] {
    drive(in, B, in_cols, gather, lines, 1, st,
          [&](const float* xT, int64_t l0, int64_t l1, int64_t b0, int64_t tb, const Store<T>& s) {
            dispatch_isa(isa, [&](auto k) PADST_ISA_BODY {
              constexpr int VW = decltype(k)::vw;
              block_body<VW, kBlockNR<VW>>(xT, L, l0, l1, s, b0, tb);
            });
          });
  };
  if (L.outer % vw != 0) {
    packed();
    return;
  }
  // kern last: the unpacked kernel's parameters are searched first, then the packed kernel (which ignores them) is
  // tried against the best of them.
  // Seeds: a tall register tile pays only with the rows read in place or packed once, and those often only with a
  // tall tile (on the Xeon, fc2 90%: mr=12 in place 1.5x the floor; fc1 90%: mr=12 in column-major tiles 1.5x; the
  // default 1.65-1.8x, and neither change alone faster).
  const int nrv = L.outer % (2 * vw) == 0 ? 2 : 1;
  const tune::Space space{{"mr", "nrv", "pack", "pf", "panel", "lt", "kern"},
                          {{4, 6, 8, 12, 14}, {1, 2, 4}, {0, 1, 2, 3}, {0, 1, 2, 3}, {1, 4, 16}, {0, 32, 256}, {0, 1, 2}},
                          {1, nrv == 2 ? 1 : 0, 0, 0, 0, 0, 0},
                          {{12, nrv, 2, 0, 1, 0, 0}, {12, nrv, 2, 3, 1, 0, 0}, {8, nrv, 2, 3, 1, 0, 0},
                           {12, nrv, 3, 0, 1, 0, 0}, {12, nrv, 1, 0, 1, 0, 0}, {12, nrv, 0, 0, 1, 0, 2},
                           {8, nrv, 0, 0, 1, 0, 2}}};
  const int64_t ld = lines * L.outer;
  auto plan_of = [](const tune::Point& p) { return MrPlan{p[0], p[1], p[2], p[4], p[5], p[6] == 2, p[3]}; };
  auto valid = [&](const tune::Point& p) {
    if (p[6] == 1) return true;
    const MrPlan plan = plan_of(p);
    // input-block order: the register tile only (its reads are in place, its rows one register tile)
    if (plan.cols) return cols && p[2] == 0 && p[3] == 0 && p[4] == 1 && p[5] == 0 && mr_plan_valid(plan, vw, L.outer);
    const int64_t rows = static_cast<int64_t>(plan.mr) * plan.panel;
    // prefetching applies to inputs read in place, pf=2 to identity ones
    const bool in_place = mr_reads_in_place(plan, gather != nullptr, in_cols * sizeof(T));
    if (plan.pf != 0 && (!in_place || (plan.pf == 2 && gather != nullptr))) return false;
    // a panel's buffers stay within about half an L2
    return mr_plan_valid(plan, vw, L.outer) &&
           (plan.panel == 1 || rows * (in_cols + (st.scatter ? ld : 0)) * 4 <= (int64_t{1} << 20));
  };
  const std::string shape = "in" + std::to_string(in_cols) + " lines" + std::to_string(lines) + " o" +
                            std::to_string(L.outer) + " i" + std::to_string(L.inner) + " nnzb" +
                            std::to_string(L.ptr[lines] - L.ptr[0]) + (gather ? " gin" : "") +
                            (st.scatter ? " gout" : "");
  tune::choose(tune_key<T>(L.blk ? "block_mm_t" : "block_mm", B, shape), space, valid, [&](const tune::Point& p) {
    if (p[6] == 1) {
      packed();
    } else if (L.ostride == 1) {
      block_mm_mr(in, B, in_cols, gather, L, lines, st, plan_of(p), cols, ncols);
    } else {
      const auto w = contiguous();
      BlockLine Lc = L;
      Lc.w = w.template data_ptr<float>();
      Lc.wstride = L.outer;
      Lc.ostride = 1;
      if (cols) {  // the same output-contiguous blocks, by input block
        BlockLine Kc = *cols;
        Kc.w = Lc.w;
        Kc.wstride = L.outer;
        Kc.ostride = 1;
        block_mm_mr(in, B, in_cols, gather, Lc, lines, st, plan_of(p), &Kc, ncols);
      } else {
        block_mm_mr(in, B, in_cols, gather, Lc, lines, st, plan_of(p));
      }
    }
  });
}

}  // namespace padst::cpu::rk
