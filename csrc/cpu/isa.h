// Runtime CPU dispatch for the vectorised kernels (csrc/cpu/row_kernels.h).
//
// The extension is compiled for the baseline x86-64 ISA; the hot loops are compiled two more times, for AVX2+FMA
// and for AVX-512, through GCC/Clang function target attributes on thin wrappers around always-inline bodies, and
// the widest one the CPU supports is chosen at run time. Only the wrappers carry the attribute (no inline
// function is ever compiled for a wider ISA than its callers), so there is no ODR hazard.
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

namespace padst::cpu {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest ISA this CPU supports.
Isa best_isa();
// The ISA the kernels use now (best_isa() unless switched).
Isa current_isa();
const char* isa_name(Isa isa);

}  // namespace padst::cpu
