// Tensor-core block-sparse product for fp16/bf16, the forward and dx kernel of the block structure when both
// block sides are multiples of 16 and the output side is 16, 32 or 64 (CTA body; see portable.h and warp_mma.h).
//
// Both products have the same shape: for an output block-line o (a block-row of S forward, a block-column for dx),
//   out[b, dst(o*bo + n)] = bias + sum_{q in line o} sum_k in[b, src(idx[q]*bi + k)] * W_q(k, n)
// forward: bo = br, bi = bc, lines = CSR (row_ptr, col_idx), block q itself, W_q(k, n) = V[q][n][k]
// dx:      bo = bc, bi = br, lines = CSC (col_ptr, row_idx_t, blk_t), block blk_t[q], W_q(k, n) = V[blk][k][n]
// i.e. one GEMM per (line, 64-row batch tile) with K running over the line's blocks: M = 64 batch rows, N = bo.
//
// CTA: 4 warps, 64 batch rows (16 per warp) x bo output columns. Per block of the line: phase "stage" gathers the
// 64 x bi input tile (through src: the permutation, fused into the load) and copies the block's values to shared
// memory (rows padded by 8 elements against bank conflicts); phase "mma" has each warp run (bi/16) x (bo/16) tensor
// core products into bo/16 float accumulators. After the last block, "store" moves the accumulators to shared
// memory and "epilogue" adds the bias and writes out[b, dst(.)] (the output permutation, fused into the store),
// consecutive threads on consecutive columns.
#pragma once

#include "portable.h"
#include "warp_mma.h"

namespace padst::kern {

template <typename T>
struct BlockTcParams {
  const T* in = nullptr;             // [B, in_cols]
  const int64_t* in_gather = nullptr;
  const T* values = nullptr;         // [nnzb, br, bc]
  const T* bias = nullptr;
  const int64_t* out_scatter = nullptr;
  T* out = nullptr;                  // [B, out_cols]
  const int64_t* ptr = nullptr;      // [lines + 1]
  const int64_t* idx = nullptr;      // input block-line of each block
  const int64_t* blk = nullptr;      // block index into values, or null (= position)
  int64_t B = 0, in_cols = 0, out_cols = 0, lines = 0, br = 0, bc = 0;
};

inline constexpr int kBlockTcRows = 64;     // batch rows per CTA
inline constexpr int kBlockTcThreads = 128;  // 4 warps x 16 rows

// The kernel serves a problem when the output block side bo is 16, 32 or 64 and the input side bi a multiple of 16
// up to 128 (shared memory stays below 48 KB); returns bo / 16, or 0 when the generic gather kernel must serve.
PADST_HD int block_tc_out16(bool dx, int64_t br, int64_t bc) {
  const int64_t o = dx ? bc : br, i = dx ? br : bc;
  if (i % 16 != 0 || i > 128 || i <= 0) return 0;
  return (o == 16 || o == 32 || o == 64) ? static_cast<int>(o / 16) : 0;
}

// kDx: false = forward (W_q(k, n) = V[q][n][k], B operand column-major), true = dx (row-major). kOut16 = bo / 16.
template <typename T, bool kDx, int kOut16>
struct BlockTc {
  using Params = BlockTcParams<T>;
  using Mma = WarpMma<T, !kDx>;
  static constexpr int kBlockThreads = kBlockTcThreads;
  static constexpr int kPad = 8;
  static constexpr int kOut = kOut16;

  PADST_HD static int64_t bo(const Params& p) { return kDx ? p.bc : p.br; }
  PADST_HD static int64_t bi(const Params& p) { return kDx ? p.br : p.bc; }
  PADST_HD static int64_t num_ctas(const Params& p) { return p.lines * ceil_div(p.B, kBlockTcRows); }
  // Shared memory: input tile [64][bi+8] and values [br][bc+8] (T), reused afterwards for the [64][bo] floats.
  static int64_t smem_bytes(const Params& p) {
    const int64_t stage = (kBlockTcRows * (bi(p) + kPad) + p.br * (p.bc + kPad)) * static_cast<int64_t>(sizeof(T));
    const int64_t acc = kBlockTcRows * bo(p) * static_cast<int64_t>(sizeof(float));
    return stage > acc ? stage : acc;
  }

