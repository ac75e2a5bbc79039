// Host emulation of the CUDA kernels: runs the CTA bodies of csrc/kernels/*.h thread by thread and phase by
// phase, over the same grid the device launchers use. A phase boundary is a __syncthreads() on the device, so
// running every thread of a phase before the next phase starts reproduces the device semantics exactly (the
// bodies use no warp-level primitives). Used by the padst_emu ops (csrc/emu/emu_ops.cpp) to test the kernels'
// index and tile logic on machines without a GPU.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kernels/block_sddmm_tc.h"
#include "kernels/block_gw.h"
#include "kernels/block_rc.h"
#include "kernels/block_xs.h"
#include "kernels/block_tc.h"
#include "kernels/gather_mm.h"
#include "kernels/rows_v2.h"
#include "kernels/nm_transpose.h"
#include "kernels/permute_cols.h"
#include "kernels/sddmm.h"

namespace padst::emu {

// A CTA's dynamic shared memory for the emulation: 16-byte aligned, every byte 0xff (NaN in every float type), so a
// read of a place no phase wrote shows in the output.
inline std::vector<kern::sm80::V16> poisoned_smem(int64_t bytes) {
  std::vector<kern::sm80::V16> smem(static_cast<size_t>((bytes + 15) / 16));
  std::memset(smem.data(), 0xff, smem.size() * sizeof(kern::sm80::V16));
  return smem;
}

template <typename T, typename E>
void gather_mm(kern::GatherMmParams<T, E> p) {
  using K = kern::GatherMm<T, E>;
  p.staged = K::fits(p.in_cols);
  std::vector<T> xs(p.staged ? static_cast<size_t>(p.in_cols * K::kTileB) : 0);
  const int64_t n = K::num_ctas(p);
  for (int64_t cta = 0; cta < n; ++cta) {
    if (p.staged) {
      for (int tid = 0; tid < K::kBlockThreads; ++tid) K::stage(p, cta, tid, xs.data());
    }
    for (int tid = 0; tid < K::kBlockThreads; ++tid) K::compute(p, cta, tid, xs.data());
  }
}

template <typename T, typename F>
void sddmm(kern::SddmmParams<T, F> p) {
  using K = kern::Sddmm<T, F>;
  K::plan(p);
  std::vector<kern::acc_t<T>> partial(static_cast<size_t>(p.splits * p.nnz));
  p.partial = partial.data();
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta)
    for (int tid = 0; tid < K::kBlockThreads; ++tid) K::partial(p, cta, tid);
  for (int64_t cta = 0; cta < K::reduce_ctas(p); ++cta)
    for (int tid = 0; tid < K::kBlockThreads; ++tid) K::reduce(p, cta, tid);
}

// The tensor-core block kernel: SIMT phases run per thread, the warp-collective products once per warp.
template <typename T, bool kDx, int kOut16>
void block_tc(const kern::BlockTcParams<T>& p) {
  using K = kern::BlockTc<T, kDx, kOut16>;
  constexpr int kWarps = K::kBlockThreads / 32;
  std::vector<float> smem_f((K::smem_bytes(p) + sizeof(float) - 1) / sizeof(float));  // float-aligned
  T* xs = reinterpret_cast<T*>(smem_f.data());
  T* vs = xs + kern::kBlockTcRows * (K::bi(p) + K::kPad);
  float* ct = smem_f.data();
  std::vector<typename K::Mma::Acc> acc(kWarps * kOut16);
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    for (auto& a : acc) K::Mma::zero(a);
    const int64_t o = K::line(p, cta);
    for (int64_t q = p.ptr[o]; q < p.ptr[o + 1]; ++q) {
      for (int tid = 0; tid < K::kBlockThreads; ++tid) K::stage(p, cta, q, tid, xs, vs);
      for (int w = 0; w < kWarps; ++w) K::mma(p, w, xs, vs, acc.data() + w * kOut16);
    }
    for (int w = 0; w < kWarps; ++w) K::store(w, acc.data() + w * kOut16, ct);
    for (int tid = 0; tid < K::kBlockThreads; ++tid) K::epilogue(p, cta, tid, ct);
  }
}

