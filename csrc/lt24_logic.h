// Host-side logic of the cuSPARSELt 2:4 path (pure C++17: no CUDA, no ATen), so that it can be unit-tested on a
// machine without a GPU (csrc/lt24_host.cpp exposes it as padst::_lt24_* CPU ops; tests/test_semi_structured.py).
//
//   * which problems cuSPARSELt can serve (dtype, N:M, dimension multiples, size limits) and why not;
//   * the exact matrix layouts handed to cuSPARSELt for the forward and the transposed (dx) problem;
//   * the plan-cache key (hash, equality) and a bounded LRU map;
//   * the N:M pattern check on a host mask and its error message.
//
// The layer: x [B, C], S [R, C] (2:4 along C, i.e. along the reduction dimension of the forward),
//   forward   y  = x_p @ S.T,   x_p = x[:, in_perm]
//   dx        dx_p = dy @ S,    dx[:, in_perm] = dx_p
// cuSPARSELt computes D = op(A) @ op(B) (+ beta C) with the structured operand A, 2:4 along op(A)'s reduction
// dimension K. For the forward that is S itself (K = C). For dx the reduction runs over R, so S's pattern (along C)
// is useless there: the transposed problem needs S.T [C, R] compressed *separately*, which is only possible when S
// is ALSO 2:4 along R ("transposable" pattern). See LtLayout and csrc/cuda/cusparselt.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace padst::lt24 {

// ------------------------------------------------------------------------------------------------------------
// Data types
// ------------------------------------------------------------------------------------------------------------

// The value types this path serves. Codes are stable (used by the host test ops).
enum class LtDtype : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

inline const char* dtype_name(LtDtype t) {
  switch (t) {
    case LtDtype::kF16: return "float16";
    case LtDtype::kBF16: return "bfloat16";
    case LtDtype::kF32: return "float32";
  }
  return "?";
}
inline int64_t dtype_bytes(LtDtype t) { return t == LtDtype::kF32 ? 4 : 2; }

// cuSPARSELt's "50 percent" structured sparsity: 2:4 for 16-bit types, 1:2 for float (computed in TF32).
inline std::pair<int64_t, int64_t> native_nm(LtDtype t) {
  return t == LtDtype::kF32 ? std::make_pair<int64_t, int64_t>(1, 2) : std::make_pair<int64_t, int64_t>(2, 4);
}

// Every row / column count and every leading dimension handed to cuSPARSELt is a multiple of this (cuSPARSELt's
// documented descriptor constraints; PyTorch's cuSPARSELt wrapper uses the same numbers: 16 for the structured
// 16-bit matrix, 8 for fp32). We apply the structured matrix's (larger) multiple to R and C, which also covers
// the dense operands' K dimension and keeps every leading dimension a multiple of 16 bytes (the alignment we
// declare in the descriptors).
inline int64_t sparse_multiple(LtDtype t) { return t == LtDtype::kF32 ? 8 : 16; }
// The batch (N of the GEMM) only appears in the dense matrices: 8 for 16-bit, 4 for fp32 (16 bytes either way).
// The ops pad the batch up to this multiple themselves (zero rows), so batch never makes a problem unsupported.
inline int64_t batch_multiple(LtDtype t) { return t == LtDtype::kF32 ? 4 : 8; }
inline int64_t padded_batch(int64_t batch, LtDtype t) {
  const int64_t q = batch_multiple(t);
  return batch <= 0 ? 0 : (batch + q - 1) / q * q;
}
// The byte alignment declared in every descriptor; every pointer handed over must honour it.
constexpr uint32_t kAlignmentBytes = 16;

// Conservative size limit: every matrix (dense operands, output, compressed input) stays below 2^31 elements, so
// no 32-bit index inside the library can overflow. Larger problems fall back.
constexpr int64_t kMaxElements = (int64_t{1} << 31) - 1;

// ------------------------------------------------------------------------------------------------------------
// Can cuSPARSELt serve this problem?
// ------------------------------------------------------------------------------------------------------------

struct Support {
  bool ok = false;
  std::string reason;  // empty when ok
};

