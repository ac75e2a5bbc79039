// The CUDA host layer: the implementation of every padst kernel op on the GPU side of the dispatcher (validation
// through prologue.h, metadata upload, the choice of kernel and its launch parameters, dtype dispatch), written once
// for two backends that say how a kernel runs:
//   Backend<false>  (cuda/cuda_backend.h) launches the CUDA kernels (csrc/cuda/*.cu) on the current stream: the
//                   `CUDA` kernels of the padst library (csrc/cuda/cuda_dispatch.cpp), built only with CUDA;
//   Backend<true>   (emu/emu_backend.h) runs the same CTA bodies on the host (csrc/emu/emulate.h): the test-only
//                   `padst_emu` library (padst_ext._emu, CPU tensors), with which the tests exercise the CUDA path's
//                   validation, metadata preparation, index and tile logic on machines without a GPU.
// Validation is shared with the CPU kernels (checks.h): the metadata is checked in full on the host, then
// copied to the device; both results are cached per metadata tensor and version (meta_cache.h), so a layer that
// calls an op with unchanged metadata pays neither the check nor the copies again.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <optional>
#include <vector>

#include "checks.h"
#include "kernels/block_gw.h"
#include "kernels/block_rc.h"
#include "kernels/block_sddmm_tc.h"
#include "kernels/block_tc.h"
#include "kernels/block_xs.h"
#include "kernels/entries.h"
#include "kernels/gather_mm.h"
#include "kernels/rows_v2.h"
#include "kernels/sddmm.h"
#include "meta_cache.h"
#include "prologue.h"

namespace padst::impl {

// How kernels run: Backend<false> on the GPU (cuda/cuda_backend.h), Backend<true> on the host (emu/emu_backend.h).
// Each provides type<S> (the element type the kernels see for the tensor dtype S), check_device and Guard (the
// device policy of prologue()), and one static function per kernel that runs it.
template <bool kHost>
struct Backend;

// ---------------------------------------------------------------------------------------------------------
// Helpers: validated host metadata -> the device of `ref`; typed pointers.
// ---------------------------------------------------------------------------------------------------------
inline at::Tensor on_device(const at::Tensor& cpu_long, const at::Tensor& ref) {
  return cpu_long.to(ref.device()).contiguous();
}
// The permutation (or its inverse) as an index tensor on ref's device; nullopt for the identity.
inline std::optional<at::Tensor> perm_on_device(const Perm& p, bool inverse, const at::Tensor& ref) {
  if (p.identity) return std::nullopt;
  const std::vector<int64_t>& v = inverse ? p.inv : p.fwd;
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(ref.device());
}
inline const int64_t* idx_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<int64_t>() : nullptr;
}
inline const int64_t* idx_ptr(const at::Tensor& t) { return t.const_data_ptr<int64_t>(); }
// The same for the int32 index maps of the v2 kernels.
inline const int32_t* idx32_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<int32_t>() : nullptr;
}
template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
const T* cptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

#define PADST_IMPL_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Runs the gather kernel out[b, dst(r)] = bias + sum values * in_p (see kernels/gather_mm.h).
template <bool kHost, typename E>
void run_gather(const at::Tensor& in, const std::optional<at::Tensor>& in_gather, const at::Tensor& values,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scatter, at::Tensor& out,
                const E& rows) {
  PADST_IMPL_DISPATCH(in.scalar_type(), "padst gather_mm", [&] {
    using T = typename Backend<kHost>::template type<scalar_t>;
    kern::GatherMmParams<T, E> p;
    p.in = cptr<T>(in);
    p.in_gather = idx_ptr(in_gather);
    p.values = cptr<T>(values);
    p.bias = cptr<T>(bias);
    p.out_scatter = idx_ptr(out_scatter);
    p.out = mptr<T>(out);
    p.B = in.size(0);
    p.in_cols = in.size(1);
    p.out_cols = out.size(1);
    p.rows = rows;
    Backend<kHost>::gather_mm(p);
  });
}

// Runs the sampled kernel out[e] = sum_b dy[b, dy_src(row e)] * x[b, x_src(col e)] (see kernels/sddmm.h).
template <bool kHost, typename F>
void run_sddmm(const at::Tensor& dy, const std::optional<at::Tensor>& dy_gather, const at::Tensor& x,
               const std::optional<at::Tensor>& x_gather, at::Tensor& out, const F& entries) {
  PADST_IMPL_DISPATCH(x.scalar_type(), "padst sddmm", [&] {
    using T = typename Backend<kHost>::template type<scalar_t>;
    kern::SddmmParams<T, F> p;
    p.dy = cptr<T>(dy);
    p.x = cptr<T>(x);
    p.dy_gather = idx_ptr(dy_gather);
    p.x_gather = idx_ptr(x_gather);
    p.out = mptr<T>(out);
    p.B = x.size(0);
    p.R = dy.size(1);
    p.C = x.size(1);
    p.nnz = out.numel();
    p.entries = entries;
    Backend<kHost>::sddmm(p, x);
  });
}

