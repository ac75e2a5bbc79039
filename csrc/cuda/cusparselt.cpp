// cuSPARSELt 2:4 path: padst::lt24_compress, padst::lt24_mm, padst::lt24_mm_t (CUDA) and padst::_lt24_plan_cache_info.
//
// Compiled in CUDA builds; does nothing unless CMake found cuSPARSELt (PADST_HAVE_CUSPARSELT). Host-side rules,
// layouts and the plan-cache key live in csrc/lt24_logic.h (unit-tested without a GPU); read its "Layouts" section
// first: every descriptor below is built from lt24::layout().
//
// In short (x [B, C], W [R, C] 2:4 along C, every tensor row-major):
//   forward  y.T [R, Bp] = W [R, C] @ x_p.T [C, Bp]:  A = W (ROW, opN, structured), B = x_p (ROW [Bp, C], opT),
//            D = y described as COL [R, Bp] with ld R, which is exactly row-major y [Bp, R]. No transposes anywhere.
//   dx       the same problem with W.T [C, R] (compressed separately, needs W 2:4 along R too) and dy in place of x.
//
// Permutation: cuSPARSELt reads its dense operand through a pointer and a leading dimension only, so x[:, in_perm]
// cannot be folded into the matmul. lt24_mm gathers it into the dense operand buffer right before the matmul (one
// extra read + write of x; the buffer is the one that also absorbs the batch padding), and lt24_mm_t scatters dx
// the same way (as the gather through the inverse permutation). This is the one place in padst where the
// permutation costs a pass over the data: index_select, or with PADST_LT24_V2=1 the row-permute kernel of
// csrc/kernels/permute_cols.h (16-byte loads and stores, the gather in shared memory; index_select where it does not
// serve). The permutation is validated once per tensor version and kept on the device with its inverse
// (csrc/meta_cache.h): no host sync per call.
//
// Bias, two ways. Default: added as beta * C with C = D pre-filled with the broadcast bias (beta = 1). Cost: one
// write of y before the matmul. With PADST_LT24_V2=1 (which also switches on the row-permute kernel above):
// cuSPARSELt's bias epilogue with beta = 0, as torch's
// _cslt_sparse_mm does; the epilogue takes the bias *pointer* as a matmul-descriptor attribute set before the plan is
// built, so the pointer is part of the plan key (a layer's bias keeps its storage across steps, so its plans are
// reused); and on the first call of each problem cusparseLtMatmulSearch picks the algorithm (the winner's id is
// remembered per problem and the final plan built with it). Repeated runs during the search are harmless only with
// beta = 0, which is why the search comes with the epilogue. Off by default until benchmarks/gpu_suite.sh has shown
// on a GPU that the epilogue's result is right and faster.
//
// Streams and devices: every op runs under a CUDAGuard on its input's device and enqueues on
// at::cuda::getCurrentCUDAStream(); one cuSPARSELt handle per device (cuSPARSELt's rule), created lazily and never
// destroyed (destroying it from a static destructor at process exit races the CUDA runtime's own teardown).
// Every cusparseLt* status is checked (PADST_LT_CHECK).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#if defined(PADST_HAVE_CUSPARSELT)

#include <cusparseLt.h>

#include <array>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cuda/launch.h"
#include "lt24_logic.h"
#include "meta_cache.h"

#define PADST_LT_CHECK(call)                                                                                    \
  do {                                                                                                          \
    const cusparseStatus_t padst_lt_status_ = (call);                                                           \
    TORCH_CHECK(padst_lt_status_ == CUSPARSE_STATUS_SUCCESS, "padst: cuSPARSELt call ", #call,                 \
                " failed with status ", static_cast<int>(padst_lt_status_), " (",                               \
                cusparseLtGetErrorName(padst_lt_status_), ": ", cusparseLtGetErrorString(padst_lt_status_), ")"); \
  } while (0)

namespace padst::lt24 {
namespace {

constexpr std::size_t kPlanCacheCapacity = 128;  // per device; a plan is a few KB of host memory
constexpr int kMaxDevices = 64;

std::optional<LtDtype> to_lt_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return LtDtype::kF16;
    case at::kBFloat16: return LtDtype::kBF16;
    case at::kFloat: return LtDtype::kF32;
    default: return std::nullopt;
  }
}

