// Wrap-around diagonal matmul on the CPU: forward, dx and dW on the diagonals.
//
// Layout: L = min(R, C) values per diagonal, offsets o_k in [0, max(R, C)).
//   R >= C ("tall"): entry t of diagonal k sits at (row, col) = ((t + o_k) mod R, t)
//   R <  C ("wide"): entry t of diagonal k sits at (row, col) = (t, (t + o_k) mod C)
// Every product reduces to two primitives over contiguous runs (the wrap splits a run in at most two):
//   shift_out: out[(t + o) mod P] += w[t] * in[t]        shift_in: out[t] += w[t] * in[(t + o) mod P]
// Permutations are fused per batch row: each task gathers its rows of x through in_perm into an L1/L2
// buffer, accumulates in a row buffer, and stores through out_perm, so no pass over x or y is added.
#include <torch/library.h>

#include "common.h"
#include "diag_mm.h"
#include "rows_dw.h"

namespace padst::cpu {
namespace {

template <typename A>
inline void shift_out(A* __restrict out, const A* __restrict w, const A* __restrict in, int64_t o, int64_t L,
                      int64_t P) {
  const int64_t n1 = std::min(L, P - o);
  A* o1 = out + o;
#pragma omp simd
  for (int64_t t = 0; t < n1; ++t) o1[t] += w[t] * in[t];
  for (int64_t t = n1; t < L; ++t) out[t + o - P] += w[t] * in[t];
}

template <typename A>
inline void shift_in(A* __restrict out, const A* __restrict w, const A* __restrict in, int64_t o, int64_t L,
                     int64_t P) {
  const int64_t n1 = std::min(L, P - o);
  const A* i1 = in + o;
#pragma omp simd
  for (int64_t t = 0; t < n1; ++t) out[t] += w[t] * i1[t];
  for (int64_t t = n1; t < L; ++t) out[t] += w[t] * in[t + o - P];
}

// Sorted offsets and their order (rk::DiagArgs::sorted / order): a chunk of outputs visits only the diagonals
// whose circular window reaches it.
struct DiagWindow {
  std::vector<int64_t> sorted, order;
  explicit DiagWindow(const at::Tensor& off) {
    const int64_t K = off.size(0);
    const int64_t* o = off.data_ptr<int64_t>();
    order.resize(K);
    for (int64_t k = 0; k < K; ++k) order[k] = k;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return o[a] < o[b]; });
    sorted.resize(K);
    for (int64_t j = 0; j < K; ++j) sorted[j] = o[order[j]];
  }
};

// The vectorised kernel (rk::diag_mm) for the forward (in = x, shifted when tall) and dx (in = dy, shifted when wide).
template <typename T>
void diag_vec(const T* in, int64_t in_cols, const int64_t* in_gather, const at::Tensor& values, const DiagProblem& p,
              bool shifted, int64_t nout, const rk::Store<T>& st, int64_t B) {
  const DiagWindow win(p.off);
  const at::Tensor vp = values.to(at::kFloat).contiguous();
  rk::diag_mm(rk::DiagArgs<T>{in, in_cols, in_gather, vp.data_ptr<float>(), values.size(1), values.size(0),
                              std::min(p.R, p.C), std::max(p.R, p.C), shifted, nout, st, nullptr, 0, nullptr,
                              win.sorted.data(), win.order.data()},
              B);
}

constexpr int64_t TB = 8;  // batch rows per task: each diagonal is loaded once per tile

