// CUDA kernels of midus_ops::hive_gather and midus_ops::hive_gather_backward (docs/design.md §1.2): this
// header holds the op-level launch logic; the kernel families are in hive_bag.cuh, hive_fwd.cuh,
// hive_bwd_tc.cuh and hive_grad_bank.cuh; csrc/cuda/hive_gather_{fwd,bwd,grad_bank}.cu compile it,
// csrc/cuda/hive_gather.cpp is the ATen glue, and tests/cuda_emu runs all of it on a CPU.
// Same schemas and semantics as csrc/cpu/hive_gather.cpp: u[t,h] = sum_j w[t,h,j] bank[idx[t,h,j]]
// accumulated in fp32 (fp64 for fp64), out[t,h] = u[t,h] @ proj[h]; the backward returns empty [0]
// tensors for the gradients not requested.
//
// Kernels, and what each one fuses (the selection conditions are in the host code at the bottom):
//
//  fwd_tc      Forward with proj, bf16/fp16 (fast path: d_z % 8 == 0, k <= 64, 16-byte aligned
//              bank, R < 2^31). A block owns one head and 64 tokens (32 where shared memory is
//              99 KiB: sm_86/89) and 64 columns of d_v. Per 256-wide
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
//              one head and a run of 32-token tiles (16 on sm_86/89). Per tile: gu = grad_out @ proj[h]^T on tensor
//              cores into shared memory (fp32, never global); one gather of the k rows per token
//              serves both grad_weights (warp dot of gu with the row) and the recomputed u; then
//              grad_proj[h] += u^T grad_out on tensor cores (u split hi/lo as in the forward),
//              accumulated in registers over the block's tiles. The few per-block partials
//              [S, H, d_z, d_v] are summed in a fixed order (sum_partials).
//  generic backward (other dtypes/shapes): per chunk of tokens, gu = grad_out proj^T (dev.gemm)
//              and u (bag_gather into an fp32 chunk buffer) are materialised for the chunk only;
//              grad_weights by bag_dot, grad_proj by accumulating GEMMs. Never [N, H, k, d_z].
//  grad_bank   (both) A deterministic segmented reduction, no atomics anywhere: contributions are
//              keyed by destination (row*H + h with proj, row without), sorted stably (dev.sort_keys:
//              each key keeps its contributions in their original order), and the
//              sorted list is cut into fixed chunks of C positions; one warp per chunk sums each
//              run of equal keys in order and writes complete runs straight to their row; a run
//              that crosses a chunk boundary leaves a partial ("carry") that the next level, the
//              same kernel over the carries, combines in order. A key hit by millions of
//              contributions is thus spread over many warps (no hot-row serialisation) and the
//              result is bitwise identical run to run. With proj the reduction happens in d_v
//              space, Y[row, h] = sum w * grad_out[t, h] (4x fewer bytes than d_z space for the
//              HML shape), then grad_bank = Y.view(R, H*d_v) @ proj^T.view(H*d_v, d_z), one fp32
//              GEMM (dev.gemm: cuBLAS without TF32, or gemm.cuh's kernel).
// Every path is deterministic, so the `deterministic` flag changes nothing on CUDA (as on CPU).
// MIDUS_OPS_CUDA_NO_TC=1 makes bf16/fp16 take the generic kernels too (for cross-checks).
//
// Out-of-range indices (docs/design.md §1.2: an error naming `indices`, never an out-of-bounds read):
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
//    (its indices are the forward's, already checked there). The host check is in the glue
//    (csrc/cuda/cuda_common.cuh, kernel in index_check.cuh).
#pragma once
#include "gemm.cuh"
#include "hive_bag.cuh"
#include "hive_bwd_tc.cuh"
#include "hive_fwd.cuh"
#include "hive_grad_bank.cuh"

