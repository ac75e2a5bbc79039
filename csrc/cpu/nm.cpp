// N:M (condensed, constant fan-in) matmul on the CPU: forward, dx and dW on the pattern.
//
// The input permutation is already folded into col_idx (col_idx = perm[logical index]), so a permuted layer
// runs exactly the same code as an unpermuted one. Batched kernels transpose a tile of x into
// xT[C][TB] (TB batch rows contiguous) so that each (row, k) term is one broadcast times one contiguous
// vector; batch 1 is a plain gather-dot.
#include <torch/library.h>

#include "common.h"
#include "gather_dot.h"
#include "rows_dw.h"
#include "rows_mm.h"

namespace padst::cpu {
namespace {

constexpr int64_t TB = 16;  // batch rows per tile: one or two SIMD registers of accumulators per output

template <typename T, typename I>
void nm_fwd_kernel(const T* x, int64_t B, int64_t C, const T* v, const I* idx, int64_t R, int64_t K, const T* bias,
                   T* y) {
  using A = acc_t<T>;
  if (B == 1) {
    at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* vr = v + r * K;
        const I* ir = idx + r * K;
        // four partial sums: one chain of dependent adds would bound this loop by the add latency
        A acc[4] = {A(0), A(0), A(0), A(0)};
        int64_t k = 0;
        for (; k + 4 <= K; k += 4)
          for (int j = 0; j < 4; ++j) acc[j] += static_cast<A>(vr[k + j]) * static_cast<A>(x[ir[k + j]]);
        for (; k < K; ++k) acc[0] += static_cast<A>(vr[k]) * static_cast<A>(x[ir[k]]);
        const A b = bias ? static_cast<A>(bias[r]) : A(0);
        y[r] = static_cast<T>(b + ((acc[0] + acc[1]) + (acc[2] + acc[3])));
      }
    });
    return;
  }
  const int64_t nbt = ceil_div(B, TB);
  // Split rows too when there are few batch tiles, so both cores get work.
  const int64_t want = 8 * at::get_num_threads();
  const int64_t nrc = nbt >= want ? 1 : std::min(ceil_div(want, nbt), ceil_div(R, 16));
  const int64_t rc = ceil_div(R, nrc);
  at::parallel_for(0, nbt * nrc, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> xT(C * TB);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / nrc, rcid = task % nrc;
      const int64_t b0 = bt * TB, tb = std::min(TB, B - b0);
      if (packed != bt) {
        for (int64_t t = 0; t < TB; ++t) {
          if (t < tb) {
            const T* xr = x + (b0 + t) * C;
            for (int64_t c = 0; c < C; ++c) xT[c * TB + t] = static_cast<A>(xr[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) xT[c * TB + t] = A(0);
          }
        }
        packed = bt;
      }
      const int64_t r_end = std::min(R, (rcid + 1) * rc);
      for (int64_t r = rcid * rc; r < r_end; ++r) {
        const T* vr = v + r * K;
        const I* ir = idx + r * K;
        A acc[TB];
        const A b = bias ? static_cast<A>(bias[r]) : A(0);
        for (int64_t t = 0; t < TB; ++t) acc[t] = b;
        for (int64_t k = 0; k < K; ++k) {
          const A s = static_cast<A>(vr[k]);
          const A* xc = xT.data() + static_cast<int64_t>(ir[k]) * TB;
#pragma omp simd
          for (int64_t t = 0; t < TB; ++t) acc[t] += s * xc[t];
        }
        for (int64_t t = 0; t < tb; ++t) y[(b0 + t) * R + r] = static_cast<T>(acc[t]);
      }
    }
  });
}

