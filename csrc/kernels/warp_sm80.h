// Warp-level SM80 tensor-core primitives (ldmatrix, mma.sync m16n8k16, cp.async) with a host model of each, so
// that kernels written with them run in the emulation (csrc/emu/emulate.h) and their fragment and address logic
// is tested on machines without a GPU.
//
// These are the same PTX instructions as CuTe's SM75_U32x4_LDSM_N / SM75_U16x8_LDSM_T, SM80_16x8x16_F32BF16BF16F32_TN
// (and its F16 twin) and SM80_CP_ASYNC_CACHEGLOBAL atoms; they are written out here (not included from CUTLASS)
// because each needs a host model beside it and the GPU machine that checks them cannot install packages.
//
// Programming model. A warp body is written once and runs in two ways:
//   device: every lane runs it with its own `lane`; a warp register (WReg) is the lane's own registers;
//   host:   it runs once per warp with lane = kAllLanes; a WReg holds the registers of all 32 lanes, the collective
//           primitives (ldsm_x4, ldsm_x4_trans, mma_16816) model the whole warp at once, and each_lane(lane, f)
//           calls f for every lane in turn (on the device: f(lane) once).
// The host models follow the PTX ISA's fragment tables (9.7.13.4.8 "Matrix Fragments for mma.m16n8k16",
// 9.7.8.x ldmatrix), so a kernel that gets a fragment or address wrong fails in the emulation tests, not only on a
// GPU. cp.async is modelled as deferred (a copy lands when a wait_group retires its group), so a read of a ring slot
// before its wait shows in the emulation. What it cannot check: barriers (a missing __syncwarp / __syncthreads),
// bank conflicts, alignment faults and speed; those are for the GPU tests, compute-sanitizer
// (benchmarks/v2_sanitize.py) and the SASS check (tests/test_sass.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if !defined(__CUDACC__)
#include <vector>
#endif

#include "portable.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define PADST_WARP_HD __device__ __forceinline__
#else
#define PADST_WARP_HD inline
#endif

namespace padst::kern::sm80 {

inline constexpr int kAllLanes = -1;

// A warp's registers: N 32-bit registers per lane.
template <int N>
struct WReg {
#if defined(__CUDACC__)
  uint32_t r[N];
  __device__ __forceinline__ uint32_t& at(int, int i) { return r[i]; }
  __device__ __forceinline__ uint32_t at(int, int i) const { return r[i]; }
#else
  uint32_t r[32][N];
  uint32_t& at(int lane, int i) { return r[lane][i]; }
  uint32_t at(int lane, int i) const { return r[lane][i]; }
#endif
};

// A warp's float accumulators: N per lane.
template <int N>
struct WAcc {
#if defined(__CUDACC__)
  float v[N];
  __device__ __forceinline__ float* lane(int) { return v; }
  __device__ __forceinline__ const float* lane(int) const { return v; }
#else
  float v[32][N];
  float* lane(int l) { return v[l]; }
  const float* lane(int l) const { return v[l]; }
#endif
  PADST_WARP_HD void zero() {
#if defined(__CUDACC__)
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = 0.0f;
#else
    for (auto& row : v)
      for (float& x : row) x = 0.0f;
#endif
  }
};

// f(l) for this lane (device) or for every lane (host).
template <typename F>
PADST_WARP_HD void each_lane(int lane, F&& f) {
#if defined(__CUDACC__)
  f(lane);
#else
  (void)lane;
  for (int l = 0; l < 32; ++l) f(l);
#endif
}

PADST_WARP_HD void syncwarp() {
#if defined(__CUDACC__)
  __syncwarp();
#endif
}

#if !defined(__CUDACC__)
namespace host {
template <typename T>
uint16_t bits(T v) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}
template <typename T>
float to_float(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  return Num<T>::to_acc(v);
}
inline uint32_t pack(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }
}  // namespace host
#endif

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 matrices of 16-bit elements; lane l supplies (through
// row_addr(l)) the address of row l % 8 of matrix l / 8, 16 contiguous bytes, 16-byte aligned. Register i of lane l
// receives elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i, the lower column in the low half.
template <typename T, typename Addr>
PADST_WARP_HD void ldsm_x4(WReg<4>& r, int lane, Addr&& row_addr) {
#if defined(__CUDACC__)
  const T* p = row_addr(lane);
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.r[0]), "=r"(r.r[1]), "=r"(r.r[2]), "=r"(r.r[3])
               : "r"(s));
