// Host-side helpers of the cuSPARSELt 2:4 path, compiled in every build (CPU-only included): they expose the pure
// logic of lt24_logic.h to Python so that it is unit-tested without a GPU (tests/test_semi_structured.py), and
// padst_ext.semi_structured.supports() answers through _lt24_supported on any machine.
// Schemas: csrc/ops.cpp (the "cuSPARSELt 2:4 path" section).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "lt24_logic.h"

namespace padst::lt24 {
namespace {

std::optional<LtDtype> to_lt_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return LtDtype::kF16;
    case at::kBFloat16: return LtDtype::kBF16;
    case at::kFloat: return LtDtype::kF32;
    default: return std::nullopt;
  }
}

std::tuple<bool, std::string> supported_op(at::ScalarType dtype, int64_t n, int64_t m, int64_t out_features,
                                           int64_t in_features, int64_t batch) {
  const Support s = supported(to_lt_dtype(dtype), n, m, out_features, in_features, batch);
  return {s.ok, s.reason};
}

int64_t padded_batch_op(at::ScalarType dtype, int64_t batch) {
  const auto t = to_lt_dtype(dtype);
  TORCH_CHECK_TYPE(t.has_value(), "padst::_lt24_padded_batch: unsupported dtype ", dtype);
  return padded_batch(batch, *t);
}

PlanKey key_from_fields(const char* op, at::IntArrayRef f) {
  TORCH_CHECK_VALUE(f.size() == PlanKey::kNumFields, op, ": expected ", PlanKey::kNumFields,
                    " fields [device, dtype_code, out_features, in_features, batch, transposed, bias, alg_id, bias_ptr], got ",
                    f.size());
  TORCH_CHECK_VALUE(f[1] >= 0 && f[1] <= 2, op, ": dtype_code must be 0 (float16), 1 (bfloat16) or 2 (float32), got ",
                    f[1]);
  PlanKey k;
  k.device = static_cast<int32_t>(f[0]);
  k.dtype = static_cast<LtDtype>(f[1]);
  k.out_features = f[2];
  k.in_features = f[3];
  k.batch = f[4];
  k.transposed = f[5] != 0;
  k.bias = f[6] != 0;
  k.alg_id = static_cast<int32_t>(f[7]);
  k.bias_ptr = f[8];
  return k;
}

// (hash, repr, fields as stored)
std::tuple<int64_t, std::string, std::vector<int64_t>> plan_key_op(at::IntArrayRef fields) {
  const PlanKey k = key_from_fields("padst::_lt24_plan_key", fields);
  return {static_cast<int64_t>(PlanKeyHash{}(k)), k.repr(), k.fields()};
}

bool plan_key_eq_op(at::IntArrayRef a, at::IntArrayRef b) {
  return key_from_fields("padst::_lt24_plan_key_eq", a) == key_from_fields("padst::_lt24_plan_key_eq", b);
}

// [m, n, k, a.rows, a.cols, a.ld, a.order, b.rows, b.cols, b.ld, b.order, d.rows, d.cols, d.ld, d.order, op_a, op_b]
// order: 0 row-major, 1 column-major; op: 0 non-transposed, 1 transposed.
std::vector<int64_t> layout_op(int64_t out_features, int64_t in_features, int64_t batch_padded, bool transposed) {
  const LtLayout L = layout(out_features, in_features, batch_padded, transposed);
  std::vector<int64_t> v{L.m, L.n, L.k};
  for (const MatDesc* d : {&L.a, &L.b, &L.d}) {
    v.insert(v.end(), {d->rows, d->cols, d->ld, static_cast<int64_t>(d->order)});
  }
  v.push_back(static_cast<int64_t>(L.op_a));
  v.push_back(static_cast<int64_t>(L.op_b));
  return v;
}

// Replays `keys` against an LruCache<int64_t, int64_t> of `capacity`: a miss inserts the key. Returns per access
// 1 (hit) or 0 (miss), and the keys evicted, in order.
std::tuple<std::vector<int64_t>, std::vector<int64_t>> lru_trace_op(int64_t capacity, at::IntArrayRef keys) {
  TORCH_CHECK_VALUE(capacity >= 1, "padst::_lt24_lru_trace: capacity must be >= 1, got ", capacity);
  LruCache<int64_t, int64_t> cache(static_cast<std::size_t>(capacity));
  std::vector<int64_t> hits, evicted;
  for (int64_t k : keys) {
    if (cache.find(k) != nullptr) {
      hits.push_back(1);
    } else {
      hits.push_back(0);
      for (int64_t e : cache.put(k, k)) evicted.push_back(e);
    }
  }
  return {hits, evicted};
}

// The pattern rule of lt24_compress on a CPU weight [R, C]: at most n non-zeros in every group of m consecutive
// columns of every row. Raises ValueError naming the first offending row and group.
void check_pattern_cpu(const at::Tensor& weight, int64_t n, int64_t m) {
  const char* op = "padst::_lt24_check_pattern";
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(1 <= n && n < m, op, ": need 1 <= n < m, got ", n, ":", m);
  const int64_t R = weight.size(0), C = weight.size(1);
  TORCH_CHECK_VALUE(C % m == 0, op, ": in_features ", C, " is not a multiple of m = ", m);
  const at::Tensor nz = weight.ne(0).to(at::kByte).contiguous();
  if (const auto v = find_violation(nz.const_data_ptr<uint8_t>(), R, C, n, m)) {
    TORCH_CHECK_VALUE(false, violation_message("padst::lt24_compress", *v, n, m));
  }
}

}  // namespace
}  // namespace padst::lt24

// Scalar-only ops have no tensor to dispatch on: CompositeExplicitAutograd serves every backend.
TORCH_LIBRARY_IMPL(padst, CompositeExplicitAutograd, m) {
  m.impl("_lt24_supported", &padst::lt24::supported_op);
  m.impl("_lt24_padded_batch", &padst::lt24::padded_batch_op);
  m.impl("_lt24_plan_key", &padst::lt24::plan_key_op);
  m.impl("_lt24_plan_key_eq", &padst::lt24::plan_key_eq_op);
  m.impl("_lt24_layout", &padst::lt24::layout_op);
  m.impl("_lt24_lru_trace", &padst::lt24::lru_trace_op);
}

TORCH_LIBRARY_IMPL(padst, CPU, m) { m.impl("_lt24_check_pattern", &padst::lt24::check_pattern_cpu); }
