// CPU kernels of midus_ops::hive_gather and its backward (docs/design.md §1.2).
// Tokens are processed in chunks: the weighted bank read u [H, T, d_z] of a chunk is accumulated
// in fp32 (fp64 for fp64) straight from the bank rows, never as [N, H, k, d_z], and the per-head
// projection is one batched GEMM per chunk. The bank gradient is a deterministic CSR scatter-add.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "csr.h"

namespace midus {
namespace {

// Tokens per chunk so that a [H, T, max(d_z, d_v)] fp32 buffer stays near 16 MiB.
int64_t token_chunk(int64_t H, int64_t width) {
  return std::max<int64_t>(1, (int64_t(16) << 20) / std::max<int64_t>(1, 4 * H * width));
}

// u[h, t - t0, :] = sum_j w[t, h, j] * bank[idx[t, h, j], :] for t in [t0, t0 + nt).
template <typename scalar_t, typename index_t, typename acc_t>
void gather_chunk(const scalar_t* w, const index_t* idx, const scalar_t* bank, int64_t t0, int64_t nt, int64_t H,
                  int64_t k, int64_t dz, acc_t* u) {
  at::parallel_for(0, nt * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      acc_t* dst = u + (h * nt + t) * dz;
      for (int64_t z = 0; z < dz; ++z) dst[z] = acc_t(0);
      const int64_t base = ((t0 + t) * H + h) * k;
      for (int64_t j = 0; j < k; ++j) {
        const acc_t wv = static_cast<acc_t>(w[base + j]);
        const scalar_t* row = bank + static_cast<int64_t>(idx[base + j]) * dz;
        for (int64_t z = 0; z < dz; ++z) dst[z] += wv * static_cast<acc_t>(row[z]);
      }
    }
  });
}

// <g, row> with 8 independent partial sums, so the compiler vectorises it without -ffast-math.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* g, const scalar_t* row, int64_t d) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t z = 0;
  for (; z + 8 <= d; z += 8)
    for (int u = 0; u < 8; ++u) part[u] += g[z + u] * static_cast<acc_t>(row[z + u]);
  acc_t s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; z < d; ++z) s += g[z] * static_cast<acc_t>(row[z]);
  return s;
}

