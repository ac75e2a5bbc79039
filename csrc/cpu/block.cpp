// Permuted block-sparse matmul on the CPU: forward, dx and block-sampled dW.
//
// The permutations are fused into the loads and stores, never a separate pass over x or y:
//  - forward: x[b, in_perm[c]] is read as the scalar that multiplies a row of the (pre-transposed) block,
//    so the gather costs the same as a contiguous read; results are stored to y[b, inv(out_perm)[r]].
//  - dx: dy is read through inv(out_perm), results are stored to dx[b, in_perm[c]].
//  - dW: each block packs its gathered dy / x columns for a batch tile into L1 and accumulates there.
#include <torch/library.h>

#include "block_dw.h"
#include "block_mm.h"
#include "common.h"

namespace padst::cpu {
namespace {

constexpr int64_t kBatchTile = 32;  // rows of x per forward / dx task: keeps the x tile in L2

// Register tile along a block's row (forward) or column (dx, dW): at most 16 accumulators, so they stay in
// registers; a 32-wide tile spilled and ran 3x slower per FLOP than 16 (measured, fc1 shape, 1 thread).
// W is the compile-time block width (0: known only at run time).
template <int W>
constexpr int kTile = (W > 0 && W < 16) ? W : 16;
template <int W>
inline int tile_len(int64_t width, int64_t start) {
  if constexpr (W > 0 && W % kTile<W> == 0) {
    return kTile<W>;
  } else {
    return static_cast<int>(std::min<int64_t>(kTile<W>, width - start));
  }
}

// y[b, inv_out[i*br + rr]] = bias + sum_{k in row i} sum_cc vt[k][cc][rr] * x[b, in_perm[col_idx[k]*bc + cc]]
template <typename T, int BR>
void block_fwd_kernel(const T* x, int64_t B, int64_t C, const acc_t<T>* vt, const BlockMeta& m, const T* bias,
                      const int64_t* in_perm, const int64_t* inv_out, T* y) {
  using A = acc_t<T>;
  constexpr int RB = kTile<BR>;
  const int64_t br = m.br, bc = m.bc, R = m.R, nbr = m.nbr;
  const int64_t* rp = m.row_ptr.data_ptr<int64_t>();
  const int64_t* ci = m.col_idx.data_ptr<int64_t>();
  const int64_t nbt = ceil_div(B, kBatchTile);
  at::parallel_for(0, nbt * nbr, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % nbr, bt = task / nbr;
      const int64_t b_end = std::min(B, (bt + 1) * kBatchTile);
      for (int64_t b = bt * kBatchTile; b < b_end; ++b) {
        const T* xr = x + b * C;
        T* yr = y + b * R;
        for (int64_t rr0 = 0; rr0 < br; rr0 += RB) {
          const int nr = tile_len<BR>(br, rr0);
          A acc[RB];
          for (int rr = 0; rr < nr; ++rr) acc[rr] = A(0);
          for (int64_t k = rp[i]; k < rp[i + 1]; ++k) {
            const int64_t* pc = in_perm + ci[k] * bc;
            const A* v = vt + k * bc * br + rr0;
            for (int64_t cc = 0; cc < bc; ++cc) {
              const A s = static_cast<A>(xr[pc[cc]]);
              const A* vc = v + cc * br;
#pragma omp simd
              for (int rr = 0; rr < nr; ++rr) acc[rr] += s * vc[rr];
            }
          }
          const int64_t* dst = inv_out + i * br + rr0;
          for (int rr = 0; rr < nr; ++rr) {
            const int64_t col = dst[rr];
            yr[col] = static_cast<T>(bias ? acc[rr] + static_cast<A>(bias[col]) : acc[rr]);
          }
        }
      }
    }
  });
}

