// CUDA kernels of midus_ops::hive_gather and midus_ops::hive_gather_backward (spec/HML.md 1.2).
// Same schemas and semantics as csrc/cpu/hive_gather.cpp: u[t,h] = sum_j w[t,h,j] bank[idx[t,h,j]]
// accumulated in fp32 (fp64 for fp64), out[t,h] = u[t,h] @ proj[h]; the backward returns empty [0]
// tensors for the gradients not requested.
//
// Kernels, and what each one fuses (the selection conditions are in the host code at the bottom):
//
//  fwd_tc      Forward with proj, bf16/fp16 (fast path: d_z % 8 == 0, k <= 64, 16-byte aligned
//              bank, R < 2^31). A block owns one head and 64 tokens (and 64 columns of d_v). Per 256-wide
//              chunk of d_z, each warp gathers its tokens' k bank rows with 16-byte loads (a lane
//              owns 8 columns), accumulates u in fp32 registers and writes it to shared memory
//              split in two bf16 terms (u = hi + lo, |lo| <= 2^-9 |hi|); then tensor cores
//              (mma.sync m16n8k16, fp32 accumulate) multiply [hi; lo] by the proj chunk:
//              2 products for bf16, 3 for fp16 (proj split in two bf16 terms too), so the result
//              carries about 2^-16 relative error: fp32-grade, like the reference. Neither
//              [N, H, k, d_z] nor [N, H, d_z] ever reaches global memory.
//  fwd_generic Forward with proj, any dtype/shape (fp32/fp64 always): a block owns one head, 16
//              tokens and 64 columns of d_v; u is gathered per 64-wide chunk of d_z into shared
//              memory (acc type) and multiplied by proj with plain FMAs (fp32 exact for fp32).
//  bag_gather  Forward without proj (EmbeddingBag sum with per-sample weights): a group of
//              threads per bag, 16-byte vector loads (8 bf16 / 4 fp32 / 2 fp64) with 8 rows in
//              flight per thread when d_z is a multiple of the vector width and the pointers are
//              16-byte aligned; otherwise the same kernel with scalar loads (any d_z).
//  bwd_tc      Backward with proj, bf16/fp16 (fast path: also d_z <= 256, d_v <= 64). A block owns
//              one head and a run of 32-token tiles. Per tile: gu = grad_out @ proj[h]^T on tensor
//              cores into shared memory (fp32, never global); one gather of the k rows per token
//              serves both grad_weights (warp dot of gu with the row) and the recomputed u; then
//              grad_proj[h] += u^T grad_out on tensor cores (u split hi/lo as in the forward),
//              accumulated in registers over the block's tiles. The few per-block partials
//              [S, H, d_z, d_v] are summed by at::sum (fixed order).
//  generic backward (other dtypes/shapes): per chunk of tokens, gu = at::bmm(grad_out, proj^T)
//              and u (bag_gather into an fp32 chunk buffer) are materialised for the chunk only;
//              grad_weights by bag_dot, grad_proj by at::baddbmm. Never [N, H, k, d_z].
//  grad_bank   (both) A deterministic segmented reduction, no atomics anywhere: contributions are
//              keyed by destination (row*H + h with proj, row without), sorted by at::sort
//              (stable, so each key keeps its contributions in their original order), and the
//              sorted list is cut into fixed chunks of C positions; one warp per chunk sums each
//              run of equal keys in order and writes complete runs straight to their row; a run
//              that crosses a chunk boundary leaves a partial ("carry") that the next level, the
//              same kernel over the carries, combines in order. A key hit by millions of
//              contributions is thus spread over many warps (no hot-row serialisation) and the
//              result is bitwise identical run to run. With proj the reduction happens in d_v
//              space, Y[row, h] = sum w * grad_out[t, h] (4x fewer bytes than d_z space for the
//              HML shape), then grad_bank = Y.view(R, H*d_v) @ proj^T.view(H*d_v, d_z), one fp32
//              GEMM (at::mm).
// Every path is deterministic, so the `deterministic` flag changes nothing on CUDA (as on CPU).
// MIDUS_OPS_CUDA_NO_TC=1 makes bf16/fp16 take the generic kernels too (for cross-checks).
//
// Out-of-range indices (spec: an error naming `indices`, never an out-of-bounds read):
//  * by default a host-side check runs before any kernel (one small reduction kernel and one
//    16-byte device-to-host copy, i.e. a stream synchronisation) and raises IndexError
//    "hive_gather: indices out of range: found X, expected every index in [0, R)";
//  * every kernel that reads an index also checks it on the device (CUDA_KERNEL_ASSERT_MSG, like
//    torch's own index kernels) and never dereferences a bad one. With the environment variable
//    MIDUS_OPS_CUDA_INDEX_CHECK=device (or 0/off) the host check is skipped (no synchronisation):
//    a bad index then fails as an asynchronous device-side assert whose message names `indices`,
//    and the CUDA context is unusable afterwards, as with torch's index ops. The host check is
//    also skipped while the current stream is capturing a CUDA graph (no synchronisation is
//    possible there), and when the caller passes check_indices=False: the layers do, since their
//    indices come from pk_topk (in [0, n*n) by construction), and so does the autograd backward
//    (its indices are the forward's, already checked there). The helpers are in cuda_common.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../checks.h"
#include "cuda_common.cuh"

