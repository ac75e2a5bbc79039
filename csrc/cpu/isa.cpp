#include "isa.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <string>

namespace padst::cpu {
namespace {

std::atomic<int> g_isa{-1};

Isa detect() {
#if PADST_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

std::string cpu_isa_op(std::optional<std::string> want) {
  if (want.has_value()) {
    const Isa* isa = std::find_if(std::begin(kIsas), std::end(kIsas), [&](Isa i) { return *want == isa_name(i); });
    TORCH_CHECK_VALUE(isa != std::end(kIsas), "padst::_cpu_isa: unknown ISA '", *want, "' (base, avx2 or avx512)");
    TORCH_CHECK_VALUE(static_cast<int>(*isa) <= static_cast<int>(best_isa()), "padst::_cpu_isa: this CPU does not ",
                      "support ", *want, " (best: ", isa_name(best_isa()), ")");
    g_isa.store(static_cast<int>(*isa));
  }
  return isa_name(current_isa());
}

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa current_isa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return v < 0 ? best_isa() : static_cast<Isa>(v);
}

const char* isa_name(Isa isa) {
  static constexpr const char* kNames[] = {"base", "avx2", "avx512"};  // by Isa value
  return kNames[static_cast<int>(isa)];
}

}  // namespace padst::cpu

TORCH_LIBRARY_FRAGMENT(padst, m) {
  // The ISA of the vectorised CPU kernels: returns it, or switches to `isa` first (base, avx2, avx512).
  m.def("_cpu_isa(str? isa=None) -> str", &padst::cpu::cpu_isa_op);
}