at::ScalarType acc_type_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor hive_gather_cpu(const at::Tensor& weights_in, const at::Tensor& indices_in, const at::Tensor& bank_in,
                           const c10::optional<at::Tensor>& proj_in, bool /*deterministic: always, on CPU*/,
                           bool /*check_indices: the CPU check is cheap (no synchronisation), so it always runs*/) {
  MIDUS_NO_AUTOCAST();
  check_hive_gather(weights_in, indices_in, bank_in, proj_in);
  const int64_t N = weights_in.size(0), H = weights_in.size(1), k = weights_in.size(2);
  const int64_t R = bank_in.size(0), dz = bank_in.size(1);
  const bool has_proj = proj_in.has_value();
  const int64_t dv = has_proj ? proj_in->size(2) : dz;
  auto out = at::empty({N, H, dv}, bank_in.options());
  if (N == 0 || H == 0) return out;
  check_index_range(indices_in, R, "hive_gather");
  const auto acc_type = acc_type_of(bank_in);
  auto w = weights_in.contiguous();
  auto idx = indices_in.contiguous();
  auto bank = bank_in.contiguous();
  at::Tensor projA = has_proj ? proj_in->to(acc_type).contiguous() : at::Tensor();
  const int64_t T = token_chunk(H, std::max(dz, dv));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "hive_gather_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "hive_gather_cpu_idx", [&] {
      for (int64_t t0 = 0; t0 < N; t0 += T) {
        const int64_t nt = std::min(T, N - t0);
        auto u = at::empty({H, nt, dz}, bank.options().dtype(acc_type));
        gather_chunk<scalar_t, index_t, acc_t>(w.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
                                               bank.data_ptr<scalar_t>(), t0, nt, H, k, dz, u.data_ptr<acc_t>());
        at::Tensor res = has_proj ? at::bmm(u, projA) : u;  // [H, nt, dv]
        out.narrow(0, t0, nt).copy_(res.transpose(0, 1));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hive_gather_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& weights_in, const at::Tensor& indices_in,
    const at::Tensor& bank_in, const c10::optional<at::Tensor>& proj_in, bool /*deterministic*/, bool need_w,
    bool need_bank, bool need_proj, bool /*check_indices: always checked on CPU*/) {
  MIDUS_NO_AUTOCAST();
  check_hive_gather(weights_in, indices_in, bank_in, proj_in);
  const int64_t N = weights_in.size(0), H = weights_in.size(1), k = weights_in.size(2);
  const int64_t R = bank_in.size(0), dz = bank_in.size(1);
  const bool has_proj = proj_in.has_value();
  need_proj = need_proj && has_proj;
  const int64_t dv = has_proj ? proj_in->size(2) : dz;
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == N && grad_out_in.size(1) == H &&
                  grad_out_in.size(2) == dv,
              "hive_gather_backward: grad_out must have shape [", N, ", ", H, ", ", dv, "], got ", grad_out_in.sizes());
  const auto acc_type = acc_type_of(bank_in);
  at::Tensor empty = bank_in.new_empty({0});
  at::Tensor gw = need_w ? at::empty({N, H, k}, weights_in.options()) : empty;
  at::Tensor gb_acc = need_bank ? at::zeros({R, dz}, bank_in.options().dtype(acc_type)) : at::Tensor();
  at::Tensor gp_acc = need_proj ? at::zeros({H, dz, dv}, bank_in.options().dtype(acc_type)) : at::Tensor();
  if (N > 0 && H > 0 && (need_w || need_bank || need_proj)) {
    check_index_range(indices_in, R, "hive_gather_backward");
    auto w = weights_in.contiguous();
    auto idx = indices_in.contiguous();
    auto bank = bank_in.contiguous();
    at::Tensor projA = has_proj ? proj_in->to(acc_type).contiguous() : at::Tensor();
    const int64_t T = token_chunk(H, std::max(dz, dv));

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "hive_gather_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "hive_gather_backward_cpu_idx", [&] {
        const scalar_t* wp = w.data_ptr<scalar_t>();
        const index_t* ip = idx.data_ptr<index_t>();
        const scalar_t* bp = bank.data_ptr<scalar_t>();
        for (int64_t t0 = 0; t0 < N; t0 += T) {
          const int64_t nt = std::min(T, N - t0);
          auto go = grad_out_in.narrow(0, t0, nt).to(acc_type).transpose(0, 1);  // [H, nt, dv]
          if (need_proj) {
            auto u = at::empty({H, nt, dz}, bank.options().dtype(acc_type));
            gather_chunk<scalar_t, index_t, acc_t>(wp, ip, bp, t0, nt, H, k, dz, u.data_ptr<acc_t>());
            gp_acc.baddbmm_(u.transpose(1, 2), go);  // grad_proj[h] += u[h]^T @ grad_out[h]
          }
          if (!(need_w || need_bank)) continue;
          // grad of the read, token-major: gu[t, h] = grad_out[t, h] @ proj[h]^T  -> [nt, H, dz]
          auto gu = (has_proj ? at::bmm(go, projA.transpose(1, 2)).transpose(0, 1) : go.transpose(0, 1)).contiguous();
          const acc_t* gup = gu.data_ptr<acc_t>();
          const int64_t base0 = t0 * H * k;  // first (t, h, j) entry of this chunk
          if (need_w) {
            scalar_t* gwp = gw.data_ptr<scalar_t>() + base0;
            at::parallel_for(0, nt * H, 16, [&](int64_t begin, int64_t end) {
              for (int64_t r = begin; r < end; ++r)
                for (int64_t j = 0; j < k; ++j) {
                  const scalar_t* row = bp + static_cast<int64_t>(ip[base0 + r * k + j]) * dz;
                  gwp[r * k + j] = static_cast<scalar_t>(dot<scalar_t, acc_t>(gup + r * dz, row, dz));
                }
            });
          }
          if (need_bank) {
            // Entry e = (t*H + h)*k + j of the chunk adds w[e] * gu[t, h] to bank row idx[e]; the
            // CSR keeps, per row, the source row t*H + h beside the weight (no divisions later).
            RowGroups groups = group_by_row(nt * H * k, R, [&](int64_t e) { return int64_t(ip[base0 + e]); });
            const int64_t M = nt * H * k;
            std::vector<int64_t> src(M);
            std::vector<acc_t> wt(M);
            at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
              for (int64_t c = begin; c < end; ++c) {
                const int64_t e = groups.order[c];
                src[c] = (e / k) * dz;
                wt[c] = static_cast<acc_t>(wp[base0 + e]);
              }
            });
            acc_t* gbp = gb_acc.data_ptr<acc_t>();
            for_each_row_block(groups, dz, 64, [&](int64_t row, int64_t c0, int64_t c1, int64_t z0, int64_t z1) {
              acc_t* dst = gbp + row * dz;
              for (int64_t c = c0; c < c1; ++c) {
                const acc_t wv = wt[c];
                const acc_t* g = gup + src[c];
                for (int64_t z = z0; z < z1; ++z) dst[z] += wv * g[z];
              }
            });
          }
        }
      });
    });
  }
  at::Tensor gb = need_bank ? gb_acc.to(bank_in.scalar_type()) : empty;
  at::Tensor gp = need_proj ? gp_acc.to(proj_in->scalar_type()) : empty;
  return {gw, gb, gp};
}

}  // namespace

TORCH_LIBRARY_IMPL(midus_ops, CPU, m) {
  m.impl("hive_gather", &hive_gather_cpu);
  m.impl("hive_gather_backward", &hive_gather_backward_cpu);
}

}  // namespace midus