// The tensor-core block kernel (kernels/block_tc.h) for fp16/bf16 when the block sides allow it; returns false
// when the generic gather kernel must serve instead. ptr/idx/blk: the CSR (forward) or CSC (dx) block lines.
template <bool kHost, bool kDx>
bool try_block_tc(const at::Tensor& in, const std::optional<at::Tensor>& in_gather, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scatter, at::Tensor& out,
                  const BlockMeta& m, const at::Tensor& ptr, const at::Tensor& idx, const int64_t* blk) {
  const int out16 = kern::block_tc_out16(kDx, m.br, m.bc);
  if (out16 == 0 || (in.scalar_type() != at::kHalf && in.scalar_type() != at::kBFloat16)) return false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(in.scalar_type(), "padst block_tc", [&] {
    using T = typename Backend<kHost>::template type<scalar_t>;
    kern::BlockTcParams<T> p;
    p.in = cptr<T>(in);
    p.in_gather = idx_ptr(in_gather);
    p.values = cptr<T>(values);
    p.bias = cptr<T>(bias);
    p.out_scatter = idx_ptr(out_scatter);
    p.out = mptr<T>(out);
    p.ptr = idx_ptr(ptr);
    p.idx = idx_ptr(idx);
    p.blk = blk;
    p.B = in.size(0);
    p.in_cols = in.size(1);
    p.out_cols = out.size(1);
    p.lines = ptr.numel() - 1;
    p.br = m.br;
    p.bc = m.bc;
    if (out16 == 1) {
      Backend<kHost>::template block_tc<T, kDx, 1>(p);
    } else if (out16 == 2) {
      Backend<kHost>::template block_tc<T, kDx, 2>(p);
    } else {
      Backend<kHost>::template block_tc<T, kDx, 4>(p);
    }
  });
  return true;
}

// The v2 tensor-core block kernels: x-stationary (kernels/block_xs.h: the input side staged whole, so it must fit in
// shared memory), row-complete (kernels/block_rc.h: whole output rows, at most 768 wide) and the weight gradient
// (kernels/block_gw.h). PADST_BLOCK_V2=1 / 0 turns them on / off; unset, they serve in the host emulation but not on
// a GPU: they have not run on one, so the device default is the block_tc kernels until benchmarks/gpu_suite.sh has
// checked them there.
inline bool block_v2_enabled(bool host) {
  const char* v = std::getenv("PADST_BLOCK_V2");
  if (v == nullptr || *v == '\0') return host;
  return !(v[0] == '0' && v[1] == '\0');
}

// Their int32 metadata, on the device of the data: ptr/idx/blk of the lines (CSR forward, CSC dx) and the index maps:
// the x-stationary kernel writes input column c to staged position in_scatter[c], the row-complete one reads staged
// position k from input column in_gather[k]; both write product column r to output column out_scatter[r].
// The weight gradient (forward-direction metadata) reads dy through out_scatter (= inv(out_perm)) and x through
// in_gather (= in_perm); max_line is the most blocks of one line.
struct BlockV2Meta {
  at::Tensor ptr, idx;
  std::optional<at::Tensor> blk, in_scatter, in_gather, out_scatter;
  int64_t max_line = 0;
  int64_t bytes() const {
    return tensor_bytes(ptr) + tensor_bytes(idx) + tensor_bytes(blk) + tensor_bytes(in_scatter) +
           tensor_bytes(in_gather) + tensor_bytes(out_scatter);
  }
};

