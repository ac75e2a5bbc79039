// The first steps of every kernel op (block, N:M, diagonal: forward, dx, dW), on every backend (the CPU kernels in
// csrc/cpu/, the CUDA host layer and its emulation in csrc/cuda/host_dispatch.h), in this order:
//   1. the data operand is on the backend's device (a readable error instead of a kernel reading the wrong memory);
//   2. that device is made current for the rest of the op (a CUDAGuard on the GPU, nothing on the CPU);
//   3. the call's cache key: every metadata tensor by identity and version, the data tensors whose shapes
//      validation reads, the int arguments (meta_cache.h);
//   4. the validated metadata: from the cache, or validated now (checks.h) and prepared for the backend (the CPU
//      keeps the validated problem as it is, the CUDA host layer copies it to the device) and cached.
// An op's call (BlockMmCall, ...) holds its arguments and says once, for every backend, what its key is and how it is
// validated; prologue() runs the four steps for a backend.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "checks.h"
#include "meta_cache.h"

namespace padst {

// What a prologue returns: the device guard (held while the op runs) and the cached, validated metadata.
template <typename Guard, typename V>
struct Validated {
  Guard guard;
  std::shared_ptr<const V> meta;
  const V& operator*() const { return *meta; }
  const V* operator->() const { return meta.get(); }
};

// The validated problem, cached as it is (the CPU kernels').
struct AsValidated {
  template <typename P>
  P operator()(P p) const {
    return p;
  }
};

// Device is the backend's device policy: a static check_device(op, what, tensor) and a Guard constructed from the
// data tensor. prepare(validated problem) makes the cached value.
template <typename Device, typename Call, typename Prepare = AsValidated>
auto prologue(const Call& call, const Prepare& prepare = {}) {
  using V = std::decay_t<std::invoke_result_t<const Prepare&, decltype(call.validate())>>;
  Device::check_device(Call::kOp, Call::kData, call.data());
  // braced initialisation runs in order: the guard is set before validation, which may launch work (on the GPU)
  return Validated<typename Device::Guard, V>{
      typename Device::Guard(call.data()),
      impl::MetaCache::instance().get<V>(call.key(), std::function<V()>([&] { return prepare(call.validate()); }))};
}

// A validated N:M pattern: its sizes and col_idx, a copy of its own taken before validation (what is checked is what
// runs), in the caller's index dtype.
struct NmPattern {
  NmProblem p;
  at::Tensor col_idx;
  size_t bytes() const { return nbytes(col_idx); }
};

// ---------------------------------------------------------------------------------------------------------
// The calls, one per op (arguments in schema order, csrc/schemas.h). kData names the operand whose device the op
// runs on.
// ---------------------------------------------------------------------------------------------------------
struct BlockMmCall {
  static constexpr const char* kOp = "padst::block_mm";
  static constexpr const char* kData = "x";
  const at::Tensor& x;
  const at::Tensor& values;
  const at::Tensor& row_ptr;
  const at::Tensor& col_idx;
  const at::Tensor& col_ptr;
  const at::Tensor& row_idx_t;
  const at::Tensor& blk_t;
  const std::optional<at::Tensor>& bias;
  const std::optional<at::Tensor>& in_perm;
  const std::optional<at::Tensor>& out_perm;
  const at::Tensor& data() const { return x; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(x).sig(values).sig(bias).meta(row_ptr).meta(col_idx).meta(col_ptr).meta(row_idx_t).meta(blk_t);
    k.meta(in_perm).meta(out_perm);
    return k;
  }
  BlockProblem validate() const {
    return validate_block_mm(kOp, x, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, bias, in_perm, out_perm);
  }
};

struct BlockMmTCall {
  static constexpr const char* kOp = "padst::block_mm_t";
  static constexpr const char* kData = "dy";
  const at::Tensor& dy;
  const at::Tensor& values;
  const at::Tensor& row_ptr;
  const at::Tensor& col_idx;
  const at::Tensor& col_ptr;
  const at::Tensor& row_idx_t;
  const at::Tensor& blk_t;
  const std::optional<at::Tensor>& in_perm;
  const std::optional<at::Tensor>& out_perm;
  const at::Tensor& data() const { return dy; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(dy).sig(values).meta(row_ptr).meta(col_idx).meta(col_ptr).meta(row_idx_t).meta(blk_t);
    k.meta(in_perm).meta(out_perm);
    return k;
  }
  BlockProblem validate() const {
    return validate_block_mm_t(kOp, dy, values, row_ptr, col_idx, col_ptr, row_idx_t, blk_t, in_perm, out_perm);
  }
};

struct BlockSddmmCall {
  static constexpr const char* kOp = "padst::block_sddmm";
  static constexpr const char* kData = "x";
  const at::Tensor& dy;
  const at::Tensor& x;
  const at::Tensor& row_ptr;
  const at::Tensor& col_idx;
  int64_t block_rows;
  int64_t block_cols;
  const std::optional<at::Tensor>& in_perm;
  const std::optional<at::Tensor>& out_perm;
  const at::Tensor& data() const { return x; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(dy).sig(x).meta(row_ptr).meta(col_idx).val(block_rows).val(block_cols).meta(in_perm).meta(out_perm);
    return k;
  }
  BlockProblem validate() const {
    return validate_block_sddmm(kOp, dy, x, row_ptr, col_idx, block_rows, block_cols, in_perm, out_perm);
  }
};

struct NmMmCall {
  static constexpr const char* kOp = "padst::nm_mm";
  static constexpr const char* kData = "x";
  const at::Tensor& x;
  const at::Tensor& values;
  const at::Tensor& col_idx;
  int64_t n;
  int64_t m;
  const std::optional<at::Tensor>& bias;
  const at::Tensor& data() const { return x; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(x).sig(values).sig(bias).meta(col_idx).val(n).val(m);
    return k;
  }
  NmPattern validate() const {
    at::Tensor own = col_idx.contiguous().clone();
    check_nm_mm_args(x, values, own, bias, n, m);
    return NmPattern{NmProblem{values.size(0), x.size(1), values.size(1)}, std::move(own)};
  }
};

struct NmMmTCall {
  static constexpr const char* kOp = "padst::nm_mm_t";
  static constexpr const char* kData = "dy";
  const at::Tensor& dy;
  const at::Tensor& values;
  const at::Tensor& col_idx;
  int64_t n;
  int64_t m;
  const at::Tensor& data() const { return dy; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(dy).sig(values).meta(col_idx).val(n).val(m);
    return k;
  }
  NmPattern validate() const {
    at::Tensor own = col_idx.contiguous().clone();
    const NmProblem p = validate_nm_mm_t(kOp, dy, values, own, n, m);
    return NmPattern{p, std::move(own)};
  }
};

struct NmSddmmCall {
  static constexpr const char* kOp = "padst::nm_sddmm";
  static constexpr const char* kData = "x";
  const at::Tensor& dy;
  const at::Tensor& x;
  const at::Tensor& col_idx;
  int64_t n;
  int64_t m;
  const at::Tensor& data() const { return x; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(dy).sig(x).meta(col_idx).val(n).val(m);
    return k;
  }
  NmPattern validate() const {
    at::Tensor own = col_idx.contiguous().clone();
    const NmProblem p = validate_nm_sddmm(kOp, dy, x, own, n, m);
    return NmPattern{p, std::move(own)};
  }
};

struct DiagMmCall {
  static constexpr const char* kOp = "padst::diag_mm";
  static constexpr const char* kData = "x";
  const at::Tensor& x;
  const at::Tensor& values;
  const at::Tensor& offsets;
  int64_t out_features;
  const std::optional<at::Tensor>& bias;
  const std::optional<at::Tensor>& in_perm;
  const std::optional<at::Tensor>& out_perm;
  const at::Tensor& data() const { return x; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(x).sig(values).sig(bias).meta(offsets).val(out_features).meta(in_perm).meta(out_perm);
    return k;
  }
  DiagProblem validate() const {
    return validate_diag_mm(kOp, x, values, offsets, out_features, bias, in_perm, out_perm);
  }
};

struct DiagMmTCall {
  static constexpr const char* kOp = "padst::diag_mm_t";
  static constexpr const char* kData = "dy";
  const at::Tensor& dy;
  const at::Tensor& values;
  const at::Tensor& offsets;
  int64_t in_features;
  const std::optional<at::Tensor>& in_perm;
  const std::optional<at::Tensor>& out_perm;
  const at::Tensor& data() const { return dy; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(dy).sig(values).meta(offsets).val(in_features).meta(in_perm).meta(out_perm);
    return k;
  }
  DiagProblem validate() const {
    return validate_diag_mm_t(kOp, dy, values, offsets, in_features, in_perm, out_perm);
  }
};

struct DiagSddmmCall {
  static constexpr const char* kOp = "padst::diag_sddmm";
  static constexpr const char* kData = "x";
  const at::Tensor& dy;
  const at::Tensor& x;
  const at::Tensor& offsets;
  const std::optional<at::Tensor>& in_perm;
  const std::optional<at::Tensor>& out_perm;
  const at::Tensor& data() const { return x; }
  impl::MetaKey key() const {
    impl::MetaKey k(kOp);
    k.sig(dy).sig(x).meta(offsets).meta(in_perm).meta(out_perm);
    return k;
  }
  DiagProblem validate() const { return validate_diag_sddmm(kOp, dy, x, offsets, in_perm, out_perm); }
};

}  // namespace padst
