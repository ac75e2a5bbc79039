// The CUDA kernels: thin __global__ wrappers around the CTA bodies of csrc/kernels/*.h, which the host
// emulation (csrc/emu/emulate.h) runs too. See csrc/cuda/launch.h for the contract. No torch headers here.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <type_traits>
#include <limits>

#include "cuda/launch.h"
#include "kernels/nm_transpose.h"

namespace padst::gpu {
namespace {

// The dynamic shared memory of every kernel here, declared once (one alignment for all).
extern __shared__ __align__(128) unsigned char smem_raw[];

template <typename K>
__global__ void __launch_bounds__(K::kBlockThreads) gather_mm_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int64_t cta = blockIdx.x;
  if (p.staged) {
    K::stage(p, cta, threadIdx.x, xs);
    __syncthreads();
  }
  K::compute(p, cta, threadIdx.x, xs);
}

template <typename K>
__global__ void __launch_bounds__(K::kBlockThreads) sddmm_partial_kernel(typename K::Params p) {
  K::partial(p, blockIdx.x, threadIdx.x);
}

template <typename K>
__global__ void __launch_bounds__(K::kBlockThreads) sddmm_reduce_kernel(typename K::Params p) {
  K::reduce(p, blockIdx.x, threadIdx.x);
}

template <typename K>
__global__ void __launch_bounds__(K::kBlockThreads) block_tc_kernel(typename K::Params p) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
  constexpr int kOut16 = K::kOut;
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* vs = xs + kern::kBlockTcRows * (K::bi(p) + K::kPad);
  float* ct = reinterpret_cast<float*>(smem_raw);  // reused once the last block is done
  const int64_t cta = blockIdx.x;
  const int warp = threadIdx.x / 32;
  typename K::Mma::Acc acc[kOut16];
#pragma unroll
  for (int j = 0; j < kOut16; ++j) K::Mma::zero(acc[j]);
  const int64_t o = K::line(p, cta);
  for (int64_t q = p.ptr[o]; q < p.ptr[o + 1]; ++q) {
    K::stage(p, cta, q, threadIdx.x, xs, vs);
    __syncthreads();
    K::mma(p, warp, xs, vs, acc);
    __syncthreads();
  }
  K::store(warp, acc, ct);
  __syncthreads();
  K::epilogue(p, cta, threadIdx.x, ct);
}

template <typename T>
__global__ void __launch_bounds__(kern::BlockSddmmTc<T>::kBlockThreads)
    block_sddmm_tc_kernel(kern::BlockSddmmTcParams<T> p) {
  using K = kern::BlockSddmmTc<T>;
  T* dz = reinterpret_cast<T*>(smem_raw);
  T* xs = dz + K::kRows * (p.br + K::kPad);
  float* ct = reinterpret_cast<float*>(smem_raw);  // reused after the last stage
  const int64_t cta = blockIdx.x;
  const int warp = threadIdx.x / 32;
  typename K::Mma::Acc acc[K::kTilesPerWarp];
#pragma unroll
  for (int s = 0; s < K::kTilesPerWarp; ++s) K::Mma::zero(acc[s]);
  for (int64_t b0 = K::rows_begin(p, cta); b0 < K::rows_end(p, cta); b0 += K::kRows) {
    K::stage(p, cta, b0, threadIdx.x, dz, xs);
    __syncthreads();
    K::mma(p, warp, dz, xs, acc);
    __syncthreads();
  }
  K::store(p, warp, acc, ct);
  __syncthreads();
  K::epilogue(p, cta, threadIdx.x, ct);
}

template <typename T>
__global__ void __launch_bounds__(kern::BlockSddmmTc<T>::kBlockThreads)
    block_sddmm_tc_reduce_kernel(kern::BlockSddmmTcParams<T> p) {
  kern::BlockSddmmTc<T>::reduce(p, blockIdx.x, threadIdx.x);
}

__global__ void __launch_bounds__(kern::kTransposeThreads) iota_kernel(int64_t* ent_in, int64_t nnz) {
  kern::NmTranspose::iota(ent_in, nnz, blockIdx.x, threadIdx.x);
}

__global__ void __launch_bounds__(kern::kTransposeThreads)
    fill_ptr_kernel(const int64_t* keys, int64_t nnz, int64_t C, int64_t* ptr) {
  kern::NmTranspose::fill_ptr(keys, nnz, C, ptr, blockIdx.x, threadIdx.x);
}

constexpr int64_t kMaxGrid = std::numeric_limits<int>::max();

// Bits needed for keys in [0, C): the radix sort only looks at those.
int key_bits(int64_t C) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < C) ++bits;
  return bits;
}

}  // namespace