// Runs a v2 kernel when one serves the problem (the x-stationary one first); false when block_tc / gather must.
template <bool kHost, bool kDx>
bool try_block_v2(const at::Tensor& in, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                  at::Tensor& out, const BlockMeta& m, const BlockV2Meta& vm) {
  const int64_t kb = m.br;
  if (!vm.ptr.defined() || !block_v2_enabled(kHost) || m.br != m.bc || (kb != 16 && kb != 32 && kb != 64)) return false;
  if (in.scalar_type() != at::kHalf && in.scalar_type() != at::kBFloat16) return false;
  const int64_t in_cols = in.size(1), out_cols = out.size(1), i32 = std::numeric_limits<int32_t>::max();
  if (in_cols % 8 != 0 || in_cols > i32 || out_cols > i32 || m.nnzb > i32) return false;
  for (const void* ptr : {in.const_data_ptr(), values.const_data_ptr(), static_cast<const void*>(out.const_data_ptr())})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const int64_t max_smem = Backend<kHost>::block_v2_max_smem();
  bool served = false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(in.scalar_type(), "padst block_v2", [&] {
    using T = typename Backend<kHost>::template type<scalar_t>;
    auto fill = [&](auto& p) {
      p.in = cptr<T>(in);
      p.values = cptr<T>(values);
      p.bias = cptr<T>(bias);
      p.out_scatter = idx32_ptr(vm.out_scatter);
      p.out = mptr<T>(out);
      p.ptr = vm.ptr.template const_data_ptr<int32_t>();
      p.idx = vm.idx.template const_data_ptr<int32_t>();
      p.blk = idx32_ptr(vm.blk);
      p.B = in.size(0);
      p.in_cols = static_cast<int32_t>(in_cols);
      p.out_cols = static_cast<int32_t>(out_cols);
      p.lines = static_cast<int32_t>(vm.ptr.numel() - 1);
    };
    auto run = [&](auto kb_const) {
      constexpr int kB = decltype(kb_const)::value;
      if (kern::BlockXs<T, kDx, kB>::smem_bytes(in_cols) <= max_smem) {
        kern::BlockXsParams<T> p;
        fill(p);
        p.in_scatter = idx32_ptr(vm.in_scatter);
        Backend<kHost>::template block_xs<T, kDx, kB>(p);
        served = true;
        return;
      }
      if constexpr (kB <= 32) {
        using K = kern::BlockRc<T, kDx, kB>;
        if (K::serves(out_cols) && K::smem_bytes(out_cols) <= max_smem) {
          kern::BlockRcParams<T> p;
          fill(p);
          p.in_gather = idx32_ptr(vm.in_gather);
          Backend<kHost>::template block_rc<T, kDx, kB>(p);
          served = true;
        }
      }
    };
    if (kb == 16) {
      run(std::integral_constant<int, 16>{});
    } else if (kb == 32) {
      run(std::integral_constant<int, 32>{});
    } else {
      run(std::integral_constant<int, 64>{});
    }
  });
  return served;
}

// The v2 weight gradient (kernels/block_gw.h) when it serves; false when block_sddmm_tc / sddmm must.
template <bool kHost>
bool try_block_gw(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dv, const BlockMeta& m,
                  const BlockV2Meta& vm) {
  const int64_t kb = m.br;
  if (!vm.ptr.defined() || !block_v2_enabled(kHost) || m.br != m.bc || (kb != 16 && kb != 32)) return false;
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  const int64_t R = dy.size(1), C = x.size(1), i32 = std::numeric_limits<int32_t>::max();
  if (R % 8 != 0 || C % 8 != 0 || R > i32 || C > i32 || m.nnzb > i32) return false;
  for (const void* ptr : {dy.const_data_ptr(), x.const_data_ptr()})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  bool served = false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "padst block_gw", [&] {
    using T = typename Backend<kHost>::template type<scalar_t>;
    kern::BlockGwParams<T> p;
    p.dy = cptr<T>(dy);
    p.x = cptr<T>(x);
    p.dy_gather = idx32_ptr(vm.out_scatter);
    p.x_gather = idx32_ptr(vm.in_gather);
    p.row_ptr = vm.ptr.template const_data_ptr<int32_t>();
    p.col_idx = vm.idx.template const_data_ptr<int32_t>();
    p.out = mptr<T>(dv);
    p.B = x.size(0);
    p.R = static_cast<int32_t>(R);
    p.C = static_cast<int32_t>(C);
    p.rows = static_cast<int32_t>(vm.ptr.numel() - 1);
    p.nnzb = static_cast<int32_t>(m.nnzb);
    auto run = [&](auto kb_const) {
      constexpr int kB = decltype(kb_const)::value;
      if (kern::BlockGw<T, kB>::smem_bytes() > Backend<kHost>::block_v2_max_smem()) return;
      Backend<kHost>::template block_gw<T, kB>(p, vm.max_line, x);
      served = true;
    };
    if (kb == 16) {
      run(std::integral_constant<int, 16>{});
    } else {
      run(std::integral_constant<int, 32>{});
    }
  });
  return served;
}