// The x-stationary block kernel: phase "stage" per thread, then each warp's lines with the lane-parallel models of
// kernels/warp_sm80.h. Shared memory starts as NaN bytes, so a read of a place no phase wrote shows in the output.
// Calls of the emulated x-stationary kernel, so that tests can tell which kernel served (padst_emu::block_xs_calls).
inline std::atomic<int64_t>& block_xs_calls() {
  static std::atomic<int64_t> n{0};
  return n;
}

template <typename T, bool kDx, int kB>
void block_xs(const kern::BlockXsParams<T>& p) {
  block_xs_calls().fetch_add(1);
  using K = kern::BlockXs<T, kDx, kB>;
  using V16 = typename K::V16;
  std::vector<V16> smem = poisoned_smem(K::smem_bytes(p.in_cols));
  T* xs = reinterpret_cast<T*>(smem.data());
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    for (int tid = 0; tid < K::kThreads; ++tid) K::stage(p, cta, tid, xs);
    kern::sm80::host::async_copies().retire_all_but(0);  // every thread's cp_async_wait<0>(), then __syncthreads()
    for (int w = 0; w < K::kWarps; ++w)
      K::warp_lines(p, cta, w, kern::sm80::kAllLanes, xs, K::ring(p, xs, w), K::ost(p, xs, w));
  }
}

// The row-complete block kernel: each warp's phase "lines", then (after the CTA barrier) each warp's "store".
inline std::atomic<int64_t>& block_rc_calls() {
  static std::atomic<int64_t> n{0};
  return n;
}

template <typename T, bool kDx, int kB>
void block_rc(const kern::BlockRcParams<T>& p) {
  block_rc_calls().fetch_add(1);
  using K = kern::BlockRc<T, kDx, kB>;
  std::vector<kern::sm80::V16> smem = poisoned_smem(K::smem_bytes(p.out_cols));
  T* base = reinterpret_cast<T*>(smem.data());
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    for (int w = 0; w < K::kWarps; ++w)
      K::warp_lines(p, cta, w, kern::sm80::kAllLanes, K::ring(base, w), K::ostage(base));
    for (int w = 0; w < K::kWarps; ++w) K::store_rows(p, cta, w, kern::sm80::kAllLanes, K::ostage(base));
  }
}

// The v2 weight gradient: per CTA, the double-buffered stage / mma loop (phases per thread / per warp), then each
// warp's store; then the ordered reduction of the splits.
inline std::atomic<int64_t>& block_gw_calls() {
  static std::atomic<int64_t> n{0};
  return n;
}

template <typename T, int kB>
void block_gw(kern::BlockGwParams<T> p, int64_t max_row_blocks) {
  block_gw_calls().fetch_add(1);
  using K = kern::BlockGw<T, kB>;
  K::plan(p, max_row_blocks);
  std::vector<float> partial(static_cast<size_t>(p.splits) * p.nnzb * kB * kB);
  p.partial = partial.data();
  std::vector<kern::sm80::V16> smem = poisoned_smem(K::smem_bytes());
  T* base = reinterpret_cast<T*>(smem.data());
  std::vector<kern::sm80::WAcc<K::kAcc>> acc(K::kWarps);
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    int row, split, group, q0, q1;
    K::decode(p, cta, row, split, group);
    K::blocks(p, row, group, q0, q1);
    if (q0 >= q1) continue;
    const int64_t b_begin = split * p.chunk, b_end = std::min(p.B, b_begin + p.chunk);
    for (auto& a : acc) a.zero();
    int buf = 0;
    auto& copies = kern::sm80::host::async_copies();
    for (int tid = 0; tid < K::kThreads; ++tid) K::stage(p, row, q0, q1, b_begin, b_end, tid, base, 0);
    for (int64_t b0 = b_begin; b0 < b_end; b0 += K::kRows) {
      if (b0 + K::kRows < b_end) {  // each thread commits one group per stage: wait<1> keeps the newest in flight
        for (int tid = 0; tid < K::kThreads; ++tid) K::stage(p, row, q0, q1, b0 + K::kRows, b_end, tid, base, buf ^ 1);
        copies.retire_all_but(K::kThreads);
      } else {
        copies.retire_all_but(0);
      }
      for (int w = 0; w < K::kWarps; ++w) K::mma(q0, q1, w, kern::sm80::kAllLanes, base, buf, acc[w]);
      buf ^= 1;
    }
    copies.retire_all_but(0);
    for (int w = 0; w < K::kWarps; ++w) K::store(p, split, q0, q1, w, kern::sm80::kAllLanes, acc[w]);
  }
  for (int64_t cta = 0; cta < K::reduce_ctas(p); ++cta)
    for (int tid = 0; tid < K::kReduceThreads; ++tid) K::reduce(p, cta, tid);
}