namespace midus {
namespace {

// ============================================================================================
// Small device helpers
// ============================================================================================
template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool is_16bit_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

constexpr unsigned kFullMask = 0xffffffffu;

// The row an index names, checked: a device-side assert on a bad index, and row 0 instead of an
// out-of-bounds address should the assert be compiled out.
template <typename index_t>
__device__ __forceinline__ int64_t checked_row(index_t r, int64_t R) {
  const int64_t v = static_cast<int64_t>(r);
  const bool ok = v >= 0 && v < R;
  CUDA_KERNEL_ASSERT_MSG(ok, "midus_ops::hive_gather: indices out of range (every index must be in [0, R))");
  return ok ? v : 0;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Raw 16-bit element helpers (bits in a uint16_t / one half of a uint32_t).
template <typename T>
struct F16;
template <>
struct F16<c10::BFloat16> {
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ float to_float(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};
template <>
struct F16<c10::Half> {
  static __device__ __forceinline__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ float lo(uint32_t w) { return to_float(static_cast<uint16_t>(w & 0xffffu)); }
  static __device__ __forceinline__ float hi(uint32_t w) { return to_float(static_cast<uint16_t>(w >> 16)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

__device__ __forceinline__ uint16_t bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float bf16_value(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// Stages the bank rows and weights of a tile of `tokens` tokens from t0 (head h) into shared
// memory, as the tensor-core kernels use them; tokens past N get row 0 and weight 0. A bad index
// asserts here, before any row is read.
template <typename T, typename index_t>
__device__ __forceinline__ void stage_tile_rows(int32_t* sR, float* sW, const index_t* idx, const uint16_t* w,
                                                int64_t t0, int tokens, int64_t N, int H, int h, int k, int64_t R,
                                                int tid, int nthreads) {
  for (int i = tid; i < tokens * k; i += nthreads) {
    const int t = i / k, j = i - t * k;
    const int64_t tok = t0 + t;
    int32_t r = 0;
    float wv = 0.f;
    if (tok < N) {
      const int64_t e = (tok * H + h) * k + j;
      r = static_cast<int32_t>(checked_row(idx[e], R));
      wv = F16<T>::to_float(w[e]);
    }
    sR[i] = r;
    sW[i] = wv;
  }
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): two bf16 terms, ~2^-17 relative error.
// A non-finite hi (x = +-inf or NaN) gets lo = 0: x - hi would be NaN there, and the lo product
// would turn an infinite result (what the reference gives) into NaN.
__device__ __forceinline__ void split_bf16(float x, uint16_t& hi, uint16_t& lo) {
  hi = bf16_bits(x);
  const float h = bf16_value(hi);
  lo = bf16_bits(isfinite(h) ? x - h : 0.f);
}

// 8 consecutive 16-bit elements (one 16-byte load) to fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&x)[8]) {
  x[0] = F16<T>::lo(v.x);
  x[1] = F16<T>::hi(v.x);
  x[2] = F16<T>::lo(v.y);
  x[3] = F16<T>::hi(v.y);
  x[4] = F16<T>::lo(v.z);
  x[5] = F16<T>::hi(v.z);
  x[6] = F16<T>::lo(v.w);
  x[7] = F16<T>::hi(v.w);
}

__device__ __forceinline__ uint4 ldg16(const uint16_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// mma.sync m16n8k16, fp32 accumulate (sm_80+). Fragment layouts (PTX ISA, "mma.m16n8k16"), with
// g = lane / 4 and c = lane % 4: A regs {a0,a1} (row g, cols 2c,2c+1), {a2,a3} (row g+8, same
// cols), {a4,a5} (row g, cols 2c+8,+9), {a6,a7} (row g+8, cols 2c+8,+9); B regs {b0,b1} (rows
// 2c,2c+1, col g), {b2,b3} (rows 2c+8,+9, col g); C {c0,c1} (row g, cols 2c,2c+1), {c2,c3} (row
// g+8). The element with the lower index sits in the low 16 bits of a register.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Both operands in T's own 16-bit format (exact inputs: no split needed).
template <typename T>
__device__ __forceinline__ void mma_native(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    mma_bf16(d, a, b);
  } else {
    mma_f16(d, a, b);
  }
}

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment (16x16 at rows m0, cols k0) of a row-major tile X[m][k] (row stride ld, even).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* X, int ld, int m0, int k0, int g, int c) {
  a[0] = lds32(X + (m0 + g) * ld + k0 + 2 * c);
  a[1] = lds32(X + (m0 + g + 8) * ld + k0 + 2 * c);
  a[2] = lds32(X + (m0 + g) * ld + k0 + 8 + 2 * c);
  a[3] = lds32(X + (m0 + g + 8) * ld + k0 + 8 + 2 * c);
}
// A fragment of A = X^T where X[k][m] is stored row-major (stride ld): A[m][k] = X[k][m].
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const uint16_t* X, int ld, int m0, int k0, int g,
                                             int c) {
  const uint16_t* r0 = X + (k0 + 2 * c) * ld + m0 + g;  // rows k0+2c, k0+2c+1, +8, +9
  a[0] = pack2(r0[0], r0[ld]);
  a[1] = pack2(r0[8], r0[ld + 8]);
  a[2] = pack2(r0[8 * ld], r0[9 * ld]);
  a[3] = pack2(r0[8 * ld + 8], r0[9 * ld + 8]);
}
// B fragment (16x8 at rows k0, cols n0) of B[k][n] stored as Y[n][k] (k contiguous, stride ld).
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[2], const uint16_t* Y, int ld, int k0, int n0, int g, int c) {
  b[0] = lds32(Y + (n0 + g) * ld + k0 + 2 * c);
  b[1] = lds32(Y + (n0 + g) * ld + k0 + 8 + 2 * c);
}
// B fragment of B[k][n] stored row-major as X[k][n] (stride ld): pairs along k are gathered.
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[2], const uint16_t* X, int ld, int k0, int n0, int g, int c) {
  const uint16_t* r0 = X + (k0 + 2 * c) * ld + n0 + g;
  b[0] = pack2(r0[0], r0[ld]);
  b[1] = pack2(r0[8 * ld], r0[9 * ld]);
}
// fp16 B fragment -> two bf16 fragments with b = hi + lo exactly (fp16 has 11 significant bits).
__device__ __forceinline__ void split_b_f16(const uint32_t (&b)[2], uint32_t (&bh)[2], uint32_t (&bl)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint16_t h0, l0, h1, l1;
    split_bf16(F16<c10::Half>::lo(b[i]), h0, l0);
    split_bf16(F16<c10::Half>::hi(b[i]), h1, l1);
    bh[i] = pack2(h0, h1);
    bl[i] = pack2(l0, l1);
  }
}
// d += [ah; al] x b with b in T's format: bf16 directly, fp16 as two bf16 terms.
template <typename T>
__device__ __forceinline__ void mma_split(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    mma_bf16(d, ah, b);
    mma_bf16(d, al, b);
  } else {
    uint32_t bh[2], bl[2];
    split_b_f16(b, bh, bl);
    mma_bf16(d, ah, bh);
    mma_bf16(d, al, bh);
    mma_bf16(d, ah, bl);
  }
}

// Vector of VEC elements loaded/stored with one access of at most 16 bytes per 16 bytes.
template <typename T, int VEC>
struct alignas((sizeof(T) * VEC > 16) ? 16 : sizeof(T) * VEC) Vec {
  T v[VEC];
};

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
  using acc_t = acc_type_t<scalar_t>;
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
          wv[q] = static_cast<acc_t>(wb[j0 + q]);
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
          for (int i = 0; i < VEC; ++i) acc[i] += wv[q] * static_cast<acc_t>(x[q].v[i]);
        }
      }
    }
    Vec<out_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<out_t>(acc[i]);
    *reinterpret_cast<Vec<out_t, VEC>*>(ob + c) = o;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename scalar_t, typename index_t, typename out_t>
void launch_bag_gather(const scalar_t* w, const index_t* idx, const scalar_t* bank, out_t* out, int64_t nbags,
                       int64_t k, int64_t R, int64_t dz, cudaStream_t stream) {
  if (nbags == 0 || dz == 0) return;
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = dz % V == 0 && aligned16(bank) && aligned16(out);
  const int v = vec ? V : 1;
  const int64_t ncol = (dz + v - 1) / v;
  int tx = 1;
  while (tx < ncol && tx < 256) tx <<= 1;
  const int ty = 256 / tx;
  const int64_t blocks = (nbags + ty - 1) / ty;
  TORCH_CHECK(blocks <= INT32_MAX, "hive_gather: too many bags for one launch: ", nbags);
  const dim3 block(tx, ty);
  if (vec) {
    bag_gather_kernel<scalar_t, index_t, out_t, V>
        <<<static_cast<unsigned>(blocks), block, 0, stream>>>(w, idx, bank, out, nbags, k, R, dz);
  } else {
    bag_gather_kernel<scalar_t, index_t, out_t, 1>
        <<<static_cast<unsigned>(blocks), block, 0, stream>>>(w, idx, bank, out, nbags, k, R, dz);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  using acc_t = acc_type_t<scalar_t>;
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
          for (int i = 0; i < VEC; ++i) part[q] += static_cast<acc_t>(gv.v[i]) * static_cast<acc_t>(x[q].v[i]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < J; ++q) {
      const acc_t s = warp_sum(part[q]);
      if (lane == 0 && j0 + q < k) gw[b * k + j0 + q] = static_cast<scalar_t>(s);
    }
  }
}