// ---------------------------------------------------------------------------------------------------------
// Block
// ---------------------------------------------------------------------------------------------------------
struct BlockDev {
  BlockProblem p;
  at::Tensor rp, ci, cp, ri, bt, brow;              // on the device of the data
  std::optional<at::Tensor> in_fwd, out_inv;        // in_perm and inv(out_perm), absent for the identity
  BlockV2Meta v2;                                   // int32 forms for the v2 kernels (forward or dx)
  int64_t bytes() const {  // the device copies and the validated host metadata (for the cache's byte bound)
    return static_cast<int64_t>(p.bytes()) + tensor_bytes(rp) + tensor_bytes(ci) + tensor_bytes(cp) +
           tensor_bytes(ri) + tensor_bytes(bt) + tensor_bytes(brow) + tensor_bytes(in_fwd) + tensor_bytes(out_inv) +
           v2.bytes();
  }
};
inline at::Tensor int32_on_device(const at::Tensor& cpu_long, const at::Tensor& ref) {
  return cpu_long.to(at::kInt).to(ref.device()).contiguous();
}
inline std::optional<at::Tensor> perm32_on_device(const Perm& p, bool inverse, const at::Tensor& ref) {
  if (p.identity) return std::nullopt;
  const std::vector<int64_t>& v = inverse ? p.inv : p.fwd;
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(at::kInt).to(ref.device());
}
// csc: the problem is dx (lines are block-columns). Index maps of the v2 kernels: the forward reads x through
// in_p[., k] = x[., in_perm[k]] (gather in_perm, scatter inv(in_perm)) and writes through inv(out_perm); dx reads dy
// through dz[., r] = dy[., inv(out_perm)[r]] (gather inv(out_perm), scatter out_perm) and writes through in_perm.
inline BlockDev upload(BlockProblem p, const at::Tensor& ref, bool csc) {
  BlockDev d;
  d.rp = on_device(p.m.row_ptr, ref);
  d.ci = on_device(p.m.col_idx, ref);
  d.brow = on_device(p.m.blk_row, ref);
  const bool v2 = p.m.nnzb <= std::numeric_limits<int32_t>::max();
  if (csc) {
    d.cp = on_device(p.m.col_ptr, ref);
    d.ri = on_device(p.m.row_idx_t, ref);
    d.bt = on_device(p.m.blk_t, ref);
    if (v2) {
      d.v2.ptr = int32_on_device(p.m.col_ptr, ref);
      d.v2.idx = int32_on_device(p.m.row_idx_t, ref);
      d.v2.blk = int32_on_device(p.m.blk_t, ref);
      d.v2.in_scatter = perm32_on_device(p.pout, false, ref);
      d.v2.in_gather = perm32_on_device(p.pout, true, ref);
      d.v2.out_scatter = perm32_on_device(p.pin, false, ref);
    }
  } else if (v2) {
    const at::Tensor counts = p.m.row_ptr.slice(0, 1) - p.m.row_ptr.slice(0, 0, -1);
    d.v2.max_line = counts.numel() ? counts.max().item<int64_t>() : 0;
    d.v2.ptr = int32_on_device(p.m.row_ptr, ref);
    d.v2.idx = int32_on_device(p.m.col_idx, ref);
    d.v2.in_scatter = perm32_on_device(p.pin, true, ref);
    d.v2.in_gather = perm32_on_device(p.pin, false, ref);
    d.v2.out_scatter = perm32_on_device(p.pout, true, ref);
  }
  d.in_fwd = perm_on_device(p.pin, false, ref);
  d.out_inv = perm_on_device(p.pout, true, ref);
  d.p = std::move(p);
  return d;
}

template <bool kHost>
at::Tensor block_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                    const at::Tensor& blk_t, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const BlockMmCall call{x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias, in_perm, out_perm};
  const auto d =
      prologue<Backend<kHost>>(call, [&](BlockProblem p) { return upload(std::move(p), x, /*csc=*/false); });
  const BlockMeta& m = d->p.m;
  auto y = at::empty({x.size(0), m.R}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  const auto bc = contiguous(bias);
  if (try_block_v2<kHost, false>(xc, vc, bc, y, m, d->v2)) return y;
  if (!try_block_tc<kHost, false>(xc, d->in_fwd, vc, bc, d->out_inv, y, m, d->rp, d->ci, nullptr)) {
    run_gather<kHost>(xc, d->in_fwd, vc, bc, d->out_inv, y, kern::BlockRows{idx_ptr(d->rp), idx_ptr(d->ci), m.br, m.bc});
  }
  return y;
}

