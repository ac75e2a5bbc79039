// Tensor-core weight gradient of the block structure for fp16/bf16 (CTA body; see portable.h and warp_mma.h):
//   dV[k][rr][cc] = sum_b dy[b, dy_src(i*br + rr)] * x[b, x_src(j*bc + cc)]      for each active block k = (i, j)
// a [br x B] x [B x bc] product per block. CTA = (block k, batch split s): per 64 batch rows, phase "stage" gathers
// the block's dy columns (through the inverse output permutation) and x columns (through the input permutation)
// into shared memory; phase "mma" has the 4 warps share the (br/16) x (bc/16) output tiles, A = dz^T read
// column-major from the staged dz rows. The float tile goes to partial[s][k] ("store" + "epilogue"); the
// partials are summed in split order by reduce_partials (sddmm.h), so the result is deterministic.
// Serves block sides that are multiples of 16 up to 64 (at most 16 tiles, 4 per warp).
#pragma once

#include "portable.h"
#include "sddmm.h"
#include "warp_mma.h"

namespace padst::kern {

template <typename T>
struct BlockSddmmTcParams {
  const T* dy = nullptr;  // [B, R]
  const T* x = nullptr;   // [B, C]
  const int64_t* dy_gather = nullptr;
  const int64_t* x_gather = nullptr;
  const int64_t* blk_row = nullptr;
  const int64_t* col_idx = nullptr;
  float* partial = nullptr;  // [splits, nnzb * br * bc]
  T* out = nullptr;          // [nnzb, br, bc]
  int64_t B = 0, R = 0, C = 0, nnzb = 0, br = 0, bc = 0, splits = 1, chunk = 0;
};

PADST_HD bool block_sddmm_tc_supports(int64_t br, int64_t bc) {
  return br > 0 && bc > 0 && br % 16 == 0 && bc % 16 == 0 && br <= 64 && bc <= 64;
}

template <typename T>
struct BlockSddmmTc {
  using Params = BlockSddmmTcParams<T>;
  using Mma = WarpMma<T, /*kBColMajor=*/false, /*kAColMajor=*/true>;
  static constexpr int kBlockThreads = 128;
  static constexpr int kWarps = 4;
  static constexpr int kRows = 64;        // batch rows per stage
  static constexpr int kTilesPerWarp = 4;  // (64/16)^2 / 4 warps
  static constexpr int kPad = 8;

  PADST_HD static int64_t num_ctas(const Params& p) { return p.nnzb * p.splits; }
  static int64_t smem_bytes(const Params& p) {
    const int64_t stage = kRows * (p.br + kPad + p.bc + kPad) * static_cast<int64_t>(sizeof(T));
    const int64_t acc = p.br * p.bc * static_cast<int64_t>(sizeof(float));
    return stage > acc ? stage : acc;
  }
  // Batch splits: enough CTAs to fill the GPU (~1024), chunks of at least 256 rows.
  static void plan(Params& p) {
    const int64_t want = p.nnzb > 0 ? ceil_div(1024, p.nnzb) : 1;
    const int64_t most = p.B > 0 ? ceil_div(p.B, 256) : 1;
    p.splits = want < 1 ? 1 : (want > most ? most : want);
    p.chunk = p.B > 0 ? ceil_div(p.B, p.splits) : 0;
    p.splits = p.chunk > 0 ? ceil_div(p.B, p.chunk) : 1;
  }
  PADST_HD static int64_t block(const Params& p, int64_t cta) { return cta % p.nnzb; }
  PADST_HD static int64_t split(const Params& p, int64_t cta) { return cta / p.nnzb; }
  PADST_HD static int64_t rows_begin(const Params& p, int64_t cta) { return split(p, cta) * p.chunk; }
  PADST_HD static int64_t rows_end(const Params& p, int64_t cta) { return min64(p.B, rows_begin(p, cta) + p.chunk); }

  // Phase "stage" for batch rows [b0, b0 + 64): dz[t][rr] (ld br+8) and xs[t][cc] (ld bc+8).
  PADST_HD static void stage(const Params& p, int64_t cta, int64_t b0, int tid, T* dz, T* xs) {
    const int64_t k = block(p, cta), b1 = rows_end(p, cta);
    const int64_t r0 = p.blk_row[k] * p.br, c0 = p.col_idx[k] * p.bc;
    for (int64_t i = tid; i < kRows * p.br; i += kBlockThreads) {
      const int64_t t = i / p.br, rr = i - t * p.br, b = b0 + t;
      const int64_t r = r0 + rr, src = p.dy_gather ? p.dy_gather[r] : r;
      dz[t * (p.br + kPad) + rr] = b < b1 ? p.dy[b * p.R + src] : Num<T>::from_acc(0.0f);
    }
    for (int64_t i = tid; i < kRows * p.bc; i += kBlockThreads) {
      const int64_t t = i / p.bc, cc = i - t * p.bc, b = b0 + t;
      const int64_t c = c0 + cc, src = p.x_gather ? p.x_gather[c] : c;
      xs[t * (p.bc + kPad) + cc] = b < b1 ? p.x[b * p.C + src] : Num<T>::from_acc(0.0f);
    }
  }

  // Phase "mma" (warp-collective): tiles tt = warp + 4*s of the (br/16) x (bc/16) output.
  PADST_WARP_FN static void mma(const Params& p, int warp, const T* dz, const T* xs, typename Mma::Acc* acc) {
    const int ldz = static_cast<int>(p.br + kPad), ldx = static_cast<int>(p.bc + kPad);
    const int tn = static_cast<int>(p.bc / 16), nt = static_cast<int>((p.br / 16) * tn);
    for (int s = 0; s < kTilesPerWarp; ++s) {
      const int tt = warp + kWarps * s;
      if (tt >= nt) break;
      const int ti = tt / tn, tj = tt - ti * tn;
      for (int t0 = 0; t0 < kRows; t0 += 16) {
        // A(m, k) = dz[t0 + k][ti*16 + m]: column-major with ld ldz; B(k, n) = xs[t0 + k][tj*16 + n]: row-major
        Mma::mma(acc[s], dz + t0 * ldz + ti * 16, ldz, xs + t0 * ldx + tj * 16, ldx);
      }
    }
  }

  PADST_WARP_FN static void store(const Params& p, int warp, const typename Mma::Acc* acc, float* ct) {
    const int tn = static_cast<int>(p.bc / 16), nt = static_cast<int>((p.br / 16) * tn);
    for (int s = 0; s < kTilesPerWarp; ++s) {
      const int tt = warp + kWarps * s;
      if (tt >= nt) break;
      const int ti = tt / tn, tj = tt - ti * tn;
      Mma::store(ct + (ti * 16) * p.bc + tj * 16, static_cast<int>(p.bc), acc[s]);
    }
  }

  // Phase "epilogue": partial[s][k*br*bc + e] = ct[e].
  PADST_HD static void epilogue(const Params& p, int64_t cta, int tid, const float* ct) {
    const int64_t area = p.br * p.bc, nnz = p.nnzb * area;
    float* dst = p.partial + split(p, cta) * nnz + block(p, cta) * area;
    for (int64_t e = tid; e < area; e += kBlockThreads) dst[e] = ct[e];
  }

  PADST_HD static int64_t reduce_ctas(const Params& p) { return ceil_div(p.nnzb * p.br * p.bc, kBlockThreads); }
  PADST_HD static void reduce(const Params& p, int64_t cta, int tid) {
    reduce_partials(p.partial, p.splits, p.nnzb * p.br * p.bc, p.out, cta * kBlockThreads + tid);
  }
};

}  // namespace padst::kern
