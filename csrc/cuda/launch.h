// Plain C++ interface of the CUDA kernels (csrc/cuda/kernels.cu): the CTA bodies of csrc/kernels/*.h launched
// on a stream. No torch/ATen here: the .cu files stay free of ATen headers (a .cu that includes ATen costs
// ~30-40 s to compile, the same kernels without it ~5 s). Dtype dispatch, validation, device guards, streams
// and op registration live in csrc/cuda/cuda_dispatch.cpp (via host_dispatch.h and cuda_backend.h).
//
// All pointers are device pointers on the current device, arrays dense row-major, metadata already validated.
// Every launcher enqueues on `stream` and returns the launch status (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda_types.h"
#include "kernels/block_sddmm_tc.h"
#include "kernels/block_tc.h"
#include "kernels/block_gw.h"
#include "kernels/block_rc.h"
#include "kernels/block_xs.h"
#include "kernels/entries.h"
#include "kernels/gather_mm.h"
#include "kernels/rows_v2.h"
#include "kernels/permute_cols.h"
#include "kernels/sddmm.h"

namespace padst::gpu {

template <typename T, typename E>
cudaError_t gather_mm(kern::GatherMmParams<T, E> p, cudaStream_t stream);

// Tensor-core block kernel (kernels/block_tc.h), T = __nv_bfloat16 or __half, kOut16 in {1, 2, 4}.
template <typename T, bool kDx, int kOut16>
cudaError_t block_tc(kern::BlockTcParams<T> p, cudaStream_t stream);

// Tensor-core block weight gradient (kernels/block_sddmm_tc.h): p planned with BlockSddmmTc<T>::plan, p.partial
// holding splits * nnzb * br * bc floats.
template <typename T>
cudaError_t block_sddmm_tc(kern::BlockSddmmTcParams<T> p, cudaStream_t stream);
extern template cudaError_t block_sddmm_tc<__nv_bfloat16>(kern::BlockSddmmTcParams<__nv_bfloat16>, cudaStream_t);
extern template cudaError_t block_sddmm_tc<__half>(kern::BlockSddmmTcParams<__half>, cudaStream_t);

// out[r, c] = in[r, idx[c]] (kernels/permute_cols.h) for 2-byte (T = uint16_t) and 4-byte (uint32_t) elements: the
// values are moved, never interpreted. PermuteCols<T>::serves(cols, ld_in, ld_out) and 16-byte aligned pointers
// are the caller's to check (cudaErrorInvalidValue otherwise).
template <typename T>
cudaError_t permute_cols(kern::PermuteColsParams<T> p, cudaStream_t stream);
extern template cudaError_t permute_cols<uint16_t>(kern::PermuteColsParams<uint16_t>, cudaStream_t);
extern template cudaError_t permute_cols<uint32_t>(kern::PermuteColsParams<uint32_t>, cudaStream_t);

// The v2 row kernel on CUDA cores (kernels/rows_v2.h): the N:M forward (NmEntries) and the diagonal forward and dx
// (DiagEntries). RowsV2<T, E, rows_v2_tile(C)>::serves(C, R) and a 16-byte aligned x are the caller's to check.
template <typename T, typename E>
cudaError_t rows_v2(kern::RowsV2Params<T, E> p, cudaStream_t stream);
#define PADST_ROWS_V2_FOR_EACH(X)      \
  X(float, kern::NmEntries)            \
  X(__nv_bfloat16, kern::NmEntries)    \
  X(__half, kern::NmEntries)           \
  X(float, kern::EllEntries)           \
  X(__nv_bfloat16, kern::EllEntries)   \
  X(__half, kern::EllEntries)          \
  X(float, kern::DiagEntries)          \
  X(__nv_bfloat16, kern::DiagEntries)  \
  X(__half, kern::DiagEntries)
#define PADST_ROWS_V2_EXTERN(T, E) extern template cudaError_t rows_v2<T, E>(kern::RowsV2Params<T, E>, cudaStream_t);
PADST_ROWS_V2_FOR_EACH(PADST_ROWS_V2_EXTERN)
#undef PADST_ROWS_V2_EXTERN
// Its weight gradient (RowsGw): p planned with RowsGw<T, E, rows_v2_tile(C)>::plan, p.partial holding splits * nnz
// floats; the forward row kernel's conditions apply (to C = x's width and R = dy's).
template <typename T, typename E>
cudaError_t rows_gw(kern::RowsGwParams<T, E> p, cudaStream_t stream);
#define PADST_ROWS_GW_FOR_EACH(X)       \
  X(float, kern::NmGwEntries)           \
  X(__nv_bfloat16, kern::NmGwEntries)   \
  X(__half, kern::NmGwEntries)          \
  X(float, kern::DiagEntries)           \
  X(__nv_bfloat16, kern::DiagEntries)   \
  X(__half, kern::DiagEntries)
#define PADST_ROWS_GW_EXTERN(T, E) extern template cudaError_t rows_gw<T, E>(kern::RowsGwParams<T, E>, cudaStream_t);
PADST_ROWS_GW_FOR_EACH(PADST_ROWS_GW_EXTERN)
#undef PADST_ROWS_GW_EXTERN

// p.splits / p.chunk planned with kern::Sddmm<T, F>::plan and p.partial holding splits * nnz accumulators.
template <typename T, typename F>
cudaError_t sddmm(kern::SddmmParams<T, F> p, cudaStream_t stream);

// Stable transpose of an N:M pattern (csrc/kernels/nm_transpose.h). Buffers: keys [nnz], ent_in [nnz], ent [nnz],
// ptr [C+1], temp [nm_transpose_temp_bytes(nnz, C)].
size_t nm_transpose_temp_bytes(int64_t nnz, int64_t C);
cudaError_t nm_transpose(const int64_t* col_idx, int64_t nnz, int64_t C, int64_t* keys, int64_t* ent_in, int64_t* ent,
                         int64_t* ptr, void* temp, size_t temp_bytes, cudaStream_t stream);

#define PADST_CUDA_FOR_EACH_TYPE(X, A) \
  X(float, A)                          \
  X(double, A)                         \
  X(__nv_bfloat16, A)                  \
  X(__half, A)
#define PADST_CUDA_FOR_EACH_ROWS(X)      \
  X(kern::NmRows<int64_t>)               \
  X(kern::NmColRows)                     \
  X(kern::BlockRows)                     \
  X(kern::BlockColRows)                  \
  X(kern::DiagRows)
#define PADST_CUDA_FOR_EACH_FLAT(X) \
  X(kern::NmFlat<int64_t>)          \
  X(kern::BlockFlat)                \
  X(kern::DiagFlat)

#define PADST_GATHER_EXTERN(T, E) extern template cudaError_t gather_mm<T, E>(kern::GatherMmParams<T, E>, cudaStream_t);
#define PADST_GATHER_EXTERN_E(E) PADST_CUDA_FOR_EACH_TYPE(PADST_GATHER_EXTERN, E)
PADST_CUDA_FOR_EACH_ROWS(PADST_GATHER_EXTERN_E)
#undef PADST_GATHER_EXTERN_E
#undef PADST_GATHER_EXTERN

#define PADST_SDDMM_EXTERN(T, F) extern template cudaError_t sddmm<T, F>(kern::SddmmParams<T, F>, cudaStream_t);
#define PADST_SDDMM_EXTERN_F(F) PADST_CUDA_FOR_EACH_TYPE(PADST_SDDMM_EXTERN, F)
PADST_CUDA_FOR_EACH_FLAT(PADST_SDDMM_EXTERN_F)
#undef PADST_SDDMM_EXTERN_F
#undef PADST_SDDMM_EXTERN

#define PADST_BLOCK_TC_FOR_EACH(X) \
  X(__nv_bfloat16, false, 1)        \
  X(__nv_bfloat16, false, 2)        \
  X(__nv_bfloat16, false, 4)        \
  X(__nv_bfloat16, true, 1)         \
  X(__nv_bfloat16, true, 2)         \
  X(__nv_bfloat16, true, 4)         \
  X(__half, false, 1)               \
  X(__half, false, 2)               \
  X(__half, false, 4)               \
  X(__half, true, 1)                \
  X(__half, true, 2)                \
  X(__half, true, 4)
#define PADST_BLOCK_TC_EXTERN(T, D, N) \
  extern template cudaError_t block_tc<T, D, N>(kern::BlockTcParams<T>, cudaStream_t);
PADST_BLOCK_TC_FOR_EACH(PADST_BLOCK_TC_EXTERN)
#undef PADST_BLOCK_TC_EXTERN

// The v2 tensor-core block kernels (csrc/cuda/block_v2.cu): x-stationary (kernels/block_xs.h, square blocks kB in
// {16, 32, 64}) and row-complete (kernels/block_rc.h, kB in {16, 32}). block_v2_max_smem(): the shared memory one of
// their CTAs may use on the current device (0 if it cannot be queried).
int64_t block_v2_max_smem();
template <typename T, bool kDx, int kB>
cudaError_t block_xs(kern::BlockXsParams<T> p, cudaStream_t stream);
template <typename T, bool kDx, int kB>
cudaError_t block_rc(kern::BlockRcParams<T> p, cudaStream_t stream);
// The v2 weight gradient (kernels/block_gw.h, kB in {16, 32}): p planned with BlockGw<T, kB>::plan, p.partial holding
// splits * nnzb * kB * kB floats.
template <typename T, int kB>
cudaError_t block_gw(kern::BlockGwParams<T> p, cudaStream_t stream);
#define PADST_BLOCK_XS_FOR_EACH(X) \
  X(__nv_bfloat16, false, 16)       \
  X(__nv_bfloat16, false, 32)       \
  X(__nv_bfloat16, false, 64)       \
  X(__nv_bfloat16, true, 16)        \
  X(__nv_bfloat16, true, 32)        \
  X(__nv_bfloat16, true, 64)        \
  X(__half, false, 16)              \
  X(__half, false, 32)              \
  X(__half, false, 64)              \
  X(__half, true, 16)               \
  X(__half, true, 32)               \
  X(__half, true, 64)
#define PADST_BLOCK_XS_EXTERN(T, D, N) \
  extern template cudaError_t block_xs<T, D, N>(kern::BlockXsParams<T>, cudaStream_t);
PADST_BLOCK_XS_FOR_EACH(PADST_BLOCK_XS_EXTERN)
#undef PADST_BLOCK_XS_EXTERN
#define PADST_BLOCK_RC_FOR_EACH(X) \
  X(__nv_bfloat16, false, 16)       \
  X(__nv_bfloat16, false, 32)       \
  X(__nv_bfloat16, true, 16)        \
  X(__nv_bfloat16, true, 32)        \
  X(__half, false, 16)              \
  X(__half, false, 32)              \
  X(__half, true, 16)               \
  X(__half, true, 32)
#define PADST_BLOCK_RC_EXTERN(T, D, N) \
  extern template cudaError_t block_rc<T, D, N>(kern::BlockRcParams<T>, cudaStream_t);
PADST_BLOCK_RC_FOR_EACH(PADST_BLOCK_RC_EXTERN)
#undef PADST_BLOCK_RC_EXTERN
#define PADST_BLOCK_GW_FOR_EACH(X) \
  X(__nv_bfloat16, 16)              \
  X(__nv_bfloat16, 32)              \
  X(__half, 16)                     \
  X(__half, 32)
#define PADST_BLOCK_GW_EXTERN(T, N) extern template cudaError_t block_gw<T, N>(kern::BlockGwParams<T>, cudaStream_t);
PADST_BLOCK_GW_FOR_EACH(PADST_BLOCK_GW_EXTERN)
#undef PADST_BLOCK_GW_EXTERN

}  // namespace padst::gpu