template <typename T, typename E>
cudaError_t gather_mm(kern::GatherMmParams<T, E> p, cudaStream_t stream) {
  using K = kern::GatherMm<T, E>;
  const int64_t ctas = K::num_ctas(p);
  if (ctas == 0) return cudaSuccess;
  if (ctas > kMaxGrid) return cudaErrorInvalidConfiguration;
  p.staged = K::fits(p.in_cols);
  const size_t smem = p.staged ? static_cast<size_t>(K::smem_bytes(p.in_cols)) : 0;
  if (smem > 48 * 1024) {  // opt in to more than the default 48 KB of dynamic shared memory
    const cudaError_t st = cudaFuncSetAttribute(gather_mm_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(K::kMaxSmemBytes));
    if (st != cudaSuccess) return st;
  }
  gather_mm_kernel<K><<<static_cast<unsigned>(ctas), K::kBlockThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename F>
cudaError_t sddmm(kern::SddmmParams<T, F> p, cudaStream_t stream) {
  using K = kern::Sddmm<T, F>;
  if (p.nnz == 0) return cudaSuccess;
  const int64_t ctas = K::num_ctas(p);
  if (ctas > kMaxGrid) return cudaErrorInvalidConfiguration;
  sddmm_partial_kernel<K><<<static_cast<unsigned>(ctas), K::kBlockThreads, 0, stream>>>(p);
  cudaError_t st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  sddmm_reduce_kernel<K><<<static_cast<unsigned>(K::reduce_ctas(p)), K::kBlockThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kDx, int kOut16>
cudaError_t block_tc(kern::BlockTcParams<T> p, cudaStream_t stream) {
  using K = kern::BlockTc<T, kDx, kOut16>;
  const int64_t ctas = K::num_ctas(p);
  if (ctas == 0) return cudaSuccess;
  if (ctas > kMaxGrid) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(K::smem_bytes(p));
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // supports() keeps every served shape below 48 KB
  block_tc_kernel<K><<<static_cast<unsigned>(ctas), K::kBlockThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t block_sddmm_tc(kern::BlockSddmmTcParams<T> p, cudaStream_t stream) {
  using K = kern::BlockSddmmTc<T>;
  if (p.nnzb == 0) return cudaSuccess;
  const int64_t ctas = K::num_ctas(p);
  if (ctas > kMaxGrid) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(K::smem_bytes(p));
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // block sides <= 64 keep it below 48 KB
  if (K::reduce_ctas(p) > kMaxGrid) return cudaErrorInvalidConfiguration;
  block_sddmm_tc_kernel<T><<<static_cast<unsigned>(ctas), K::kBlockThreads, smem, stream>>>(p);
  const cudaError_t st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  block_sddmm_tc_reduce_kernel<T><<<static_cast<unsigned>(K::reduce_ctas(p)), K::kBlockThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
template cudaError_t block_sddmm_tc<__nv_bfloat16>(kern::BlockSddmmTcParams<__nv_bfloat16>, cudaStream_t);
template cudaError_t block_sddmm_tc<__half>(kern::BlockSddmmTcParams<__half>, cudaStream_t);

size_t nm_transpose_temp_bytes(int64_t nnz, int64_t C) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
                                  static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                  static_cast<int>(nnz), 0, key_bits(C));
  return bytes;
}

cudaError_t nm_transpose(const int64_t* col_idx, int64_t nnz, int64_t C, int64_t* keys, int64_t* ent_in, int64_t* ent,
                         int64_t* ptr, void* temp, size_t temp_bytes, cudaStream_t stream) {
  if (nnz > std::numeric_limits<int>::max()) return cudaErrorInvalidValue;  // cub's item count is an int
  const unsigned threads = kern::kTransposeThreads;
  if (nnz > 0) {
    iota_kernel<<<static_cast<unsigned>(kern::ceil_div(nnz, threads)), threads, 0, stream>>>(ent_in, nnz);
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) return st;
    // Keys are validated to lie in [0, C): sort them as unsigned over the low key_bits(C) bits. Stable.
    st = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, reinterpret_cast<const uint64_t*>(col_idx),
                                         reinterpret_cast<uint64_t*>(keys), ent_in, ent, static_cast<int>(nnz), 0,
                                         key_bits(C), stream);
    if (st != cudaSuccess) return st;
  }
  fill_ptr_kernel<<<static_cast<unsigned>(kern::ceil_div(C + 1, threads)), threads, 0, stream>>>(keys, nnz, C, ptr);
  return cudaGetLastError();
}

#define PADST_GATHER_INST(T, E) template cudaError_t gather_mm<T, E>(kern::GatherMmParams<T, E>, cudaStream_t);
#define PADST_GATHER_INST_E(E) PADST_CUDA_FOR_EACH_TYPE(PADST_GATHER_INST, E)
PADST_CUDA_FOR_EACH_ROWS(PADST_GATHER_INST_E)
#undef PADST_GATHER_INST_E
#undef PADST_GATHER_INST

#define PADST_BLOCK_TC_INST(T, D, N) template cudaError_t block_tc<T, D, N>(kern::BlockTcParams<T>, cudaStream_t);
PADST_BLOCK_TC_FOR_EACH(PADST_BLOCK_TC_INST)
#undef PADST_BLOCK_TC_INST

#define PADST_SDDMM_INST(T, F) template cudaError_t sddmm<T, F>(kern::SddmmParams<T, F>, cudaStream_t);
#define PADST_SDDMM_INST_F(F) PADST_CUDA_FOR_EACH_TYPE(PADST_SDDMM_INST, F)
PADST_CUDA_FOR_EACH_FLAT(PADST_SDDMM_INST_F)
#undef PADST_SDDMM_INST_F
#undef PADST_SDDMM_INST

}  // namespace padst::gpu