template <typename scalar_t, typename g_t, typename index_t>
void launch_bag_dot(const g_t* G, const index_t* idx, const scalar_t* bank, scalar_t* gw, int64_t nbags, int64_t k,
                    int64_t R, int64_t dz, cudaStream_t stream) {
  if (nbags == 0 || k == 0) return;
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = dz % V == 0 && aligned16(bank) && aligned16(G);
  const int warps = 4;
  const int64_t blocks = (nbags + warps - 1) / warps;
  TORCH_CHECK(blocks <= INT32_MAX, "hive_gather_backward: too many bags for one launch: ", nbags);
  if (vec) {
    bag_dot_kernel<scalar_t, g_t, index_t, V>
        <<<static_cast<unsigned>(blocks), warps * 32, 0, stream>>>(G, idx, bank, gw, nbags, k, R, dz);
  } else {
    bag_dot_kernel<scalar_t, g_t, index_t, 1>
        <<<static_cast<unsigned>(blocks), warps * 32, 0, stream>>>(G, idx, bank, gw, nbags, k, R, dz);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================================================
// fwd_generic: out[t,h,v] = sum_z u[t,h,z] proj[h,z,v], u gathered per chunk into shared memory
// ============================================================================================
constexpr int G_TM = 16;       // tokens per block
constexpr int G_ZC = 64;       // d_z columns per chunk
constexpr int G_VT = 64;       // d_v columns per block
constexpr int G_THREADS = 256;
constexpr int G_OUT_PER_THREAD = G_TM * G_VT / G_THREADS;  // 4

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(G_THREADS)
    fwd_generic_kernel(const scalar_t* __restrict__ w, const index_t* __restrict__ idx,
                       const scalar_t* __restrict__ bank, const scalar_t* __restrict__ proj,
                       scalar_t* __restrict__ out, int64_t N, int64_t H, int64_t k, int64_t R, int64_t dz,
                       int64_t dv) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t su[G_TM][G_ZC];
  const int tid = threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.x) * G_TM;
  const int64_t h = blockIdx.y;
  const int64_t v0 = int64_t(blockIdx.z) * G_VT;
  acc_t oacc[G_OUT_PER_THREAD];
#pragma unroll
  for (int q = 0; q < G_OUT_PER_THREAD; ++q) oacc[q] = acc_t(0);
  for (int64_t z0 = 0; z0 < dz; z0 += G_ZC) {
    __syncthreads();  // the previous chunk's products are done with su
    for (int i = tid; i < G_TM * G_ZC; i += G_THREADS) {
      const int t = i / G_ZC, zz = i % G_ZC;
      const int64_t tok = t0 + t, z = z0 + zz;
      acc_t a = acc_t(0);
      if (tok < N && z < dz) {
        const int64_t base = (tok * H + h) * k;
        for (int64_t j = 0; j < k; ++j)
          a += static_cast<acc_t>(w[base + j]) * static_cast<acc_t>(bank[checked_row(idx[base + j], R) * dz + z]);
      }
      su[t][zz] = a;
    }
    __syncthreads();
    const int64_t zn = std::min<int64_t>(G_ZC, dz - z0);
#pragma unroll
    for (int q = 0; q < G_OUT_PER_THREAD; ++q) {
      const int o = tid + q * G_THREADS;
      const int t = o / G_VT;
      const int64_t v = v0 + o % G_VT;
      if (v < dv) {
        const scalar_t* p = proj + (h * dz + z0) * dv + v;
        acc_t s = oacc[q];
        for (int64_t zz = 0; zz < zn; ++zz) s += su[t][zz] * static_cast<acc_t>(p[zz * dv]);
        oacc[q] = s;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < G_OUT_PER_THREAD; ++q) {
    const int o = tid + q * G_THREADS;
    const int64_t tok = t0 + o / G_VT, v = v0 + o % G_VT;
    if (tok < N && v < dv) out[(tok * H + h) * dv + v] = static_cast<scalar_t>(oacc[q]);
  }
}

// ============================================================================================
// fwd_tc: fused gather + projection on tensor cores (bf16 / fp16)
// ============================================================================================
constexpr int F_TM = 64;          // tokens per block (4 m-tiles of 16)
constexpr int F_ZC = 256;         // d_z columns per chunk (32 lanes x 8)
constexpr int F_VT = 64;          // d_v columns per block (8 n-tiles of 8)
constexpr int F_THREADS = 256;    // 8 warps: warp w -> m-tile w % 4, n-tiles 4*(w / 4) .. +3
constexpr int F_LDU = F_ZC + 8;   // row stride of the u tiles (conflict-free fragment loads)
constexpr int F_LDP = F_VT + 8;   // row stride of the proj chunk
constexpr int F_KMAX = 64;        // fast path only for k <= F_KMAX (indices/weights staged in smem)

size_t fwd_tc_smem_bytes(int64_t k) {
  return sizeof(uint16_t) * (2 * F_TM * F_LDU + F_ZC * F_LDP) + size_t(F_TM) * size_t(k) * (sizeof(int32_t) + sizeof(float));
}

template <typename T, typename index_t>
__global__ void __launch_bounds__(F_THREADS, 2)
    fwd_tc_kernel(const T* __restrict__ w_, const index_t* __restrict__ idx, const T* __restrict__ bank_,
                  const T* __restrict__ proj_, T* __restrict__ out_, int64_t N, int H, int k, int64_t R, int dz,
                  int dv) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* Uh = reinterpret_cast<uint16_t*>(smem);
  uint16_t* Ul = Uh + F_TM * F_LDU;
  uint16_t* Ps = Ul + F_TM * F_LDU;  // proj chunk [z][v]
  int32_t* sR = reinterpret_cast<int32_t*>(Ps + F_ZC * F_LDP);
  float* sW = reinterpret_cast<float*>(sR + F_TM * k);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_);
  const uint16_t* bank = reinterpret_cast<const uint16_t*>(bank_);
  const uint16_t* proj = reinterpret_cast<const uint16_t*>(proj_);
  uint16_t* out = reinterpret_cast<uint16_t*>(out_);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;
  const int64_t t0 = int64_t(blockIdx.x) * F_TM;
  const int h = blockIdx.y;
  const int v0 = blockIdx.z * F_VT;

  stage_tile_rows<T>(sR, sW, idx, w, t0, F_TM, N, H, h, k, R, tid, F_THREADS);

  const int mt = warp & 3;   // token rows 16*mt .. 16*mt+15
  const int nh = warp >> 2;  // v columns 32*nh .. 32*nh+31 of the tile
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;

  const int c = lane * 8;  // this lane's 8 columns of the chunk
  for (int z0 = 0; z0 < dz; z0 += F_ZC) {
    const int width = min(F_ZC, dz - z0);  // a multiple of 8
    const int kz = (width + 15) & ~15;     // padded to the mma k-step; the padding is zero
    __syncthreads();                       // sR/sW written; the previous chunk's mma is done
    for (int i = tid; i < kz * F_VT; i += F_THREADS) {
      const int z = i / F_VT, v = i % F_VT;
      uint16_t x = 0;
      if (z < width && v0 + v < dv) x = proj[(int64_t(h) * dz + z0 + z) * dv + v0 + v];
      Ps[z * F_LDP + v] = x;
    }
    // Gather: warp w handles tokens w, w+8, ..., each lane 8 columns, 8 rows in flight.
    for (int t = warp; t < F_TM; t += F_THREADS / 32) {
      float u[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) u[i] = 0.f;
      if (t0 + t < N && c < width) {
        const int32_t* rr = sR + t * k;
        const float* ww = sW + t * k;
        const uint16_t* base = bank + z0 + c;
        for (int j0 = 0; j0 < k; j0 += 8) {
          uint4 x[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) x[q] = (j0 + q < k) ? ldg16(base + int64_t(rr[j0 + q]) * dz) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            if (j0 + q < k) {
              float xf[8];
              unpack8<T>(x[q], xf);
              const float wq = ww[j0 + q];
#pragma unroll
              for (int i = 0; i < 8; ++i) u[i] = fmaf(wq, xf[i], u[i]);
            }
          }
        }
      }
      if (c < kz) {
        uint16_t hi[8], lo[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) split_bf16(u[i], hi[i], lo[i]);
        *reinterpret_cast<uint4*>(Uh + t * F_LDU + c) =
            make_uint4(pack2(hi[0], hi[1]), pack2(hi[2], hi[3]), pack2(hi[4], hi[5]), pack2(hi[6], hi[7]));
        *reinterpret_cast<uint4*>(Ul + t * F_LDU + c) =
            make_uint4(pack2(lo[0], lo[1]), pack2(lo[2], lo[3]), pack2(lo[4], lo[5]), pack2(lo[6], lo[7]));
      }
    }
    __syncthreads();
    for (int kk = 0; kk < kz; kk += 16) {
      uint32_t ah[4], al[4];
      load_a(ah, Uh, F_LDU, mt * 16, kk, g, c4);
      load_a(al, Ul, F_LDU, mt * 16, kk, g, c4);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        uint32_t b[2];
        load_b_kn(b, Ps, F_LDP, kk, nh * 32 + nt * 8, g, c4);
        mma_split<T>(acc[nt], ah, al, b);
      }
    }
  }
  // Store: C rows g and g+8 of m-tile mt, columns 2*c4, 2*c4+1 of each n-tile.
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int v = v0 + nh * 32 + nt * 8 + 2 * c4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t tok = t0 + mt * 16 + g + 8 * half;
      if (tok < N) {
        uint16_t* o = out + (tok * H + h) * dv;
        if (v < dv) o[v] = F16<T>::from_float(acc[nt][2 * half]);
        if (v + 1 < dv) o[v + 1] = F16<T>::from_float(acc[nt][2 * half + 1]);
      }
    }
  }
}

