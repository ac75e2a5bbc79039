// The v2 N:M forward on CUDA cores (csrc/kernels/nm_fwd.h): __global__ wrapper and launcher. See csrc/cuda/launch.h.
#include <limits>

#include "cuda/launch.h"

namespace padst::gpu {
namespace {

extern __shared__ __align__(16) unsigned char nm_smem_raw[];

template <typename K>
__global__ void __launch_bounds__(K::kThreads) nm_fwd_kernel(typename K::Params p) {
  float* xs = reinterpret_cast<float*>(nm_smem_raw);
  K::stage(p, blockIdx.x, static_cast<int>(threadIdx.x), xs);
  __syncthreads();
  K::rows(p, blockIdx.x, static_cast<int>(threadIdx.x), xs);
}

template <typename K>
cudaError_t launch_nm_fwd(const typename K::Params& p, cudaStream_t stream) {
  const int64_t ctas = K::num_ctas(p);
  if (ctas == 0) return cudaSuccess;
  if (ctas > std::numeric_limits<int>::max() || !K::serves(p.C, p.R)) return cudaErrorInvalidValue;
  const int64_t smem = K::smem_bytes(p.C);
  if (smem > 48 * 1024) {
    const cudaError_t st = cudaFuncSetAttribute(nm_fwd_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(kern::kNmFwdSmem));
    if (st != cudaSuccess) return st;
  }
  nm_fwd_kernel<K><<<static_cast<unsigned>(ctas), K::kThreads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename I>
cudaError_t nm_fwd(kern::NmFwdParams<T, I> p, cudaStream_t stream) {
  switch (kern::nm_fwd_rows(p.C)) {
    case 32: return launch_nm_fwd<kern::NmFwd<T, I, 32>>(p, stream);
    case 16: return launch_nm_fwd<kern::NmFwd<T, I, 16>>(p, stream);
    case 8: return launch_nm_fwd<kern::NmFwd<T, I, 8>>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

#define PADST_NM_FWD_INST(T, I) template cudaError_t nm_fwd<T, I>(kern::NmFwdParams<T, I>, cudaStream_t);
PADST_NM_FWD_FOR_EACH(PADST_NM_FWD_INST)
#undef PADST_NM_FWD_INST

}  // namespace padst::gpu
