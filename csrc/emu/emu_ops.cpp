// `padst_emu`: the CUDA implementation of every padst kernel op (csrc/cuda/host_dispatch.h), run on the host through
// the kernel emulation (csrc/emu/emulate.h). Same schemas as `padst`, CPU tensors only, slow (one host thread
// plays every GPU thread): for tests (tests/test_cuda_emulation.py), in every build, GPU or not. Built into the
// test-only module padst_ext._emu, which `import padst_ext` does not load (padst_ext._extension.load_emulation()).
#include <torch/library.h>

#include "emu/emu_backend.h"
#include "schemas.h"

namespace {
at::Tensor permute_cols_emu(const at::Tensor& x, const at::Tensor& idx) {
  const char* op = "padst_emu::_permute_cols";
  TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D CPU tensor");
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == x.size(1) && idx.scalar_type() == at::kInt, op,
                    ": idx must be int32 [", x.size(1), "]");
  const at::Tensor xc = x.contiguous(), ic = idx.contiguous();
  const int64_t cols = x.size(1);
  TORCH_CHECK_VALUE(ic.numel() == 0 || (ic.min().item<int64_t>() >= 0 && ic.max().item<int64_t>() < cols), op,
                    ": idx out of range");
  at::Tensor out = at::empty_like(xc);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    using K = padst::kern::PermuteCols<T>;
    TORCH_CHECK_VALUE(K::serves(cols, cols, cols), op, ": ", cols, " columns not served");
    padst::kern::PermuteColsParams<T> p;
    p.in = reinterpret_cast<const T*>(xc.const_data_ptr());
    p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
    p.idx = ic.const_data_ptr<int32_t>();
    p.rows = x.size(0);
    p.ld_in = p.ld_out = cols;
    p.cols = static_cast<int32_t>(cols);
    padst::emu::permute_cols(p);
  };
  if (x.element_size() == 2) {
    run(uint16_t{});
  } else {
    TORCH_CHECK_VALUE(x.element_size() == 4, op, ": 2- or 4-byte elements only");
    run(uint32_t{});
  }
  return out;
}
}  // namespace

TORCH_LIBRARY(padst_emu, m) {
  m.def(PADST_SCHEMA_BLOCK_MM);
  m.def(PADST_SCHEMA_BLOCK_MM_T);
  m.def(PADST_SCHEMA_BLOCK_SDDMM);
  m.def(PADST_SCHEMA_NM_MM);
  m.def(PADST_SCHEMA_NM_MM_T);
  m.def(PADST_SCHEMA_NM_SDDMM);
  m.def(PADST_SCHEMA_DIAG_MM);
  m.def(PADST_SCHEMA_DIAG_MM_T);
  m.def(PADST_SCHEMA_DIAG_SDDMM);
  // How often the v2 kernels (csrc/kernels/block_xs.h, block_rc.h, block_gw.h, rows_v2.h) have served so far: tests use
  // them to tell which kernel ran.
  m.def("block_xs_calls() -> int", [] { return padst::emu::block_xs_calls().load(); });
  m.def("block_rc_calls() -> int", [] { return padst::emu::block_rc_calls().load(); });
  m.def("block_gw_calls() -> int", [] { return padst::emu::block_gw_calls().load(); });
  m.def("rows_v2_calls() -> int", [] { return padst::emu::rows_v2_calls().load(); });
  // The cuSPARSELt path's column permutation kernel (csrc/kernels/permute_cols.h): out[r, c] = x[r, idx[c]].
  m.def("_permute_cols(Tensor x, Tensor idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(padst_emu, CPU, m) {
  namespace I = padst::impl;
  m.impl("block_mm", &I::block_mm<true>);
  m.impl("block_mm_t", &I::block_mm_t<true>);
  m.impl("block_sddmm", &I::block_sddmm<true>);
  m.impl("nm_mm", &I::nm_mm<true>);
  m.impl("nm_mm_t", &I::nm_mm_t<true>);
  m.impl("nm_sddmm", &I::nm_sddmm<true>);
  m.impl("diag_mm", &I::diag_mm<true>);
  m.impl("diag_mm_t", &I::diag_mm_t<true>);
  m.impl("diag_sddmm", &I::diag_sddmm<true>);
  m.impl("_permute_cols", &permute_cols_emu);
}
