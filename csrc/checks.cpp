#include "checks.h"

#include <algorithm>
#include <limits>

namespace padst {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Index metadata is small: validating it on the CPU is cheaper than a device round trip per element.
// Always a copy of its own, even of an int64 contiguous CPU tensor (which .to() would return as is): the kernels read
// only these validated copies, so a later write to the caller's tensor that bypasses the version counter (.data,
// numpy, DLPack) can leave a stale pattern in the cache but never an unchecked index in a kernel.
at::Tensor as_cpu_long(const at::Tensor& t) {
  return t.to(at::TensorOptions().device(at::kCPU).dtype(at::kLong), /*non_blocking=*/false, /*copy=*/true)
      .contiguous();
}

}  // namespace

void check_matrix(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", what, " must be 2-D, got a tensor of shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", what,
                   " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

void check_same_dtype(const char* op, const char* what, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", what, " has dtype ", t.scalar_type(),
                   " but the input has dtype ", ref.scalar_type(), "; all floating operands must share one dtype");
}

void check_same_device(const char* op, const char* what, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", what, " is on ", t.device(), " but the input is on ",
                    ref.device(), "; all operands must be on one device");
}

void check_index_tensor(const char* op, const char* what, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", what,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", what, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& ref, int64_t n) {
  if (!bias.has_value()) return;
  const auto& b = *bias;
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, op, ": bias must have shape [", n, "], got ", b.sizes());
  check_same_dtype(op, "bias", b, ref);
  check_same_device(op, "bias", b, ref);
}

Perm check_perm(const char* op, const char* what, const std::optional<at::Tensor>& perm, int64_t n,
                const at::Tensor& ref) {
  Perm p;
  p.fwd.resize(n);
  p.inv.resize(n);
  if (!perm.has_value()) {
    for (int64_t i = 0; i < n; ++i) p.fwd[i] = p.inv[i] = i;
    return p;
  }
  check_index_tensor(op, what, *perm, 1);
  check_same_device(op, what, *perm, ref);
  TORCH_CHECK_VALUE(perm->size(0) == n, op, ": ", what, " must have length ", n, ", got length ", perm->size(0));
  auto pc = as_cpu_long(*perm);
  const int64_t* d = pc.data_ptr<int64_t>();
  std::fill(p.inv.begin(), p.inv.end(), -1);
  p.identity = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = d[i];
    TORCH_CHECK_VALUE(v >= 0 && v < n, op, ": ", what, " is not a permutation of 0..", n - 1, ": entry ", i,
                      " is ", v);
    TORCH_CHECK_VALUE(p.inv[v] < 0, op, ": ", what, " is not a permutation of 0..", n - 1, ": value ", v,
                      " appears at positions ", p.inv[v], " and ", i);
    p.inv[v] = i;
    p.fwd[i] = v;
    p.identity = p.identity && v == i;
  }
  if (!p.identity && n <= std::numeric_limits<int32_t>::max()) {
    p.fwd32.assign(p.fwd.begin(), p.fwd.end());
    p.inv32.assign(p.inv.begin(), p.inv.end());
  }
  return p;
}