// out[b, dst[j]] / out[b, j] = buf[...]: gather/scatter helpers with the permutation fused in.
// Forward: y = z[:, out_perm] + bias (gather by out_perm). dx: dx[:, in_perm] = dxp (scatter by in_perm).
template <typename T>
void diag_apply_kernel(const T* in, int64_t B, int64_t Pin, const int64_t* in_gather, const acc_t<T>* v,
                       const int64_t* off, int64_t K, int64_t L, int64_t Pout, bool shift_output, int64_t P,
                       const int64_t* out_index, bool out_is_gather, const T* bias, T* out) {
  using A = acc_t<T>;
  const int64_t nbt = ceil_div(B, TB);
  at::parallel_for(0, nbt, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> g(TB * Pin), z(TB * Pout);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b0 = bt * TB, tb = std::min(TB, B - b0);
      for (int64_t t = 0; t < tb; ++t) {
        const T* r = in + (b0 + t) * Pin;
        A* gr = g.data() + t * Pin;
        for (int64_t c = 0; c < Pin; ++c) gr[c] = static_cast<A>(r[in_gather[c]]);
      }
      std::fill(z.begin(), z.end(), A(0));
      for (int64_t k = 0; k < K; ++k) {
        const A* vk = v + k * L;
        for (int64_t t = 0; t < tb; ++t) {
          if (shift_output) {
            shift_out(z.data() + t * Pout, vk, g.data() + t * Pin, off[k], L, P);
          } else {
            shift_in(z.data() + t * Pout, vk, g.data() + t * Pin, off[k], L, P);
          }
        }
      }
      for (int64_t t = 0; t < tb; ++t) {
        T* o = out + (b0 + t) * Pout;
        const A* zr = z.data() + t * Pout;
        if (out_is_gather) {
          for (int64_t j = 0; j < Pout; ++j)
            o[j] = static_cast<T>(bias ? zr[out_index[j]] + static_cast<A>(bias[j]) : zr[out_index[j]]);
        } else {
          for (int64_t j = 0; j < Pout; ++j) o[out_index[j]] = static_cast<T>(zr[j]);
        }
      }
    }
  });
}

// dv[k][t] = sum_b dz[b, row(k, t)] * x_p[b, col(k, t)]; threads split the diagonals.
template <typename T>
void diag_sddmm_kernel(const T* dy, const T* x, int64_t B, int64_t R, int64_t C, const int64_t* in_perm,
                       const int64_t* inv_out, const int64_t* off, int64_t K, T* dv) {
  using A = acc_t<T>;
  constexpr int64_t SB = 32;
  const int64_t L = std::min(R, C);
  const bool tall = R >= C;
  const int64_t nkc = std::min<int64_t>(K, 4 * at::get_num_threads());
  const int64_t kc = nkc > 0 ? ceil_div(K, nkc) : 0;
  at::parallel_for(0, nkc, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> xg(SB * C), dz(SB * R), acc(kc * L);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t k0 = chunk * kc, k1 = std::min(K, k0 + kc);
      if (k0 >= k1) continue;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t b0 = 0; b0 < B; b0 += SB) {
        const int64_t tb = std::min(SB, B - b0);
        for (int64_t t = 0; t < tb; ++t) {
          const T* xr = x + (b0 + t) * C;
          const T* dyr = dy + (b0 + t) * R;
          for (int64_t c = 0; c < C; ++c) xg[t * C + c] = static_cast<A>(xr[in_perm[c]]);
          for (int64_t r = 0; r < R; ++r) dz[t * R + r] = static_cast<A>(dyr[inv_out[r]]);
        }
        for (int64_t k = k0; k < k1; ++k) {
          A* ak = acc.data() + (k - k0) * L;
          for (int64_t t = 0; t < tb; ++t) {
            // tall: dv[t] += x_p[t] * dz[(t+o) mod R];  wide: dv[t] += dz[t] * x_p[(t+o) mod C]
            if (tall) {
              shift_in(ak, xg.data() + t * C, dz.data() + t * R, off[k], L, R);
            } else {
              shift_in(ak, dz.data() + t * R, xg.data() + t * C, off[k], L, C);
            }
          }
        }
      }
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t t = 0; t < L; ++t) dv[k * L + t] = static_cast<T>(acc[(k - k0) * L + t]);
    }
  });
}

