// The tuner's key (tune.h) for the kernel families of the row-walking kernels (block_mm.h, rows_mm.h).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "isa.h"

namespace padst::cpu::rk {

template <typename T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "f32";
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return "bf16";
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return "f16";
  } else {
    return "other";
  }
}

// The tuner's key for a call of a row-walking family: ISA, element type, threads, batch size class (its power of
// two), then the family's own shape fields.
template <typename T>
std::string tune_key(const char* family, int64_t B, const std::string& shape) {
  int lg = 0;
  while ((int64_t{2} << lg) <= B) ++lg;
  return std::string(family) + " " + isa_name(current_isa()) + " " + dtype_name<T>() + " t" +
         std::to_string(at::get_num_threads()) + " B2^" + std::to_string(lg) + " " + shape;
}

}  // namespace padst::cpu::rk
