// Per-machine tuning of the vectorised CPU kernels (the way oneDNN, FBGEMM and ATLAS choose micro-kernel parameters
// on the machine that runs them, not the one they were written on).
//
// A kernel family describes its variants as a small space of integer parameters (register tile, packing, panel,
// ...), one of whose points is the fixed default. At the first call of a shape class (the family's key: ISA, dtype,
// threads, batch size class, the layer's shape, sparsity and permutation sides) choose() times the candidates on
// that very call's data and keeps the fastest; later calls of the class look it up. The search is coordinate descent
// (one parameter at a time, the others at their best so far) from the best of the default and the family's seeds,
// under a time budget; then the search's fastest points and the default run off in alternating rounds, and a change
// is kept only if it clearly beats the default there (tune.cpp: kRunoff). A shape class costs at most about a hundred
// kernel calls and under 1 s (a class whose default runs in under 20 us keeps it unmeasured). Every variant computes
// the same sums in the same order, so the choice never changes a result (tests/test_tuning.py runs every variant and
// compares it with the reference and, element for element, with the default).
//
// PADST_CPU_TUNE=0 (or torch.ops.padst._cpu_tune("off"), padst_ext.tuning.set_enabled(False)) turns tuning off:
// every call then runs the default point. padst_ext.tuning keeps the choices on disk when PADST_CPU_TUNE_CACHE names
// a file (keyed by CPU model and ISA).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

namespace padst::cpu::tune {

// A parameter space: dims[d] takes values[d][0..], default point `def` (indices into values). `seeds`: points (values,
// not indices) measured before the descent, whose parameters only pay together (the block kernel's in-place reads
// with a tall register tile: each alone is no faster than the default, so one parameter at a time never finds them).
struct Space {
  std::vector<const char*> names;
  std::vector<std::vector<int>> values;
  std::vector<int> def;
  std::vector<std::vector<int>> seeds = {};
};

// A point of the space: one value (not index) per parameter.
using Point = std::vector<int>;

// The point to run for `key`: the default when tuning is off, the cached choice, or measured now. Measuring calls
// run(p) for candidate points p that valid(p) accepts (run computes the whole result into the caller's output) and
// leaves the result of the chosen point in the output.
Point choose(const std::string& key, const Space& space, const std::function<bool(const Point&)>& valid,
             const std::function<void(const Point&)>& run);

// Whether choose() measures (PADST_CPU_TUNE unset or not 0/off/false).
bool enabled();

// "mr=6,nrv=2,..." for a point of `space`.
std::string point_name(const Space& space, const Point& p);

// A chosen parameter as a compile-time constant: f(std::integral_constant<int, V>{}) for the V of Vs equal to v
// (a parameter's space lists only values the kernel instantiates; any other is an internal error).
template <int... Vs, typename F>
void with_value(const char* what, int v, F&& f) {
  const bool hit = ((v == Vs ? (f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  TORCH_INTERNAL_ASSERT(hit, what, "=", v, " has no compiled kernel");
}

}  // namespace padst::cpu::tune