namespace midus {
namespace {

// Pt[h * dv + v][z] = proj[h][z][v] in the accumulation type: proj^T stacked over heads, the B
// operand of grad_bank = Y.view(R, H*dv) @ Pt.
template <typename T, typename acc_t>
__global__ void permute_proj_kernel(const T* __restrict__ proj, acc_t* __restrict__ Pt, int64_t H, int64_t dz,
                                    int64_t dv) {
  const int64_t n = H * dz * dv, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t z = i % dz, hv = i / dz, v = hv % dv, h = hv / dv;
    Pt[i] = cvt<acc_t>(proj[(h * dz + z) * dv + v]);
  }
}

// out [N, H, dv] (dv = dz without proj). Needs N * H >= 1.
template <typename Dev, typename T, typename index_t>
void hive_gather_forward(Dev& dev, const HiveShapes& s, const T* w, const index_t* idx, const T* bank, const T* proj,
                         T* out, const HiveOptions& o) {
  if (s.k == 0 || s.dz == 0) return dev.zero(out, s.N * s.H * s.dv);
  if (!s.has_proj) return launch_bag_gather<Dev, T, index_t, T>(dev, w, idx, bank, out, s.N * s.H, s.k, s.R, s.dz);
  hive_forward_proj<Dev, T, index_t>(dev, s, w, idx, bank, proj, out, o);
}

// grad_weights and grad_proj by the generic path: per chunk of tokens, gu = grad_out proj^T and
// u = the gathered rows, for the chunk only (never [N, H, k, dz]).
template <typename Dev, typename T, typename index_t>
void hive_backward_generic(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx,
                           const T* bank, const T* proj, T* gw, T* gp, int64_t chunk_tokens) {
  using acc_t = acc_t_of<T>;
  constexpr bool same = std::is_same_v<T, acc_t>;
  const int64_t H = s.H, dz = s.dz, dv = s.dv, k = s.k;
  const int64_t width = std::max(dz, dv);
  const int64_t Tc = std::min<int64_t>(
      s.N, chunk_tokens > 0 ? chunk_tokens
                            : std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, int64_t(sizeof(acc_t)) * H * width)));
  const acc_t* projA;
  if constexpr (same) {
    projA = proj;
  } else {
    acc_t* p = dev.template alloc<acc_t>(size_t(H * dz * dv));
    launch_convert(dev, proj, p, H * dz * dv);
    projA = p;
  }
  acc_t* goA = same ? nullptr : dev.template alloc<acc_t>(size_t(Tc * H * dv));
  acc_t* gu = gw ? dev.template alloc<acc_t>(size_t(Tc * H * dz)) : nullptr;
  acc_t* u = gp ? dev.template alloc<acc_t>(size_t(Tc * H * dz)) : nullptr;
  acc_t* gpA = nullptr;
  if (gp) {
    if constexpr (same) {
      gpA = gp;
    } else {
      gpA = dev.template alloc<acc_t>(size_t(H * dz * dv));
    }
  }
  for (int64_t t0 = 0; t0 < s.N; t0 += Tc) {
    const int64_t nt = std::min(Tc, s.N - t0), e0 = t0 * H * k;
    const acc_t* go;
    if constexpr (same) {
      go = gout + t0 * H * dv;
    } else {
      launch_convert(dev, gout + t0 * H * dv, goA, nt * H * dv);
      go = goA;
    }
    if (gw) {
      // gu[t][h][z] = sum_v go[t][h][v] proj[h][z][v]: per head, [nt, dv] x [dv, dz].
      dev.gemm(GemmArgs<acc_t>{H, nt, dz, dv, go, dv, H * dv, 1, projA, dz * dv, 1, dv, gu, dz, H * dz, 1, false});
      launch_bag_dot<Dev, T, acc_t, index_t>(dev, gu, idx + e0, bank, gw + e0, nt * H, k, s.R, dz);
    }
    if (gp) {
      // grad_proj[h] += u[:, h]^T go[:, h]: per head, [dz, nt] x [nt, dv].
      launch_bag_gather<Dev, T, index_t, acc_t>(dev, w + e0, idx + e0, bank, u, nt * H, k, s.R, dz);
      dev.gemm(GemmArgs<acc_t>{H, dz, dv, nt, u, dz, 1, H * dz, go, dv, H * dv, 1, gpA, dz * dv, dv, 1, t0 > 0});
    }
  }
  if constexpr (!same) {
    if (gp) launch_convert(dev, static_cast<const acc_t*>(gpA), gp, H * dz * dv);
  }
}