// dx[b, in_perm[j*bc + cc]] = sum_{blocks (i, k) in column j} sum_rr dy[b, inv_out[i*br + rr]] * v[k][rr][cc]
template <typename T, int BC>
void block_dx_kernel(const T* dy, int64_t B, const acc_t<T>* v, const BlockMeta& m, const int64_t* in_perm,
                     const int64_t* inv_out, T* dx) {
  using A = acc_t<T>;
  constexpr int CB = kTile<BC>;
  const int64_t br = m.br, bc = m.bc, R = m.R, C = m.C, nbc = m.nbc;
  const int64_t* cp = m.col_ptr.data_ptr<int64_t>();
  const int64_t* ri = m.row_idx_t.data_ptr<int64_t>();
  const int64_t* bt_idx = m.blk_t.data_ptr<int64_t>();
  const int64_t nbt = ceil_div(B, kBatchTile);
  at::parallel_for(0, nbt * nbc, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task % nbc, bt = task / nbc;
      const int64_t b_end = std::min(B, (bt + 1) * kBatchTile);
      for (int64_t b = bt * kBatchTile; b < b_end; ++b) {
        const T* dyr = dy + b * R;
        T* dxr = dx + b * C;
        for (int64_t cc0 = 0; cc0 < bc; cc0 += CB) {
          const int nc = tile_len<BC>(bc, cc0);
          A acc[CB];
          for (int cc = 0; cc < nc; ++cc) acc[cc] = A(0);
          for (int64_t p = cp[j]; p < cp[j + 1]; ++p) {
            const int64_t* src = inv_out + ri[p] * br;
            const A* vk = v + bt_idx[p] * br * bc + cc0;
            for (int64_t rr = 0; rr < br; ++rr) {
              const A s = static_cast<A>(dyr[src[rr]]);
              const A* vr = vk + rr * bc;
#pragma omp simd
              for (int cc = 0; cc < nc; ++cc) acc[cc] += s * vr[cc];
            }
          }
          const int64_t* dst = in_perm + j * bc + cc0;
          for (int cc = 0; cc < nc; ++cc) dxr[dst[cc]] = static_cast<T>(acc[cc]);
        }
      }
    }
  });
}

// dv[k][rr][cc] = sum_b dy[b, inv_out[i*br + rr]] * x[b, in_perm[j*bc + cc]] for each active block k = (i, j)
template <typename T, int BC>
void block_sddmm_kernel(const T* dy, const T* x, int64_t B, const BlockMeta& m, const int64_t* in_perm,
                        const int64_t* inv_out, T* dv) {
  using A = acc_t<T>;
  constexpr int64_t TB = 64;
  constexpr int CB = kTile<BC>;
  const int64_t br = m.br, bc = m.bc, R = m.R, C = m.C;
  const int64_t* ci = m.col_idx.data_ptr<int64_t>();
  const int64_t* brow = m.blk_row.data_ptr<int64_t>();
  at::parallel_for(0, m.nnzb, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> dzT(br * TB), xg(TB * bc), acc(br * bc);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t* rows = inv_out + brow[k] * br;
      const int64_t* cols = in_perm + ci[k] * bc;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t b0 = 0; b0 < B; b0 += TB) {
        const int64_t tb = std::min(TB, B - b0);
        for (int64_t t = 0; t < tb; ++t) {
          const T* dyr = dy + (b0 + t) * R;
          const T* xr = x + (b0 + t) * C;
          for (int64_t rr = 0; rr < br; ++rr) dzT[rr * TB + t] = static_cast<A>(dyr[rows[rr]]);
          for (int64_t cc = 0; cc < bc; ++cc) xg[t * bc + cc] = static_cast<A>(xr[cols[cc]]);
        }
        for (int64_t rr = 0; rr < br; ++rr) {
          A* accr = acc.data() + rr * bc;
          const A* d = dzT.data() + rr * TB;
          for (int64_t cc0 = 0; cc0 < bc; cc0 += CB) {
            const int nc = tile_len<BC>(bc, cc0);
            A a[CB];
            for (int cc = 0; cc < nc; ++cc) a[cc] = accr[cc0 + cc];
            for (int64_t t = 0; t < tb; ++t) {
              const A s = d[t];
              const A* xt = xg.data() + t * bc + cc0;
#pragma omp simd
              for (int cc = 0; cc < nc; ++cc) a[cc] += s * xt[cc];
            }
            for (int cc = 0; cc < nc; ++cc) accr[cc0 + cc] = a[cc];
          }
        }
      }
      T* out = dv + k * br * bc;
      for (int64_t e = 0; e < br * bc; ++e) out[e] = static_cast<T>(acc[e]);
    }
  });
}

// Each block transposed to [bc][br] as float, what the forward's unpacked kernel reads (the br outputs of one input
// column contiguous). float32 blocks whose sides are multiples of 8 go through 8x8 register transposes, blocks split
// between threads (measured 2.5-3x faster than values.transpose(1, 2).contiguous(), whose strided copy cost 8% of a
// 90%-sparse fc2 forward from cold caches); other dtypes and sides through ATen.
at::Tensor transposed_float_blocks(const at::Tensor& values) {
  const int64_t n = values.size(0), br = values.size(1), bc = values.size(2);
  if (values.scalar_type() != at::kFloat || br % 8 != 0 || bc % 8 != 0)
    return values.transpose(1, 2).to(at::kFloat).contiguous();
  const at::Tensor v = values.contiguous();
  at::Tensor out = at::empty({n, bc, br}, v.options());
  const float* src = v.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const Isa isa = current_isa();
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / (br * bc)), [&](int64_t k0, int64_t k1) {
    dispatch_isa(isa, [&](auto) PADST_ISA_BODY {
      for (int64_t k = k0; k < k1; ++k) {
        const float* a = src + k * br * bc;
        float* o = dst + k * br * bc;
        for (int64_t r0 = 0; r0 < br; r0 += 8)
          for (int64_t c0 = 0; c0 < bc; c0 += 8) rk::transpose8x8(a + r0 * bc + c0, bc, o + c0 * br + r0, br);
      }
    });
  });
  return out;
}