template <bool kHost>
at::Tensor block_mm_t(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                      const at::Tensor& blk_t, const std::optional<at::Tensor>& in_perm,
                      const std::optional<at::Tensor>& out_perm) {
  const BlockMmTCall call{dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm};
  const auto d =
      prologue<Backend<kHost>>(call, [&](BlockProblem p) { return upload(std::move(p), dy, /*csc=*/true); });
  const BlockMeta& m = d->p.m;
  auto dx = at::empty({dy.size(0), m.C}, dy.options());
  if (dx.numel() == 0) return dx;
  // dz = dy[:, inv(out_perm)] gathered on load; dx[:, in_perm] = dz @ S scattered on store.
  const at::Tensor dyc = dy.contiguous(), vc = values.contiguous();
  if (try_block_v2<kHost, true>(dyc, vc, std::nullopt, dx, m, d->v2)) return dx;
  if (!try_block_tc<kHost, true>(dyc, d->out_inv, vc, std::nullopt, d->in_fwd, dx, m, d->cp, d->ri, idx_ptr(d->bt))) {
    run_gather<kHost>(dyc, d->out_inv, vc, std::nullopt, d->in_fwd, dx,
                      kern::BlockColRows{idx_ptr(d->cp), idx_ptr(d->ri), idx_ptr(d->bt), m.br, m.bc});
  }
  return dx;
}

template <bool kHost>
at::Tensor block_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                       const at::Tensor& col_idx, int64_t block_rows, int64_t block_cols,
                       const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto d =
      prologue<Backend<kHost>>(BlockSddmmCall{dy, x, row_ptr, col_idx, block_rows, block_cols, in_perm, out_perm},
                               [&](BlockProblem p) { return upload(std::move(p), x, /*csc=*/false); });
  const BlockMeta& m = d->p.m;
  auto dv = at::empty({m.nnzb, m.br, m.bc}, x.options());
  if (dv.numel() == 0) return dv;
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous();
  if (try_block_gw<kHost>(dyc, xc, dv, m, d->v2)) return dv;
  if (kern::block_sddmm_tc_supports(m.br, m.bc) &&
      (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "padst block_sddmm_tc", [&] {
      using T = typename Backend<kHost>::template type<scalar_t>;
      kern::BlockSddmmTcParams<T> q;
      q.dy = cptr<T>(dyc);
      q.x = cptr<T>(xc);
      q.dy_gather = idx_ptr(d->out_inv);
      q.x_gather = idx_ptr(d->in_fwd);
      q.blk_row = idx_ptr(d->brow);
      q.col_idx = idx_ptr(d->ci);
      q.out = mptr<T>(dv);
      q.B = x.size(0);
      q.R = dy.size(1);
      q.C = x.size(1);
      q.nnzb = m.nnzb;
      q.br = m.br;
      q.bc = m.bc;
      Backend<kHost>::block_sddmm_tc(q, x);
    });
    return dv;
  }
  run_sddmm<kHost>(dyc, d->out_inv, xc, d->in_fwd, dv, kern::BlockFlat{idx_ptr(d->brow), idx_ptr(d->ci), m.br, m.bc});
  return dv;
}

// ---------------------------------------------------------------------------------------------------------
// N:M (the input permutation is folded into col_idx)
// ---------------------------------------------------------------------------------------------------------
struct NmDev {
  NmProblem p;
  at::Tensor ci;        // col_idx as int64 on the device
  at::Tensor ent, ptr;  // its stable transpose (dx only)
  at::Tensor it;        // the v2 row kernel's indices: col_idx transposed [K, R], uint16 bits in int16 storage
  at::Tensor ell_row;   // dx in ELL form [D, C]: forward row of each entry (uint16 bits; 0xFFFF: none)
  at::Tensor ell_v;     // [D * C]: the entry's index into values (0 where there is none)
  int64_t bytes() const {
    return tensor_bytes(ci) + tensor_bytes(ent) + tensor_bytes(ptr) + tensor_bytes(it) + tensor_bytes(ell_row) +
           tensor_bytes(ell_v);
  }
};

// The transpose of an N:M pattern in ELL form (see EllEntries in kernels/rows_v2.h), built with torch ops on col_idx's
// device once per metadata version; undefined tensors when the rows do not fit in uint16.
inline std::pair<at::Tensor, at::Tensor> nm_ell(const at::Tensor& col_idx64, int64_t R, int64_t C, int64_t K) {
  if (R >= 0xFFFF || col_idx64.numel() == 0) return {};
  const at::Tensor ci = col_idx64.reshape({-1});
  const at::Tensor order = std::get<1>(ci.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));  // by column
  const at::Tensor counts = at::bincount(ci, {}, C);
  const at::Tensor starts = counts.cumsum(0) - counts;
  const at::Tensor cols = ci.index_select(0, order);
  const at::Tensor rank = at::arange(ci.numel(), ci.options()) - starts.index_select(0, cols);
  const int64_t D = counts.max().item<int64_t>();
  at::Tensor row = at::full({D, C}, -1, ci.options().dtype(at::kInt));
  at::Tensor v = at::zeros({D, C}, ci.options());
  row.index_put_({rank, cols}, at::floor_divide(order, K).to(at::kInt));
  v.index_put_({rank, cols}, order);
  return {row.to(at::kShort), v.reshape({-1})};
}