#else
  (void)lane;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const T* row = row_addr(i * 8 + l / 4);
      r.at(l, i) = host::pack(host::bits(row[2 * (l % 4)]), host::bits(row[2 * (l % 4) + 1]));
    }
#endif
}

// The same with .trans: register i of lane l receives elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) of
// matrix i (rows as stored, i.e. the transpose of the stored matrix is distributed like ldsm_x4 does).
template <typename T, typename Addr>
PADST_WARP_HD void ldsm_x4_trans(WReg<4>& r, int lane, Addr&& row_addr) {
#if defined(__CUDACC__)
  const T* p = row_addr(lane);
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.r[0]), "=r"(r.r[1]), "=r"(r.r[2]), "=r"(r.r[3])
               : "r"(s));
#else
  (void)lane;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const T* lo = row_addr(i * 8 + 2 * (l % 4));
      const T* hi = row_addr(i * 8 + 2 * (l % 4) + 1);
      r.at(l, i) = host::pack(host::bits(lo[l / 4]), host::bits(hi[l / 4]));
    }
#endif
}

template <typename T>
struct MmaName;

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D(16x8) += A(16x16) B(16x8), float accumulators. With
// g = l / 4, t = l % 4 (lane l):
//   A regs a0..a3: (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)      [row, k], low half = lower k
//   B regs b0, b1: (2t..2t+1, g), (2t+8.., g)                                  [k, col]
//   C c0..c3:      (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)                  [row, col]
// a: registers a_off..a_off+3 of a WReg (one ldsm_x4 fills the A operand of one m16 tile);
// b: registers b_off, b_off+1 of a WReg (one ldsm_x4 fills the B operands of two n8 tiles);
// c: accumulators c_off..c_off+3 of a WAcc.
template <typename T, int NA, int NB, int NC>
PADST_WARP_HD void mma_16816(WAcc<NC>& c, int c_off, const WReg<NA>& a, int a_off, const WReg<NB>& b, int b_off,
                             int lane) {
#if defined(__CUDACC__)
  (void)lane;
  float* d = c.v + c_off;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.r[a_off]), "r"(a.r[a_off + 1]), "r"(a.r[a_off + 2]), "r"(a.r[a_off + 3]), "r"(b.r[b_off]),
          "r"(b.r[b_off + 1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.r[a_off]), "r"(a.r[a_off + 1]), "r"(a.r[a_off + 2]), "r"(a.r[a_off + 3]), "r"(b.r[b_off]),
          "r"(b.r[b_off + 1]));
  }
#else
  (void)lane;
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const int ar[4] = {g, g + 8, g, g + 8}, ak[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = a.at(l, a_off + i);
      A[ar[i]][ak[i]] = host::to_float<T>(static_cast<uint16_t>(v & 0xffffu));
      A[ar[i]][ak[i] + 1] = host::to_float<T>(static_cast<uint16_t>(v >> 16));
    }
    for (int i = 0; i < 2; ++i) {
      const uint32_t v = b.at(l, b_off + i);
      B[2 * t + 8 * i][g] = host::to_float<T>(static_cast<uint16_t>(v & 0xffffu));
      B[2 * t + 8 * i + 1][g] = host::to_float<T>(static_cast<uint16_t>(v >> 16));
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = c.lane(l) + c_off;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float s = 0.0f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      d[i] += s;
    }
  }
#endif
}

// Coordinates (row, col) in the 16x8 tile of accumulator i (0..3) of lane l (the C table above).
PADST_HD int acc_row(int l, int i) { return l / 4 + (i >= 2 ? 8 : 0); }
PADST_HD int acc_col(int l, int i) { return 2 * (l % 4) + (i & 1); }