at::Tensor block_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                        const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                        const at::Tensor& blk_t, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto pp =
      prologue<CpuDevice>(BlockMmCall{x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias, in_perm, out_perm});
  const BlockProblem& p = *pp;
  const BlockMeta& m = p.m;
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), m.R}, x.options());
  std::optional<at::Tensor> bc_ = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  PADST_DISPATCH_FLOATS(x.scalar_type(), "block_mm_cpu", [&] {
    using A = acc_t<scalar_t>;
    if constexpr (kVecType<scalar_t>) {
      if (x.size(0) >= kMinVecBatch) {
        // The blocks as stored ([br][bc]: outputs bc apart) for the packed kernel; the unpacked one gets each block
        // transposed to [bc][br] (the br outputs of one input column contiguous).
        const at::Tensor vf = float_values(values);
        const rk::BlockLine line{m.row_ptr.data_ptr<int64_t>(), m.col_idx.data_ptr<int64_t>(), nullptr,
                                 vf.data_ptr<float>(), m.bc, m.br, 1, m.br * m.bc, m.bc};
        // the same blocks by block-column (input block): line = block-row, weights through blk_t
        const rk::BlockLine by_col{m.col_ptr.data_ptr<int64_t>(), m.row_idx_t.data_ptr<int64_t>(),
                                   m.blk_t.data_ptr<int64_t>(), vf.data_ptr<float>(), m.bc, m.br, 1, m.br * m.bc, m.bc};
        rk::block_mm(xc.data_ptr<scalar_t>(), x.size(0), m.C, perm_ptr(p.pin, false), line, m.nbr,
                     rk::Store<scalar_t>{y.data_ptr<scalar_t>(), m.R, perm_ptr(p.pout, true),
                                         bc_ ? bc_->data_ptr<scalar_t>() : nullptr, perm_ptr(p.pout, false),
                                         perm_ptr32(p.pout, false)},
                     [&] { return transposed_float_blocks(values); }, &by_col, m.nbc);
        return;
      }
    }
    // Pre-transpose each block to [bc][br] so the inner loop runs along contiguous output rows.
    auto vt = values.transpose(1, 2).to(c10::CppTypeToScalarType<A>::value).contiguous();
    dispatch_width(m.br, [&](auto W) {
      block_fwd_kernel<scalar_t, decltype(W)::value>(xc.data_ptr<scalar_t>(), x.size(0), m.C, vt.data_ptr<A>(), m,
                                                     bc_ ? bc_->data_ptr<scalar_t>() : nullptr, p.pin.fwd.data(),
                                                     p.pout.inv.data(), y.data_ptr<scalar_t>());
    });
  });
  return y;
}

at::Tensor block_mm_t_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                          const at::Tensor& blk_t, const std::optional<at::Tensor>& in_perm,
                          const std::optional<at::Tensor>& out_perm) {
  const auto pp =
      prologue<CpuDevice>(BlockMmTCall{dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm});
  const BlockProblem& p = *pp;
  const BlockMeta& m = p.m;
  auto dyc = dy.contiguous();
  auto dx = at::empty({dy.size(0), m.C}, dy.options());
  PADST_DISPATCH_FLOATS(dy.scalar_type(), "block_mm_t_cpu", [&] {
    if constexpr (kVecType<scalar_t>) {
      if (dy.size(0) >= kMinVecBatch) {
        const at::Tensor vf = float_values(values);  // [nnzb][br][bc]: the bc outputs of one dy column contiguous
        const rk::BlockLine line{m.col_ptr.data_ptr<int64_t>(), m.row_idx_t.data_ptr<int64_t>(),
                                 m.blk_t.data_ptr<int64_t>(), vf.data_ptr<float>(), m.br, m.bc, m.bc, m.br * m.bc};
        // the same blocks by block-row (dy's input block): line = block-column, weights in place
        const rk::BlockLine by_row{m.row_ptr.data_ptr<int64_t>(), m.col_idx.data_ptr<int64_t>(), nullptr,
                                   vf.data_ptr<float>(), m.br, m.bc, m.bc, m.br * m.bc};
        rk::block_mm(dyc.data_ptr<scalar_t>(), dy.size(0), m.R, perm_ptr(p.pout, true), line, m.nbc,
                     rk::Store<scalar_t>{dx.data_ptr<scalar_t>(), m.C, perm_ptr(p.pin, false), nullptr,
                                         perm_ptr(p.pin, true), perm_ptr32(p.pin, true)},
                     [&] { return vf; }, &by_row, m.nbr);  // already output-contiguous
        return;
      }
    }
    auto v = as_acc<scalar_t>(values.contiguous());
    dispatch_width(m.bc, [&](auto W) {
      block_dx_kernel<scalar_t, decltype(W)::value>(dyc.data_ptr<scalar_t>(), dy.size(0), v.ptr, m, p.pin.fwd.data(),
                                                    p.pout.inv.data(), dx.data_ptr<scalar_t>());
    });
  });
  return dx;
}