// ============================================================================================
// bwd_tc: fused backward for grad_weights and grad_proj on tensor cores (bf16 / fp16)
// ============================================================================================
constexpr int B_TM = 32;         // tokens per tile (2 m-tiles for gu, 2 k-steps for grad_proj)
constexpr int B_THREADS = 256;   // 8 warps
constexpr int B_ZMAX = 256;      // fast path: d_z <= 256 (warp w owns d_z rows 32w..32w+31 of dP)
constexpr int B_VMAX = 64;       // fast path: d_v <= 64 (8 n-tiles)
constexpr int B_KMAX = 64;
constexpr int B_ROWS = 16;       // bank rows in flight per lane in the gather

struct BwdDims {
  int KZ, KV, LDZ, LDV, LDF;
};
__host__ __device__ inline BwdDims bwd_dims(int dz, int dv) {
  BwdDims d;
  d.KZ = (dz + 15) & ~15;
  d.KV = (dv + 15) & ~15;
  d.LDZ = d.KZ + 8;
  d.LDV = d.KV + 8;
  d.LDF = d.KZ + 8;
  return d;
}
size_t bwd_tc_smem_bytes(int dz, int dv, int64_t k) {
  const BwdDims d = bwd_dims(dz, dv);
  return sizeof(uint16_t) * (size_t(d.KZ) * d.LDV + size_t(B_TM) * d.LDV + 2 * size_t(B_TM) * d.LDZ) +
         sizeof(float) * size_t(B_TM) * d.LDF + size_t(B_TM) * size_t(k) * (sizeof(int32_t) + sizeof(float));
}

