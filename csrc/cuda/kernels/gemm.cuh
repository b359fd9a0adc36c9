// A plain fp32/fp64 batched GEMM kernel and element-wise conversion, for the backward GEMMs of
// pk_topk (grad_subkeys) and hive_gather (grad_bank, the generic path's gu and grad_proj).
//
// Those GEMMs normally run in cuBLAS (csrc/cuda/cuda_dev.cuh) under at::NoTF32Guard, because
// fp32 must mean fp32 there even when the user enabled TF32. This kernel replaces cuBLAS where
// cuBLAS cannot be used deterministically: under torch.use_deterministic_algorithms(True)
// without CUBLAS_WORKSPACE_CONFIG (where ATen's cuBLAS calls raise), or when asked for with
// MIDUS_OPS_CUDA_GEMM=own. It uses plain FMAs in a fixed order (k ascending): fp32 is fp32, and
// results are bitwise identical run to run; it is also what the emulator runs.
//
// C[b] (M x N) (+)= A[b] (M x K) * B[b] (K x N), every operand addressed by element strides
// (batch, row, column), so transposed views need no copies.
#pragma once
#include "common.cuh"

namespace midus {
namespace {

constexpr int GEMM_TM = 64, GEMM_TN = 64, GEMM_TK = 16;
constexpr int GEMM_THREADS = 256;  // 16 x 16 threads, 4 x 4 outputs each

template <typename acc_t>
struct GemmArgs {
  int64_t batch, M, N, K;
  const acc_t* A;
  int64_t sAb, sAm, sAk;
  const acc_t* B;
  int64_t sBb, sBk, sBn;
  acc_t* C;
  int64_t sCb, sCm, sCn;
  bool accumulate;
};

template <typename acc_t>
__global__ void __launch_bounds__(GEMM_THREADS) gemm_kernel(GemmArgs<acc_t> g) {
  MIDUS_SHARED(acc_t, As, [GEMM_TK][GEMM_TM + 4]);
  MIDUS_SHARED(acc_t, Bs, [GEMM_TK][GEMM_TN + 4]);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.x) * GEMM_TM, n0 = int64_t(blockIdx.y) * GEMM_TN, b = blockIdx.z;
  const acc_t* A = g.A + b * g.sAb;
  const acc_t* B = g.B + b * g.sBb;
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  for (int64_t k0 = 0; k0 < g.K; k0 += GEMM_TK) {
    __syncthreads();  // the previous step is done with As/Bs
    for (int e = tid; e < GEMM_TK * GEMM_TM; e += GEMM_THREADS) {
      const int kk = e / GEMM_TM, mm = e % GEMM_TM;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < g.M && k < g.K) ? A[m * g.sAm + k * g.sAk] : acc_t(0);
    }
    for (int e = tid; e < GEMM_TK * GEMM_TN; e += GEMM_THREADS) {
      const int kk = e / GEMM_TN, nn = e % GEMM_TN;
      const int64_t n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = (n < g.N && k < g.K) ? B[k * g.sBk + n * g.sBn] : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < GEMM_TK; ++kk) {
      acc_t a[4], bb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bb[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], bb[j], acc[i][j]);
    }
  }
  acc_t* C = g.C + b * g.sCb;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < g.M && n < g.N) {
        acc_t* c = C + m * g.sCm + n * g.sCn;
        *c = g.accumulate ? *c + acc[i][j] : acc[i][j];
      }
    }
}

template <typename Dev, typename acc_t>
void launch_gemm(Dev& dev, const GemmArgs<acc_t>& g) {
  if (g.batch == 0 || g.M == 0 || g.N == 0) return;
  MIDUS_CHECK(g.batch <= 65535 && ceil_div(g.N, GEMM_TN) <= 65535 && ceil_div(g.M, GEMM_TM) <= INT32_MAX,
              "midus_ops: GEMM of ", g.batch, " x ", g.M, " x ", g.N, " too large for one launch");
  if (g.K == 0) {
    MIDUS_CHECK(g.accumulate, "midus_ops: GEMM with K = 0 and no accumulation");
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(g.M, GEMM_TM)), static_cast<unsigned>(ceil_div(g.N, GEMM_TN)),
                  static_cast<unsigned>(g.batch));
  dev.launch("gemm", gemm_kernel<acc_t>, grid, dim3(GEMM_THREADS), 0, g);
}

// out[i] = cvt<To>(in[i]).
template <typename From, typename To>
__global__ void convert_kernel(const From* __restrict__ in, To* __restrict__ out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = cvt<To>(in[i]);
}

template <typename Dev, typename From, typename To>
void launch_convert(Dev& dev, const From* in, To* out, int64_t n) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), int64_t(dev.sm_count()) * 8);
  dev.launch("convert", convert_kernel<From, To>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, in, out, n);
}

}  // namespace
}  // namespace midus