// dtype: the activation / weight dtype; n, m: the layer's N:M; R = out_features, C = in_features; batch < 0 when
// unknown (then only the weight-side rules apply). The rules are symmetric in R and C, so the transposed (dx)
// problem has the same answer.
inline Support supported(std::optional<LtDtype> dtype, int64_t n, int64_t m, int64_t R, int64_t C, int64_t batch = -1) {
  std::ostringstream why;
  if (!dtype.has_value()) {
    return {false, "dtype not supported by cuSPARSELt here (float16, bfloat16 with 2:4; float32 with 1:2)"};
  }
  const auto [nn, mm] = native_nm(*dtype);
  if (n != nn || m != mm) {
    why << dtype_name(*dtype) << " needs " << nn << ":" << mm << " sparsity on cuSPARSELt, got " << n << ":" << m;
    return {false, why.str()};
  }
  if (R <= 0 || C <= 0) {
    why << "empty weight [" << R << ", " << C << "]";
    return {false, why.str()};
  }
  const int64_t q = sparse_multiple(*dtype);
  if (R % q || C % q) {
    why << "out_features and in_features must be multiples of " << q << " for " << dtype_name(*dtype)
        << " on cuSPARSELt, got [" << R << ", " << C << "]";
    return {false, why.str()};
  }
  if (R > kMaxElements / C) {
    why << "weight [" << R << ", " << C << "] exceeds 2^31 elements";
    return {false, why.str()};
  }
  if (batch >= 0) {
    const int64_t bp = padded_batch(batch, *dtype);
    const int64_t wide = R > C ? R : C;
    if (bp > 0 && bp > kMaxElements / wide) {
      why << "batch " << batch << " x " << wide << " exceeds 2^31 elements";
      return {false, why.str()};
    }
  }
  return {true, ""};
}

// ------------------------------------------------------------------------------------------------------------
// Layouts
// ------------------------------------------------------------------------------------------------------------
//
// cuSPARSELt: D[m, n] = op(A)[m, k] @ op(B)[k, n] (+ beta C), A structured (2:4 along k). We keep every PyTorch
// tensor row-major and describe it to cuSPARSELt as it lies in memory:
//
// forward  y[Bp, R] = x_p[Bp, C] @ S[R, C].T          computed as  y.T[R, Bp] = S[R, C] @ x_p.T[C, Bp]
//   A = S       rows R,  cols C,  ld C,  ROW, opA = N     -> op(A) is [m=R, k=C], 2:4 along k = C (as pruned)
//   B = x_p     rows Bp, cols C,  ld C,  ROW, opB = T     -> op(B) is [k=C, n=Bp] (x_p row-major, read transposed)
//   D = y       rows R,  cols Bp, ld R,  COL              -> column b of D (R contiguous values) is row b of y
//   (the same trick as PyTorch's _cslt_sparse_mm with transpose_result: no transpose pass on either side)
//
// dx       dx_p[Bp, C] = dy[Bp, R] @ S[R, C]           computed as  dx_p.T[C, Bp] = S.T[C, R] @ dy.T[R, Bp]
//   A = S.T     rows C,  cols R,  ld R,  ROW, opA = N     -> S.T materialised row-major [C, R] and compressed on its
//                                                          own (2:4 along k = R: needs a transposable pattern)
//   B = dy      rows Bp, cols R,  ld R,  ROW, opB = T
//   D = dx_p    rows C,  cols Bp, ld C,  COL
//
// So the transposed problem is the forward problem with (R, C) swapped; `transposed` only changes which
// (out_features, in_features) land in (m, k).
enum class Order : int { kRow = 0, kCol = 1 };
enum class Op : int { kN = 0, kT = 1 };

struct MatDesc {
  int64_t rows = 0, cols = 0, ld = 0;
  Order order = Order::kRow;
};

struct LtLayout {
  int64_t m = 0, n = 0, k = 0;  // D [m, n] = op(A) [m, k] @ op(B) [k, n]
  MatDesc a, b, d;              // c == d (in place; beta = 1 when a bias was pre-filled into d)
  Op op_a = Op::kN, op_b = Op::kT;
};

// out_features = R, in_features = C, batch_padded = Bp (already a multiple of batch_multiple()).
inline LtLayout layout(int64_t out_features, int64_t in_features, int64_t batch_padded, bool transposed) {
  LtLayout L;
  L.m = transposed ? in_features : out_features;
  L.k = transposed ? out_features : in_features;
  L.n = batch_padded;
  L.a = {L.m, L.k, L.k, Order::kRow};
  L.b = {L.n, L.k, L.k, Order::kRow};
  L.d = {L.m, L.n, L.m, Order::kCol};
  L.op_a = Op::kN;
  L.op_b = Op::kT;
  return L;
}

// Elements the matrix spans in memory (what the tensor behind it must hold).
inline int64_t span(const MatDesc& d) { return d.order == Order::kRow ? d.rows * d.ld : d.cols * d.ld; }

// ------------------------------------------------------------------------------------------------------------
// Plan cache key
// ------------------------------------------------------------------------------------------------------------
//
// A cuSPARSELt plan is built from the descriptors (shapes, leading dimensions, orders, value type, alignment), the
// matmul descriptor (ops, compute type) and the algorithm selection: everything that LtLayout derives from
// (dtype, R, C, padded batch, transposed), plus the device the handle belongs to and the algorithm (alg_id). `bias`
// selects beta = 1 with the bias pre-filled into D: it changes no plan setting, but keeps the plans of calls with and
// without a bias apart. bias_ptr is the bias epilogue's device pointer (PADST_LT24_V2), which the plan holds: such a
// plan serves that bias tensor only. No other pointer is part of the key: the plan holds none.
struct PlanKey {
  int32_t device = 0;
  LtDtype dtype = LtDtype::kF16;
  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t batch = 0;  // padded batch (the GEMM's n)
  bool transposed = false;
  bool bias = false;
  int32_t alg_id = 0;    // cuSPARSELt algorithm config id (0 = the default heuristic)
  int64_t bias_ptr = 0;  // the bias epilogue's device pointer, built into the plan (0: no epilogue)

