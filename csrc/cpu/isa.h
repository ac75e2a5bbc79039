// Runtime CPU dispatch for the vectorised kernels (csrc/cpu/rows_*.h, block_*.h, diag_mm.h, gather_dot.h).
//
// The extension is compiled for the baseline x86-64 ISA; the hot loops are compiled two more times, for AVX2+FMA
// and for AVX-512, through GCC/Clang function target attributes, and the widest one the CPU supports is chosen at
// run time by dispatch_isa() below, the one place that turns the run-time ISA into code. Only dispatch_isa's three
// entry functions carry a target attribute; the kernel bodies are always-inline templates without one, compiled for
// an ISA by being inlined into its entry function (no inline function is ever compiled for a wider ISA than its
// callers, so there is no ODR hazard).
// torch.ops.padst._cpu_isa("avx2" | "avx512" | "base") switches for tests and benchmarks; it refuses an ISA
// the CPU lacks.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PADST_X86_DISPATCH 1
#define PADST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PADST_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define PADST_X86_DISPATCH 0
#define PADST_TARGET_AVX2
#define PADST_TARGET_AVX512
#endif
#define PADST_ALWAYS_INLINE inline __attribute__((always_inline))
// Marks the lambda given to dispatch_isa: `[&](auto isa) PADST_ISA_BODY { ... }`. It must be inlined into the
// entry function to be compiled for its ISA (an out-of-line lambda body would be baseline code, silently slow).
#define PADST_ISA_BODY __attribute__((always_inline))

namespace padst::cpu {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
inline constexpr Isa kIsas[] = {Isa::kBase, Isa::kAvx2, Isa::kAvx512};

// The widest ISA this CPU supports.
Isa best_isa();
// The ISA the kernels use now (best_isa() unless switched).
Isa current_isa();
// "base", "avx2" or "avx512" (the names _cpu_isa takes).
const char* isa_name(Isa isa);

// Floats per SIMD vector: 4 (SSE2), 8 (AVX2), 16 (AVX-512).
constexpr int vec_floats(Isa isa) { return isa == Isa::kAvx512 ? 16 : (isa == Isa::kAvx2 ? 8 : 4); }

// The ISA whose vectors hold vw floats (the inverse of vec_floats).
constexpr Isa isa_of_width(int vw) { return vw >= 16 ? Isa::kAvx512 : (vw == 8 ? Isa::kAvx2 : Isa::kBase); }

// An ISA as a type, what a dispatch_isa body receives: `decltype(isa)::vw` is a compile-time vector width.
template <Isa I>
struct IsaTag {
  static constexpr Isa isa = I;
  static constexpr int vw = vec_floats(I);
};

namespace isa_detail {
template <typename F>
PADST_TARGET_AVX512 void run_avx512(const F& body) {
  body(IsaTag<Isa::kAvx512>{});
}
template <typename F>
PADST_TARGET_AVX2 void run_avx2(const F& body) {
  body(IsaTag<Isa::kAvx2>{});
}
template <typename F>
void run_base(const F& body) {
  body(IsaTag<Isa::kBase>{});
}
}  // namespace isa_detail

// Runs body(IsaTag<isa>{}) compiled for `isa`: body is a PADST_ISA_BODY lambda that calls the always-inline kernel
// body with the tag's vector width, e.g.
//   dispatch_isa(current_isa(), [&](auto isa) PADST_ISA_BODY { rows_body<decltype(isa)::vw>(...); });
// Off x86 only the baseline is instantiated.
template <typename F>
void dispatch_isa(Isa isa, const F& body) {
#if PADST_X86_DISPATCH
  switch (isa) {
    case Isa::kAvx512: isa_detail::run_avx512(body); return;
    case Isa::kAvx2: isa_detail::run_avx2(body); return;
    case Isa::kBase: break;
  }
#endif
  (void)isa;
  isa_detail::run_base(body);
}

}  // namespace padst::cpu
