// Shared pieces of the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../meta_cache.h"
#include "../prologue.h"
#include "../kernels/entries.h"

namespace padst::cpu {

// float32/float64 compute natively; bfloat16/float16 load, convert and accumulate in float32.
#define PADST_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

template <typename T>
using acc_t = at::opmath_type<T>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Values converted to the accumulation type, or a view of the original when no conversion is needed.
template <typename T>
struct AccValues {
  at::Tensor holder;
  const acc_t<T>* ptr = nullptr;
};
template <typename T>
AccValues<T> as_acc(const at::Tensor& values_contig) {
  AccValues<T> r;
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    r.holder = values_contig;
  } else {
    r.holder = values_contig.to(c10::CppTypeToScalarType<acc_t<T>>::value);
  }
  r.ptr = r.holder.template data_ptr<acc_t<T>>();
  return r;
}

// Calls f(std::integral_constant<int, W>) with W the compile-time tile width when `w` is one of the common
// block sizes, else W = 0 (the kernel then uses the run-time width in chunks of 64).
template <typename F>
void dispatch_width(int64_t w, F&& f) {
  switch (w) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// The vectorised float kernels (rk::, in rows_*.h, block_*.h, diag_mm.h) serve float32/bfloat16/float16 from
// kMinVecBatch rows on; float64 and smaller batches keep the scalar kernels (a 32-row tile would be mostly padding).
inline constexpr int64_t kMinVecBatch = 8;
template <typename T>
inline constexpr bool kVecType = !std::is_same_v<T, double>;

// Weights as a contiguous float tensor (a view when they already are).
inline at::Tensor float_values(const at::Tensor& values) { return values.to(at::kFloat).contiguous(); }
inline const int64_t* perm_ptr(const Perm& p, bool inverse) {
  return p.identity ? nullptr : (inverse ? p.inv.data() : p.fwd.data());
}
// The same as int32 (rk::Store::gather32), or null (identity, or too long for 32-bit indices).
inline const int32_t* perm_ptr32(const Perm& p, bool inverse) {
  const std::vector<int32_t>& v = inverse ? p.inv32 : p.fwd32;
  return p.identity || v.empty() ? nullptr : v.data();
}

// Validation results are cached per metadata tensor and version as on the GPU path (meta_cache.h): at batch 1
// a full check of the metadata would cost as much as the product itself.
template <typename V, typename F>
std::shared_ptr<const V> cached(impl::MetaKey key, F&& make) {
  return impl::MetaCache::instance().get<V>(std::move(key), std::function<V()>(std::forward<F>(make)));
}

inline void check_cpu(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

// The CPU kernels' device for prologue() (prologue.h): data on the CPU, no device to make current.
struct CpuDevice {
  static void check_device(const char* op, const char* what, const at::Tensor& t) { check_cpu(op, what, t); }
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
};

}  // namespace padst::cpu
