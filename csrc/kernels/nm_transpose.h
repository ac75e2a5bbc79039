// The transpose of an N:M pattern, for the dx kernel (CTA bodies; see portable.h).
//
// Entries e = r*K + k of col_idx [R, K] are sorted stably by column (ascending e within a column): `ent` lists
// them, `ptr [C+1]` delimits each column's run. On the device the stable sort is cub's radix sort of
// (col_idx[e], e) pairs; the host emulation uses std::stable_sort. Both then fill ptr with the bodies below.
#pragma once

#include "portable.h"

namespace padst::kern {

inline constexpr int kTransposeThreads = 256;

struct NmTranspose {
  // iota: ent_in[e] = e
  PADST_HD static void iota(int64_t* ent_in, int64_t nnz, int64_t cta, int tid) {
    const int64_t e = cta * kTransposeThreads + tid;
    if (e < nnz) ent_in[e] = e;
  }
  // ptr[c] = first position of column c in the sorted keys (lower bound), c in [0, C]
  PADST_HD static void fill_ptr(const int64_t* sorted_keys, int64_t nnz, int64_t C, int64_t* ptr, int64_t cta,
                                int tid) {
    const int64_t c = cta * kTransposeThreads + tid;
    if (c > C) return;
    int64_t lo = 0, hi = nnz;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_keys[mid] < c) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    ptr[c] = lo;
  }
};

}  // namespace padst::kern
