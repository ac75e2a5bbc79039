// The x-stationary tensor-core block kernel (csrc/kernels/block_xs.h): its __global__ wrapper and launcher, in their
// own translation unit (compiled in parallel with kernels.cu). See csrc/cuda/launch.h for the contract.
#include <limits>

#include "cuda/launch.h"

namespace padst::gpu {
namespace {

extern __shared__ __align__(128) unsigned char xs_smem_raw[];

template <typename K>
__global__ void __launch_bounds__(K::kThreads, 1) block_xs_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  T* xs = reinterpret_cast<T*>(xs_smem_raw);
  K::stage(p, blockIdx.x, static_cast<int>(threadIdx.x), xs);
  kern::sm80::cp_async_wait<0>();
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  K::warp_lines(p, blockIdx.x, warp, lane, xs, K::ring(p, xs, warp), K::ost(p, xs, warp));
}

}  // namespace

int64_t block_xs_max_smem() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  return bytes < kern::kBlockXsMaxSmem ? bytes : kern::kBlockXsMaxSmem;
}

template <typename T, bool kDx, int kB>
cudaError_t block_xs(kern::BlockXsParams<T> p, cudaStream_t stream) {
  using K = kern::BlockXs<T, kDx, kB>;
  const int64_t ctas = K::num_ctas(p);
  if (ctas == 0) return cudaSuccess;
  if (ctas > std::numeric_limits<int>::max()) return cudaErrorInvalidConfiguration;
  const int64_t smem = K::smem_bytes(p.in_cols);
  if (smem > block_xs_max_smem()) return cudaErrorInvalidValue;  // the dispatcher checks this first
  const cudaError_t st =
      cudaFuncSetAttribute(block_xs_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (st != cudaSuccess) return st;
  block_xs_kernel<K><<<static_cast<unsigned>(ctas), K::kThreads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
}

#define PADST_BLOCK_XS_INST(T, D, N) template cudaError_t block_xs<T, D, N>(kern::BlockXsParams<T>, cudaStream_t);
PADST_BLOCK_XS_FOR_EACH(PADST_BLOCK_XS_INST)
#undef PADST_BLOCK_XS_INST

}  // namespace padst::gpu
