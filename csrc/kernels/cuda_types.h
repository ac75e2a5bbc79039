// Numeric traits of the CUDA 16-bit types (see Num in portable.h). Usable from nvcc and the host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "portable.h"

namespace padst::kern {

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  PADST_HD static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  PADST_HD static __nv_bfloat16 from_acc(float v) { return __float2bfloat16(v); }  // round to nearest even
};
template <>
struct Num<__half> {
  using acc = float;
  PADST_HD static float to_acc(__half v) { return __half2float(v); }
  PADST_HD static __half from_acc(float v) { return __float2half(v); }  // round to nearest even
};

}  // namespace padst::kern