// grad_bank [R, dz] by the deterministic segmented reduction (hive_grad_bank.cuh).
template <typename Dev, typename T, typename index_t>
void hive_grad_bank(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx, const T* proj,
                    T* gb) {
  using acc_t = acc_t_of<T>;
  constexpr bool same = std::is_same_v<T, acc_t>;
  const int64_t M = s.N * s.H * s.k;
  const int64_t key_space = s.has_proj ? s.R * s.H : s.R;
  int64_t* skeys = dev.template alloc<int64_t>(size_t(M));
  int64_t* perm = dev.template alloc<int64_t>(size_t(M));
  if (key_space <= INT32_MAX) {
    int32_t* keys = dev.template alloc<int32_t>(size_t(M));
    launch_make_keys(dev, idx, keys, M, s.k, s.H, s.R, s.has_proj);
    dev.sort_keys(static_cast<const int32_t*>(keys), M, skeys, perm);
  } else {
    int64_t* keys = dev.template alloc<int64_t>(size_t(M));
    launch_make_keys(dev, idx, keys, M, s.k, s.H, s.R, s.has_proj);
    dev.sort_keys(static_cast<const int64_t*>(keys), M, skeys, perm);
  }
  if (!s.has_proj) {
    dev.zero(gb, s.R * s.dz);
    segmented_scatter<Dev, T, T>(dev, skeys, perm, M, w, s.k, gout, s.dz, gb);
    return;
  }
  // Y[row, h] = sum w * grad_out[t, h] (d_v space), then grad_bank = Y.view(R, H*dv) @ Pt.
  const int64_t HV = s.H * s.dv;
  acc_t* Y = dev.template alloc<acc_t>(size_t(s.R * HV));
  dev.zero(Y, s.R * HV);
  segmented_scatter<Dev, T, acc_t>(dev, skeys, perm, M, w, s.k, gout, s.dv, Y);
  acc_t* Pt = dev.template alloc<acc_t>(size_t(HV * s.dz));
  {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(HV * s.dz, threads), int64_t(dev.sm_count()) * 8);
    dev.launch("permute_proj", permute_proj_kernel<T, acc_t>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0,
               proj, Pt, s.H, s.dz, s.dv);
  }
  acc_t* gbA;
  if constexpr (same) {
    gbA = gb;
  } else {
    gbA = dev.template alloc<acc_t>(size_t(s.R * s.dz));
  }
  dev.gemm(GemmArgs<acc_t>{1, s.R, s.dz, HV, Y, 0, HV, 1, Pt, 0, s.dz, 1, gbA, 0, s.dz, 1, false});
  if constexpr (!same) launch_convert(dev, static_cast<const acc_t*>(gbA), gb, s.R * s.dz);
}

// The backward in two parts that the extension compiles in separate translation units
// (csrc/cuda/hive_gather_bwd.cu and hive_gather_grad_bank.cu, built in parallel); the emulator runs
// them through hive_gather_backward below, in the same order.
// gw [N, H, k] and gp [H, dz, dv]: each null when not wanted (gp null without proj).
template <typename Dev, typename T, typename index_t>
void hive_gather_backward_weights_proj(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx,
                                       const T* bank, const T* proj, T* gw, T* gp, const HiveOptions& o) {
  const int64_t M = s.N * s.H * s.k;
  if (M == 0 || s.dz == 0) {  // nothing to gather: zeros (gw has no elements when M == 0)
    if (gw) dev.zero(gw, M);
    if (gp) dev.zero(gp, s.H * s.dz * s.dv);
    return;
  }
  if (!s.has_proj) {
    if (gw) launch_bag_dot<Dev, T, T, index_t>(dev, gout, idx, bank, gw, s.N * s.H, s.k, s.R, s.dz);
  } else if (gw || gp) {
    if (!try_bwd_tc<Dev, T, index_t>(dev, s, gout, w, idx, bank, proj, gw, gp, o))
      hive_backward_generic<Dev, T, index_t>(dev, s, gout, w, idx, bank, proj, gw, gp, o.chunk_tokens);
  }
}

// gb [R, dz] (not null).
template <typename Dev, typename T, typename index_t>
void hive_gather_backward_bank(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx,
                               const T* proj, T* gb) {
  const int64_t M = s.N * s.H * s.k;
  if (M == 0 || s.dz == 0) return dev.zero(gb, s.R * s.dz);
  hive_grad_bank<Dev, T, index_t>(dev, s, gout, w, idx, proj, gb);
}

// gw [N, H, k], gb [R, dz], gp [H, dz, dv]: each null when not wanted (gp null without proj).
template <typename Dev, typename T, typename index_t>
void hive_gather_backward(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx, const T* bank,
                          const T* proj, T* gw, T* gb, T* gp, const HiveOptions& o) {
  hive_gather_backward_weights_proj<Dev, T, index_t>(dev, s, gout, w, idx, bank, proj, gw, gp, o);
  if (gb) hive_gather_backward_bank<Dev, T, index_t>(dev, s, gout, w, idx, proj, gb);
}

}  // namespace
}  // namespace midus
