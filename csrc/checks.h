// Input checks shared by the CPU and CUDA kernels, for callers of torch.ops.midus_ops.* that
// bypass the Python wrappers in midus_ops/ops.py. Messages name the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

// The kernels call ATen ops themselves (bmm, sort, ...). Under torch.autocast those nested calls
// would be recast (a bmm of fp32 inputs returning bf16), so autocast is off inside our kernels:
// the ops compute in their inputs' dtype with fp32 accumulation, whatever the context.
#define MIDUS_NO_AUTOCAST() c10::impl::ExcludeDispatchKeyGuard midus_no_autocast_guard_(c10::autocast_dispatch_keyset)

namespace midus {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_pk_topk(const at::Tensor& q, const at::Tensor& subkeys, int64_t k) {
  TORCH_CHECK(q.dim() == 3, "pk_topk: q must have shape [N, H, d_k], got ", q.sizes());
  TORCH_CHECK(subkeys.dim() == 4 && subkeys.size(1) == 2,
              "pk_topk: subkeys must have shape [H, 2, n, d_k/2], got ", subkeys.sizes());
  TORCH_CHECK(is_float_type(q.scalar_type()), "pk_topk: q must be a float tensor, got ", q.scalar_type());
  TORCH_CHECK(q.scalar_type() == subkeys.scalar_type(), "pk_topk: q is ", q.scalar_type(), " but subkeys is ",
              subkeys.scalar_type());
  TORCH_CHECK(q.device() == subkeys.device(), "pk_topk: q is on ", q.device(), " but subkeys is on ",
              subkeys.device());
  TORCH_CHECK(q.size(2) % 2 == 0, "pk_topk: q: d_k must be even, got ", q.size(2));
  TORCH_CHECK(subkeys.size(0) == q.size(1), "pk_topk: subkeys has ", subkeys.size(0), " heads but q has ",
              q.size(1));
  TORCH_CHECK(subkeys.size(3) * 2 == q.size(2), "pk_topk: subkeys width ", subkeys.size(3),
              " does not match q: d_k/2 = ", q.size(2) / 2);
  TORCH_CHECK(k >= 1 && k <= subkeys.size(2), "pk_topk: k must satisfy 1 <= k <= n = ", subkeys.size(2),
              ", got k = ", k);
}

inline void check_hive_gather(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& bank,
                              const c10::optional<at::Tensor>& proj) {
  TORCH_CHECK(weights.dim() == 3, "hive_gather: weights must have shape [N, H, k], got ", weights.sizes());
  TORCH_CHECK(indices.sizes() == weights.sizes(), "hive_gather: indices has shape ", indices.sizes(),
              " but weights has ", weights.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "hive_gather: indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(bank.dim() == 2, "hive_gather: bank must have shape [R, d_z], got ", bank.sizes());
  TORCH_CHECK(is_float_type(bank.scalar_type()), "hive_gather: bank must be a float tensor, got ",
              bank.scalar_type());
  TORCH_CHECK(weights.scalar_type() == bank.scalar_type(), "hive_gather: weights is ", weights.scalar_type(),
              " but bank is ", bank.scalar_type());
  TORCH_CHECK(weights.device() == bank.device() && indices.device() == bank.device(),
              "hive_gather: weights, indices and bank must be on one device, got ", weights.device(), ", ",
              indices.device(), ", ", bank.device());
  if (proj.has_value()) {
    const auto& p = *proj;
    TORCH_CHECK(p.dim() == 3, "hive_gather: proj must have shape [H, d_z, d_v], got ", p.sizes());
    TORCH_CHECK(p.size(0) == weights.size(1), "hive_gather: proj has ", p.size(0), " heads but weights has H = ",
                weights.size(1));
    TORCH_CHECK(p.size(1) == bank.size(1), "hive_gather: proj has d_z = ", p.size(1), " but bank has d_z = ",
                bank.size(1));
    TORCH_CHECK(p.scalar_type() == bank.scalar_type(), "hive_gather: proj is ", p.scalar_type(),
                " but bank is ", bank.scalar_type());
    TORCH_CHECK(p.device() == bank.device(), "hive_gather: proj is on ", p.device(), " but bank is on ",
                bank.device());
  }
}

// Raises IndexError (not a silent wrap or an out-of-bounds read) for any index outside [0, R).
inline void check_index_range(const at::Tensor& indices, int64_t R, const char* op) {
  if (indices.numel() == 0) return;
  auto mm = at::aminmax(indices);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < R, op, ": indices out of range: found ", (lo < 0 ? lo : hi),
                    ", expected every index in [0, ", R, ")");
}

}  // namespace midus
