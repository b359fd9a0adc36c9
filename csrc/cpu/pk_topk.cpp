// CPU kernels of midus_ops::pk_topk and its backward (spec/HML.md 1.1).
// Scores of both query halves against a head's sub-keys are one batched GEMM per token chunk
// (fp32 accumulation, fp64 for fp64); selection is exact and per (token, head).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "csr.h"

namespace midus {
namespace {

// The selection order: larger score first, NaN before everything (as torch.sort descending),
// and among equal scores the lower id first. A strict weak ordering even with NaN.
template <typename acc_t>
inline bool ranks_before(acc_t sa, int64_t ia, acc_t sb, int64_t ib) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

// fp32 selection packs (score, id) into one uint64 whose integer order is the selection order:
// the score's bits mapped to an order-preserving uint32 (NaN highest, -0 folded into +0) above
// the inverted id (lower id = larger key). Integer compares make the sorts several times faster.
inline uint64_t rank_key(float s, uint32_t id) {
  uint32_t u;
  if (std::isnan(s)) {
    u = 0xFFFFFFFFu;
  } else {
    s += 0.0f;  // -0.0 -> +0.0: they compare equal, so the id must decide
    std::memcpy(&u, &s, sizeof(u));
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (uint64_t(u) << 32) | uint64_t(~id);
}
inline uint32_t key_id(uint64_t key) { return ~uint32_t(key & 0xFFFFFFFFu); }

// Top-k of s[0..n) in selection order: ids written to out[0..k).
inline void topk_ids(const float* s, int64_t n, int64_t k, uint64_t* keys, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(s[i], uint32_t(i));
  std::partial_sort(keys, keys + k, keys + n, std::greater<uint64_t>());
  for (int64_t i = 0; i < k; ++i) out[i] = key_id(keys[i]);
}

// fp64 (used for gradcheck): the same order through a comparator.
template <typename acc_t>
void topk_ids_generic(const acc_t* s, int64_t n, int64_t k, int64_t* ids, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) ids[i] = i;
  std::partial_sort(ids, ids + k, ids + n,
                    [s](int64_t a, int64_t b) { return ranks_before<acc_t>(s[a], a, s[b], b); });
  std::copy(ids, ids + k, out);
}

// Selects the top k of row (s1, s2) into (score_out, id_out), both in selection order.
// Candidate (i, j) can reach the top k only if (i+1)(j+1) <= k: the (i+1)(j+1)-1 pairs above
// and left of it rank before it (sums are monotone in i and j, and ties among them go to lower
// ids by the stage-1 order), so the pruning is exact.
struct Selector {
  int64_t n, k;
  std::vector<uint64_t> keys;
  std::vector<int64_t> ids, a, b;
  std::vector<double> cand;
  std::vector<int64_t> cand_id;
  Selector(int64_t n_, int64_t k_) : n(n_), k(k_), keys(std::max(n_, k_ * k_)), ids(std::max(n_, k_ * k_)),
                                     a(k_), b(k_) {}

  template <typename scalar_t>
  void run(const float* s1, const float* s2, scalar_t* score_out, int64_t* id_out) {
    topk_ids(s1, n, k, keys.data(), a.data());
    topk_ids(s2, n, k, keys.data(), b.data());
    int64_t m = 0;
    for (int64_t i = 0; i < k; ++i) {
      const float si = s1[a[i]];
      for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j)
        keys[m++] = rank_key(si + s2[b[j]], uint32_t(a[i] * n + b[j]));
    }
    std::partial_sort(keys.begin(), keys.begin() + k, keys.begin() + m, std::greater<uint64_t>());
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t id = key_id(keys[j]);
      id_out[j] = id;
      score_out[j] = static_cast<scalar_t>(s1[id / n] + s2[id % n]);
    }
  }

  template <typename scalar_t>
  void run(const double* s1, const double* s2, scalar_t* score_out, int64_t* id_out) {
    topk_ids_generic<double>(s1, n, k, ids.data(), a.data());
    topk_ids_generic<double>(s2, n, k, ids.data(), b.data());
    cand.clear();
    cand_id.clear();
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j) {
        cand.push_back(s1[a[i]] + s2[b[j]]);
        cand_id.push_back(a[i] * n + b[j]);
      }
    const int64_t m = static_cast<int64_t>(cand.size());
    for (int64_t c = 0; c < m; ++c) ids[c] = c;
    std::partial_sort(ids.begin(), ids.begin() + k, ids.begin() + m, [&](int64_t x, int64_t y) {
      return ranks_before<double>(cand[x], cand_id[x], cand[y], cand_id[y]);
    });
    for (int64_t j = 0; j < k; ++j) {
      score_out[j] = static_cast<scalar_t>(cand[ids[j]]);
      id_out[j] = cand_id[ids[j]];
    }
  }
};

// Rows processed per GEMM chunk: bounds the [2H, T, n] score buffer to about 32 MiB.
int64_t token_chunk(int64_t H, int64_t n, int64_t elem) {
  return std::max<int64_t>(1, (int64_t(32) << 20) / std::max<int64_t>(1, 2 * H * n * elem));
}