BlockMeta check_block_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t br,
                          int64_t bc, int64_t R, int64_t C, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(br > 0 && bc > 0, op, ": block size must be positive, got ", br, "x", bc);
  TORCH_CHECK_VALUE(R % br == 0, op, ": block rows ", br, " do not divide out_features ", R);
  TORCH_CHECK_VALUE(C % bc == 0, op, ": block cols ", bc, " do not divide in_features ", C);
  check_index_tensor(op, "row_ptr", row_ptr, 1);
  check_index_tensor(op, "col_idx", col_idx, 1);
  check_same_device(op, "row_ptr", row_ptr, ref);
  check_same_device(op, "col_idx", col_idx, ref);
  BlockMeta m;
  m.R = R, m.C = C, m.br = br, m.bc = bc, m.nbr = R / br, m.nbc = C / bc, m.nnzb = col_idx.size(0);
  TORCH_CHECK_VALUE(row_ptr.size(0) == m.nbr + 1, op, ": row_ptr must have length R/br + 1 = ", m.nbr + 1,
                    ", got ", row_ptr.size(0));
  m.row_ptr = as_cpu_long(row_ptr);
  m.col_idx = as_cpu_long(col_idx);
  m.blk_row = at::empty({m.nnzb}, m.row_ptr.options());
  const int64_t* rp = m.row_ptr.data_ptr<int64_t>();
  const int64_t* ci = m.col_idx.data_ptr<int64_t>();
  int64_t* brow = m.blk_row.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(rp[0] == 0, op, ": row_ptr[0] must be 0, got ", rp[0]);
  TORCH_CHECK_VALUE(rp[m.nbr] == m.nnzb, op, ": row_ptr[-1] = ", rp[m.nbr],
                    " must equal the number of blocks len(col_idx) = ", m.nnzb);
  // All of row_ptr first: with row_ptr[0] = 0, row_ptr[-1] = nnzb and no decrease, every range below is in bounds.
  for (int64_t i = 0; i < m.nbr; ++i) {
    TORCH_CHECK_VALUE(rp[i] <= rp[i + 1], op, ": row_ptr must be non-decreasing, but row_ptr[", i, "] = ", rp[i],
                      " > row_ptr[", i + 1, "] = ", rp[i + 1]);
  }
  for (int64_t i = 0; i < m.nbr; ++i) {
    for (int64_t k = rp[i]; k < rp[i + 1]; ++k) {
      TORCH_CHECK_VALUE(ci[k] >= 0 && ci[k] < m.nbc, op, ": col_idx[", k, "] = ", ci[k],
                        " is out of range for ", m.nbc, " block columns");
      TORCH_CHECK_VALUE(k == rp[i] || ci[k] > ci[k - 1], op,
                        ": col_idx must be strictly increasing within each block-row; block-row ", i, " has ",
                        ci[k], " after ", ci[k - 1], " (at position ", k, ")");
      brow[k] = i;
    }
  }
  return m;
}

void check_block_csc(const char* op, BlockMeta& m, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                     const at::Tensor& blk_t) {
  check_index_tensor(op, "col_ptr", col_ptr, 1);
  check_index_tensor(op, "row_idx_t", row_idx_t, 1);
  check_index_tensor(op, "blk_t", blk_t, 1);
  TORCH_CHECK_VALUE(col_ptr.size(0) == m.nbc + 1, op, ": col_ptr must have length C/bc + 1 = ", m.nbc + 1,
                    ", got ", col_ptr.size(0));
  TORCH_CHECK_VALUE(row_idx_t.size(0) == m.nnzb && blk_t.size(0) == m.nnzb, op,
                    ": row_idx_t and blk_t must have one entry per block (", m.nnzb, "), got ", row_idx_t.size(0),
                    " and ", blk_t.size(0));
  m.col_ptr = as_cpu_long(col_ptr);
  m.row_idx_t = as_cpu_long(row_idx_t);
  m.blk_t = as_cpu_long(blk_t);
  const int64_t* cp = m.col_ptr.data_ptr<int64_t>();
  const int64_t* ri = m.row_idx_t.data_ptr<int64_t>();
  const int64_t* bt = m.blk_t.data_ptr<int64_t>();
  const int64_t* ci = m.col_idx.data_ptr<int64_t>();
  const int64_t* brow = m.blk_row.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(cp[0] == 0 && cp[m.nbc] == m.nnzb, op, ": col_ptr must start at 0 and end at ", m.nnzb,
                    ", got ", cp[0], " and ", cp[m.nbc], " (transpose metadata out of date?)");
  std::vector<char> seen(m.nnzb, 0);
  for (int64_t j = 0; j < m.nbc; ++j) {
    TORCH_CHECK_VALUE(cp[j] <= cp[j + 1], op, ": col_ptr must be non-decreasing, but col_ptr[", j, "] = ", cp[j],
                      " > col_ptr[", j + 1, "] = ", cp[j + 1]);
  }
  for (int64_t j = 0; j < m.nbc; ++j) {
    for (int64_t p = cp[j]; p < cp[j + 1]; ++p) {
      const int64_t k = bt[p];
      TORCH_CHECK_VALUE(k >= 0 && k < m.nnzb && !seen[k], op, ": blk_t is not a permutation of 0..", m.nnzb - 1,
                        ": entry ", p, " is ", k);
      seen[k] = 1;
      TORCH_CHECK_VALUE(ci[k] == j && brow[k] == ri[p], op, ": transpose metadata does not match the block pattern: ",
                        "CSC entry ", p, " says block ", k, " is at (", ri[p], ", ", j, ") but the CSR pattern puts it at (",
                        brow[k], ", ", ci[k], "); rebuild it with padst_ext.ops.block_transpose_meta");
    }
  }
}