cudaDataType cuda_type(LtDtype t) {
  switch (t) {
    case LtDtype::kF16: return CUDA_R_16F;
    case LtDtype::kBF16: return CUDA_R_16BF;
    case LtDtype::kF32: return CUDA_R_32F;
  }
  TORCH_CHECK(false, "padst: unreachable dtype");
  return CUDA_R_32F;
}

cusparseOrder_t cuda_order(Order o) { return o == Order::kRow ? CUSPARSE_ORDER_ROW : CUSPARSE_ORDER_COL; }
cusparseOperation_t cuda_op(Op o) {
  return o == Op::kN ? CUSPARSE_OPERATION_NON_TRANSPOSE : CUSPARSE_OPERATION_TRANSPOSE;
}

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kAlignmentBytes == 0; }

// A plan with everything it was built from. The descriptors stay alive as long as the plan (cuSPARSELt does not
// document that a plan is independent of them). Non-copyable, heap-allocated: the opaque structs are 512 bytes each
// and must not move once initialised.
struct Plan {
  cusparseLtMatDescriptor_t a{}, b{}, d{};
  cusparseLtMatmulDescriptor_t matmul{};
  cusparseLtMatmulAlgSelection_t alg{};
  cusparseLtMatmulPlan_t plan{};
  bool has_a = false, has_b = false, has_d = false, has_alg = false, has_plan = false;
  size_t workspace_bytes = 0;
  size_t compressed_bytes = 0;       // what lt24_compress produces for matrix `a` (a fresh descriptor's size)
  size_t plan_compressed_bytes = 0;  // what cuSPARSELt reports for `a` once this plan is bound to it

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {  // statuses ignored: nothing sensible to do about a failing destroy in a destructor
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_alg) cusparseLtMatmulAlgSelectionDestroy(&alg);
    if (has_d) cusparseLtMatDescriptorDestroy(&d);
    if (has_b) cusparseLtMatDescriptorDestroy(&b);
    if (has_a) cusparseLtMatDescriptorDestroy(&a);
  }
};

struct DeviceState {
  std::mutex mu;  // guards everything below and serialises this device's cuSPARSELt calls
  std::unique_ptr<cusparseLtHandle_t> handle;
  LruCache<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans{kPlanCacheCapacity};
  LruCache<PlanKey, int32_t, PlanKeyHash> searched{4 * kPlanCacheCapacity};  // problem (alg_id 0) -> searched alg id
  int64_t hits = 0, misses = 0;
};

// PADST_LT24_V2=1: the bias epilogue, the algorithm search and the row-permute kernel (see the header comment). Read at
// every call.
bool lt24_v2_enabled() {
  const char* v = std::getenv("PADST_LT24_V2");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// Leaked on purpose (see the header comment on process exit).
DeviceState& device_state(int device) {
  static auto* states = new std::array<DeviceState, kMaxDevices>();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "padst: cuSPARSELt path supports device indices below ",
              kMaxDevices, ", got ", device);
  return (*states)[device];
}

// Caller holds st.mu and a CUDAGuard on the device.
const cusparseLtHandle_t* handle_locked(DeviceState& st) {
  if (!st.handle) {
    auto h = std::make_unique<cusparseLtHandle_t>();
    PADST_LT_CHECK(cusparseLtInit(h.get()));
    st.handle = std::move(h);
  }
  return st.handle.get();
}

void init_structured(const cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* desc, const MatDesc& m, LtDtype t) {
  PADST_LT_CHECK(cusparseLtStructuredDescriptorInit(h, desc, m.rows, m.cols, m.ld, kAlignmentBytes, cuda_type(t),
                                                    cuda_order(m.order), CUSPARSELT_SPARSITY_50_PERCENT));
}