// dx[b, idx[r, k]] += dy[b, r] * v[r, k]. Rows scatter into shared columns, so threads split the batch.
template <typename T, typename I>
void nm_dx_kernel(const T* dy, int64_t B, const T* v, const I* idx, int64_t R, int64_t K, int64_t C, T* dx) {
  using A = acc_t<T>;
  const int64_t nbt = ceil_div(B, TB);
  at::parallel_for(0, nbt, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> dxT(C * TB), dyT(R * TB);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b0 = bt * TB, tb = std::min(TB, B - b0);
      std::fill(dxT.begin(), dxT.end(), A(0));
      for (int64_t t = 0; t < TB; ++t) {
        if (t < tb) {
          const T* dyr = dy + (b0 + t) * R;
          for (int64_t r = 0; r < R; ++r) dyT[r * TB + t] = static_cast<A>(dyr[r]);
        } else {
          for (int64_t r = 0; r < R; ++r) dyT[r * TB + t] = A(0);
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const T* vr = v + r * K;
        const I* ir = idx + r * K;
        const A* d = dyT.data() + r * TB;
        for (int64_t k = 0; k < K; ++k) {
          const A s = static_cast<A>(vr[k]);
          A* o = dxT.data() + static_cast<int64_t>(ir[k]) * TB;
#pragma omp simd
          for (int64_t t = 0; t < TB; ++t) o[t] += s * d[t];
        }
      }
      for (int64_t t = 0; t < tb; ++t) {
        T* dxr = dx + (b0 + t) * C;
        for (int64_t c = 0; c < C; ++c) dxr[c] = static_cast<T>(dxT[c * TB + t]);
      }
    }
  });
}

// dv[r, k] = sum_b dy[b, r] * x[b, idx[r, k]]. Threads split the rows; each packs the batch tiles it needs.
template <typename T, typename I>
void nm_sddmm_kernel(const T* dy, const T* x, int64_t B, const I* idx, int64_t R, int64_t K, int64_t C, T* dv) {
  using A = acc_t<T>;
  constexpr int64_t SB = 32;  // batch rows per tile: the length of each dot product
  const int64_t nrc = std::min<int64_t>(R, 4 * at::get_num_threads());
  const int64_t rc = nrc > 0 ? ceil_div(R, nrc) : 0;
  at::parallel_for(0, nrc, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> xT(C * SB), dyT(rc * SB), acc(rc * K);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * rc, r1 = std::min(R, r0 + rc);
      if (r0 >= r1) continue;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t b0 = 0; b0 < B; b0 += SB) {
        const int64_t tb = std::min(SB, B - b0);
        for (int64_t t = 0; t < SB; ++t) {
          if (t < tb) {
            const T* xr = x + (b0 + t) * C;
            const T* dyr = dy + (b0 + t) * R;
            for (int64_t c = 0; c < C; ++c) xT[c * SB + t] = static_cast<A>(xr[c]);
            for (int64_t r = r0; r < r1; ++r) dyT[(r - r0) * SB + t] = static_cast<A>(dyr[r]);
          } else {
            for (int64_t c = 0; c < C; ++c) xT[c * SB + t] = A(0);
            for (int64_t r = r0; r < r1; ++r) dyT[(r - r0) * SB + t] = A(0);
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const A* d = dyT.data() + (r - r0) * SB;
          const I* ir = idx + r * K;
          A* ar = acc.data() + (r - r0) * K;
          for (int64_t k = 0; k < K; ++k) {
            const A* xc = xT.data() + static_cast<int64_t>(ir[k]) * SB;
            A s = A(0);
#pragma omp simd reduction(+ : s)
            for (int64_t t = 0; t < SB; ++t) s += d[t] * xc[t];
            ar[k] += s;
          }
        }
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < K; ++k) dv[r * K + k] = static_cast<T>(acc[(r - r0) * K + k]);
    }
  });
}

