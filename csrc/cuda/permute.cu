// Column permutation kernel (csrc/kernels/permute_cols.h): __global__ wrapper and launcher. See csrc/cuda/launch.h.
#include "cuda/launch.h"
#include "cuda/launch_util.cuh"

namespace padst::gpu {
namespace {

extern __shared__ __align__(16) unsigned char perm_smem_raw[];

template <typename K>
__global__ void __launch_bounds__(K::kThreads) permute_cols_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  T* row = reinterpret_cast<T*>(perm_smem_raw) + static_cast<int64_t>(warp) * p.cols;
  K::warp_row(p, blockIdx.x, warp, lane, row);
}

}  // namespace

template <typename T>
cudaError_t permute_cols(kern::PermuteColsParams<T> p, cudaStream_t stream) {
  using K = kern::PermuteCols<T>;
  if (!K::serves(p.cols, p.ld_in, p.ld_out)) return cudaErrorInvalidValue;
  return launch_smem(permute_cols_kernel<K>, K::num_ctas(p), K::kThreads, K::smem_bytes(p.cols), K::kMaxSmem, p,
                     stream);
}

template cudaError_t permute_cols<uint16_t>(kern::PermuteColsParams<uint16_t>, cudaStream_t);
template cudaError_t permute_cols<uint32_t>(kern::PermuteColsParams<uint32_t>, cudaStream_t);

}  // namespace padst::gpu