template <typename T, typename index_t>
__global__ void __launch_bounds__(B_THREADS, 1)
    bwd_tc_kernel(const T* __restrict__ g_, const T* __restrict__ w_, const index_t* __restrict__ idx,
                  const T* __restrict__ bank_, const T* __restrict__ proj_, T* __restrict__ gw_,
                  float* __restrict__ gp_part, int64_t N, int H, int k, int64_t R, int dz, int dv,
                  int tiles_per_block, bool need_w, bool need_proj) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BwdDims d = bwd_dims(dz, dv);
  uint16_t* Ps = reinterpret_cast<uint16_t*>(smem);  // proj[h] [z][v]      (KZ x LDV)
  uint16_t* Gs = Ps + d.KZ * d.LDV;                   // grad_out tile [t][v] (B_TM x LDV)
  uint16_t* Uh = Gs + B_TM * d.LDV;                   // u tile [t][z], hi    (B_TM x LDZ)
  uint16_t* Ul = Uh + B_TM * d.LDZ;                   // u tile, lo
  float* GU = reinterpret_cast<float*>(Ul + B_TM * d.LDZ);  // gu tile [t][z] fp32 (B_TM x LDF)
  int32_t* sR = reinterpret_cast<int32_t*>(GU + B_TM * d.LDF);
  float* sW = reinterpret_cast<float*>(sR + B_TM * k);
  const uint16_t* gout = reinterpret_cast<const uint16_t*>(g_);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_);
  const uint16_t* bank = reinterpret_cast<const uint16_t*>(bank_);
  const uint16_t* proj = reinterpret_cast<const uint16_t*>(proj_);
  uint16_t* gw = reinterpret_cast<uint16_t*>(gw_);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;
  const int h = blockIdx.y;
  const int64_t ntiles = (N + B_TM - 1) / B_TM;
  const int64_t tile_begin = int64_t(blockIdx.x) * tiles_per_block;
  const int64_t tile_end = std::min<int64_t>(ntiles, tile_begin + tiles_per_block);

  if (need_w) {
    for (int i = tid; i < d.KZ * d.KV; i += B_THREADS) {
      const int z = i / d.KV, v = i % d.KV;
      Ps[z * d.LDV + v] = (z < dz && v < dv) ? proj[(int64_t(h) * dz + z) * dv + v] : uint16_t(0);
    }
  }
  float dacc[2][8][4];  // grad_proj rows 32*warp + 16*mi + (g, g+8), cols 8*nt + 2*c4 (+1)
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) dacc[mi][nt][r] = 0.f;

  const int c = lane * 8;  // this lane's 8 columns of d_z (d_z <= 256)
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * B_TM;
    __syncthreads();  // Ps written (first tile); the previous tile is done with the smem tiles
    for (int i = tid; i < B_TM * d.KV; i += B_THREADS) {
      const int t = i / d.KV, v = i % d.KV;
      const int64_t tok = t0 + t;
      Gs[t * d.LDV + v] = (tok < N && v < dv) ? gout[(tok * H + h) * dv + v] : uint16_t(0);
    }
    stage_tile_rows<T>(sR, sW, idx, w, t0, B_TM, N, H, h, k, R, tid, B_THREADS);
    __syncthreads();
    if (need_w) {
      // GU[t][z] = sum_v Gs[t][v] * Ps[z][v]: warp w computes z columns 32w .. 32w+31.
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int n0 = warp * 32 + q * 8;
        if (n0 < d.KZ) {
          float cc[2][4];
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int r = 0; r < 4; ++r) cc[mi][r] = 0.f;
          for (int kk = 0; kk < d.KV; kk += 16) {
            uint32_t b[2];
            load_b_nk(b, Ps, d.LDV, kk, n0, g, c4);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              uint32_t a[4];
              load_a(a, Gs, d.LDV, mi * 16, kk, g, c4);
              mma_native<T>(cc[mi], a, b);
            }
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            *reinterpret_cast<float2*>(GU + (mi * 16 + g) * d.LDF + n0 + 2 * c4) = make_float2(cc[mi][0], cc[mi][1]);
            *reinterpret_cast<float2*>(GU + (mi * 16 + g + 8) * d.LDF + n0 + 2 * c4) =
                make_float2(cc[mi][2], cc[mi][3]);
          }
        }
      }
      __syncthreads();
    }
    // One gather of each token's k rows: grad_weights (dot with gu) and u (for grad_proj).
    for (int t = warp; t < B_TM; t += B_THREADS / 32) {
      const int64_t tok = t0 + t;
      float u[8], gu[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        u[i] = 0.f;
        gu[i] = 0.f;
      }
      if (tok < N) {  // warp-uniform
        const bool col = c < dz;
        if (need_w && col) {
          const float4 a = *reinterpret_cast<const float4*>(GU + t * d.LDF + c);
          const float4 b = *reinterpret_cast<const float4*>(GU + t * d.LDF + c + 4);
          gu[0] = a.x, gu[1] = a.y, gu[2] = a.z, gu[3] = a.w;
          gu[4] = b.x, gu[5] = b.y, gu[6] = b.z, gu[7] = b.w;
        }
        const int32_t* rr = sR + t * k;
        const float* ww = sW + t * k;
        const uint16_t* base = bank + c;
        const int64_t gw_off = (tok * H + h) * k;
        // 16 rows in flight per lane: one block per SM holds only 8 warps, so each needs more.
        for (int j0 = 0; j0 < k; j0 += B_ROWS) {
          uint4 x[B_ROWS];
#pragma unroll
          for (int q = 0; q < B_ROWS; ++q)
            x[q] = (col && j0 + q < k) ? ldg16(base + int64_t(rr[j0 + q]) * dz) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int q = 0; q < B_ROWS; ++q) {
            if (j0 + q < k) {  // warp-uniform
              float xf[8];
              unpack8<T>(x[q], xf);
              if (need_proj) {
                const float wq = ww[j0 + q];
#pragma unroll
                for (int i = 0; i < 8; ++i) u[i] = fmaf(wq, xf[i], u[i]);
              }
              if (need_w) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) s = fmaf(gu[i], xf[i], s);
                s = warp_sum(s);
                if (lane == 0) gw[gw_off + j0 + q] = F16<T>::from_float(s);
              }
            }
          }
        }
      }
      if (need_proj && c < d.KZ) {
        uint16_t hi[8], lo[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) split_bf16(u[i], hi[i], lo[i]);
        *reinterpret_cast<uint4*>(Uh + t * d.LDZ + c) =
            make_uint4(pack2(hi[0], hi[1]), pack2(hi[2], hi[3]), pack2(hi[4], hi[5]), pack2(hi[6], hi[7]));
        *reinterpret_cast<uint4*>(Ul + t * d.LDZ + c) =
            make_uint4(pack2(lo[0], lo[1]), pack2(lo[2], lo[3]), pack2(lo[4], lo[5]), pack2(lo[6], lo[7]));
      }
    }
    if (need_proj) {
      __syncthreads();
      // dP[z][v] += sum_t U[t][z] * G[t][v]: A = U^T (rows z of warp w), B = Gs [t][v].
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int m0 = warp * 32 + mi * 16;
        if (m0 < d.KZ) {
#pragma unroll
          for (int kk = 0; kk < B_TM; kk += 16) {
            uint32_t ah[4], al[4];
            load_a_trans(ah, Uh, d.LDZ, m0, kk, g, c4);
            load_a_trans(al, Ul, d.LDZ, m0, kk, g, c4);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              if (nt * 8 < d.KV) {
                uint32_t b[2];
                load_b_kn(b, Gs, d.LDV, kk, nt * 8, g, c4);
                mma_split<T>(dacc[mi][nt], ah, al, b);
              }
            }
          }
        }
      }
    }
  }
  if (need_proj) {
    float* dst = gp_part + (int64_t(blockIdx.x) * H + h) * int64_t(dz) * dv;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int z = warp * 32 + mi * 16 + g + 8 * (r >> 1);
          const int v = nt * 8 + 2 * c4 + (r & 1);
          if (z < dz && v < dv) dst[int64_t(z) * dv + v] = dacc[mi][nt][r];
        }
  }
}

// ============================================================================================
// grad_bank: deterministic segmented reduction over key-sorted contributions
// ============================================================================================
template <typename index_t, typename key_t>
__global__ void make_keys_kernel(const index_t* __restrict__ idx, key_t* __restrict__ keys, int64_t M, int64_t k,
                                 int64_t H, int64_t R, bool per_head) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < M; e += stride) {
    const int64_t r = checked_row(idx[e], R);
    keys[e] = static_cast<key_t>(per_head ? r * H + (e / k) % H : r);
  }
}

// Carries of chunk [s, e) of a sorted list of n keys: its first run continues from the previous
// chunk, its last run continues into the next; one carry when the whole chunk is a single run
// that does both.
struct ChunkCarry {
  bool first, last;
  int count;
};
__device__ __forceinline__ ChunkCarry chunk_carry(const int64_t* keys, int64_t n, int64_t s, int64_t e) {
  ChunkCarry cc;
  cc.first = s > 0 && keys[s - 1] == keys[s];
  cc.last = e < n && keys[e - 1] == keys[e];
  const bool single = cc.first && cc.last && keys[s] == keys[e - 1];
  cc.count = int(cc.first) + int(cc.last) - int(single);
  return cc;
}

__global__ void seg_count_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ n_dev, int64_t n_host,
                                 int64_t C, int64_t nchunks, int64_t* __restrict__ counts) {
  const int64_t n = n_dev ? *n_dev : n_host;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t ch = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; ch < nchunks; ch += stride) {
    const int64_t s = ch * C;
    counts[ch] = s < n ? chunk_carry(keys, n, s, std::min<int64_t>(n, s + C)).count : 0;
  }
}

constexpr int S_WARPS = 4;  // warps (chunks) per block
constexpr int S_Q = 4;      // columns per lane per column block: 128 columns per block.y

// One warp per (chunk of C positions, 128-column block). LEVEL0: position i is contribution
// e = perm[i] with weight w[e] and source row e / k_div of src (grad_out); later levels: position
// i is carry i of the previous level, weight 1, source row i of src (the carries). Complete runs
// go to out[key] (out_t); runs cut by a chunk boundary go to the next level's carry slots.
template <typename src_t, typename wt_t, typename out_t, typename acc_t, bool LEVEL0>
__global__ void __launch_bounds__(S_WARPS * 32)
    seg_reduce_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ n_dev, int64_t n_host,
                      const int64_t* __restrict__ perm, const wt_t* __restrict__ weights, int64_t k_div,
                      const src_t* __restrict__ src, int64_t W, out_t* __restrict__ out,
                      const int64_t* __restrict__ carry_incl, int64_t* __restrict__ carry_keys,
                      acc_t* __restrict__ carry_vals, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t chunk = int64_t(blockIdx.x) * S_WARPS + (threadIdx.x >> 5);
  const int64_t n = n_dev ? *n_dev : n_host;
  const int64_t s = chunk * C;
  if (s >= n) return;
  const int64_t e_end = std::min<int64_t>(n, s + C);
  const int64_t col0 = int64_t(blockIdx.y) * (32 * S_Q) + lane;
  ChunkCarry cc = {false, false, 0};
  int64_t slot0 = 0;
  if (carry_incl != nullptr) {  // null when the list is one chunk: nothing can be carried
    cc = chunk_carry(keys, n, s, e_end);
    slot0 = chunk > 0 ? carry_incl[chunk - 1] : 0;
  }

  acc_t acc[S_Q];