void check_nm(const char* op, const at::Tensor& values, const at::Tensor& col_idx, int64_t n, int64_t m, int64_t R,
              int64_t C, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(m > 0 && n >= 1 && n < m, op, ": N:M sparsity needs 1 <= N < M, got N=", n, ", M=", m);
  TORCH_CHECK_VALUE(C % m == 0, op, ": M=", m, " does not divide in_features ", C);
  const int64_t K = C / m * n;
  check_index_tensor(op, "col_idx", col_idx, 2);
  check_same_device(op, "col_idx", col_idx, ref);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == R && values.size(1) == K, op,
                    ": values must have shape [out_features, in_features*N/M] = [", R, ", ", K, "], got ",
                    values.sizes());
  TORCH_CHECK_VALUE(col_idx.sizes() == values.sizes(), op, ": col_idx must have the shape of values ", values.sizes(),
                    ", got ", col_idx.sizes());
  if (col_idx.numel() == 0) return;
  auto [lo, hi] = at::aminmax(col_idx);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < C, op, ": col_idx holds values in [", lo_v, ", ", hi_v,
                    "], outside the valid range [0, ", C, ")");
}

void check_nm_mm_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                      const std::optional<at::Tensor>& bias, int64_t n, int64_t m) {
  const char* op = "padst::nm_mm";
  check_matrix(op, "x", x);
  check_matrix(op, "values", values);
  check_same_dtype(op, "values", values, x);
  check_same_device(op, "values", values, x);
  check_nm(op, values, col_idx, n, m, values.size(0), x.size(1), x);
  check_bias(op, bias, x, values.size(0));
}

at::Tensor check_diag_offsets(const char* op, const at::Tensor& offsets, int64_t R, int64_t C, const at::Tensor& ref) {
  check_index_tensor(op, "offsets", offsets, 1);
  check_same_device(op, "offsets", offsets, ref);
  TORCH_CHECK_VALUE(R > 0 && C > 0, op, ": out_features and in_features must be positive, got ", R, " and ", C);
  auto oc = as_cpu_long(offsets);
  const int64_t* o = oc.data_ptr<int64_t>();
  const int64_t hi = std::max(R, C);
  // A repeated offset would store one diagonal twice: a different matrix than the pattern describes.
  std::vector<int64_t> first(hi, -1);
  for (int64_t k = 0; k < oc.size(0); ++k) {
    TORCH_CHECK_VALUE(o[k] >= 0 && o[k] < hi, op, ": offsets[", k, "] = ", o[k], " is outside [0, max(R, C)) = [0, ",
                      hi, ")");
    TORCH_CHECK_VALUE(first[o[k]] < 0, op, ": offsets must be distinct, but offset ", o[k], " appears at positions ",
                      first[o[k]], " and ", k);
    first[o[k]] = k;
  }
  return oc;
}

