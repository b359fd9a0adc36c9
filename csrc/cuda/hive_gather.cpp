// ATen glue of the CUDA hive_gather and hive_gather_backward (docs/design.md §1.2): input checks,
// outputs, the host-side index check, the environment switches and the registration. Plain C++:
// the dtype dispatch and the kernels compile in the CUDA units listed in launch.h. The kernels,
// their launch logic and how they work are in kernels/hive_gather.cuh and the family headers it
// includes (shared with the CPU emulation in tests/cuda_emu).
//
// Environment: MIDUS_OPS_CUDA_NO_TC=1 makes bf16/fp16 take the generic kernels too;
// MIDUS_OPS_CUDA_FWD_TC_TILE=64|32 and MIDUS_OPS_CUDA_BWD_TC_TILE=32|16 force a tensor-core tile
// configuration (cross-checks on one GPU); MIDUS_OPS_CUDA_INDEX_CHECK and MIDUS_OPS_CUDA_GEMM are
// described in cuda_common.cuh and cuda_dev.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "glue.h"

namespace midus {
namespace {

HiveDims shapes_of(const at::Tensor& weights, const at::Tensor& bank, const c10::optional<at::Tensor>& proj) {
  HiveDims s;
  s.N = weights.size(0);
  s.H = weights.size(1);
  s.k = weights.size(2);
  s.R = bank.size(0);
  s.dz = bank.size(1);
  s.has_proj = proj.has_value();
  s.dv = s.has_proj ? proj->size(2) : s.dz;
  return s;
}

int env_int(const char* name) {
  const char* s = std::getenv(name);
  return s == nullptr ? 0 : std::atoi(s);
}

HiveEnvOptions options_from_env() {
  HiveEnvOptions o;
  const char* s = std::getenv("MIDUS_OPS_CUDA_NO_TC");
  o.tensor_cores = !(s != nullptr && *s != '\0' && std::strcmp(s, "0") != 0);
  o.fwd_tile = env_int("MIDUS_OPS_CUDA_FWD_TC_TILE");
  o.bwd_tile = env_int("MIDUS_OPS_CUDA_BWD_TC_TILE");
  return o;
}

at::Tensor hive_gather_cuda(const at::Tensor& weights_in, const at::Tensor& indices_in, const at::Tensor& bank_in,
                            const c10::optional<at::Tensor>& proj_in, bool /*deterministic: always, on CUDA*/,
                            bool check_indices) {
  MIDUS_NO_AUTOCAST();
  check_hive_gather(weights_in, indices_in, bank_in, proj_in);
  TORCH_CHECK(bank_in.is_cuda(), "hive_gather: the CUDA kernel got a bank on ", bank_in.device());
  const c10::cuda::CUDAGuard guard(bank_in.device());
  const HiveDims s = shapes_of(weights_in, bank_in, proj_in);
  auto out = at::empty({s.N, s.H, s.dv}, bank_in.options());
  if (out.numel() == 0) return out;
  auto w = weights_in.contiguous();
  auto idx = indices_in.contiguous();
  auto bank = bank_in.contiguous();
  at::Tensor proj = s.has_proj ? proj_in->contiguous() : at::Tensor();
  const bool idx64 = idx.scalar_type() == at::kLong;
  const int device = bank.get_device();
  if (check_indices)
    check_index_range_cuda_tu(idx.data_ptr(), idx64, idx.numel(), idx.get_device(), s.R, "hive_gather");
  hive_gather_forward_cuda_tu(s, options_from_env(), float_type_of(bank), idx64, device, w.data_ptr(), idx.data_ptr(),
                              bank.data_ptr(), s.has_proj ? proj.data_ptr() : nullptr, out.data_ptr());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hive_gather_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& weights_in, const at::Tensor& indices_in,
    const at::Tensor& bank_in, const c10::optional<at::Tensor>& proj_in, bool /*deterministic: always*/,
    bool need_w, bool need_bank, bool need_proj, bool check_indices) {
  MIDUS_NO_AUTOCAST();
  check_hive_gather(weights_in, indices_in, bank_in, proj_in);
  TORCH_CHECK(bank_in.is_cuda(), "hive_gather_backward: the CUDA kernel got a bank on ", bank_in.device());
  const c10::cuda::CUDAGuard guard(bank_in.device());
  const HiveDims s = shapes_of(weights_in, bank_in, proj_in);
  need_proj = need_proj && s.has_proj;
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == s.N && grad_out_in.size(1) == s.H &&
                  grad_out_in.size(2) == s.dv,
              "hive_gather_backward: grad_out must have shape [", s.N, ", ", s.H, ", ", s.dv, "], got ",
              grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.device() == bank_in.device(), "hive_gather_backward: grad_out is on ", grad_out_in.device(),
              " but bank is on ", bank_in.device());
  at::Tensor empty = bank_in.new_empty({0});
  at::Tensor gw = need_w ? at::empty({s.N, s.H, s.k}, weights_in.options()) : empty;
  at::Tensor gb = need_bank ? at::empty({s.R, s.dz}, bank_in.options()) : empty;
  at::Tensor gp = need_proj ? at::empty({s.H, s.dz, s.dv}, proj_in->options()) : empty;
  if (!(need_w || need_bank || need_proj)) return {gw, gb, gp};
  auto w = weights_in.contiguous();
  auto idx = indices_in.contiguous();
  auto bank = bank_in.contiguous();
  auto gout = grad_out_in.to(bank_in.scalar_type()).contiguous();
  at::Tensor proj = s.has_proj ? proj_in->contiguous() : at::Tensor();
  const bool idx64 = idx.scalar_type() == at::kLong;
  const int device = bank.get_device();
  if (check_indices)
    check_index_range_cuda_tu(idx.data_ptr(), idx64, idx.numel(), idx.get_device(), s.R, "hive_gather_backward");
  const FloatType t = float_type_of(bank);
  const void* pp = s.has_proj ? proj.data_ptr() : nullptr;
  hive_gather_backward_weights_proj_cuda_tu(s, options_from_env(), t, idx64, device, gout.data_ptr(), w.data_ptr(),
                                            idx.data_ptr(), bank.data_ptr(), pp, need_w ? gw.data_ptr() : nullptr,
                                            need_proj ? gp.data_ptr() : nullptr);
  if (need_bank)
    hive_gather_backward_bank_cuda_tu(s, t, idx64, device, gout.data_ptr(), w.data_ptr(), idx.data_ptr(), pp,
                                      gb.data_ptr());
  return {gw, gb, gp};
}

}  // namespace

TORCH_LIBRARY_IMPL(midus_ops, CUDA, m) {
  m.impl("hive_gather", &hive_gather_cuda);
  m.impl("hive_gather_backward", &hive_gather_backward_cuda);
}

}  // namespace midus