#pragma unroll
  for (int q = 0; q < S_Q; ++q) acc[q] = acc_t(0);
  int64_t cur = keys[s];
  int64_t piece_start = s;

  auto flush = [&](int64_t key, bool is_first, bool is_last) {
    const bool carry_first = is_first && cc.first;
    const bool carry_last = is_last && cc.last;
    if (carry_first || carry_last) {
      const int64_t slot = slot0 + ((carry_first || !cc.first) ? 0 : 1);
#pragma unroll
      for (int q = 0; q < S_Q; ++q) {
        const int64_t col = col0 + 32 * q;
        if (col < W) carry_vals[slot * W + col] = acc[q];
      }
      if (blockIdx.y == 0 && lane == 0) carry_keys[slot] = key;
    } else {
#pragma unroll
      for (int q = 0; q < S_Q; ++q) {
        const int64_t col = col0 + 32 * q;
        if (col < W) out[key * W + col] = static_cast<out_t>(acc[q]);
      }
    }
  };

  // Lane i holds position b + i of the current 32-position batch (key, source row, weight); the
  // next batch's are loaded one batch ahead, so their latency hides behind the row loads.
  auto fetch = [&](int64_t b, int64_t& key, int64_t& row, acc_t& wt) {
    key = -1;
    row = 0;
    wt = acc_t(0);
    if (b + lane < e_end) {
      key = keys[b + lane];
      if constexpr (LEVEL0) {
        const int64_t e = perm[b + lane];
        row = e / k_div;
        wt = static_cast<acc_t>(weights[e]);
      } else {
        row = b + lane;
        wt = acc_t(1);
      }
    }
  };
  int64_t nx_key, nx_row;
  acc_t nx_w;
  fetch(s, nx_key, nx_row, nx_w);
  for (int64_t b = s; b < e_end; b += 32) {
    const int cnt = static_cast<int>(std::min<int64_t>(32, e_end - b));
    const int64_t my_key = nx_key, my_row = nx_row;
    const acc_t my_w = nx_w;
    if (b + 32 < e_end) fetch(b + 32, nx_key, nx_row, nx_w);
    for (int q0 = 0; q0 < cnt; q0 += 8) {
      acc_t x[8][S_Q];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t row = __shfl_sync(kFullMask, my_row, q0 + i);
#pragma unroll
        for (int q = 0; q < S_Q; ++q) {
          const int64_t col = col0 + 32 * q;
          x[i][q] = (q0 + i < cnt && col < W) ? static_cast<acc_t>(src[row * W + col]) : acc_t(0);
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t key = __shfl_sync(kFullMask, my_key, q0 + i);
        const acc_t wq = __shfl_sync(kFullMask, my_w, q0 + i);
        if (q0 + i < cnt) {  // warp-uniform
          if (key != cur) {
            flush(cur, piece_start == s, false);
            cur = key;
            piece_start = b + q0 + i;
#pragma unroll
            for (int q = 0; q < S_Q; ++q) acc[q] = acc_t(0);
          }
#pragma unroll
          for (int q = 0; q < S_Q; ++q) acc[q] += wq * x[i][q];
        }
      }
    }
  }
  flush(cur, piece_start == s, true);
}

// Positions per chunk of the segmented reduction: a power of two in [32, 2048] giving about 48
// chunks (warps) per multiprocessor, i.e. about two waves: each warp walks its chunk in order, so
// short chunks keep enough of them in flight. (C >= 4 is what makes the levels shrink: a level of
// n chunks leaves at most 2n carries.)
int64_t seg_chunk(int64_t M, int device) {
  const int64_t target = M / (int64_t(device_sm_count(device)) * 48);
  int64_t C = 32;
  while (2 * C <= target && C < 2048) C <<= 1;
  return C;
}

// out[key, :] = sum over contributions e with keys[e] == key of w[e] * src[e / k, :] (rows of
// width W), in the order of e; out must be zero-filled by the caller (untouched keys stay zero).
template <typename scalar_t, typename out_t>
void segmented_scatter(const at::Tensor& keys_unsorted, const scalar_t* weights, int64_t k, const scalar_t* src,
                       int64_t W, out_t* out, cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t M = keys_unsorted.numel();
  if (M == 0 || W == 0) return;
  const int device = keys_unsorted.get_device();
  auto sorted = at::sort(keys_unsorted, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor skeys = std::get<0>(sorted).to(at::kLong);
  at::Tensor perm = std::get<1>(sorted);
  const int64_t C = seg_chunk(M, device);
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const int64_t ncb = (W + 32 * S_Q - 1) / (32 * S_Q);
  TORCH_CHECK(ncb <= 65535, "hive_gather_backward: row width ", W, " too large");

  // Level 0: the contributions themselves.
  int64_t nchunks = (M + C - 1) / C;
  at::Tensor carry_keys, carry_vals, incl;  // incl: inclusive prefix sum of the carries per chunk
  // Carry slots of the next level (at most 2 per chunk) and their offsets.
  auto plan_carries = [&](const at::Tensor& keys, const int64_t* n_dev, int64_t n_host, int64_t nch) {
    at::Tensor counts = at::empty({nch}, skeys.options());
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((nch + threads - 1) / threads, 65535);
    seg_count_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(keys.data_ptr<int64_t>(), n_dev, n_host,
                                                                         C, nch, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    incl = at::cumsum(counts, 0);
    carry_keys = at::empty({2 * nch}, skeys.options());
    carry_vals = at::empty({2 * nch, W}, skeys.options().dtype(acc_dtype));
  };
  const dim3 block(S_WARPS * 32);
  {
    const bool multi = nchunks > 1;
    if (multi) plan_carries(skeys, nullptr, M, nchunks);
    const dim3 grid(static_cast<unsigned>((nchunks + S_WARPS - 1) / S_WARPS), static_cast<unsigned>(ncb));
    seg_reduce_kernel<scalar_t, scalar_t, out_t, acc_t, true><<<grid, block, 0, stream>>>(
        skeys.data_ptr<int64_t>(), nullptr, M, perm.data_ptr<int64_t>(), weights, k, src, W, out,
        multi ? incl.data_ptr<int64_t>() : nullptr, multi ? carry_keys.data_ptr<int64_t>() : nullptr,
        multi ? carry_vals.data_ptr<acc_t>() : nullptr, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!multi) return;
  }
  // Later levels over the carries, until one chunk holds them all.
  while (true) {
    at::Tensor in_keys = carry_keys, in_vals = carry_vals, in_incl = incl;
    const int64_t prev_chunks = nchunks;
    const int64_t* n_dev = in_incl.data_ptr<int64_t>() + (prev_chunks - 1);
    const int64_t n_max = 2 * prev_chunks;  // upper bound; the kernels read the true count at n_dev
    nchunks = (n_max + C - 1) / C;
    const bool multi = nchunks > 1;
    if (multi) plan_carries(in_keys, n_dev, n_max, nchunks);
    const dim3 grid(static_cast<unsigned>((nchunks + S_WARPS - 1) / S_WARPS), static_cast<unsigned>(ncb));
    seg_reduce_kernel<acc_t, acc_t, out_t, acc_t, false><<<grid, block, 0, stream>>>(
        in_keys.data_ptr<int64_t>(), n_dev, n_max, nullptr, nullptr, 1, in_vals.data_ptr<acc_t>(), W, out,
        multi ? incl.data_ptr<int64_t>() : nullptr, multi ? carry_keys.data_ptr<int64_t>() : nullptr,
        multi ? carry_vals.data_ptr<acc_t>() : nullptr, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!multi) return;
  }
}

// Keys of the bank-gradient contributions: row * H + h with proj (Y is [R, H, d_v]), row without.
at::Tensor make_keys(const at::Tensor& idx, int64_t k, int64_t H, int64_t R, bool per_head, cudaStream_t stream) {
  const int64_t M = idx.numel();
  const int64_t key_space = per_head ? R * H : R;
  const bool small = key_space <= INT32_MAX;
  at::Tensor keys = at::empty({M}, idx.options().dtype(small ? at::kInt : at::kLong));
  if (M == 0) return keys;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((M + threads - 1) / threads, int64_t(device_sm_count(idx.get_device())) * 16);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "hive_gather_make_keys", [&] {
    if (small) {
      make_keys_kernel<index_t, int32_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          idx.data_ptr<index_t>(), keys.data_ptr<int32_t>(), M, k, H, R, per_head);
    } else {
      make_keys_kernel<index_t, int64_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          idx.data_ptr<index_t>(), keys.data_ptr<int64_t>(), M, k, H, R, per_head);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keys;
}

// ============================================================================================
// Host entry points
// ============================================================================================
struct Shapes {
  int64_t N, H, k, R, dz, dv;
  bool has_proj;
};

Shapes shapes_of(const at::Tensor& weights, const at::Tensor& bank, const c10::optional<at::Tensor>& proj) {
  Shapes s;
  s.N = weights.size(0);
  s.H = weights.size(1);
  s.k = weights.size(2);
  s.R = bank.size(0);
  s.dz = bank.size(1);
  s.has_proj = proj.has_value();
  s.dv = s.has_proj ? proj->size(2) : s.dz;
  return s;
}

// MIDUS_OPS_CUDA_NO_TC=1 turns the tensor-core paths off (the generic kernels run instead): for
// cross-checking one against the other on a GPU.
bool tc_disabled() {
  const char* s = std::getenv("MIDUS_OPS_CUDA_NO_TC");
  return s != nullptr && *s != '\0' && std::strcmp(s, "0") != 0;
}

// Conditions shared by the tensor-core paths (16-bit dtype checked by the caller).
bool tc_common_ok(const Shapes& s, const at::Tensor& bank) {
  return !tc_disabled() && s.has_proj && s.dz % 8 == 0 && s.k <= F_KMAX && s.R <= INT32_MAX && s.H <= 65535 && aligned16(bank.data_ptr());
}

bool fwd_tc_ok(const Shapes& s, const at::Tensor& bank) {
  if (!tc_common_ok(s, bank) || (s.dv + F_VT - 1) / F_VT > 65535 || s.dz > INT32_MAX / 2 || s.dv > INT32_MAX / 2)
    return false;
  return fwd_tc_smem_bytes(s.k) <= size_t(device_smem_optin(bank.get_device()));
}

bool bwd_tc_ok(const Shapes& s, const at::Tensor& bank) {
  if (!tc_common_ok(s, bank) || s.dz > B_ZMAX || s.dv > B_VMAX || s.k > B_KMAX) return false;
  return bwd_tc_smem_bytes(int(s.dz), int(s.dv), s.k) <= size_t(device_smem_optin(bank.get_device()));
}

// Raises a kernel's dynamic shared-memory limit to the device's opt-in maximum, once per kernel
// and device (so that nothing but launches happens during a CUDA graph capture after the first
// eager call).
template <typename Kernel>
void allow_smem(Kernel kernel, int device) {
  static bool done[64] = {false};
  if (device >= 0 && device < 64 && done[device]) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device_smem_optin(device)));
  if (device >= 0 && device < 64) done[device] = true;
}

