// The v2 row kernel on CUDA cores (csrc/kernels/rows_v2.h: the N:M forward, the diagonal forward and dx): __global__
// wrapper and launcher. See csrc/cuda/launch.h.
#include "cuda/launch.h"
#include "cuda/launch_util.cuh"

namespace padst::gpu {
namespace {

extern __shared__ __align__(16) unsigned char rows_smem_raw[];

template <typename K>
__global__ void __launch_bounds__(K::kThreads) rows_v2_kernel(typename K::Params p) {
  float* xs = reinterpret_cast<float*>(rows_smem_raw);
  K::stage(p, blockIdx.x, static_cast<int>(threadIdx.x), xs);
  __syncthreads();
  K::rows(p, blockIdx.x, static_cast<int>(threadIdx.x), xs);
}

template <typename K>
cudaError_t launch_rows(const typename K::Params& p, cudaStream_t stream) {
  if (!K::serves(p.C, p.R)) return cudaErrorInvalidValue;
  return launch_smem(rows_v2_kernel<K>, K::num_ctas(p), K::kThreads, K::smem_bytes(p.C), kern::kRowsV2Smem, p, stream);
}

template <typename K>
__global__ void __launch_bounds__(K::kThreads, 1) rows_gw_kernel(typename K::Params p) {
  float* xs = reinterpret_cast<float*>(rows_smem_raw);
  const uint32_t tiles = static_cast<uint32_t>(K::row_tiles(p)), cta = blockIdx.x;
  const uint32_t split = cta / tiles, tile = cta - split * tiles;  // 32-bit, once per CTA
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t b_begin = static_cast<int64_t>(split) * p.chunk, b_end = kern::min64(p.B, b_begin + p.chunk);
  for (int k0 = 0; k0 < p.K; k0 += K::kKG) {
    float acc[K::kRPT][K::kKG];
#pragma unroll
    for (int j = 0; j < K::kRPT; ++j)
#pragma unroll
      for (int kk = 0; kk < K::kKG; ++kk) acc[j][kk] = 0.0f;
    for (int64_t b0 = b_begin; b0 < b_end; b0 += K::kTBRows) {
      K::stage(p, b0, b_end, tid, xs);
      __syncthreads();
      K::accumulate(p, tile, k0, b0, b_end, tid, xs, acc);
      __syncthreads();  // every thread is done with xs before the next rows are staged
    }
    K::store(p, tile, static_cast<int>(split), k0, tid, acc);
  }
}

template <typename K>
__global__ void __launch_bounds__(K::kReduceThreads) rows_gw_reduce_kernel(typename K::Params p) {
  K::reduce(p, blockIdx.x, static_cast<int>(threadIdx.x));
}

template <typename K>
cudaError_t launch_gw(const typename K::Params& p, cudaStream_t stream) {
  if (!K::serves(p.C, p.R)) return cudaErrorInvalidValue;
  cudaError_t st =
      launch_smem(rows_gw_kernel<K>, K::num_ctas(p), K::kThreads, K::smem_bytes(p.C), kern::kRowsV2Smem, p, stream);
  if (st != cudaSuccess) return st;
  return launch_smem(rows_gw_reduce_kernel<K>, K::reduce_ctas(p), K::kReduceThreads, 0, 0, p, stream);
}

}  // namespace

template <typename T, typename E>
cudaError_t rows_gw(kern::RowsGwParams<T, E> p, cudaStream_t stream) {
  switch (kern::rows_v2_tile(p.C)) {
    case 32: return launch_gw<kern::RowsGw<T, E, 32>>(p, stream);
    case 16: return launch_gw<kern::RowsGw<T, E, 16>>(p, stream);
    case 8: return launch_gw<kern::RowsGw<T, E, 8>>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename E>
cudaError_t rows_v2(kern::RowsV2Params<T, E> p, cudaStream_t stream) {
  switch (kern::rows_v2_tile(p.C)) {
    case 32: return launch_rows<kern::RowsV2<T, E, 32>>(p, stream);
    case 16: return launch_rows<kern::RowsV2<T, E, 16>>(p, stream);
    case 8: return launch_rows<kern::RowsV2<T, E, 8>>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

#define PADST_ROWS_V2_INST(T, E) template cudaError_t rows_v2<T, E>(kern::RowsV2Params<T, E>, cudaStream_t);
PADST_ROWS_V2_FOR_EACH(PADST_ROWS_V2_INST)
#undef PADST_ROWS_V2_INST
#define PADST_ROWS_GW_INST(T, E) template cudaError_t rows_gw<T, E>(kern::RowsGwParams<T, E>, cudaStream_t);
PADST_ROWS_GW_FOR_EACH(PADST_ROWS_GW_INST)
#undef PADST_ROWS_GW_INST

}  // namespace padst::gpu