at::Tensor block_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, int64_t block_rows, int64_t block_cols,
                           const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto pp =
      prologue<CpuDevice>(BlockSddmmCall{dy, x, row_ptr, col_idx, block_rows, block_cols, in_perm, out_perm});
  const BlockProblem& p = *pp;
  const BlockMeta& m = p.m;
  auto dyc = dy.contiguous();
  auto xc = x.contiguous();
  auto dv = at::empty({m.nnzb, m.br, m.bc}, x.options());
  PADST_DISPATCH_FLOATS(x.scalar_type(), "block_sddmm_cpu", [&] {
    if constexpr (kVecType<scalar_t>) {
      if (rk::block_dw(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), x.size(0), m.R, m.C, m.br, m.bc, m.nnzb,
                       m.blk_row.data_ptr<int64_t>(), m.col_idx.data_ptr<int64_t>(), perm_ptr(p.pout, true),
                       perm_ptr(p.pin, false), dv.data_ptr<scalar_t>()))
        return;
    }
    dispatch_width(m.bc, [&](auto W) {
      block_sddmm_kernel<scalar_t, decltype(W)::value>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), x.size(0),
                                                       m, p.pin.fwd.data(), p.pout.inv.data(), dv.data_ptr<scalar_t>());
    });
  });
  return dv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_transpose_meta_cpu(const at::Tensor& row_ptr,
                                                                         const at::Tensor& col_idx,
                                                                         int64_t num_block_cols) {
  const char* op = "padst::block_transpose_meta";
  check_index_tensor(op, "row_ptr", row_ptr, 1);
  check_cpu(op, "row_ptr", row_ptr);
  TORCH_CHECK_VALUE(row_ptr.size(0) >= 1, op, ": row_ptr must have at least one entry");
  TORCH_CHECK_VALUE(num_block_cols >= 0 && num_block_cols < (int64_t{1} << 31), op,
                    ": num_block_cols must be in [0, 2^31) (the weight's block-columns), got ", num_block_cols);
  // 1x1 "blocks": validates row_ptr and col_idx (range, sorted) exactly as the matmul ops do.
  const BlockMeta m = check_block_csr(op, row_ptr, col_idx, 1, 1, row_ptr.size(0) - 1, num_block_cols, row_ptr);
  auto opts = m.row_ptr.options();
  auto col_ptr = at::zeros({m.nbc + 1}, opts);
  auto row_idx_t = at::empty({m.nnzb}, opts);
  auto blk_t = at::empty({m.nnzb}, opts);
  int64_t* cp = col_ptr.data_ptr<int64_t>();
  const int64_t* ci = m.col_idx.data_ptr<int64_t>();
  const int64_t* brow = m.blk_row.data_ptr<int64_t>();
  for (int64_t k = 0; k < m.nnzb; ++k) ++cp[ci[k] + 1];
  for (int64_t j = 0; j < m.nbc; ++j) cp[j + 1] += cp[j];
  // Counting sort in CSR order: within each column the block-rows come out ascending.
  std::vector<int64_t> next(cp, cp + m.nbc);
  int64_t* ri = row_idx_t.data_ptr<int64_t>();
  int64_t* bt = blk_t.data_ptr<int64_t>();
  for (int64_t k = 0; k < m.nnzb; ++k) {
    const int64_t p = next[ci[k]]++;
    ri[p] = brow[k];
    bt[p] = k;
  }
  return {col_ptr, row_idx_t, blk_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(padst, CPU, m) {
  m.impl("block_transpose_meta", &block_transpose_meta_cpu);
  m.impl("block_mm", &block_mm_cpu);
  m.impl("block_mm_t", &block_mm_t_cpu);
  m.impl("block_sddmm", &block_sddmm_cpu);
}

}  // namespace padst::cpu
