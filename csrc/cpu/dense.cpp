// Dense weight gradient in the permuted frame: dz.T @ x_p with dz = dy[:, inv(out_perm)], x_p = x[:, in_perm].
// Only needed on DST update steps (RigL's grow score), so it calls the BLAS matmul and permutes the [R, C]
// result, which is independent of the batch size, instead of gathering the [B, *] operands.
#include <torch/library.h>

#include "common.h"

namespace padst::cpu {
namespace {

at::Tensor dense_grad_impl(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& in_perm,
                           const std::optional<at::Tensor>& out_perm) {
  const char* op = "padst::dense_grad";
  check_grad_pair(op, dy, x);
  const int64_t R = dy.size(1), C = x.size(1);
  const Perm pin = check_perm(op, "in_perm", in_perm, C, x);
  const Perm pout = check_perm(op, "out_perm", out_perm, R, x);
  auto g = at::mm(dy.t(), x);
  auto idx_opts = at::TensorOptions().dtype(at::kLong);
  if (!pout.identity) {
    auto inv = at::from_blob(const_cast<int64_t*>(pout.inv.data()), {R}, idx_opts).to(x.device());
    g = g.index_select(0, inv);
  }
  if (!pin.identity) {
    auto fwd = at::from_blob(const_cast<int64_t*>(pin.fwd.data()), {C}, idx_opts).to(x.device());
    g = g.index_select(1, fwd);
  }
  return g.contiguous();
}

at::Tensor dense_grad(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& in_perm,
                      const std::optional<at::Tensor>& out_perm) {
  return dense_grad_impl(dy, x, in_perm, out_perm);
}

}  // namespace

TORCH_LIBRARY_IMPL(padst, CPU, m) { m.impl("dense_grad", &dense_grad); }

#ifdef PADST_WITH_CUDA
// Built from ATen calls only, so the same code serves CUDA tensors.
TORCH_LIBRARY_IMPL(padst, CUDA, m) { m.impl("dense_grad", &dense_grad); }
#endif

}  // namespace padst::cpu
