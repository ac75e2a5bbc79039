// Backend<true> of the CUDA host layer (cuda/host_dispatch.h): every kernel runs on the host through the kernel
// emulation (emulate.h), on CPU tensors. Used only by the test library padst_emu (emu_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "cuda/host_dispatch.h"
#include "emu/emulate.h"
#include "emu/host_types.h"

namespace padst::impl {

template <>
struct Backend<true> {
  template <typename S>
  using type = S;  // the emulation computes with c10::BFloat16 / c10::Half (rounding as on the device)
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static void check_device(const char* op, const char* what, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, " (host emulation): ", what, " must be a CPU tensor, got ", t.device());
  }
  template <typename T, typename E>
  static void gather_mm(const kern::GatherMmParams<T, E>& p) {
    emu::gather_mm(p);
  }
  template <typename T, typename F>
  static void sddmm(kern::SddmmParams<T, F> p, const at::Tensor&) {
    emu::sddmm(p);
  }
  template <typename T, bool kDx, int kOut16>
  static void block_tc(const kern::BlockTcParams<T>& p) {
    emu::block_tc<T, kDx, kOut16>(p);
  }
  template <typename T, bool kDx, int kB>
  static void block_xs(const kern::BlockXsParams<T>& p) {
    emu::block_xs<T, kDx, kB>(p);
  }
  template <typename T, bool kDx, int kB>
  static void block_rc(const kern::BlockRcParams<T>& p) {
    emu::block_rc<T, kDx, kB>(p);
  }
  template <typename T, int kB>
  static void block_gw(const kern::BlockGwParams<T>& p, int64_t max_row_blocks, const at::Tensor&) {
    emu::block_gw<T, kB>(p, max_row_blocks);
  }
  static int64_t block_v2_max_smem() { return kern::kBlockXsMaxSmem; }  // the emulation models an H100/H200
  template <typename T, typename E>
  static void rows_v2(const kern::RowsV2Params<T, E>& p) {
    emu::rows_v2<T, E>(p);
  }
  template <typename T, typename E>
  static void rows_gw(const kern::RowsGwParams<T, E>& p, const at::Tensor&) {
    emu::rows_gw<T, E>(p);
  }
  template <typename T>
  static void block_sddmm_tc(kern::BlockSddmmTcParams<T> p, const at::Tensor&) {
    emu::block_sddmm_tc(p);
  }
  // Stable transpose of the N:M pattern: (ent [nnz], ptr [C+1]).
  static std::pair<at::Tensor, at::Tensor> nm_transpose(const at::Tensor& col_idx64, int64_t C) {
    const int64_t nnz = col_idx64.numel();
    auto ent = at::empty({nnz}, col_idx64.options());
    auto ptr = at::empty({C + 1}, col_idx64.options());
    emu::nm_transpose(col_idx64.const_data_ptr<int64_t>(), nnz, C, ent.mutable_data_ptr<int64_t>(),
                      ptr.mutable_data_ptr<int64_t>());
    return {ent, ptr};
  }
};

}  // namespace padst::impl