// The v2 row kernel (kernels/rows_v2.h): the N:M forward, the diagonal forward and dx. PADST_ROWS_V2=1 / 0 turns it
// on / off; unset, it serves in the host emulation but not on a GPU, where it has not run.
inline bool rows_v2_enabled(bool host) {
  const char* v = std::getenv("PADST_ROWS_V2");
  if (v == nullptr || *v == '\0') return host;
  return !(v[0] == '0' && v[1] == '\0');
}

// Whether the row kernels serve a problem: switched on, fp32/bf16/fp16, the staged operand (the input; x for dW)
// contiguous, 16-byte aligned and at most 3,072 columns of whole 16-byte vectors, an even number of rows R, and
// 32-bit counts (R, K entries per row, nnz stored values).
inline bool rows_v2_serves(bool host, const at::Tensor& staged, int64_t R, int64_t K, int64_t nnz) {
  if (!rows_v2_enabled(host)) return false;
  const auto st = staged.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return false;
  const int64_t C = staged.size(1), vec = 16 / staged.element_size(), i32 = std::numeric_limits<int32_t>::max();
  return kern::rows_v2_tile(C) != 0 && C % vec == 0 && R % 2 == 0 && staged.is_contiguous() &&
         reinterpret_cast<uintptr_t>(staged.const_data_ptr()) % 16 == 0 && R <= i32 && K <= i32 && nnz <= i32;
}

// Runs it when it serves (rows_v2_serves); false when the gather kernel must. in_scatter / out_scatter: int32 index
// maps (see RowsV2Params) or null.
template <bool kHost, typename E>
bool try_rows_v2(const at::Tensor& in, const std::optional<at::Tensor>& in_scatter, const at::Tensor& values,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scatter, at::Tensor& out,
                 int64_t K, const E& entries) {
  if (!rows_v2_serves(kHost, in, out.size(1), K, values.numel())) return false;
  const int64_t C = in.size(1), R = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "padst rows_v2", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      using T = typename Backend<kHost>::template type<scalar_t>;
      kern::RowsV2Params<T, E> p;
      p.x = cptr<T>(in);
      p.in_scatter = idx32_ptr(in_scatter);
      p.values = cptr<T>(values);
      p.bias = cptr<T>(bias);
      p.out_scatter = idx32_ptr(out_scatter);
      p.out = mptr<T>(out);
      p.B = in.size(0);
      p.C = static_cast<int32_t>(C);
      p.R = static_cast<int32_t>(R);
      p.K = static_cast<int32_t>(K);
      p.entries = entries;
      Backend<kHost>::rows_v2(p);
    }
  });
  return true;
}

// The v2 row weight gradient (RowsGw in kernels/rows_v2.h) when it serves (as try_rows_v2, with C = x's width and R =
// dy's); false when the sampled kernel must. dy_gather / in_scatter: int32 index maps or null.
template <bool kHost, typename E>
bool try_rows_gw(const at::Tensor& dy, const std::optional<at::Tensor>& dy_gather, const at::Tensor& x,
                 const std::optional<at::Tensor>& in_scatter, at::Tensor& dv, int64_t K, const E& entries) {
  if (!dy.is_contiguous() || !rows_v2_serves(kHost, x, dy.size(1), K, dv.numel())) return false;
  const int64_t C = x.size(1), R = dy.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "padst rows_gw", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      using T = typename Backend<kHost>::template type<scalar_t>;
      kern::RowsGwParams<T, E> p;
      p.dy = cptr<T>(dy);
      p.dy_gather = idx32_ptr(dy_gather);
      p.x = cptr<T>(x);
      p.in_scatter = idx32_ptr(in_scatter);
      p.out = mptr<T>(dv);
      p.B = x.size(0);
      p.C = static_cast<int32_t>(C);
      p.R = static_cast<int32_t>(R);
      p.K = static_cast<int32_t>(K);
      p.nnz = static_cast<int32_t>(dv.numel());
      p.entries = entries;
      Backend<kHost>::rows_gw(p, x);
    }
  });
  return true;
}

