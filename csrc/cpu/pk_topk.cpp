// CPU kernels of midus_ops::pk_topk and its backward (docs/design.md §1.1).
// Scores of both query halves against a head's sub-keys are one batched GEMM per token chunk
// (fp32 accumulation, fp64 for fp64); selection (pk_select.h) is exact and per (token, head).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "pk_select.h"

namespace midus {
namespace {

// Rows processed per GEMM chunk: bounds the [2H, T, n] score buffer to about 32 MiB.
int64_t token_chunk(int64_t H, int64_t n, int64_t elem) {
  return std::max<int64_t>(1, (int64_t(32) << 20) / std::max<int64_t>(1, 2 * H * n * elem));
}

std::tuple<at::Tensor, at::Tensor> pk_topk_cpu(const at::Tensor& q_in, const at::Tensor& subkeys_in, int64_t k) {
  MIDUS_NO_AUTOCAST();
  check_pk_topk(q_in, subkeys_in, k);
  const int64_t N = q_in.size(0), H = q_in.size(1), half = q_in.size(2) / 2, n = subkeys_in.size(2);
  TORCH_CHECK(n <= 65536, "pk_topk: subkeys has n = ", n, " sub-keys per half; at most 65536 are supported "
              "(slot ids a * n + b must fit in 32 bits)");
  auto scores = at::empty({N, H, k}, q_in.options());
  auto indices = at::empty({N, H, k}, q_in.options().dtype(at::kLong));
  if (N == 0) return {scores, indices};
  const auto acc_type = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // keysT[2h + p] = subkeys[h, p]^T : [2H, half, n]
  auto keysT = subkeys_in.to(acc_type).reshape({2 * H, n, half}).transpose(1, 2);
  const int64_t T = token_chunk(H, n, acc_type == at::kDouble ? 8 : 4);
  bool simd = false;
#if MIDUS_HAS_AVX2_PATH
  // MIDUS_OPS_CPU_SIMD=0 forces the scalar path (the tests compare both).
  const char* env = std::getenv("MIDUS_OPS_CPU_SIMD");
  simd = n <= kSimdMaxN && k <= kSimdMaxK && cpu_has_avx2() && !(env && std::string(env) == "0");
#endif

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_in.scalar_type(), "pk_topk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* sc = scores.data_ptr<scalar_t>();
    int64_t* ix = indices.data_ptr<int64_t>();
    for (int64_t t0 = 0; t0 < N; t0 += T) {
      const int64_t nt = std::min(T, N - t0);
      // [nt, H, 2, half] -> [2H, nt, half] -> scores S [2H, nt, n]
      auto qa = q_in.narrow(0, t0, nt).to(acc_type).reshape({nt, 2 * H, half}).transpose(0, 1);
      auto S = at::bmm(qa, keysT).contiguous();
      const acc_t* s = S.data_ptr<acc_t>();
      // Work items: 8 consecutive tokens of one head (one AVX2 pass, lanes = tokens).
      const int64_t blocks = (nt + 7) / 8;
      at::parallel_for(0, H * blocks, 4, [&](int64_t begin, int64_t end) {
        ScalarSelector sel(n, k);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t h = item / blocks, tb = (item % blocks) * 8, rows = std::min<int64_t>(8, nt - tb);
          const acc_t* s1 = s + ((2 * h) * nt + tb) * n;
          const acc_t* s2 = s + ((2 * h + 1) * nt + tb) * n;
          const int64_t o = ((t0 + tb) * H + h) * k;  // output row of lane l: o + l * H * k
          int redo = (1 << rows) - 1;
#if MIDUS_HAS_AVX2_PATH
          if constexpr (std::is_same<acc_t, float>::value) {
            if (simd && rows == 8)  // (not a template context: the cast keeps the fp64 instance compiling)
              redo = select8<scalar_t>(reinterpret_cast<const float*>(s1), reinterpret_cast<const float*>(s2), n,
                                       int(n), int(k), sc + o, ix + o, H * k);
          }
#endif
          for (int64_t l = 0; l < rows; ++l)
            if (redo >> l & 1) sel.run<acc_t, scalar_t>(s1 + l * n, s2 + l * n, sc + o + l * H * k, ix + o + l * H * k);
        }
      });
    }
  });
  return {scores, indices};
}

