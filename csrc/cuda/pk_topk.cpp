// ATen glue of the CUDA pk_topk and pk_topk_backward (docs/design.md §1.1): input checks, outputs,
// the host-side index check and the registration. Plain C++: the dtype dispatch and the kernels
// compile in pk_topk_fwd.cu and pk_topk_bwd.cu (launch.h). The kernels and their launch logic, and
// how they work, are in kernels/pk_topk.cuh (shared with the CPU emulation in tests/cuda_emu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../limits.h"
#include "glue.h"

namespace midus {
namespace {

std::tuple<at::Tensor, at::Tensor> pk_topk_cuda(const at::Tensor& q_in, const at::Tensor& subkeys_in, int64_t k) {
  MIDUS_NO_AUTOCAST();
  check_pk_topk(q_in, subkeys_in, k);
  TORCH_CHECK(q_in.is_cuda(), "pk_topk: the CUDA kernel got q on ", q_in.device());
  const int64_t N = q_in.size(0), H = q_in.size(1), half = q_in.size(2) / 2, n = subkeys_in.size(2);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto scores = at::empty({N, H, k}, q_in.options());
  auto indices = at::empty({N, H, k}, q_in.options().dtype(at::kLong));
  auto q = q_in.contiguous();
  auto sk = subkeys_in.contiguous();
  pk_topk_forward_cuda_tu(float_type_of(q), q.get_device(), q.data_ptr(), sk.data_ptr(), scores.data_ptr(),
                          indices.data_ptr<int64_t>(), N, H, half, n, k);
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> pk_topk_backward_cuda(const at::Tensor& grad_scores_in, const at::Tensor& q_in,
                                                         const at::Tensor& subkeys_in, const at::Tensor& indices_in,
                                                         bool need_q, bool need_subkeys, bool check_indices) {
  MIDUS_NO_AUTOCAST();
  check_pk_topk(q_in, subkeys_in, 1);
  TORCH_CHECK(q_in.is_cuda(), "pk_topk_backward: the CUDA kernel got q on ", q_in.device());
  const int64_t N = q_in.size(0), H = q_in.size(1), half = q_in.size(2) / 2, n = subkeys_in.size(2);
  TORCH_CHECK(indices_in.dim() == 3 && indices_in.size(0) == N && indices_in.size(1) == H,
              "pk_topk_backward: indices must have shape [N, H, k], got ", indices_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "pk_topk_backward: indices must be int64, got ",
              indices_in.scalar_type());
  TORCH_CHECK(grad_scores_in.sizes() == indices_in.sizes(), "pk_topk_backward: grad_scores has shape ",
              grad_scores_in.sizes(), " but indices has ", indices_in.sizes());
  TORCH_CHECK(indices_in.device() == q_in.device() && grad_scores_in.device() == q_in.device(),
              "pk_topk_backward: grad_scores, q and indices must be on one device, got ", grad_scores_in.device(), ", ",
              q_in.device(), ", ", indices_in.device());
  TORCH_CHECK(is_float_type(grad_scores_in.scalar_type()), "pk_topk_backward: grad_scores must be a float tensor, got ",
              grad_scores_in.scalar_type());
  TORCH_CHECK(n <= kPkMaxN, "pk_topk_backward: subkeys has n = ", n,
              " sub-keys per half, above the CUDA kernel's limit of n <= ", kPkMaxN);
  TORCH_CHECK(H <= 65535, "pk_topk_backward: q has H = ", H, " heads, above the CUDA kernel's limit of 65535");
  const int64_t k = indices_in.size(2);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor grad_q = need_q ? at::empty({N, H, 2 * half}, q_in.options()) : q_in.new_empty({0});
  at::Tensor grad_k = need_subkeys ? at::empty({H, 2, n, half}, subkeys_in.options()) : subkeys_in.new_empty({0});
  if (!(need_q || need_subkeys)) return {grad_q, grad_k};
  if (N == 0 || H == 0 || k == 0) {
    if (need_q) grad_q.zero_();
    if (need_subkeys) grad_k.zero_();
    return {grad_q, grad_k};
  }
  auto idx = indices_in.contiguous();
  if (check_indices)
    check_index_range_cuda_tu(idx.data_ptr(), /*idx64=*/true, idx.numel(), idx.get_device(), n * n, "pk_topk_backward");
  auto q = q_in.contiguous();
  auto sk = subkeys_in.contiguous();
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // grad_scores in q's dtype is read as is; any other dtype is converted to the accumulation type.
  const bool g_native = grad_scores_in.scalar_type() == q.scalar_type();
  auto g = g_native ? grad_scores_in.contiguous() : grad_scores_in.to(acc_type).contiguous();
  pk_topk_backward_cuda_tu(float_type_of(q), q.get_device(), g.data_ptr(), g_native, idx.data_ptr<int64_t>(),
                           q.data_ptr(), sk.data_ptr(), need_q ? grad_q.data_ptr() : nullptr,
                           need_subkeys ? grad_k.data_ptr() : nullptr, N, H, half, n, k);
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(midus_ops, CUDA, m) {
  m.impl("pk_topk", &pk_topk_cuda);
  m.impl("pk_topk_backward", &pk_topk_backward_cuda);
}

}  // namespace midus