template <bool kHost>
at::Tensor nm_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx, int64_t n, int64_t m,
                 const std::optional<at::Tensor>& bias) {
  const auto d = prologue<Backend<kHost>>(NmMmCall{x, values, col_idx, n, m, bias}, [&](NmPattern v) {
    NmDev r;
    r.p = v.p;
    r.ci = v.col_idx.to(at::kLong).contiguous();
    if (x.size(1) <= 65536)  // uint16 indices (two's complement int16 storage keeps the 16 bits)
      r.it = r.ci.t().contiguous().to(at::kInt).to(at::kShort);
    return r;
  });
  auto y = at::empty({x.size(0), d->p.R}, x.options());
  if (y.numel() == 0) return y;
  if (d->it.defined()) {
    const at::Tensor xc = x.contiguous();
    // values [R, K] read transposed, [K, R]: R * K values, small next to the activations
    if (try_rows_v2<kHost>(xc, std::nullopt, values.t().contiguous(), contiguous(bias), std::nullopt, y, d->p.K,
                           kern::NmEntries{reinterpret_cast<const uint16_t*>(d->it.const_data_ptr()),
                                           static_cast<int32_t>(d->p.R)}))
      return y;
  }
  run_gather<kHost>(x.contiguous(), std::nullopt, values.contiguous(), contiguous(bias), std::nullopt, y,
                    kern::NmRows<int64_t>{idx_ptr(d->ci), d->p.K});
  return y;
}

template <bool kHost>
at::Tensor nm_mm_t(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_idx, int64_t n, int64_t m) {
  const auto d = prologue<Backend<kHost>>(NmMmTCall{dy, values, col_idx, n, m}, [&](NmPattern v) {
    NmDev r;
    r.p = v.p;
    r.ci = v.col_idx.to(at::kLong).contiguous();
    std::tie(r.ent, r.ptr) = Backend<kHost>::nm_transpose(r.ci, r.p.C);
    std::tie(r.ell_row, r.ell_v) = nm_ell(r.ci, r.p.R, r.p.C, r.p.K);
    return r;
  });
  auto dx = at::empty({dy.size(0), d->p.C}, dy.options());
  if (dx.numel() == 0) return dx;
  if (d->ell_row.defined() && rows_v2_enabled(kHost)) {
    const at::Tensor dyc = dy.contiguous();
    // the values in the same [D, C] layout: one gather of D * C values, small next to the activations
    const at::Tensor ve = values.reshape({-1}).index_select(0, d->ell_v);
    if (try_rows_v2<kHost>(dyc, std::nullopt, ve, std::nullopt, std::nullopt, dx, d->ell_row.size(0),
                           kern::EllEntries{reinterpret_cast<const uint16_t*>(d->ell_row.const_data_ptr()),
                                            static_cast<int32_t>(d->p.C)}))
      return dx;
  }
  run_gather<kHost>(dy.contiguous(), std::nullopt, values.contiguous(), std::nullopt, std::nullopt, dx,
                    kern::NmColRows{idx_ptr(d->ptr), idx_ptr(d->ent), d->p.K});
  return dx;
}

template <bool kHost>
at::Tensor nm_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& col_idx, int64_t n, int64_t m) {
  const auto d = prologue<Backend<kHost>>(NmSddmmCall{dy, x, col_idx, n, m}, [&](NmPattern v) {
    NmDev r;
    r.p = v.p;
    r.ci = v.col_idx.to(at::kLong).contiguous();
    if (x.size(1) <= 65536) r.it = r.ci.t().contiguous().to(at::kInt).to(at::kShort);  // as in nm_mm
    return r;
  });
  auto dv = at::empty({d->p.R, d->p.K}, x.options());
  if (dv.numel() == 0) return dv;
  if (d->it.defined() &&
      try_rows_gw<kHost>(dy.contiguous(), std::nullopt, x.contiguous(), std::nullopt, dv, d->p.K,
                         kern::NmGwEntries{reinterpret_cast<const uint16_t*>(d->it.const_data_ptr()),
                                           static_cast<int32_t>(d->p.R), static_cast<int32_t>(d->p.K)}))
    return dv;
  run_sddmm<kHost>(dy.contiguous(), std::nullopt, x.contiguous(), std::nullopt, dv,
                   kern::NmFlat<int64_t>{idx_ptr(d->ci), d->p.K});
  return dv;
}