template <typename F>
void dispatch_index(const at::Tensor& idx, F&& f) {
  if (idx.scalar_type() == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

at::Tensor nm_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx, int64_t n, int64_t m,
                     const std::optional<at::Tensor>& bias) {
  // the validated pattern as a copy of its own: the kernels never read the caller's col_idx (see as_cpu_long)
  const auto pat = prologue<CpuDevice>(NmMmCall{x, values, col_idx, n, m, bias});
  const at::Tensor& ic = pat->col_idx;
  const int64_t R = values.size(0), K = values.size(1), B = x.size(0), C = x.size(1);
  auto xc = x.contiguous();
  auto vc = values.contiguous();
  std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  auto y = at::empty({B, R}, x.options());
  if (y.numel() == 0) return y;  // also keeps the tiling arithmetic below free of divisions by zero
  // The column indices as uint16 (C <= 65536), cached with the pattern like its validation: each nonzero then costs
  // sizeof(T) + 2 bytes to stream instead of sizeof(T) + 8. That is most of a token's cost at batch 1 (memory-bound),
  // and the batched kernel streams the whole pattern once per 32-row tile.
  std::shared_ptr<const std::vector<uint16_t>> c16;
  if (C <= 65536) {
    impl::MetaKey ckey("padst::nm_mm/u16");
    ckey.meta(col_idx);
    c16 = cached<std::vector<uint16_t>>(std::move(ckey), [&] {
      std::vector<uint16_t> out(static_cast<size_t>(R * K));
      dispatch_index(ic, [&](auto I) {
        using idx_t = decltype(I);
        const idx_t* src = ic.data_ptr<idx_t>();
        for (int64_t i = 0; i < R * K; ++i) out[i] = static_cast<uint16_t>(src[i]);  // validated: in [0, C)
      });
      return out;
    });
  }
  PADST_DISPATCH_FLOATS(x.scalar_type(), "nm_mm_cpu", [&] {
    auto run = [&](const auto* idx) {
      using idx_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      if constexpr (kVecType<scalar_t>) {
        if (B >= kMinVecBatch) {
          const at::Tensor vf = float_values(vc);
          rk::rows_mm("nm_mm", xc.data_ptr<scalar_t>(), B, C, nullptr, vf.data_ptr<float>(), kern::NmRows<idx_t>{idx, K}, R,
                      rk::Store<scalar_t>{y.data_ptr<scalar_t>(), R, nullptr, bc ? bc->data_ptr<scalar_t>() : nullptr});
          return;
        }
      }
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<idx_t, uint16_t>) {
        if (B == 1) {
          gd::nm_gemv(xc.data_ptr<float>(), vc.data_ptr<float>(), idx, R, K, bc ? bc->data_ptr<float>() : nullptr,
                      y.data_ptr<float>());
          return;
        }
      }
      nm_fwd_kernel<scalar_t, idx_t>(xc.data_ptr<scalar_t>(), B, C, vc.data_ptr<scalar_t>(), idx, R, K,
                                     bc ? bc->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
    };
    if (c16) {
      run(c16->data());
    } else {
      dispatch_index(ic, [&](auto I) { run(ic.data_ptr<decltype(I)>()); });
    }
  });
  return y;
}

// A validated N:M pattern and its transpose (what kern::NmColRowsStored walks), sorted stably by column by a counting
// sort (O(nnz + C)): column c holds the entries ptr[c] .. ptr[c+1], entry q being values' flat index val[q] of forward
// row src[q].
struct NmTransposed {
  NmProblem p;
  std::vector<int64_t> ptr, src, val;
  at::Tensor ci;  // the validated col_idx, a copy of its own
  size_t bytes() const { return (ptr.size() + src.size() + val.size()) * sizeof(int64_t) + nbytes(ci); }
};

NmTransposed transpose_pattern(const NmProblem& p, const at::Tensor& col_idx) {
  const at::Tensor ci = col_idx.to(at::kLong).contiguous();  // validated: every entry in [0, C)
  const int64_t* c = ci.data_ptr<int64_t>();
  const int64_t nnz = p.R * p.K;
  NmTransposed t{p, std::vector<int64_t>(p.C + 1, 0), std::vector<int64_t>(nnz), std::vector<int64_t>(nnz)};
  for (int64_t e = 0; e < nnz; ++e) ++t.ptr[c[e] + 1];
  for (int64_t j = 0; j < p.C; ++j) t.ptr[j + 1] += t.ptr[j];
  std::vector<int64_t> next(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t e = 0; e < nnz; ++e) {
    const int64_t q = next[c[e]]++;
    t.src[q] = e / p.K;
    t.val[q] = e;
  }
  return t;
}

at::Tensor nm_mm_t_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_idx, int64_t n,
                       int64_t m) {
  // Validation and the pattern's transpose are cached together: both depend on col_idx only.
  const auto t = prologue<CpuDevice>(NmMmTCall{dy, values, col_idx, n, m}, [](NmPattern v) {
    NmTransposed r = transpose_pattern(v.p, v.col_idx);
    r.ci = std::move(v.col_idx);
    return r;
  });
  const NmProblem& p = t->p;
  const int64_t R = p.R, K = p.K, B = dy.size(0), C = p.C;
  auto dyc = dy.contiguous();
  auto vc = values.contiguous();
  const at::Tensor& ic = t->ci;
  auto dx = at::empty({B, C}, dy.options());
  if (B == 0) return dx;
  if (R == 0) return dx.zero_();
  PADST_DISPATCH_FLOATS(dy.scalar_type(), "nm_mm_t_cpu", [&] {
    dispatch_index(ic, [&](auto I) {
      using idx_t = decltype(I);
      if constexpr (kVecType<scalar_t>) {
        if (B >= kMinVecBatch) {
          // dx[b, c] = sum over the entries (r, k) with col_idx[r, k] = c of values[r, k] * dy[b, r]: the gathered-row
          // kernel over the columns of the (cached) transposed pattern.
          const at::Tensor vf = float_values(vc);
          rk::rows_mm("nm_mm_t", dyc.data_ptr<scalar_t>(), B, R, nullptr, vf.data_ptr<float>(),
                      kern::NmColRowsStored{t->ptr.data(), t->src.data(), t->val.data()}, C,
                      rk::Store<scalar_t>{dx.data_ptr<scalar_t>(), C, nullptr, nullptr});
          return;
        }
      }
      nm_dx_kernel<scalar_t, idx_t>(dyc.data_ptr<scalar_t>(), B, vc.data_ptr<scalar_t>(), ic.data_ptr<idx_t>(), R, K,
                                    C, dx.data_ptr<scalar_t>());
    });
  });
  return dx;
}

