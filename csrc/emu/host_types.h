// Numeric traits of the c10 16-bit types (see Num in csrc/kernels/portable.h), for the host emulation.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels/portable.h"

namespace padst::kern {

template <>
struct Num<c10::BFloat16> {
  using acc = float;
  static float to_acc(c10::BFloat16 v) { return static_cast<float>(v); }
  static c10::BFloat16 from_acc(float v) { return c10::BFloat16(v); }  // round to nearest even, as on the device
};
template <>
struct Num<c10::Half> {
  using acc = float;
  static float to_acc(c10::Half v) { return static_cast<float>(v); }
  static c10::Half from_acc(float v) { return c10::Half(v); }
};

}  // namespace padst::kern
