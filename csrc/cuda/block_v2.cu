// The v2 tensor-core block kernels, x-stationary (csrc/kernels/block_xs.h), row-complete (block_rc.h) and the weight
// gradient (block_gw.h):
// their __global__ wrappers and launchers, in their own translation unit (compiled in parallel with kernels.cu). See
// csrc/cuda/launch.h for the contract.
#include <limits>

#include "cuda/launch.h"
#include "cuda/launch_util.cuh"

namespace padst::gpu {
namespace {

extern __shared__ __align__(128) unsigned char v2_smem_raw[];

template <typename K>
__global__ void __launch_bounds__(K::kThreads, 1) block_xs_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  T* xs = reinterpret_cast<T*>(v2_smem_raw);
  K::stage(p, blockIdx.x, static_cast<int>(threadIdx.x), xs);
  kern::sm80::cp_async_wait<0>();
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  K::warp_lines(p, blockIdx.x, warp, lane, xs, K::ring(p, xs, warp), K::ost(p, xs, warp));
}

template <typename K>
__global__ void __launch_bounds__(K::kThreads, 1) block_rc_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  T* smem = reinterpret_cast<T*>(v2_smem_raw);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  K::warp_lines(p, blockIdx.x, warp, lane, K::ring(smem, warp), K::ostage(smem));
  __syncthreads();
  K::store_rows(p, blockIdx.x, warp, lane, K::ostage(smem));
}

template <typename K>
__global__ void __launch_bounds__(K::kThreads, 1) block_gw_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  T* smem = reinterpret_cast<T*>(v2_smem_raw);
  int row, split, group, q0, q1;
  K::decode(p, blockIdx.x, row, split, group);
  K::blocks(p, row, group, q0, q1);
  if (q0 >= q1) return;  // the same for every thread of the CTA
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t b_begin = split * p.chunk, b_end = kern::min64(p.B, b_begin + p.chunk);
  kern::sm80::WAcc<K::kAcc> acc;
  acc.zero();
  int buf = 0;
  K::stage(p, row, q0, q1, b_begin, b_end, tid, smem, 0);
  for (int64_t b0 = b_begin; b0 < b_end; b0 += K::kRows) {
    if (b0 + K::kRows < b_end) {
      K::stage(p, row, q0, q1, b0 + K::kRows, b_end, tid, smem, buf ^ 1);  // the next rows, while these multiply
    } else {
      kern::sm80::cp_async_commit();
    }
    kern::sm80::cp_async_wait<1>();
    __syncthreads();
    K::mma(q0, q1, warp, lane, smem, buf, acc);
    __syncthreads();  // every warp is done with buf before it is refilled
    buf ^= 1;
  }
  K::store(p, split, q0, q1, warp, lane, acc);
}

template <typename K>
__global__ void __launch_bounds__(K::kReduceThreads) block_gw_reduce_kernel(typename K::Params p) {
  K::reduce(p, blockIdx.x, static_cast<int>(threadIdx.x));
}

// Launches kernel<K> with `smem` bytes of dynamic shared memory.
template <typename K, typename Kernel>
cudaError_t launch(Kernel kernel, const typename K::Params& p, int64_t smem, cudaStream_t stream) {
  if (smem > block_v2_max_smem()) return cudaErrorInvalidValue;  // the dispatcher checks this first
  return launch_smem(kernel, K::num_ctas(p), K::kThreads, smem, smem, p, stream);
}

}  // namespace

int64_t block_v2_max_smem() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  return bytes < kern::kBlockXsMaxSmem ? bytes : kern::kBlockXsMaxSmem;
}

template <typename T, bool kDx, int kB>
cudaError_t block_xs(kern::BlockXsParams<T> p, cudaStream_t stream) {
  using K = kern::BlockXs<T, kDx, kB>;
  return launch<K>(block_xs_kernel<K>, p, K::smem_bytes(p.in_cols), stream);
}

template <typename T, bool kDx, int kB>
cudaError_t block_rc(kern::BlockRcParams<T> p, cudaStream_t stream) {
  using K = kern::BlockRc<T, kDx, kB>;
  return launch<K>(block_rc_kernel<K>, p, K::smem_bytes(p.out_cols), stream);
}

template <typename T, int kB>
cudaError_t block_gw(kern::BlockGwParams<T> p, cudaStream_t stream) {
  using K = kern::BlockGw<T, kB>;
  const cudaError_t st = launch<K>(block_gw_kernel<K>, p, K::smem_bytes(), stream);
  if (st != cudaSuccess) return st;
  const int64_t ctas = K::reduce_ctas(p);
  if (ctas == 0) return cudaSuccess;
  if (ctas > std::numeric_limits<int>::max()) return cudaErrorInvalidConfiguration;
  block_gw_reduce_kernel<K><<<static_cast<unsigned>(ctas), K::kReduceThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define PADST_BLOCK_XS_INST(T, D, N) template cudaError_t block_xs<T, D, N>(kern::BlockXsParams<T>, cudaStream_t);
PADST_BLOCK_XS_FOR_EACH(PADST_BLOCK_XS_INST)
#undef PADST_BLOCK_XS_INST
#define PADST_BLOCK_RC_INST(T, D, N) template cudaError_t block_rc<T, D, N>(kern::BlockRcParams<T>, cudaStream_t);
PADST_BLOCK_RC_FOR_EACH(PADST_BLOCK_RC_INST)
#undef PADST_BLOCK_RC_INST
#define PADST_BLOCK_GW_INST(T, N) template cudaError_t block_gw<T, N>(kern::BlockGwParams<T>, cudaStream_t);
PADST_BLOCK_GW_FOR_EACH(PADST_BLOCK_GW_INST)
#undef PADST_BLOCK_GW_INST

}  // namespace padst::gpu