// ---------------------------------------------------------------------------------------------------------
// Diagonal
// ---------------------------------------------------------------------------------------------------------
struct DiagDev {
  DiagProblem p;
  at::Tensor off;                              // offsets as int64 on the device
  std::optional<at::Tensor> in_fwd, out_inv;
  at::Tensor off32;                            // the v2 row kernel's: offsets and the four index maps, int32
  std::optional<at::Tensor> in_fwd32, in_inv32, out_fwd32, out_inv32;
  int64_t bytes() const {
    return static_cast<int64_t>(p.bytes()) + tensor_bytes(off) + tensor_bytes(in_fwd) + tensor_bytes(out_inv) +
           tensor_bytes(off32) + tensor_bytes(in_fwd32) + tensor_bytes(in_inv32) + tensor_bytes(out_fwd32) +
           tensor_bytes(out_inv32);
  }
};
inline DiagDev upload(DiagProblem p, const at::Tensor& ref) {
  DiagDev d;
  d.off = on_device(p.off, ref);
  if (std::max(p.R, p.C) <= std::numeric_limits<int32_t>::max()) {
    d.off32 = int32_on_device(p.off, ref);
    d.in_fwd32 = perm32_on_device(p.pin, false, ref);
    d.in_inv32 = perm32_on_device(p.pin, true, ref);
    d.out_fwd32 = perm32_on_device(p.pout, false, ref);
    d.out_inv32 = perm32_on_device(p.pout, true, ref);
  }
  d.in_fwd = perm_on_device(p.pin, false, ref);
  d.out_inv = perm_on_device(p.pout, true, ref);
  d.p = std::move(p);
  return d;
}
inline kern::DiagRows diag_rows(const DiagDev& d, bool shifted) {
  return kern::DiagRows{idx_ptr(d.off), d.off.size(0), std::min(d.p.R, d.p.C), std::max(d.p.R, d.p.C), shifted};
}
inline kern::DiagEntries diag_entries(const DiagDev& d, bool shifted) {
  return kern::DiagEntries{d.off32.const_data_ptr<int32_t>(), static_cast<int32_t>(std::min(d.p.R, d.p.C)),
                           static_cast<int32_t>(std::max(d.p.R, d.p.C)), shifted};
}

template <bool kHost>
at::Tensor diag_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets, int64_t out_features,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_perm,
                   const std::optional<at::Tensor>& out_perm) {
  const auto d = prologue<Backend<kHost>>(DiagMmCall{x, values, offsets, out_features, bias, in_perm, out_perm},
                                          [&](DiagProblem p) { return upload(std::move(p), x); });
  auto y = at::empty({x.size(0), d->p.R}, x.options());
  if (y.numel() == 0) return y;
  // v2: x staged through inv(in_perm) (column c to its permuted place), y stored through inv(out_perm)
  if (d->off32.defined() && try_rows_v2<kHost>(x.contiguous(), d->in_inv32, values.contiguous(), contiguous(bias),
                                               d->out_inv32, y, d->off.size(0), diag_entries(*d, d->p.R >= d->p.C)))
    return y;
  run_gather<kHost>(x.contiguous(), d->in_fwd, values.contiguous(), contiguous(bias), d->out_inv, y,
                    diag_rows(*d, /*shifted=*/d->p.R >= d->p.C));
  return y;
}

template <bool kHost>
at::Tensor diag_mm_t(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& offsets, int64_t in_features,
                     const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto d = prologue<Backend<kHost>>(DiagMmTCall{dy, values, offsets, in_features, in_perm, out_perm},
                                          [&](DiagProblem p) { return upload(std::move(p), dy); });
  auto dx = at::empty({dy.size(0), d->p.C}, dy.options());
  if (dx.numel() == 0) return dx;
  // v2: dy staged through out_perm (the inverse of the gather inv(out_perm)), dx stored through in_perm
  if (d->off32.defined() && try_rows_v2<kHost>(dy.contiguous(), d->out_fwd32, values.contiguous(), std::nullopt,
                                               d->in_fwd32, dx, d->off.size(0), diag_entries(*d, d->p.R < d->p.C)))
    return dx;
  run_gather<kHost>(dy.contiguous(), d->out_inv, values.contiguous(), std::nullopt, d->in_fwd, dx,
                    diag_rows(*d, /*shifted=*/d->p.R < d->p.C));
  return dx;
}

template <bool kHost>
at::Tensor diag_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  const auto d = prologue<Backend<kHost>>(DiagSddmmCall{dy, x, offsets, in_perm, out_perm},
                                          [&](DiagProblem p) { return upload(std::move(p), x); });
  const int64_t L = std::min(d->p.R, d->p.C);
  auto dv = at::empty({d->off.size(0), L}, x.options());
  if (dv.numel() == 0) return dv;
  // v2: dy read through inv(out_perm), x staged through inv(in_perm); rows of the forward form
  if (d->off32.defined() && try_rows_gw<kHost>(dy.contiguous(), d->out_inv32, x.contiguous(), d->in_inv32, dv,
                                               d->off.size(0), diag_entries(*d, d->p.R >= d->p.C)))
    return dv;
  run_sddmm<kHost>(dy.contiguous(), d->out_inv, x.contiguous(), d->in_fwd, dv,
                   kern::DiagFlat{idx_ptr(d->off), L, d->p.R, d->p.C});
  return dv;
}

}  // namespace padst::impl