// A structured descriptor that is destroyed with its owner (also when a later cuSPARSELt call throws).
struct ScopedStructured {
  cusparseLtMatDescriptor_t desc{};
  ScopedStructured(const cusparseLtHandle_t* h, const MatDesc& m, LtDtype t) { init_structured(h, &desc, m, t); }
  ScopedStructured(const ScopedStructured&) = delete;
  ScopedStructured& operator=(const ScopedStructured&) = delete;
  ~ScopedStructured() { cusparseLtMatDescriptorDestroy(&desc); }
};

// Compressed size of a structured [rows, cols] matrix on a descriptor no plan has seen: what
// lt24_compress allocates. Once a plan is bound to a descriptor, cusparseLtSpMMACompressedSize2 on it can answer
// less (measured on an H200, cuSPARSELt of CUDA 13: S.T [64, 32] fp16 compresses to 2560 bytes on a fresh
// descriptor, 2304 on the transposed plan's), so the size check of the matmul compares against this number.
size_t fresh_compressed_size(const cusparseLtHandle_t* h, const MatDesc& m, LtDtype t) {
  ScopedStructured d(h, m, t);
  size_t bytes = 0, buffer_bytes = 0;
  PADST_LT_CHECK(cusparseLtSpMMACompressedSize2(h, &d.desc, &bytes, &buffer_bytes));
  return bytes;
}

// The structured descriptor of the weight as lt24_compress sees it: W [R, C] row-major (lt24::layout's matrix A
// of the untransposed problem). For lt24_mm_t the weight is S.T, i.e. R and C swapped.
MatDesc weight_desc(int64_t rows, int64_t cols, LtDtype dt) {
  return layout(rows, cols, batch_multiple(dt), /*transposed=*/false).a;
}