template <typename T>
void block_sddmm_tc(kern::BlockSddmmTcParams<T> p) {
  using K = kern::BlockSddmmTc<T>;
  K::plan(p);
  std::vector<float> partial(static_cast<size_t>(p.splits * p.nnzb * p.br * p.bc));
  p.partial = partial.data();
  std::vector<float> smem_f((K::smem_bytes(p) + sizeof(float) - 1) / sizeof(float));
  T* dz = reinterpret_cast<T*>(smem_f.data());
  T* xs = dz + K::kRows * (p.br + K::kPad);
  std::vector<typename K::Mma::Acc> acc(K::kWarps * K::kTilesPerWarp);
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    for (auto& a : acc) K::Mma::zero(a);
    for (int64_t b0 = K::rows_begin(p, cta); b0 < K::rows_end(p, cta); b0 += K::kRows) {
      for (int tid = 0; tid < K::kBlockThreads; ++tid) K::stage(p, cta, b0, tid, dz, xs);
      for (int w = 0; w < K::kWarps; ++w) K::mma(p, w, dz, xs, acc.data() + w * K::kTilesPerWarp);
    }
    for (int w = 0; w < K::kWarps; ++w) K::store(p, w, acc.data() + w * K::kTilesPerWarp, smem_f.data());
    for (int tid = 0; tid < K::kBlockThreads; ++tid) K::epilogue(p, cta, tid, smem_f.data());
  }
  for (int64_t cta = 0; cta < K::reduce_ctas(p); ++cta)
    for (int tid = 0; tid < K::kBlockThreads; ++tid) K::reduce(p, cta, tid);
}

// The v2 row kernel (N:M forward, diagonal forward and dx): "stage" then "rows", per thread.
inline std::atomic<int64_t>& rows_v2_calls() {
  static std::atomic<int64_t> n{0};
  return n;
}

template <typename T, typename E, int kTB>
void rows_v2_tb(const kern::RowsV2Params<T, E>& p) {
  using K = kern::RowsV2<T, E, kTB>;
  std::vector<float> xs(static_cast<size_t>(K::smem_bytes(p.C) / 4), std::numeric_limits<float>::quiet_NaN());
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    for (int tid = 0; tid < K::kThreads; ++tid) K::stage(p, cta, tid, xs.data());
    for (int tid = 0; tid < K::kThreads; ++tid) K::rows(p, cta, tid, xs.data());
  }
}

template <typename T, typename E>
void rows_v2(const kern::RowsV2Params<T, E>& p) {
  rows_v2_calls().fetch_add(1);
  switch (kern::rows_v2_tile(p.C)) {
    case 32: rows_v2_tb<T, E, 32>(p); break;
    case 16: rows_v2_tb<T, E, 16>(p); break;
    default: rows_v2_tb<T, E, 8>(p); break;
  }
}