// The tensor-core paths, for bf16/fp16 where their conditions hold; false otherwise (then the
// generic path runs). Templates, so that `if constexpr` keeps them from being instantiated for
// fp32/fp64.
template <typename scalar_t, typename index_t>
bool try_fwd_tc(const Shapes& s, const at::Tensor& bank, const scalar_t* wp, const index_t* ip, const scalar_t* bp,
                const scalar_t* pp, scalar_t* op, cudaStream_t stream) {
  if constexpr (!is_16bit_v<scalar_t>) {
    return false;
  } else {
    if (!fwd_tc_ok(s, bank)) return false;
    const size_t smem = fwd_tc_smem_bytes(s.k);
    auto kernel = fwd_tc_kernel<scalar_t, index_t>;
    allow_smem(kernel, bank.get_device());
    const dim3 grid(static_cast<unsigned>((s.N + F_TM - 1) / F_TM), static_cast<unsigned>(s.H),
                    static_cast<unsigned>((s.dv + F_VT - 1) / F_VT));
    kernel<<<grid, F_THREADS, smem, stream>>>(wp, ip, bp, pp, op, s.N, int(s.H), int(s.k), s.R, int(s.dz), int(s.dv));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

// grad_weights into gw and grad_proj into gp (whichever are needed).
template <typename scalar_t, typename index_t>
bool try_bwd_tc(const Shapes& s, const at::Tensor& bank, const scalar_t* gop, const scalar_t* wp, const index_t* ip,
                const scalar_t* bp, const at::Tensor& proj, at::Tensor& gw, at::Tensor& gp, bool need_w,
                bool need_proj, cudaStream_t stream) {
  if constexpr (!is_16bit_v<scalar_t>) {
    return false;
  } else {
    if (!bwd_tc_ok(s, bank)) return false;
    const size_t smem = bwd_tc_smem_bytes(int(s.dz), int(s.dv), s.k);
    auto kernel = bwd_tc_kernel<scalar_t, index_t>;
    allow_smem(kernel, bank.get_device());
    const int64_t ntiles = (s.N + B_TM - 1) / B_TM;
    int64_t S = ntiles;  // token splits: one tile per block unless grad_proj is accumulated
    if (need_proj) {     // then one block per head and per slot of the GPU, each over a run of tiles
      int occ = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, B_THREADS, smem));
      const int64_t slots = int64_t(device_sm_count(bank.get_device())) * std::max(occ, 1);
      S = std::max<int64_t>(1, std::min<int64_t>(ntiles, slots / s.H));
    }
    const int64_t tpb = (ntiles + S - 1) / S;
    S = (ntiles + tpb - 1) / tpb;
    TORCH_CHECK(S <= INT32_MAX && tpb <= INT32_MAX, "hive_gather_backward: too many tokens: ", s.N);
    at::Tensor gp_part =
        need_proj ? at::empty({S, s.H, s.dz, s.dv}, bank.options().dtype(at::kFloat)) : at::Tensor();
    const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(s.H));
    kernel<<<grid, B_THREADS, smem, stream>>>(gop, wp, ip, bp, proj.data_ptr<scalar_t>(),
                                              need_w ? gw.data_ptr<scalar_t>() : nullptr,
                                              need_proj ? gp_part.data_ptr<float>() : nullptr, s.N, int(s.H),
                                              int(s.k), s.R, int(s.dz), int(s.dv), int(tpb), need_w, need_proj);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_proj) gp.copy_(S == 1 ? gp_part.select(0, 0) : gp_part.sum(0));  // fixed-order sum
    return true;
  }
}

