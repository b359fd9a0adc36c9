// hive_gather's bag kernels (csrc/cuda/kernels/hive_gather.cuh has the overview): bag_gather, the
// forward without proj (an EmbeddingBag sum with per-sample weights; also u for the generic
// backward), and bag_dot, the weights' gradient as dot products with gathered rows.
#pragma once
#include "common.cuh"

namespace midus {
namespace {

// ============================================================================================
// bag_gather: out[b, :] = sum_j w[b*k + j] * bank[idx[b*k + j], :] (no projection)
// ============================================================================================
// Block (TX, TY): TY bags per block, TX threads across a bag's row, VEC contiguous columns per
// thread per step; 8 rows in flight per thread. VEC > 1 needs dz % VEC == 0 and 16-byte aligned
// bank and out; VEC == 1 works for any dz.
template <typename scalar_t, typename index_t, typename out_t, int VEC>
__global__ void bag_gather_kernel(const scalar_t* __restrict__ w, const index_t* __restrict__ idx,
                                  const scalar_t* __restrict__ bank, out_t* __restrict__ out, int64_t nbags,
                                  int64_t k, int64_t R, int64_t dz) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (b >= nbags) return;
  const scalar_t* wb = w + b * k;
  const index_t* ib = idx + b * k;
  out_t* ob = out + b * dz;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < dz; c += int64_t(blockDim.x) * VEC) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t j0 = 0; j0 < k; j0 += 8) {
      int64_t off[8];
      acc_t wv[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (j0 + q < k) {
          off[q] = checked_row(ib[j0 + q], R) * dz + c;
          wv[q] = cvt<acc_t>(wb[j0 + q]);
        } else {
          off[q] = 0;
          wv[q] = acc_t(0);
        }
      }
      Vec<scalar_t, VEC> x[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (j0 + q < k) x[q] = *reinterpret_cast<const Vec<scalar_t, VEC>*>(bank + off[q]);
      }
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (j0 + q < k) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += wv[q] * cvt<acc_t>(x[q].v[i]);
        }
      }
    }
    Vec<out_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = cvt<out_t>(acc[i]);
    *reinterpret_cast<Vec<out_t, VEC>*>(ob + c) = o;
  }
}

template <typename Dev, typename scalar_t, typename index_t, typename out_t>
void launch_bag_gather(Dev& dev, const scalar_t* w, const index_t* idx, const scalar_t* bank, out_t* out,
                       int64_t nbags, int64_t k, int64_t R, int64_t dz) {
  if (nbags == 0 || dz == 0) return;
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = dz % V == 0 && aligned16(bank) && aligned16(out);
  const int v = vec ? V : 1;
  const int64_t ncol = (dz + v - 1) / v;
  int tx = 1;
  while (tx < ncol && tx < 256) tx <<= 1;
  const int ty = 256 / tx;
  const int64_t blocks = (nbags + ty - 1) / ty;
  MIDUS_CHECK(blocks <= INT32_MAX, "hive_gather: too many bags for one launch: ", nbags);
  const dim3 block(tx, ty);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (vec) {
    dev.launch("bag_gather_vec", bag_gather_kernel<scalar_t, index_t, out_t, V>, grid, block, 0, w, idx, bank, out,
               nbags, k, R, dz);
  } else {
    dev.launch("bag_gather", bag_gather_kernel<scalar_t, index_t, out_t, 1>, grid, block, 0, w, idx, bank, out, nbags,
               k, R, dz);
  }
}

// ============================================================================================
// bag_dot: gw[b*k + j] = <G[b, :], bank[idx[b*k + j], :]> (grad of the weights)
// ============================================================================================
// One warp per bag, 4 rows per pass, VEC contiguous columns per lane per step; fixed-order
// butterfly reductions (deterministic). G is grad_out (no proj) or an fp32 gu chunk (proj).
template <typename scalar_t, typename g_t, typename index_t, int VEC>
__global__ void bag_dot_kernel(const g_t* __restrict__ G, const index_t* __restrict__ idx,
                               const scalar_t* __restrict__ bank, scalar_t* __restrict__ gw, int64_t nbags, int64_t k,
                               int64_t R, int64_t dz) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int J = 4;
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (b >= nbags) return;
  const g_t* gb = G + b * dz;
  for (int64_t j0 = 0; j0 < k; j0 += J) {
    int64_t off[J];
#pragma unroll
    for (int q = 0; q < J; ++q) off[q] = (j0 + q < k) ? checked_row(idx[b * k + j0 + q], R) * dz : 0;
    acc_t part[J];
#pragma unroll
    for (int q = 0; q < J; ++q) part[q] = acc_t(0);
    for (int64_t c = int64_t(lane) * VEC; c < dz; c += 32 * VEC) {
      const Vec<g_t, VEC> gv = *reinterpret_cast<const Vec<g_t, VEC>*>(gb + c);
      Vec<scalar_t, VEC> x[J];
#pragma unroll
      for (int q = 0; q < J; ++q) {
        if (j0 + q < k) x[q] = *reinterpret_cast<const Vec<scalar_t, VEC>*>(bank + off[q] + c);
      }
#pragma unroll
      for (int q = 0; q < J; ++q) {
        if (j0 + q < k) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) part[q] += cvt<acc_t>(gv.v[i]) * cvt<acc_t>(x[q].v[i]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < J; ++q) {
      const acc_t s = warp_sum(part[q]);
      if (lane == 0 && j0 + q < k) gw[b * k + j0 + q] = cvt<scalar_t>(s);
    }
  }
}

template <typename Dev, typename scalar_t, typename g_t, typename index_t>
void launch_bag_dot(Dev& dev, const g_t* G, const index_t* idx, const scalar_t* bank, scalar_t* gw, int64_t nbags,
                    int64_t k, int64_t R, int64_t dz) {
  if (nbags == 0 || k == 0) return;
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = dz % V == 0 && aligned16(bank) && aligned16(G);
  const int warps = 4;
  const int64_t blocks = (nbags + warps - 1) / warps;
  MIDUS_CHECK(blocks <= INT32_MAX, "hive_gather_backward: too many bags for one launch: ", nbags);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (vec) {
    dev.launch("bag_dot_vec", bag_dot_kernel<scalar_t, g_t, index_t, V>, grid, dim3(warps * 32), 0, G, idx, bank, gw,
               nbags, k, R, dz);
  } else {
    dev.launch("bag_dot", bag_dot_kernel<scalar_t, g_t, index_t, 1>, grid, dim3(warps * 32), 0, G, idx, bank, gw,
               nbags, k, R, dz);
  }
}

}  // namespace
}  // namespace midus