std::tuple<at::Tensor, at::Tensor> pk_topk_cpu(const at::Tensor& q_in, const at::Tensor& subkeys_in, int64_t k) {
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
      at::parallel_for(0, nt * H, 16, [&](int64_t begin, int64_t end) {
        Selector sel(n, k);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t t = r / H, h = r % H;
          const int64_t o = ((t0 + t) * H + h) * k;
          sel.run<scalar_t>(s + ((2 * h) * nt + t) * n, s + ((2 * h + 1) * nt + t) * n, sc + o, ix + o);
        }
      });
    }
  });
  return {scores, indices};
}

// d score[t,h,m] / d q1[t,h] = K1_h[a_m],  d score / d K1_h[a_m] = q1[t,h]  (same for half 2 with b_m).
std::tuple<at::Tensor, at::Tensor> pk_topk_backward_cpu(const at::Tensor& grad_scores_in, const at::Tensor& q_in,
                                                        const at::Tensor& subkeys_in, const at::Tensor& indices_in,
                                                        bool need_q, bool need_subkeys) {
  check_pk_topk(q_in, subkeys_in, 1);
  const int64_t N = q_in.size(0), H = q_in.size(1), half = q_in.size(2) / 2, n = subkeys_in.size(2);
  TORCH_CHECK(indices_in.dim() == 3 && indices_in.size(0) == N && indices_in.size(1) == H,
              "pk_topk_backward: indices must have shape [N, H, k], got ", indices_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "pk_topk_backward: indices must be int64");
  TORCH_CHECK(grad_scores_in.sizes() == indices_in.sizes(), "pk_topk_backward: grad_scores has shape ",
              grad_scores_in.sizes(), " but indices has ", indices_in.sizes());
  const int64_t k = indices_in.size(2);
  check_index_range(indices_in, n * n, "pk_topk_backward");
  at::Tensor grad_q = need_q ? at::empty_like(q_in, at::MemoryFormat::Contiguous) : q_in.new_empty({0});
  at::Tensor grad_k = need_subkeys ? at::empty_like(subkeys_in, at::MemoryFormat::Contiguous)
                                   : subkeys_in.new_empty({0});
  if (!(need_q || need_subkeys)) return {grad_q, grad_k};
  if (N == 0) {
    if (need_subkeys) grad_k.zero_();
    return {grad_q, grad_k};
  }
  const auto acc_type = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto q = q_in.to(acc_type).contiguous();
  auto keys = subkeys_in.to(acc_type).contiguous();
  auto g = grad_scores_in.to(acc_type).contiguous();
  auto idx = indices_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_in.scalar_type(), "pk_topk_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* qp = q.data_ptr<acc_t>();
    const acc_t* kp = keys.data_ptr<acc_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const int64_t dk = 2 * half;
    if (need_q) {
      scalar_t* out = grad_q.data_ptr<scalar_t>();
      at::parallel_for(0, N * H, 64, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(dk);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t h = r % H;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t m = 0; m < k; ++m) {
            const acc_t gv = gp[r * k + m];
            const int64_t a = ip[r * k + m] / n, b = ip[r * k + m] % n;
            const acc_t* k1 = kp + ((h * 2 + 0) * n + a) * half;
            const acc_t* k2 = kp + ((h * 2 + 1) * n + b) * half;
            for (int64_t d = 0; d < half; ++d) acc[d] += gv * k1[d];
            for (int64_t d = 0; d < half; ++d) acc[half + d] += gv * k2[d];
          }
          for (int64_t d = 0; d < dk; ++d) out[r * dk + d] = static_cast<scalar_t>(acc[d]);
        }
      });
    }
    if (need_subkeys) {
      // Contribution c = ((t*H + h)*k + m)*2 + p goes to sub-key row (h*2 + p)*n + (a or b).
      auto row_of = [&](int64_t c) {
        const int64_t p = c & 1, e = c >> 1, h = (e / k) % H;
        const int64_t id = ip[e];
        return (h * 2 + p) * n + (p == 0 ? id / n : id % n);
      };
      RowGroups groups = group_by_row(N * H * k * 2, H * 2 * n, row_of);
      auto acc_grad = at::zeros({H * 2 * n, half}, q.options());
      acc_t* ag = acc_grad.data_ptr<acc_t>();
      for_each_row_block(groups, half, 64, [&](int64_t row, int64_t c0, int64_t c1, int64_t d0, int64_t d1) {
        acc_t* dst = ag + row * half;
        for (int64_t ci = c0; ci < c1; ++ci) {
          const int64_t c = groups.order[ci], p = c & 1, e = c >> 1;
          const acc_t gv = gp[e];
          const acc_t* qv = qp + (e / k) * dk + p * half;
          for (int64_t d = d0; d < d1; ++d) dst[d] += gv * qv[d];
        }
      });
      grad_k.copy_(acc_grad.view(subkeys_in.sizes()));
    }
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(midus_ops, CPU, m) {
  m.impl("pk_topk", &pk_topk_cpu);
  m.impl("pk_topk_backward", &pk_topk_backward_cpu);
}

}  // namespace midus