// The v2 row weight gradient: per CTA and entry group, "stage" and "accumulate" per thread over the split's batch rows,
// then "store"; then the ordered reduction of the splits.
template <typename T, typename E, int kTB>
void rows_gw_tb(kern::RowsGwParams<T, E> p) {
  using K = kern::RowsGw<T, E, kTB>;
  K::plan(p);
  std::vector<float> partial(static_cast<size_t>(p.splits) * p.nnz, std::numeric_limits<float>::quiet_NaN());
  p.partial = partial.data();
  std::vector<float> xs(static_cast<size_t>(K::smem_bytes(p.C) / 4), std::numeric_limits<float>::quiet_NaN());
  std::vector<std::array<std::array<float, K::kKG>, K::kRPT>> acc(K::kThreads);
  const int64_t tiles = K::row_tiles(p);
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta) {
    const int64_t split = cta / tiles, tile = cta - split * tiles;
    const int64_t b_begin = split * p.chunk, b_end = std::min(p.B, b_begin + p.chunk);
    for (int k0 = 0; k0 < p.K; k0 += K::kKG) {
      for (auto& a : acc)
        for (auto& row : a) row.fill(0.0f);
      for (int64_t b0 = b_begin; b0 < b_end; b0 += kTB) {
        for (int tid = 0; tid < K::kThreads; ++tid) K::stage(p, b0, b_end, tid, xs.data());
        for (int tid = 0; tid < K::kThreads; ++tid) {
          float a[K::kRPT][K::kKG];
          for (int j = 0; j < K::kRPT; ++j)
            for (int kk = 0; kk < K::kKG; ++kk) a[j][kk] = acc[tid][j][kk];
          K::accumulate(p, tile, k0, b0, b_end, tid, xs.data(), a);
          for (int j = 0; j < K::kRPT; ++j)
            for (int kk = 0; kk < K::kKG; ++kk) acc[tid][j][kk] = a[j][kk];
        }
      }
      for (int tid = 0; tid < K::kThreads; ++tid) {
        float a[K::kRPT][K::kKG];
        for (int j = 0; j < K::kRPT; ++j)
          for (int kk = 0; kk < K::kKG; ++kk) a[j][kk] = acc[tid][j][kk];
        K::store(p, tile, static_cast<int>(split), k0, tid, a);
      }
    }
  }
  for (int64_t cta = 0; cta < K::reduce_ctas(p); ++cta)
    for (int tid = 0; tid < K::kReduceThreads; ++tid) K::reduce(p, cta, tid);
}

template <typename T, typename E>
void rows_gw(const kern::RowsGwParams<T, E>& p) {
  rows_v2_calls().fetch_add(1);
  switch (kern::rows_v2_tile(p.C)) {
    case 32: rows_gw_tb<T, E, 32>(p); break;
    case 16: rows_gw_tb<T, E, 16>(p); break;
    default: rows_gw_tb<T, E, 8>(p); break;
  }
}

// The column permutation: each warp's row, lane-parallel.
template <typename T>
void permute_cols(const kern::PermuteColsParams<T>& p) {
  using K = kern::PermuteCols<T>;
  std::vector<kern::sm80::V16> smem = poisoned_smem(K::smem_bytes(p.cols));
  T* base = reinterpret_cast<T*>(smem.data());
  for (int64_t cta = 0; cta < K::num_ctas(p); ++cta)
    for (int w = 0; w < K::kWarps; ++w)
      K::warp_row(p, cta, w, kern::sm80::kAllLanes, base + static_cast<int64_t>(w) * p.cols);
}

// ent [nnz], ptr [C+1] as described in nm_transpose.h.
inline void nm_transpose(const int64_t* col_idx, int64_t nnz, int64_t C, int64_t* ent, int64_t* ptr) {
  using K = kern::NmTranspose;
  std::vector<int64_t> ent_in(nnz), keys(nnz);
  const int64_t nb = kern::ceil_div(nnz, kern::kTransposeThreads);
  for (int64_t cta = 0; cta < nb; ++cta)
    for (int tid = 0; tid < kern::kTransposeThreads; ++tid) K::iota(ent_in.data(), nnz, cta, tid);
  std::copy(ent_in.begin(), ent_in.end(), ent);
  std::stable_sort(ent, ent + nnz, [&](int64_t a, int64_t b) { return col_idx[a] < col_idx[b]; });
  for (int64_t i = 0; i < nnz; ++i) keys[i] = col_idx[ent[i]];
  const int64_t np = kern::ceil_div(C + 1, kern::kTransposeThreads);
  for (int64_t cta = 0; cta < np; ++cta)
    for (int tid = 0; tid < kern::kTransposeThreads; ++tid) K::fill_ptr(keys.data(), nnz, C, ptr, cta, tid);
}

}  // namespace padst::emu