  PADST_HD static int64_t line(const Params& p, int64_t cta) { return cta % p.lines; }
  PADST_HD static int64_t row0(const Params& p, int64_t cta) { return (cta / p.lines) * kBlockTcRows; }

  // Phase "stage" for the line's q-th block: xs[t][k] = in[b0 + t, src(idx[q]*bi + k)], vs[r][c] = V[blk][r][c].
  PADST_HD static void stage(const Params& p, int64_t cta, int64_t q, int tid, T* xs, T* vs) {
    const int64_t b0 = row0(p, cta), w = bi(p), ldx = w + kPad;
    const int64_t c0 = p.idx[q] * w;
    for (int64_t i = tid; i < kBlockTcRows * w; i += kBlockTcThreads) {
      const int64_t t = i / w, k = i - t * w, b = b0 + t;
      const int64_t c = c0 + k;
      const int64_t src = p.in_gather ? p.in_gather[c] : c;
      xs[t * ldx + k] = b < p.B ? p.in[b * p.in_cols + src] : Num<T>::from_acc(0.0f);
    }
    const int64_t blk = p.blk ? p.blk[q] : q;
    const T* v = p.values + blk * p.br * p.bc;
    for (int64_t i = tid; i < p.br * p.bc; i += kBlockTcThreads) {
      const int64_t r = i / p.bc, c = i - r * p.bc;
      vs[r * (p.bc + kPad) + c] = v[i];
    }
  }

  // Phase "mma" (warp-collective): acc[j] += X_warp[16 x bi] * W[bi x 16 (columns j*16..)].
  PADST_WARP_FN static void mma(const Params& p, int warp, const T* xs, const T* vs, typename Mma::Acc* acc) {
    const int ldx = static_cast<int>(bi(p) + kPad), ldv = static_cast<int>(p.bc + kPad);
    const T* a = xs + warp * 16 * ldx;
    for (int64_t k = 0; k < bi(p); k += 16) {
      for (int j = 0; j < kOut16; ++j) {
        // forward: W(k, n) = vs[n][k] (column-major, ld ldv); dx: W(k, n) = vs[k][n] (row-major, ld ldv)
        const T* b = kDx ? vs + k * ldv + j * 16 : vs + (j * 16) * ldv + k;
        Mma::mma(acc[j], a + k, ldx, b, ldv);
      }
    }
  }

  PADST_WARP_FN static void store(int warp, const typename Mma::Acc* acc, float* ct) {
    for (int j = 0; j < kOut16; ++j) Mma::store(ct + warp * 16 * (16 * kOut16) + j * 16, 16 * kOut16, acc[j]);
  }

  // Phase "epilogue": out[b0 + t, dst(o*bo + n)] = ct[t][n] + bias.
  PADST_HD static void epilogue(const Params& p, int64_t cta, int tid, const float* ct) {
    const int64_t b0 = row0(p, cta), o = line(p, cta);
    constexpr int64_t n_out = 16 * kOut16;
    for (int64_t i = tid; i < kBlockTcRows * n_out; i += kBlockTcThreads) {
      const int64_t t = i / n_out, n = i - t * n_out, b = b0 + t;
      if (b >= p.B) continue;
      const int64_t r = o * n_out + n;
      const int64_t dst = p.out_scatter ? p.out_scatter[r] : r;
      const float bias = p.bias ? Num<T>::to_acc(p.bias[dst]) : 0.0f;
      p.out[b * p.out_cols + dst] = Num<T>::from_acc(ct[i] + bias);
    }
  }
};

}  // namespace padst::kern