at::Tensor nm_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& col_idx, int64_t n, int64_t m) {
  const auto v = prologue<CpuDevice>(NmSddmmCall{dy, x, col_idx, n, m});
  const NmProblem& p = v->p;
  const at::Tensor& ic = v->col_idx;
  const int64_t R = p.R, K = p.K, B = x.size(0), C = p.C;
  auto dyc = dy.contiguous();
  auto xc = x.contiguous();
  auto dv = at::empty({R, K}, x.options());
  if (dv.numel() == 0) return dv;
  if (B == 0) return dv.zero_();
  PADST_DISPATCH_FLOATS(x.scalar_type(), "nm_sddmm_cpu", [&] {
    dispatch_index(ic, [&](auto I) {
      using idx_t = decltype(I);
      if constexpr (kVecType<scalar_t>) {
        if (B >= kMinVecBatch) {
          rk::rows_dw(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), B, R, C, nullptr, nullptr,
                      kern::NmRows<idx_t>{ic.data_ptr<idx_t>(), K}, R * K, dv.data_ptr<scalar_t>());
          return;
        }
      }
      nm_sddmm_kernel<scalar_t, idx_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), B, ic.data_ptr<idx_t>(), R,
                                       K, C, dv.data_ptr<scalar_t>());
    });
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(padst, CPU, m) {
  m.impl("nm_mm", &nm_mm_cpu);
  m.impl("nm_mm_t", &nm_mm_t_cpu);
  m.impl("nm_sddmm", &nm_sddmm_cpu);
}

}  // namespace padst::cpu