// Backward as the gradient of the dense sub-key scores S_p = Q_p K_p^T (p = both halves): score m
// of (t, h) is S_0[t, a_m] + S_1[t, b_m], so dS_p is grad_scores scattered into [2H, T, n]
// (at most k non-zeros per row, summed in m order), and grad_q = dS K, grad_K = dS^T Q are two
// batched GEMMs. No atomics and no scatter over tokens: bitwise deterministic.
std::tuple<at::Tensor, at::Tensor> pk_topk_backward_cpu(const at::Tensor& grad_scores_in, const at::Tensor& q_in,
                                                        const at::Tensor& subkeys_in, const at::Tensor& indices_in,
                                                        bool need_q, bool need_subkeys,
                                                        bool /*check_indices: always checked on CPU*/) {
  MIDUS_NO_AUTOCAST();
  check_pk_topk(q_in, subkeys_in, 1);
  const int64_t N = q_in.size(0), H = q_in.size(1), half = q_in.size(2) / 2, n = subkeys_in.size(2);
  TORCH_CHECK(indices_in.dim() == 3 && indices_in.size(0) == N && indices_in.size(1) == H,
              "pk_topk_backward: indices must have shape [N, H, k], got ", indices_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "pk_topk_backward: indices must be int64, got ",
              indices_in.scalar_type());
  TORCH_CHECK(grad_scores_in.sizes() == indices_in.sizes(), "pk_topk_backward: grad_scores has shape ",
              grad_scores_in.sizes(), " but indices has ", indices_in.sizes());
  const int64_t k = indices_in.size(2);
  check_index_range(indices_in, n * n, "pk_topk_backward");
  at::Tensor grad_q = need_q ? at::empty({N, H, 2 * half}, q_in.options()) : q_in.new_empty({0});
  at::Tensor grad_k = need_subkeys ? at::empty({H, 2, n, half}, subkeys_in.options()) : subkeys_in.new_empty({0});
  if (!(need_q || need_subkeys)) return {grad_q, grad_k};
  const auto acc_type = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto keys = subkeys_in.to(acc_type).reshape({2 * H, n, half});                          // K_p, [2H, n, half]
  auto gk_acc = need_subkeys ? at::zeros({2 * H, n, half}, keys.options()) : at::Tensor();
  auto g = grad_scores_in.to(acc_type).contiguous();
  auto idx = indices_in.contiguous();
  const int64_t T = token_chunk(H, n, acc_type == at::kDouble ? 8 : 4);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_in.scalar_type(), "pk_topk_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gp = g.data_ptr<acc_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t t0 = 0; t0 < N; t0 += T) {
      const int64_t nt = std::min(T, N - t0);
      auto dS = at::zeros({2 * H, nt, n}, keys.options());
      acc_t* ds = dS.data_ptr<acc_t>();
      at::parallel_for(0, nt * H, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t t = r / H, h = r % H, e = (t0 + t) * H + h;
          acc_t* d1 = ds + ((2 * h) * nt + t) * n;
          acc_t* d2 = ds + ((2 * h + 1) * nt + t) * n;
          for (int64_t m = 0; m < k; ++m) {
            const int64_t id = ip[e * k + m];
            d1[id / n] += gp[e * k + m];
            d2[id % n] += gp[e * k + m];
          }
        }
      });
      if (need_q) {  // [2H, nt, half] -> rows of [nt, H, 2, half]
        grad_q.narrow(0, t0, nt).view({nt, 2 * H, half}).copy_(at::bmm(dS, keys).transpose(0, 1));
      }
      if (need_subkeys) {
        auto qa = q_in.narrow(0, t0, nt).to(acc_type).reshape({nt, 2 * H, half}).transpose(0, 1);
        gk_acc.baddbmm_(dS.transpose(1, 2), qa);
      }
    }
  });
  if (need_subkeys) grad_k.copy_(gk_acc.view({H, 2, n, half}));
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(midus_ops, CPU, m) {
  m.impl("pk_topk", &pk_topk_cpu);
  m.impl("pk_topk_backward", &pk_topk_backward_cpu);
}

}  // namespace midus