BlockMeta block_setup(const char* op, const at::Tensor& ref, int64_t br, int64_t bc, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, int64_t C) {
  check_index_tensor(op, "row_ptr", row_ptr, 1);
  TORCH_CHECK_VALUE(row_ptr.size(0) >= 1, op, ": row_ptr must have at least one entry");
  return check_block_csr(op, row_ptr, col_idx, br, bc, (row_ptr.size(0) - 1) * br, C, ref);
}

void check_block_values(const char* op, const at::Tensor& values, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(values.dim() == 3, op, ": values must be 3-D [nnz_blocks, block_rows, block_cols], got shape ",
                    values.sizes());
  check_same_dtype(op, "values", values, ref);
  check_same_device(op, "values", values, ref);
}

void check_diag_values(const char* op, const at::Tensor& values, const at::Tensor& offsets, int64_t R, int64_t C,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D [num_diagonals, min(R, C)], got shape ",
                    values.sizes());
  check_same_dtype(op, "values", values, ref);
  check_same_device(op, "values", values, ref);
  TORCH_CHECK_VALUE(values.size(1) == std::min(R, C), op, ": values must have min(R, C) = ", std::min(R, C),
                    " entries per diagonal, got ", values.size(1));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == values.size(0), op, ": offsets must have shape [",
                    values.size(0), "] (one per diagonal), got ", offsets.sizes());
}

void check_grad_pair(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  check_matrix(op, "dy", dy);
  check_matrix(op, "x", x);
  check_same_dtype(op, "dy", dy, x);
  check_same_device(op, "dy", dy, x);
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), op, ": dy has ", dy.size(0), " rows but x has ", x.size(0));
}

BlockProblem validate_block_mm(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx_t,
                               const at::Tensor& blk_t, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  check_matrix(op, "x", x);
  check_block_values(op, values, x);
  BlockProblem p{block_setup(op, x, values.size(1), values.size(2), row_ptr, col_idx, x.size(1)), {}, {}};
  check_block_csc(op, p.m, col_ptr, row_idx_t, blk_t);
  TORCH_CHECK_VALUE(values.size(0) == p.m.nnzb, op, ": values holds ", values.size(0), " blocks but col_idx has ",
                    p.m.nnzb);
  check_bias(op, bias, x, p.m.R);
  p.pin = check_perm(op, "in_perm", in_perm, p.m.C, x);
  p.pout = check_perm(op, "out_perm", out_perm, p.m.R, x);
  return p;
}

BlockProblem validate_block_mm_t(const char* op, const at::Tensor& dy, const at::Tensor& values,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                 const at::Tensor& row_idx_t, const at::Tensor& blk_t,
                                 const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  check_matrix(op, "dy", dy);
  check_block_values(op, values, dy);
  check_index_tensor(op, "col_ptr", col_ptr, 1);
  TORCH_CHECK_VALUE(col_ptr.size(0) >= 1, op, ": col_ptr must have at least one entry");
  const int64_t br = values.size(1), bc = values.size(2);
  BlockProblem p{block_setup(op, dy, br, bc, row_ptr, col_idx, (col_ptr.size(0) - 1) * bc), {}, {}};
  check_block_csc(op, p.m, col_ptr, row_idx_t, blk_t);
  TORCH_CHECK_VALUE(values.size(0) == p.m.nnzb, op, ": values holds ", values.size(0), " blocks but col_idx has ",
                    p.m.nnzb);
  TORCH_CHECK_VALUE(dy.size(1) == p.m.R, op, ": dy has ", dy.size(1), " columns but the weight has ", p.m.R, " rows");
  p.pin = check_perm(op, "in_perm", in_perm, p.m.C, dy);
  p.pout = check_perm(op, "out_perm", out_perm, p.m.R, dy);
  return p;
}