  bool operator==(const PlanKey& o) const {
    return device == o.device && dtype == o.dtype && out_features == o.out_features && in_features == o.in_features &&
           batch == o.batch && transposed == o.transposed && bias == o.bias && alg_id == o.alg_id &&
           bias_ptr == o.bias_ptr;
  }
  bool operator!=(const PlanKey& o) const { return !(*this == o); }

  // The fields as integers, in a fixed order (used by the host test op and by repr()).
  std::vector<int64_t> fields() const {
    return {device, static_cast<int64_t>(dtype), out_features, in_features, batch, transposed ? 1 : 0, bias ? 1 : 0,
            alg_id, bias_ptr};
  }
  static constexpr std::size_t kNumFields = 9;

  std::string repr() const {
    std::ostringstream s;
    s << "PlanKey(device=" << device << ", dtype=" << dtype_name(dtype) << ", out_features=" << out_features
      << ", in_features=" << in_features << ", batch=" << batch << ", transposed=" << (transposed ? 1 : 0)
      << ", bias=" << (bias ? 1 : 0) << ", alg_id=" << alg_id << ", bias_ptr=" << bias_ptr << ")";
    return s.str();
  }
};

// boost-style hash_combine over 64-bit values (splitmix64 finaliser per field so that small integers that differ
// in one field never collide trivially).
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct PlanKeyHash {
  std::size_t operator()(const PlanKey& k) const {
    uint64_t h = 0x84222325cbf29ce4ULL;
    for (int64_t f : k.fields()) h = mix64(h ^ mix64(static_cast<uint64_t>(f)));
    return static_cast<std::size_t>(h);
  }
};

// ------------------------------------------------------------------------------------------------------------
// Bounded LRU map (not thread-safe by itself: the caller holds its mutex)
// ------------------------------------------------------------------------------------------------------------
template <typename K, typename V, typename Hash = std::hash<K>>
class LruCache {
 public:
  explicit LruCache(std::size_t capacity) : capacity_(capacity ? capacity : 1) {}

  // The value for `key`, marked most recently used; nullptr when absent.
  V* find(const K& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return &it->second->second;
  }

  // Inserts (or replaces) `key`, most recently used; evicts the least recently used entries beyond capacity and
  // returns their keys (the values are destroyed here).
  std::vector<K> put(const K& key, V value) {
    std::vector<K> evicted;
    auto it = index_.find(key);
    if (it != index_.end()) {
      it->second->second = std::move(value);
      order_.splice(order_.begin(), order_, it->second);
      return evicted;
    }
    order_.emplace_front(key, std::move(value));
    index_.emplace(key, order_.begin());
    while (order_.size() > capacity_) {
      evicted.push_back(order_.back().first);
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    return evicted;
  }

  std::size_t size() const { return order_.size(); }
  std::size_t capacity() const { return capacity_; }
  void clear() {
    index_.clear();
    order_.clear();
  }

 private:
  std::size_t capacity_;
  std::list<std::pair<K, V>> order_;  // most recently used first
  std::unordered_map<K, typename std::list<std::pair<K, V>>::iterator, Hash> index_;
};

// ------------------------------------------------------------------------------------------------------------
// Pattern check
// ------------------------------------------------------------------------------------------------------------

struct PatternViolation {
  int64_t row = 0, group = 0, count = 0;
};

// nonzero: row-major [R, C] flags (non-zero weight entries). The first (row, group) holding more than n non-zeros
// in a group of m consecutive columns, if any. Fewer than n is fine (a kept weight may be exactly zero).
inline std::optional<PatternViolation> find_violation(const uint8_t* nonzero, int64_t R, int64_t C, int64_t n,
                                                      int64_t m) {
  const int64_t G = C / m;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      int64_t cnt = 0;
      for (int64_t j = 0; j < m; ++j) cnt += nonzero[r * C + g * m + j] != 0;
      if (cnt > n) return PatternViolation{r, g, cnt};
    }
  }
  return std::nullopt;
}

// The ValueError text of lt24_compress (shared by the CPU check and the CUDA op).
inline std::string violation_message(const char* op, const PatternViolation& v, int64_t n, int64_t m) {
  std::ostringstream s;
  s << op << ": the weight is not " << n << ":" << m << " sparse along in_features: row " << v.row << ", group "
    << v.group << " (columns " << v.group * m << ".." << v.group * m + m - 1 << ") holds " << v.count
    << " non-zeros, at most " << n << " allowed";
  return s.str();
}

}  // namespace padst::lt24
