// `padst_emu`: the CUDA implementation of every padst kernel op (csrc/sparse_impl.h), run on the host through
// the kernel emulation (csrc/emu/emulate.h). Same schemas as `padst`, CPU tensors only, slow (one host thread
// plays every GPU thread): for tests (tests/test_cuda_emulation.py), in every build, GPU or not.
#include <torch/library.h>

#include "schemas.h"
#include "sparse_impl.h"

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
  // How often the v2 block kernels (csrc/kernels/block_xs.h, block_rc.h, block_gw.h) have served so far: tests use them to tell
  // which kernel ran.
  m.def("block_xs_calls() -> int", [] { return padst::emu::block_xs_calls().load(); });
  m.def("block_rc_calls() -> int", [] { return padst::emu::block_rc_calls().load(); });
  m.def("block_gw_calls() -> int", [] { return padst::emu::block_gw_calls().load(); });
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
}