std::unique_ptr<Plan> build_plan(const cusparseLtHandle_t* h, const PlanKey& key) {
  const LtLayout L = layout(key.out_features, key.in_features, key.batch, key.transposed);
  const cudaDataType vt = cuda_type(key.dtype);
  auto p = std::make_unique<Plan>();
  init_structured(h, &p->a, L.a, key.dtype);
  p->has_a = true;
  PADST_LT_CHECK(cusparseLtDenseDescriptorInit(h, &p->b, L.b.rows, L.b.cols, L.b.ld, kAlignmentBytes, vt,
                                               cuda_order(L.b.order)));
  p->has_b = true;
  PADST_LT_CHECK(cusparseLtDenseDescriptorInit(h, &p->d, L.d.rows, L.d.cols, L.d.ld, kAlignmentBytes, vt,
                                               cuda_order(L.d.order)));
  p->has_d = true;
  // C and D share one descriptor (in place). Compute in fp32 for every type (cuSPARSELt >= 0.5.2 has no 16F/TF32
  // compute types for these inputs any more; float inputs run on TF32 tensor cores).
  PADST_LT_CHECK(cusparseLtMatmulDescriptorInit(h, &p->matmul, cuda_op(L.op_a), cuda_op(L.op_b), &p->a, &p->b, &p->d,
                                                &p->d, CUSPARSE_COMPUTE_32F));
  if (key.bias_ptr != 0) {  // the bias epilogue (one value per row of D, i.e. per output feature)
    void* bias = reinterpret_cast<void*>(static_cast<intptr_t>(key.bias_ptr));
    PADST_LT_CHECK(
        cusparseLtMatmulDescSetAttribute(h, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &bias, sizeof(bias)));
  }
  PADST_LT_CHECK(cusparseLtMatmulAlgSelectionInit(h, &p->alg, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  p->has_alg = true;
  if (key.alg_id != 0) {
    const int alg_id = key.alg_id;
    PADST_LT_CHECK(
        cusparseLtMatmulAlgSetAttribute(h, &p->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id, sizeof(alg_id)));
  }
  PADST_LT_CHECK(cusparseLtMatmulPlanInit(h, &p->plan, &p->matmul, &p->alg));
  p->has_plan = true;
  PADST_LT_CHECK(cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace_bytes));
  size_t buffer_bytes = 0;
  PADST_LT_CHECK(cusparseLtSpMMACompressedSize2(h, &p->a, &p->plan_compressed_bytes, &buffer_bytes));
  const int64_t w_rows = key.transposed ? key.in_features : key.out_features;  // lt24_mm_t's weight is S.T
  const int64_t w_cols = key.transposed ? key.out_features : key.in_features;
  p->compressed_bytes = fresh_compressed_size(h, weight_desc(w_rows, w_cols, key.dtype), key.dtype);
  // The matmul reads plan_compressed_bytes from what lt24_compress wrote: never let it read past the end.
  TORCH_CHECK(p->compressed_bytes >= p->plan_compressed_bytes, "padst: cuSPARSELt plan for a ", dtype_name(key.dtype),
              " weight [", key.out_features, ", ", key.in_features, "]", key.transposed ? " (transposed)" : "",
              " expects ", p->plan_compressed_bytes, " compressed bytes, more than lt24_compress produces (",
              p->compressed_bytes, "); please report this cuSPARSELt version");
  return p;
}

// Caller holds st.mu and a CUDAGuard on the device.
Plan& plan_locked(DeviceState& st, const PlanKey& key) {
  if (auto* found = st.plans.find(key)) {
    ++st.hits;
    return **found;
  }
  ++st.misses;
  std::unique_ptr<Plan> p = build_plan(handle_locked(st), key);
  Plan* raw = p.get();
  st.plans.put(key, std::move(p));  // may evict (destroy) the least recently used plan, never this one
  return *raw;
}

LtDtype checked_dtype(const char* op, const at::Tensor& t, const char* what) {
  const auto dt = to_lt_dtype(t.scalar_type());
  TORCH_CHECK_TYPE(dt.has_value(), op, ": ", what, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  return *dt;
}

void check_cuda(const char* op, const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", what, " must be a CUDA tensor, got one on ", t.device());
}

void check_supported(const char* op, LtDtype dt, int64_t R, int64_t C, int64_t batch) {
  const auto [n, m] = native_nm(dt);
  const Support s = supported(dt, n, m, R, C, batch);
  TORCH_CHECK_VALUE(s.ok, op, ": cuSPARSELt cannot serve this problem: ", s.reason,
                    " (padst_ext.semi_structured.lt24_linear falls back to the N:M kernels)");
}

void check_compressed(const char* op, const at::Tensor& compressed, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(compressed.scalar_type() == at::kByte, op,
                   ": compressed must be the uint8 tensor returned by padst::lt24_compress, got dtype ",
                   compressed.scalar_type());
  TORCH_CHECK_VALUE(compressed.dim() == 1 && compressed.is_contiguous(), op,
                    ": compressed must be the 1-D contiguous tensor returned by padst::lt24_compress, got shape ",
                    compressed.sizes());
  check_same_device(op, "compressed", compressed, ref);
  TORCH_CHECK_VALUE(aligned(compressed), op, ": compressed must be ", kAlignmentBytes,
                    "-byte aligned (pass the tensor lt24_compress returned, not a slice of it)");
}

// A validated permutation on the device: fwd (perm) and inv (its inverse), int32.
struct LtPerm {
  bool identity = true;
  at::Tensor fwd, inv;
  int64_t bytes() const { return impl::tensor_bytes(fwd) + impl::tensor_bytes(inv); }
};

// out[:, c] = a[:, idx[c]] for the first a.size(0) rows of out (contiguous, aligned): the row-permute kernel where it
// serves, index_select otherwise.
void permute_columns_into(at::Tensor out, const at::Tensor& a, const at::Tensor& idx) {
  const int64_t rows = a.size(0), cols = a.size(1);
  const bool two = a.element_size() == 2;
  const bool served = lt24_v2_enabled() && a.is_contiguous() && aligned(a) && aligned(out) && aligned(idx) &&
                      out.is_contiguous() &&
                      (two ? kern::PermuteCols<uint16_t>::serves(cols, cols, cols)
                           : kern::PermuteCols<uint32_t>::serves(cols, cols, cols));
  if (!served) {
    at::index_select_out(out, a, 1, idx);
    return;
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    kern::PermuteColsParams<T> p;
    p.in = reinterpret_cast<const T*>(a.const_data_ptr());
    p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
    p.idx = idx.const_data_ptr<int32_t>();
    p.rows = rows;
    p.ld_in = p.ld_out = cols;
    p.cols = static_cast<int32_t>(cols);
    C10_CUDA_CHECK(gpu::permute_cols<T>(p, at::cuda::getCurrentCUDAStream()));
  };
  if (two) {
    run(uint16_t{});
  } else {
    run(uint32_t{});
  }
}

// The dense operand [Bp, K] of the matmul: `a` [B, K] gathered through `perm` (columns), padded with zero rows to Bp,
// contiguous and aligned. Returns `a` itself when nothing is needed.
at::Tensor dense_operand(const at::Tensor& a, const LtPerm* perm, int64_t Bp) {
  const int64_t B = a.size(0), K = a.size(1);
  const bool permute = perm != nullptr && !perm->identity;
  if (!permute && Bp == B && a.is_contiguous() && aligned(a)) return a;
  at::Tensor buf = at::empty({Bp, K}, a.options());
  at::Tensor head = buf.narrow(0, 0, B);
  if (permute) {
    permute_columns_into(head, a.contiguous(), perm->fwd);  // x_p = x[:, perm], written straight into the buffer
  } else {
    head.copy_(a);
  }
  if (Bp > B) buf.narrow(0, B, Bp - B).zero_();
  return buf;
}

// D [Bp, M] (row-major) = dense [Bp, K] @ W.T, W [M, K] compressed; D pre-filled with the bias when given.
at::Tensor run_matmul(const char* op, const at::Tensor& dense, const at::Tensor& compressed, LtDtype dt,
                      int64_t out_features, int64_t in_features, bool transposed, const std::optional<at::Tensor>& bias) {
  const int64_t Bp = dense.size(0);
  const int64_t M = transposed ? in_features : out_features;
  at::Tensor out = at::empty({Bp, M}, dense.options());
  const bool epilogue = lt24_v2_enabled();
  if (bias.has_value() && !epilogue) out.copy_(bias->unsqueeze(0).expand({Bp, M}));
  const float alpha = 1.0f, beta = bias.has_value() && !epilogue ? 1.0f : 0.0f;

  PlanKey key;
  key.device = dense.get_device();
  key.dtype = dt;
  key.out_features = out_features;
  key.in_features = in_features;
  key.batch = Bp;
  key.transposed = transposed;
  key.bias = bias.has_value();
  if (epilogue && bias.has_value())
    key.bias_ptr = static_cast<int64_t>(reinterpret_cast<intptr_t>(bias->const_data_ptr()));

  DeviceState& st = device_state(key.device);
  std::lock_guard<std::mutex> lock(st.mu);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto workspace_for = [&](const Plan& p) {
    return p.workspace_bytes > 0
               ? at::empty({static_cast<int64_t>(p.workspace_bytes)}, dense.options().dtype(at::kByte))
               : at::Tensor();
  };
  // The matmul reads the plan's compressed size from `compressed`: never let it read past the end.
  auto check_size = [&](const Plan& p) {
    TORCH_CHECK_VALUE(static_cast<size_t>(compressed.numel()) == p.compressed_bytes, op, ": compressed holds ",
                      compressed.numel(), " bytes but a ", dtype_name(dt), " weight [",
                      transposed ? in_features : out_features, ", ", transposed ? out_features : in_features,
                      "] compresses to ", p.compressed_bytes,
                      " bytes: was it compressed from a weight of this shape and dtype",
                      transposed ? " (for lt24_mm_t: from W.t().contiguous())" : "", "?");
  };
  if (epilogue) {  // the algorithm: searched on the first call of this problem, remembered after
    if (const int32_t* found = st.searched.find(key)) {
      key.alg_id = *found;
    } else {
      Plan& first = plan_locked(st, key);
      check_size(first);
      at::Tensor ws = workspace_for(first);
      PADST_LT_CHECK(cusparseLtMatmulSearch(handle_locked(st), &first.plan, &alpha, compressed.const_data_ptr(),
                                            dense.const_data_ptr(), &beta, out.const_data_ptr(), out.mutable_data_ptr(),
                                            ws.defined() ? ws.mutable_data_ptr() : nullptr, &stream, 1));
      int32_t alg_id = 0;
      PADST_LT_CHECK(cusparseLtMatmulAlgGetAttribute(handle_locked(st), &first.alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                                                     &alg_id, sizeof(alg_id)));
      st.searched.put(key, alg_id);
      key.alg_id = alg_id;
    }
  }
  Plan& plan = plan_locked(st, key);
  check_size(plan);
  at::Tensor workspace = workspace_for(plan);
  PADST_LT_CHECK(cusparseLtMatmul(handle_locked(st), &plan.plan, &alpha, compressed.const_data_ptr(),
                                  dense.const_data_ptr(), &beta, out.const_data_ptr(), out.mutable_data_ptr(),
                                  workspace.defined() ? workspace.mutable_data_ptr() : nullptr, &stream, 1));
  return out;
}

// in_perm validated (a full bijection check) once per tensor version and kept on the device with its inverse; null
// for no permutation. A hit costs no host synchronisation.
std::shared_ptr<const LtPerm> checked_perm(const char* op, const std::optional<at::Tensor>& perm, int64_t n,
                                           const at::Tensor& ref) {
  if (!perm.has_value()) return nullptr;
  impl::MetaKey key(op);
  key.meta(perm).val(n).sig(ref);
  return impl::MetaCache::instance().get<LtPerm>(std::move(key), [&] {
    const Perm p = check_perm(op, "in_perm", perm, n, ref);
    LtPerm lp;
    lp.identity = p.identity;
    if (!p.identity) {
      const auto opts = at::TensorOptions().dtype(at::kLong);
      lp.fwd = at::tensor(p.fwd, opts).to(at::kInt).to(ref.device());
      lp.inv = at::tensor(p.inv, opts).to(at::kInt).to(ref.device());
    }
    return lp;
  });
}

// ------------------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------------------

at::Tensor lt24_compress_cuda(const at::Tensor& weight) {
  const char* op = "padst::lt24_compress";
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
                    weight.sizes());
  check_cuda(op, weight, "weight");
  const LtDtype dt = checked_dtype(op, weight, "weight");
  const int64_t R = weight.size(0), C = weight.size(1);
  check_supported(op, dt, R, C, -1);
  const auto [n, m] = native_nm(dt);
  const c10::cuda::CUDAGuard guard(weight.device());

  // Pattern check on the device; one scalar comes back (and the offending position when there is one).
  const at::Tensor counts = weight.ne(0).reshape({R, C / m, m}).sum(-1);  // int64 [R, C/m]
  const at::Tensor bad = counts.gt(n);
  if (bad.any().item<bool>()) {
    const int64_t flat = bad.flatten().nonzero().select(1, 0)[0].item<int64_t>();
    PatternViolation v{flat / (C / m), flat % (C / m), counts.flatten()[flat].item<int64_t>()};
    TORCH_CHECK_VALUE(false, violation_message(op, v, n, m));
  }

  at::Tensor w = weight.contiguous();
  if (!aligned(w)) w = w.clone();
  DeviceState& st = device_state(w.get_device());
  std::lock_guard<std::mutex> lock(st.mu);
  const cusparseLtHandle_t* h = handle_locked(st);
  // The structured descriptor of matrix A exactly as build_plan() describes it (lt24::layout: ROW [R, C], ld C).
  ScopedStructured d(h, weight_desc(R, C, dt), dt);
  size_t bytes = 0, buffer_bytes = 0;
  PADST_LT_CHECK(cusparseLtSpMMACompressedSize2(h, &d.desc, &bytes, &buffer_bytes));
  at::Tensor compressed = at::empty({static_cast<int64_t>(bytes)}, w.options().dtype(at::kByte));
  at::Tensor buffer =
      at::empty({static_cast<int64_t>(buffer_bytes > 0 ? buffer_bytes : 1)}, w.options().dtype(at::kByte));
  // isSparseA = 1, opA = N: the compressed form of A for a matmul with opA = N (all our plans).
  PADST_LT_CHECK(cusparseLtSpMMACompress2(h, &d.desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.const_data_ptr(),
                                          compressed.mutable_data_ptr(), buffer.mutable_data_ptr(),
                                          at::cuda::getCurrentCUDAStream()));
  return compressed;
}

at::Tensor lt24_mm_cuda(const at::Tensor& x, const at::Tensor& compressed, int64_t out_features, int64_t in_features,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_perm) {
  const char* op = "padst::lt24_mm";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [batch, in_features], got shape ", x.sizes());
  check_cuda(op, x, "x");
  const LtDtype dt = checked_dtype(op, x, "x");
  TORCH_CHECK_VALUE(x.size(1) == in_features, op, ": x has ", x.size(1), " features but in_features is ",
                    in_features);
  check_compressed(op, compressed, x);
  check_bias(op, bias, x, out_features);
  const int64_t B = x.size(0);
  check_supported(op, dt, out_features, in_features, B);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto perm = checked_perm(op, in_perm, in_features, x);
  if (B == 0) return at::empty({0, out_features}, x.options());

  const at::Tensor dense = dense_operand(x, perm.get(), padded_batch(B, dt));
  const std::optional<at::Tensor> bc =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor y = run_matmul(op, dense, compressed, dt, out_features, in_features, /*transposed=*/false, bc);
  return y.size(0) == B ? y : y.narrow(0, 0, B);
}

at::Tensor lt24_mm_t_cuda(const at::Tensor& dy, const at::Tensor& compressed, int64_t out_features, int64_t in_features,
                          const std::optional<at::Tensor>& in_perm) {
  const char* op = "padst::lt24_mm_t";
  TORCH_CHECK_VALUE(dy.dim() == 2, op, ": dy must be 2-D [batch, out_features], got shape ", dy.sizes());
  check_cuda(op, dy, "dy");
  const LtDtype dt = checked_dtype(op, dy, "dy");
  TORCH_CHECK_VALUE(dy.size(1) == out_features, op, ": dy has ", dy.size(1), " features but out_features is ",
                    out_features);
  check_compressed(op, compressed, dy);
  const int64_t B = dy.size(0);
  check_supported(op, dt, out_features, in_features, B);
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto perm = checked_perm(op, in_perm, in_features, dy);
  if (B == 0) return at::empty({0, in_features}, dy.options());

  const at::Tensor dense = dense_operand(dy, nullptr, padded_batch(B, dt));
  at::Tensor dxp = run_matmul(op, dense, compressed, dt, out_features, in_features, /*transposed=*/true, std::nullopt);
  if (dxp.size(0) != B) dxp = dxp.narrow(0, 0, B);
  if (perm == nullptr || perm->identity) return dxp;
  // The scatter dx[:, perm[j]] = dx_p[:, j] as the gather dx[:, c] = dx_p[:, inv[c]] (one extra pass over dx, as
  // the gather in lt24_mm).
  at::Tensor dx = at::empty({B, in_features}, dy.options());
  permute_columns_into(dx, dxp.contiguous(), perm->inv);
  return dx;
}

std::vector<int64_t> plan_cache_info(int64_t device) {
  DeviceState& st = device_state(static_cast<int>(device));
  std::lock_guard<std::mutex> lock(st.mu);
  return {static_cast<int64_t>(st.plans.size()), static_cast<int64_t>(st.plans.capacity()), st.hits, st.misses};
}

}  // namespace
}  // namespace padst::lt24

TORCH_LIBRARY_IMPL(padst, CUDA, m) {
  m.impl("lt24_compress", &padst::lt24::lt24_compress_cuda);
  m.impl("lt24_mm", &padst::lt24::lt24_mm_cuda);
  m.impl("lt24_mm_t", &padst::lt24::lt24_mm_t_cuda);
}

TORCH_LIBRARY_IMPL(padst, CompositeExplicitAutograd, m) {
  m.impl("_lt24_plan_cache_info", &padst::lt24::plan_cache_info);
}

#endif  // PADST_HAVE_CUSPARSELT
