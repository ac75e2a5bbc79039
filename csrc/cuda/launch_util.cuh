// One launch path for the kernels of csrc/cuda/*.cu that take dynamic shared memory: checks the grid, opts in to more
// than the default 48 KB, launches on `stream` and returns the launch status. nvcc only (kernel launch syntax).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>

namespace padst::gpu {

// kernel<<<ctas, threads, smem, stream>>>(p); smem_optin: the dynamic shared memory the kernel is allowed (>= smem),
// set as its attribute when smem is above 48 KB.
template <typename Kernel, typename Params>
cudaError_t launch_smem(Kernel kernel, int64_t ctas, int threads, int64_t smem, int64_t smem_optin, const Params& p,
                        cudaStream_t stream) {
  if (ctas == 0) return cudaSuccess;
  if (ctas > std::numeric_limits<int>::max()) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {
    const cudaError_t st =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_optin));
    if (st != cudaSuccess) return st;
  }
  kernel<<<static_cast<unsigned>(ctas), threads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace padst::gpu