// 16-byte moves between global/shared memory and registers. Device: one 128-bit load or store (addresses 16-byte
// aligned). Host: memcpy, so the emulation never reads an object through a type it was not written as.
struct alignas(16) V16 {
  uint32_t w[4];
};
PADST_WARP_HD V16 load16(const void* src) {
#if defined(__CUDACC__)
  const uint4 u = *reinterpret_cast<const uint4*>(src);
  return V16{{u.x, u.y, u.z, u.w}};
#else
  V16 v;
  std::memcpy(&v, src, 16);
  return v;
#endif
}
PADST_WARP_HD void store16(void* dst, const V16& v) {
#if defined(__CUDACC__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  std::memcpy(dst, &v, 16);
#endif
}
// Element j (0..7) of 8 packed 16-bit values.
template <typename T>
PADST_WARP_HD T elem16(const V16& v, int j) {
  const uint16_t bits = static_cast<uint16_t>(v.w[j >> 1] >> (16 * (j & 1)));
  T t;
  std::memcpy(&t, &bits, 2);
  return t;
}

// Element j of the 16 bytes as a 2- or 4-byte type (j < 16 / sizeof(T)).
template <typename T>
PADST_WARP_HD T elem(const V16& v, int j) {
  if constexpr (sizeof(T) == 2) {
    return elem16<T>(v, j);
  } else {
    static_assert(sizeof(T) == 4, "2- or 4-byte element types");
    const uint32_t w = v.w[j];
    T t;
    std::memcpy(&t, &w, 4);
    return t;
  }
}

// Four floats from shared memory in one 16-byte load (p 16-byte aligned).
PADST_WARP_HD void lds4(float (&q)[4], const float* p) {
#if defined(__CUDACC__)
  const float4 f = *reinterpret_cast<const float4*>(p);
  q[0] = f.x;
  q[1] = f.y;
  q[2] = f.z;
  q[3] = f.w;
#else
  std::memcpy(q, p, 16);
#endif
}

// Two adjacent 16-bit values as one 32-bit store (dst 4-byte aligned).
template <typename T>
PADST_WARP_HD void store_pair(T* dst, T lo, T hi) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  uint16_t b[2];
  std::memcpy(&b[0], &lo, 2);
  std::memcpy(&b[1], &hi, 2);
  const uint32_t w = static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 16);
#if defined(__CUDACC__)
  *reinterpret_cast<uint32_t*>(dst) = w;
#else
  std::memcpy(dst, &w, 4);
#endif
}

#if !defined(__CUDACC__)
namespace host {
// The emulation's model of cp.async: a copy is taken from the source when issued and lands in shared memory only
// when a wait_group retires its group, so a kernel that reads a slot before waiting for it reads stale (or NaN-
// poisoned) data in the emulation, as it may on the GPU. One queue per host thread: the emulation runs a CTA's
// threads and warps one after another, and each of them waits for its own groups (see csrc/emu/emulate.h).
struct AsyncCopies {
  struct Copy {
    void* dst;
    unsigned char bytes[16];
  };
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
  void retire_all_but(size_t n) {
    while (groups.size() > n) {
      for (const Copy& c : groups.front()) std::memcpy(c.dst, c.bytes, 16);
      groups.erase(groups.begin());
    }
  }
};
inline AsyncCopies& async_copies() {
  thread_local AsyncCopies q;
  return q;
}
}  // namespace host
#endif

// cp.async.cg.shared.global 16 bytes (L2 only: streamed data), and the group fence / wait. Host: the model above.
PADST_WARP_HD void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDACC__)
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src));
#else
  host::AsyncCopies::Copy c;
  c.dst = smem_dst;
  std::memcpy(c.bytes, gmem_src, 16);
  host::async_copies().open.push_back(c);
#endif
}
PADST_WARP_HD void cp_async_commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  host::AsyncCopies& q = host::async_copies();
  q.groups.push_back(std::move(q.open));
  q.open.clear();
#endif
}
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
PADST_WARP_HD void cp_async_wait() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#else
  host::async_copies().retire_all_but(N);
#endif
}

}  // namespace padst::kern::sm80