at::Tensor hive_gather_cuda(const at::Tensor& weights_in, const at::Tensor& indices_in, const at::Tensor& bank_in,
                            const c10::optional<at::Tensor>& proj_in, bool /*deterministic: always, on CUDA*/,
                            bool check_indices) {
  MIDUS_NO_AUTOCAST();
  check_hive_gather(weights_in, indices_in, bank_in, proj_in);
  TORCH_CHECK(bank_in.is_cuda(), "hive_gather: the CUDA kernel got a bank on ", bank_in.device());
  const c10::cuda::CUDAGuard guard(bank_in.device());
  const Shapes s = shapes_of(weights_in, bank_in, proj_in);
  auto out = at::empty({s.N, s.H, s.dv}, bank_in.options());
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto w = weights_in.contiguous();
  auto idx = indices_in.contiguous();
  auto bank = bank_in.contiguous();
  at::Tensor proj = s.has_proj ? proj_in->contiguous() : at::Tensor();
  if (check_indices) check_index_range_cuda(idx, s.R, "hive_gather", stream);
  if (s.k == 0 || s.dz == 0) return out.zero_();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "hive_gather_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "hive_gather_cuda_idx", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const index_t* ip = idx.data_ptr<index_t>();
      const scalar_t* bp = bank.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      if (!s.has_proj) {
        launch_bag_gather<scalar_t, index_t, scalar_t>(wp, ip, bp, op, s.N * s.H, s.k, s.R, s.dz, stream);
        return;
      }
      const scalar_t* pp = proj.data_ptr<scalar_t>();
      if (!try_fwd_tc<scalar_t, index_t>(s, bank, wp, ip, bp, pp, op, stream)) {
        TORCH_CHECK(s.H <= 65535 && (s.dv + G_VT - 1) / G_VT <= 65535, "hive_gather: H = ", s.H, " or d_v = ", s.dv,
                    " too large for the CUDA kernel");
        const dim3 grid(static_cast<unsigned>((s.N + G_TM - 1) / G_TM), static_cast<unsigned>(s.H),
                        static_cast<unsigned>((s.dv + G_VT - 1) / G_VT));
        fwd_generic_kernel<scalar_t, index_t>
            <<<grid, G_THREADS, 0, stream>>>(wp, ip, bp, pp, op, s.N, s.H, s.k, s.R, s.dz, s.dv);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
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
  const Shapes s = shapes_of(weights_in, bank_in, proj_in);
  need_proj = need_proj && s.has_proj;
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == s.N && grad_out_in.size(1) == s.H &&
                  grad_out_in.size(2) == s.dv,
              "hive_gather_backward: grad_out must have shape [", s.N, ", ", s.H, ", ", s.dv, "], got ",
              grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.device() == bank_in.device(), "hive_gather_backward: grad_out is on ", grad_out_in.device(),
              " but bank is on ", bank_in.device());
  const auto acc_dtype = bank_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor empty = bank_in.new_empty({0});
  at::Tensor gw = need_w ? at::empty({s.N, s.H, s.k}, weights_in.options()) : empty;
  at::Tensor gb = need_bank ? at::zeros({s.R, s.dz}, bank_in.options()) : empty;
  at::Tensor gp = need_proj ? at::zeros({s.H, s.dz, s.dv}, proj_in->options()) : empty;
  // Nothing to compute (gw then has no elements; gb and gp are zeros).
  if (s.N == 0 || s.H == 0 || s.k == 0 || !(need_w || need_bank || need_proj)) return {gw, gb, gp};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto w = weights_in.contiguous();
  auto idx = indices_in.contiguous();
  auto bank = bank_in.contiguous();
  auto gout = grad_out_in.to(bank_in.scalar_type()).contiguous();
  at::Tensor proj = s.has_proj ? proj_in->contiguous() : at::Tensor();
  if (check_indices) check_index_range_cuda(idx, s.R, "hive_gather_backward", stream);
  if (s.dz == 0) return {need_w ? gw.zero_() : gw, gb, gp};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "hive_gather_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "hive_gather_backward_cuda_idx", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const index_t* ip = idx.data_ptr<index_t>();
      const scalar_t* bp = bank.data_ptr<scalar_t>();
      const scalar_t* gop = gout.data_ptr<scalar_t>();

      // ---- grad_weights and grad_proj ------------------------------------------------------
      if (!s.has_proj) {
        if (need_w)
          launch_bag_dot<scalar_t, scalar_t, index_t>(gop, ip, bp, gw.data_ptr<scalar_t>(), s.N * s.H, s.k, s.R,
                                                      s.dz, stream);
      } else if (need_w || need_proj) {
        if (!try_bwd_tc<scalar_t, index_t>(s, bank, gop, wp, ip, bp, proj, gw, gp, need_w, need_proj, stream)) {
          // Generic: per chunk of tokens, gu and u for the chunk only (never [N, H, k, d_z]).
          const int64_t width = std::max(s.dz, s.dv);
          const int64_t T = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, int64_t(sizeof(acc_t)) * s.H * width));
          at::Tensor projA = proj.to(acc_dtype);
          at::Tensor gp_acc = need_proj ? at::zeros({s.H, s.dz, s.dv}, bank.options().dtype(acc_dtype)) : at::Tensor();
          for (int64_t t0 = 0; t0 < s.N; t0 += T) {
            const int64_t nt = std::min(T, s.N - t0);
            at::Tensor go = gout.narrow(0, t0, nt).to(acc_dtype).transpose(0, 1);  // [H, nt, dv]
            const int64_t e0 = t0 * s.H * s.k;
            if (need_w) {
              at::Tensor gu = at::bmm(go, projA.transpose(1, 2)).transpose(0, 1).contiguous();  // [nt, H, dz]
              launch_bag_dot<scalar_t, acc_t, index_t>(gu.data_ptr<acc_t>(), ip + e0, bp,
                                                       gw.data_ptr<scalar_t>() + e0, nt * s.H, s.k, s.R, s.dz, stream);
            }
            if (need_proj) {
              at::Tensor u = at::empty({nt, s.H, s.dz}, bank.options().dtype(acc_dtype));
              launch_bag_gather<scalar_t, index_t, acc_t>(wp + e0, ip + e0, bp, u.data_ptr<acc_t>(), nt * s.H, s.k,
                                                          s.R, s.dz, stream);
              gp_acc.baddbmm_(u.transpose(0, 1).transpose(1, 2), go);  // grad_proj[h] += u[h]^T @ grad_out[h]
            }
          }
          if (need_proj) gp.copy_(gp_acc);
        }
      }

      // ---- grad_bank ----------------------------------------------------------------------
      if (need_bank) {
        at::Tensor keys = make_keys(idx, s.k, s.H, s.R, s.has_proj, stream);
        if (s.has_proj) {
          // Y[row, h] = sum w * grad_out[t, h] (d_v space), then grad_bank = Y @ proj^T.
          at::Tensor Y = at::zeros({s.R * s.H, s.dv}, bank.options().dtype(acc_dtype));
          segmented_scatter<scalar_t, acc_t>(keys, wp, s.k, gop, s.dv, Y.data_ptr<acc_t>(), stream);
          at::Tensor Pt = proj.to(acc_dtype).permute({0, 2, 1}).reshape({s.H * s.dv, s.dz});
          gb.copy_(at::mm(Y.view({s.R, s.H * s.dv}), Pt));
        } else {
          segmented_scatter<scalar_t, scalar_t>(keys, wp, s.k, gop, s.dz, gb.data_ptr<scalar_t>(), stream);
        }
      }
    });
  });
  return {gw, gb, gp};
}

}  // namespace

TORCH_LIBRARY_IMPL(midus_ops, CUDA, m) {
  m.impl("hive_gather", &hive_gather_cuda);
  m.impl("hive_gather_backward", &hive_gather_backward_cuda);
}

}  // namespace midus
