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

}  // namespace

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

}  // namespace padst::gpu