BlockProblem validate_block_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, int64_t block_rows, int64_t block_cols,
                                  const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  check_grad_pair(op, dy, x);
  check_index_tensor(op, "row_ptr", row_ptr, 1);
  BlockProblem p{check_block_csr(op, row_ptr, col_idx, block_rows, block_cols, dy.size(1), x.size(1), x), {}, {}};
  p.pin = check_perm(op, "in_perm", in_perm, p.m.C, x);
  p.pout = check_perm(op, "out_perm", out_perm, p.m.R, x);
  return p;
}

NmProblem validate_nm_mm_t(const char* op, const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_idx,
                           int64_t n, int64_t m) {
  check_matrix(op, "dy", dy);
  check_matrix(op, "values", values);
  check_same_dtype(op, "values", values, dy);
  check_same_device(op, "values", values, dy);
  TORCH_CHECK_VALUE(m > 0 && n >= 1 && n < m, op, ": N:M sparsity needs 1 <= N < M, got N=", n, ", M=", m);
  TORCH_CHECK_VALUE(values.size(1) % n == 0, op, ": values has ", values.size(1),
                    " columns per row, not a multiple of N=", n);
  NmProblem p{values.size(0), values.size(1) / n * m, values.size(1)};
  check_nm(op, values, col_idx, n, m, p.R, p.C, dy);
  TORCH_CHECK_VALUE(dy.size(1) == p.R, op, ": dy has ", dy.size(1), " columns but the weight has ", p.R, " rows");
  return p;
}

NmProblem validate_nm_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& col_idx,
                            int64_t n, int64_t m) {
  check_grad_pair(op, dy, x);
  const int64_t R = dy.size(1), C = x.size(1);
  // Shape-only stand-in for values: check_nm compares col_idx against [R, C*n/m].
  TORCH_CHECK_VALUE(m > 0 && n >= 1 && n < m, op, ": N:M sparsity needs 1 <= N < M, got N=", n, ", M=", m);
  TORCH_CHECK_VALUE(C % m == 0, op, ": M=", m, " does not divide in_features ", C);
  NmProblem p{R, C, C / m * n};
  check_nm(op, at::empty({R, p.K}, x.options().device(at::kMeta)), col_idx, n, m, R, C, x);
  return p;
}

DiagProblem validate_diag_mm(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets,
                             int64_t out_features, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  check_matrix(op, "x", x);
  DiagProblem p;
  p.R = out_features;
  p.C = x.size(1);
  p.off = check_diag_offsets(op, offsets, p.R, p.C, x);
  check_diag_values(op, values, offsets, p.R, p.C, x);
  check_bias(op, bias, x, p.R);
  p.pin = check_perm(op, "in_perm", in_perm, p.C, x);
  p.pout = check_perm(op, "out_perm", out_perm, p.R, x);
  return p;
}

DiagProblem validate_diag_mm_t(const char* op, const at::Tensor& dy, const at::Tensor& values,
                               const at::Tensor& offsets, int64_t in_features, const std::optional<at::Tensor>& in_perm,
                               const std::optional<at::Tensor>& out_perm) {
  check_matrix(op, "dy", dy);
  DiagProblem p;
  p.R = dy.size(1);
  p.C = in_features;
  p.off = check_diag_offsets(op, offsets, p.R, p.C, dy);
  check_diag_values(op, values, offsets, p.R, p.C, dy);
  p.pin = check_perm(op, "in_perm", in_perm, p.C, dy);
  p.pout = check_perm(op, "out_perm", out_perm, p.R, dy);
  return p;
}

DiagProblem validate_diag_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& in_perm, const std::optional<at::Tensor>& out_perm) {
  check_grad_pair(op, dy, x);
  DiagProblem p;
  p.R = dy.size(1);
  p.C = x.size(1);
  p.off = check_diag_offsets(op, offsets, p.R, p.C, x);
  p.pin = check_perm(op, "in_perm", in_perm, p.C, x);
  p.pout = check_perm(op, "out_perm", out_perm, p.R, x);
  return p;
}

}  // namespace padst
