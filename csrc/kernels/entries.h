// How each structure enumerates its non-zeros, for the kernels in gather_mm.h and sddmm.h.
//
// Row view (gather_mm, the CPU row kernels): an output row r of z = W_eff · in_p has entries p in [begin(r), end(r));
// at(r, p, col, v) gives the input column `col` (in the permuted frame) and the index `v` of the value in `values`,
// and returns false for a slot that holds no entry (diagonals that miss a row). The forward walks the rows of S, dx
// the rows of S^T (CSC metadata for blocks, a sorted transpose for N:M, arithmetic for diagonals).
// Names say which rows are walked, in terms of S: <Structure>Rows walks the rows of S (the forward), and
// <Structure>ColRows walks the columns of S as rows (dx). A ColRows walker reads the pattern compressed by column,
// which is at once the CSC form of S and the CSR form of S^T, so "Csr" / "Csc" are never part of a walker's name.
//
// Flat view (sddmm): entry e in [0, nnz) of `values` sits at (row, col) of S.
#pragma once

#include "portable.h"

namespace padst::kern {

// ------------------------------------------------------------------------------------------------ N:M
// Forward rows: row r holds K = C*n/m entries, col_idx[r, k] already holds perm[logical column].
template <typename I>
struct NmRows {
  const I* col_idx;
  int64_t K;
  PADST_HD int64_t begin(int64_t r) const { return r * K; }
  PADST_HD int64_t end(int64_t r) const { return (r + 1) * K; }
  PADST_HD bool at(int64_t, int64_t p, int64_t& col, int64_t& v) const {
    v = p;
    col = static_cast<int64_t>(col_idx[p]);
    return true;
  }
};

// The columns of S as rows (dx): column c holds the entries e (flat index r*K + k, ascending) with col_idx[e] == c;
// ptr [C+1] delimits them in `ent`. The forward row of entry e is computed, e / K (the GPU's: no array to read).
struct NmColRows {
  const int64_t* ptr;
  const int64_t* ent;
  int64_t K;
  PADST_HD int64_t begin(int64_t c) const { return ptr[c]; }
  PADST_HD int64_t end(int64_t c) const { return ptr[c + 1]; }
  PADST_HD bool at(int64_t, int64_t p, int64_t& col, int64_t& v) const {
    v = ent[p];
    col = v / K;
    return true;
  }
};

// The same walk with each entry's forward row and value index stored (src, val: no division per entry; the CPU's).
struct NmColRowsStored {
  const int64_t* ptr;
  const int64_t* src;
  const int64_t* val;
  PADST_HD int64_t begin(int64_t c) const { return ptr[c]; }
  PADST_HD int64_t end(int64_t c) const { return ptr[c + 1]; }
  PADST_HD bool at(int64_t, int64_t p, int64_t& col, int64_t& v) const {
    col = src[p];
    v = val[p];
    return true;
  }
};

template <typename I>
struct NmFlat {
  const I* col_idx;
  int64_t K;
  PADST_HD void rc(int64_t e, int64_t& row, int64_t& col) const {
    row = e / K;
    col = static_cast<int64_t>(col_idx[e]);
  }
};

// ------------------------------------------------------------------------------------------------ blocks
// Forward rows: row r lies in block-row i = r / br; its entries are the bc columns of each block k of that
// block-row, enumerated p = k * bc + cc for k in [row_ptr[i], row_ptr[i+1]).
struct BlockRows {
  const int64_t* row_ptr;
  const int64_t* col_idx;
  int64_t br, bc;
  PADST_HD int64_t begin(int64_t r) const { return row_ptr[r / br] * bc; }
  PADST_HD int64_t end(int64_t r) const { return row_ptr[r / br + 1] * bc; }
  PADST_HD bool at(int64_t r, int64_t p, int64_t& col, int64_t& v) const {
    const int64_t k = p / bc, cc = p - k * bc;
    col = col_idx[k] * bc + cc;
    v = (k * br + (r - (r / br) * br)) * bc + cc;
    return true;
  }
};

// Transposed rows (dx): column c lies in block-column j = c / bc; its entries are the br rows of each block of
// that block-column in CSC order, p = q * br + rr for q in [col_ptr[j], col_ptr[j+1]); blk_t[q] is the block's
// index in `values`, row_idx_t[q] its block-row.
struct BlockColRows {
  const int64_t* col_ptr;
  const int64_t* row_idx_t;
  const int64_t* blk_t;
  int64_t br, bc;
  PADST_HD int64_t begin(int64_t c) const { return col_ptr[c / bc] * br; }
  PADST_HD int64_t end(int64_t c) const { return col_ptr[c / bc + 1] * br; }
  PADST_HD bool at(int64_t c, int64_t p, int64_t& col, int64_t& v) const {
    const int64_t q = p / br, rr = p - q * br;
    col = row_idx_t[q] * br + rr;
    v = (blk_t[q] * br + rr) * bc + (c - (c / bc) * bc);
    return true;
  }
};

struct BlockFlat {
  const int64_t* blk_row;
  const int64_t* col_idx;
  int64_t br, bc;
  PADST_HD void rc(int64_t e, int64_t& row, int64_t& col) const {
    const int64_t area = br * bc;
    const int64_t k = e / area, rem = e - k * area;
    const int64_t rr = rem / bc, cc = rem - rr * bc;
    row = blk_row[k] * br + rr;
    col = col_idx[k] * bc + cc;
  }
};

// ------------------------------------------------------------------------------------------------ diagonals
// Diagonal k holds L = min(R, C) values; offsets o_k in [0, P) with P = max(R, C).
//   R >= C (tall): entry t at (row, col) = ((t + o) mod R, t)      R < C (wide): (t, (t + o) mod C)
// Both the forward and dx rows take one of two forms, with P the wrapped dimension:
//   kDirect:  row r is entry t = r of every diagonal, col = (r + o) mod P          (wide forward, tall dx)
//   kShifted: row r is entry t = (r - o) mod P of each diagonal, if t < L; col = t   (tall forward, wide dx)
struct DiagRows {
  const int64_t* offsets;
  int64_t K, L, P;
  bool shifted;
  PADST_HD int64_t begin(int64_t) const { return 0; }
  PADST_HD int64_t end(int64_t) const { return K; }
  PADST_HD bool at(int64_t r, int64_t k, int64_t& col, int64_t& v) const {
    const int64_t o = offsets[k];
    if (shifted) {
      const int64_t t = wrap(r - o, P);
      if (t >= L) return false;
      col = t;
      v = k * L + t;
    } else {
      col = wrap(r + o, P);
      v = k * L + r;
    }
    return true;
  }
};

struct DiagFlat {
  const int64_t* offsets;
  int64_t L, R, C;
  PADST_HD void rc(int64_t e, int64_t& row, int64_t& col) const {
    const int64_t k = e / L, t = e - k * L;
    const int64_t o = offsets[k];
    if (R >= C) {
      row = wrap(t + o, R);
      col = t;
    } else {
      row = t;
      col = wrap(t + o, C);
    }
  }
};

}  // namespace padst::kern
