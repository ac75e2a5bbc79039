// Every padst schema, declared once. Backends register implementations in their own files
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(padst, CPU), csrc/cuda/*_dispatch.cpp with CUDA); the schema strings
// are in csrc/schemas.h (shared with the host emulation library padst_emu); fake (meta) kernels and autograd
// formulas live in python/padst_ext/ops.py.
//
// Conventions (see docs in python/padst_ext/ops.py and the README op table):
//   x [B, C] input, y [B, R] output, S [R, C] the structured weight.
//   in_perm  (optional, a bijection of 0..C-1):  x_p = x[:, in_perm]
//   out_perm (optional, a bijection of 0..R-1):  y   = (x_p @ S.T)[:, out_perm] (+ bias)
//   *_mm_t ops return dx for dy [B, R]; *_sddmm ops return dS on the active pattern only.
#include <torch/library.h>

#include "meta_cache.h"
#include "schemas.h"

TORCH_LIBRARY(padst, m) {
  // Block-sparse (BSR) weight: values [nnzb, br, bc]; CSR block metadata row_ptr/col_idx and its CSC
  // transpose col_ptr/row_idx_t/blk_t (precomputed, used by the dx kernel).
  m.def(PADST_SCHEMA_BLOCK_MM);
  m.def(PADST_SCHEMA_BLOCK_MM_T);
  // CSC metadata (col_ptr, row_idx_t, blk_t) of a CSR block pattern, rebuilt only when the pattern changes.
  m.def(PADST_SCHEMA_BLOCK_TRANSPOSE_META);
  m.def(PADST_SCHEMA_BLOCK_SDDMM);

  // N:M along the input dimension, condensed: values/col_idx [R, C*n/m]. An input permutation is folded
  // into col_idx (col_idx = perm[logical index]), so these ops take none.
  m.def(PADST_SCHEMA_NM_MM);
  m.def(PADST_SCHEMA_NM_MM_T);
  m.def(PADST_SCHEMA_NM_SDDMM);

  // Wrap-around diagonals: values [K, min(R, C)], offsets [K] in [0, max(R, C)).
  m.def(PADST_SCHEMA_DIAG_MM);
  m.def(PADST_SCHEMA_DIAG_MM_T);
  m.def(PADST_SCHEMA_DIAG_SDDMM);

  // Dense weight gradient in the permuted frame, dy[:, inv(out_perm)].T @ x[:, in_perm]: RigL's grow score.
  m.def(PADST_SCHEMA_DENSE_GRAD);

  // The validated-metadata cache of the GPU path (csrc/meta_cache.h): [hits, misses, entries], and a reset that
  // also drops its references to metadata tensors.
  m.def("_metadata_cache_info() -> int[]", [] {
    const auto s = padst::impl::MetaCache::instance().stats();
    return std::vector<int64_t>{s.hits, s.misses, s.size};
  });
  m.def("_metadata_cache_clear() -> ()", [] { padst::impl::MetaCache::instance().clear(); });
  // The bytes the cache's entries hold (bounded by MetaCache::max_bytes(): 256 MB, or PADST_META_CACHE_MB).
  m.def("_metadata_cache_bytes() -> int", [] { return padst::impl::MetaCache::instance().stats().bytes; });

  // cuSPARSELt 2:4 path (CUDA builds with cuSPARSELt; csrc/cuda/cusparselt.cpp, python/padst_ext/semi_structured.py).
  // weight [R, C]: 2:4 along C (float16/bfloat16) or 1:2 (float32, TF32 math); `compressed` is opaque (uint8).
  //   lt24_mm:   y = x[:, in_perm] @ W.T + bias, with compressed = lt24_compress(W)
  //   lt24_mm_t: dx with dx[:, in_perm] = dy @ W, with compressed = lt24_compress(W.t().contiguous()): the reduction
  //              of dx runs over R, so cuSPARSELt needs W.T compressed on its own (W 2:4 along R as well).
  m.def("lt24_compress(Tensor weight) -> Tensor");
  m.def(
      "lt24_mm(Tensor x, Tensor compressed, int out_features, int in_features, Tensor? bias=None, "
      "Tensor? in_perm=None) -> Tensor");
  m.def("lt24_mm_t(Tensor dy, Tensor compressed, int out_features, int in_features, Tensor? in_perm=None) -> Tensor");
  // [size, capacity, hits, misses] of the cuSPARSELt plan cache of one device (CUDA builds with cuSPARSELt only).
  m.def("_lt24_plan_cache_info(int device) -> int[]");
  // Host-side logic of that path (csrc/lt24_logic.h via csrc/lt24_host.cpp), in every build, for tests and supports().
  m.def("_lt24_supported(ScalarType dtype, int n, int m, int out_features, int in_features, int batch=-1) -> (bool, str)");
  m.def("_lt24_padded_batch(ScalarType dtype, int batch) -> int");
  m.def("_lt24_plan_key(int[] fields) -> (int, str, int[])");
  m.def("_lt24_plan_key_eq(int[] a, int[] b) -> bool");
  m.def("_lt24_layout(int out_features, int in_features, int batch_padded, bool transposed) -> int[]");
  m.def("_lt24_lru_trace(int capacity, int[] keys) -> (int[], int[])");
  m.def("_lt24_check_pattern(Tensor weight, int n, int m) -> ()");
}