at::Tensor diag_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets,
                       int64_t out_features, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto pp = prologue<CpuDevice>(DiagMmCall{x, values, offsets, out_features, bias, in_perm, out_perm});
  const DiagProblem& p = *pp;
  const int64_t R = p.R, C = p.C, B = x.size(0);
  auto xc = x.contiguous();
  std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  auto y = at::empty({B, R}, x.options());
  const bool tall = R >= C;
  PADST_DISPATCH_FLOATS(x.scalar_type(), "diag_mm_cpu", [&] {
    if constexpr (kVecType<scalar_t>) {
      if (B >= kMinVecBatch) {
        const rk::Store<scalar_t> st{y.data_ptr<scalar_t>(), R, perm_ptr(p.pout, true),
                                     bc ? bc->data_ptr<scalar_t>() : nullptr, perm_ptr(p.pout, false),
                                     perm_ptr32(p.pout, false)};
        diag_vec(xc.data_ptr<scalar_t>(), C, perm_ptr(p.pin, false), values, p, /*shifted=*/tall, R, st, B);
        return;
      }
    }
    auto v = as_acc<scalar_t>(values.contiguous());
    diag_apply_kernel<scalar_t>(xc.data_ptr<scalar_t>(), B, C, p.pin.fwd.data(), v.ptr, p.off.data_ptr<int64_t>(),
                                values.size(0), std::min(R, C), R, /*shift_output=*/tall, tall ? R : C,
                                p.pout.fwd.data(), /*out_is_gather=*/true, bc ? bc->data_ptr<scalar_t>() : nullptr,
                                y.data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor diag_mm_t_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& offsets,
                         int64_t in_features, const std::optional<at::Tensor>& in_perm,
                         const std::optional<at::Tensor>& out_perm) {
  const auto pp = prologue<CpuDevice>(DiagMmTCall{dy, values, offsets, in_features, in_perm, out_perm});
  const DiagProblem& p = *pp;
  const int64_t R = p.R, C = p.C, B = dy.size(0);
  auto dyc = dy.contiguous();
  auto dx = at::empty({B, C}, dy.options());
  const bool tall = R >= C;
  // dz = dy[:, inv(out_perm)]; tall: dxp[t] += v[t] dz[(t+o) mod R]; wide: dxp[(t+o) mod C] += v[t] dz[t];
  // dx[:, in_perm] = dxp.
  PADST_DISPATCH_FLOATS(dy.scalar_type(), "diag_mm_t_cpu", [&] {
    if constexpr (kVecType<scalar_t>) {
      if (B >= kMinVecBatch) {
        const rk::Store<scalar_t> st{dx.data_ptr<scalar_t>(), C, perm_ptr(p.pin, false), nullptr,
                                     perm_ptr(p.pin, true), perm_ptr32(p.pin, true)};
        diag_vec(dyc.data_ptr<scalar_t>(), R, perm_ptr(p.pout, true), values, p, /*shifted=*/!tall, C, st, B);
        return;
      }
    }
    auto v = as_acc<scalar_t>(values.contiguous());
    diag_apply_kernel<scalar_t>(dyc.data_ptr<scalar_t>(), B, R, p.pout.inv.data(), v.ptr, p.off.data_ptr<int64_t>(),
                                values.size(0), std::min(R, C), C, /*shift_output=*/!tall, tall ? R : C,
                                p.pin.fwd.data(), /*out_is_gather=*/false, nullptr, dx.data_ptr<scalar_t>());
  });
  return dx;
}

at::Tensor diag_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                          const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto pp = prologue<CpuDevice>(DiagSddmmCall{dy, x, offsets, in_perm, out_perm});
  const DiagProblem& p = *pp;
  const int64_t R = p.R, C = p.C, B = x.size(0);
  auto dyc = dy.contiguous();
  auto xc = x.contiguous();
  const int64_t K = p.off.size(0);
  auto dv = at::empty({K, std::min(R, C)}, x.options());
  PADST_DISPATCH_FLOATS(x.scalar_type(), "diag_sddmm_cpu", [&] {
    if constexpr (kVecType<scalar_t>) {
      if (B >= kMinVecBatch) {
        // the entries of each output row r of S (shifted form when tall, direct when wide), as in the forward
        const bool tall = R >= C;
        rk::rows_dw(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), B, R, C, perm_ptr(p.pout, true),
                    perm_ptr(p.pin, false),
                    kern::DiagRows{p.off.data_ptr<int64_t>(), K, std::min(R, C), std::max(R, C), tall},
                    K * std::min(R, C), dv.data_ptr<scalar_t>());
        return;
      }
    }
    diag_sddmm_kernel<scalar_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), B, R, C, p.pin.fwd.data(),
                                p.pout.inv.data(), p.off.data_ptr<int64_t>(), K, dv.data_ptr<scalar_t>());
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(padst, CPU, m) {
  m.impl("diag_mm", &diag_mm_cpu);
  m.impl("diag_mm_t", &diag_mm_t_cpu);
  m.impl("diag_sddmm", &diag_sddmm_cpu);
}

}  // namespace padst::cpu
