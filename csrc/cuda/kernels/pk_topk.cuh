// CUDA kernels of midus_ops::pk_topk and midus_ops::pk_topk_backward (docs/design.md §1.1) and their
// launch logic; csrc/cuda/pk_topk_{fwd,bwd}.cu compile them and csrc/cuda/pk_topk.cpp is the ATen
// glue; tests/cuda_emu runs them on a CPU. Same
// schemas and semantics as csrc/cpu/pk_topk.cpp: sub-key scores accumulated in fp32 (fp64 for
// fp64), exact two-stage selection in the order of csrc/cpu/pk_select.h, and the backward returns
// empty [0] tensors for the gradients not requested.
//
// Forward, one kernel (pk_topk_fwd_kernel). A block owns one head h and a run of tokens; each of
// its W warps (W = 8 unless shared memory forces fewer) takes one (token, head) row at a time:
//   1. scores: the head's sub-keys are staged in shared memory (converted to the accumulation
//      type, rows padded to half + 1 elements against bank conflicts) once per block when both
//      halves fit in 64 KiB (every shape of docs/design.md §4: n = 32, d_k = 64 is 8.4 KiB), otherwise in
//      chunks of rows restaged per round of W tokens; each lane computes the dot products of its
//      sub-keys with the query half (fp32/fp64 FMAs, d in order) into the warp's score rows s1, s2.
//   2. stage 1: the top k of each half. Items are (score, id) packed so that one integer
//      comparison gives the selection order of pk_select.h: larger score first, NaN above
//      everything, -0 == +0, lower id first among equal scores. fp32: one uint64, the order-
//      preserving 32-bit image of the score above ~id (exactly pk_select.h's `pack`); fp64: a
//      (uint64 image, ~id) pair. A warp keeps the best B = 32 (k <= 32) or 64 (k <= 64) items
//      sorted across its lanes (1 or 2 registers per lane) and consumes the n items in batches of
//      B: a batch with no item better than the current k-th is skipped (one ballot), otherwise it
//      is bitonic-sorted across the lanes (shuffles) and merged (bitonic merge of the best B).
//   3. stage 2: the candidate sums s1[a_i] + s2[b_j], rounded in the accumulation type as on the
//      CPU, over the pairs with (i+1)(j+1) <= k only (about k ln k of the k*k: every other pair
//      has >= k kept pairs that score at least as much); the same warp top-k selects. Exactly as
//      on the CPU, a row where a pruned pair's sum equals the k-th kept score (rounding can make
//      sums equal, and then the id decides), or where a stage-1 score is not finite, is redone
//      over all k*k pairs: the result is exactly the full k x k selection of the reference.
//   4. scores (descending, rounded once to the input dtype) and int64 ids a * n + b are written:
//      every element of both outputs, so nothing relies on pre-zeroed memory.
// The CPU kernel computes the same sub-key scores with an fp32 GEMM, whose summation order may
// differ: both are within fp32 rounding of the exact value, and where the inputs make every dot
// product exact (e.g. bf16 values with few significant bits, as in tied bf16 cases) both give
// identical scores and, by the identical selection order, identical slots.
//
// Backward. dS_p[t, h, :] is grad_scores[t, h, m] scattered to a_m (p = 0) and b_m (p = 1), summed
// in m order (pk_topk_bwd_kernel: one warp per row, built in shared memory where each position is
// owned by one lane, so no atomics; the same order as the CPU, hence the same fp32 values).
//   grad_q[t, h]  = [dS_0 K_0[h]; dS_1 K_1[h]]  in the same kernel (fp32 FMAs over the non-zero
//                   entries of the row, i in order), written for every element;
//   grad_subkeys  = dS^T Q per head: the kernel writes dS [T, 2H, n] (fp32, every element) for a
//                   chunk of T tokens (<= 128 MiB) and dev.gemm multiplies it by the chunk's
//                   queries (gemm.cuh: cuBLAS without TF32, or our own kernel), accumulating over
//                   the chunks in order: no atomics anywhere, so every result is bitwise
//                   identical run to run (with or without deterministic mode).
//
// Limits: k <= 64 (two registers per lane hold the best 64) and n <= 4096 (the warp's score rows
// live in shared memory); beyond them the op raises an error naming k or n (the public
// midus_ops.pk_topk then runs the reference instead). H <= 65535 (grid dimension).
//
// Out-of-range indices given to the backward: as hive_gather.cuh. By default a host-side check
// (one synchronisation) raises IndexError naming `indices`; it is skipped with check_indices=False
// (what the autograd backward passes: its indices are the forward's own output), under
// MIDUS_OPS_CUDA_INDEX_CHECK=device, and while the stream is capturing a CUDA graph. The kernel
// also asserts on the device and never touches memory through a bad index.
#pragma once
#include "common.cuh"
#include "gemm.cuh"
#include "../../limits.h"

namespace midus {
namespace {

constexpr int kPkMaxWarps = 8;
constexpr unsigned kPkFull = 0xffffffffu;
constexpr size_t kPkKeysBudget = size_t(64) << 10;  // sub-keys resident in shared memory up to this


// ============================================================================================
// Selection items
// ============================================================================================
// An unsigned integer whose order is the order of the scores: NaN above +inf (all NaNs equal),
// -0 folded into +0. (pk_select.h's float_key, offset into unsigned range.)
__device__ __forceinline__ uint32_t order_key(float s) {
  if (isnan(s)) return 0xffffffffu;
  int32_t b = __float_as_int(s);
  if ((b & 0x7fffffff) == 0) b = 0;  // -0 -> +0 (in integers: no float rewrite can drop it)
  return static_cast<uint32_t>(b ^ ((b >> 31) & 0x7fffffff)) ^ 0x80000000u;
}
__device__ __forceinline__ float key_value(uint32_t key) {
  const int32_t b = static_cast<int32_t>(key ^ 0x80000000u);
  return __int_as_float(b ^ ((b >> 31) & 0x7fffffff));
}
__device__ __forceinline__ unsigned long long order_key(double s) {
  if (isnan(s)) return ~0ull;
  long long b = __double_as_longlong(s);
  if ((b & 0x7fffffffffffffffll) == 0) b = 0;
  return static_cast<unsigned long long>(b ^ ((b >> 63) & 0x7fffffffffffffffll)) ^ 0x8000000000000000ull;
}
__device__ __forceinline__ double key_value(unsigned long long key) {
  const long long b = static_cast<long long>(key ^ 0x8000000000000000ull);
  return __longlong_as_double(b ^ ((b >> 63) & 0x7fffffffffffffffll));
}

// Sel<acc_t>: the item type, its order (`better`: strictly ranks first) and warp shuffles. Real
// items are never equal (distinct ids); pad() ranks below every real item.
template <typename acc_t>
struct Sel;

template <>
struct Sel<float> {
  using Item = unsigned long long;  // order key << 32 | ~id (pk_select.h's pack)
  using Key = uint32_t;
  static __device__ __forceinline__ Item pad() { return 0ull; }
  static __device__ __forceinline__ Item make(float s, uint32_t id) {
    return (static_cast<unsigned long long>(order_key(s)) << 32) | static_cast<unsigned long long>(~id);
  }
  static __device__ __forceinline__ bool better(Item a, Item b) { return a > b; }
  static __device__ __forceinline__ Item shfl_xor(Item v, int m) { return __shfl_xor_sync(kPkFull, v, m); }
  static __device__ __forceinline__ Item shfl(Item v, int src) { return __shfl_sync(kPkFull, v, src); }
  static __device__ __forceinline__ Key key(Item v) { return static_cast<uint32_t>(v >> 32); }
  static __device__ __forceinline__ float value(Item v) { return key_value(key(v)); }
  static __device__ __forceinline__ uint32_t id(Item v) { return ~static_cast<uint32_t>(v & 0xffffffffull); }
};

struct Item64 {
  unsigned long long key;
  unsigned int nid;  // ~id
};

template <>
struct Sel<double> {
  using Item = Item64;
  using Key = unsigned long long;
  static __device__ __forceinline__ Item pad() { return Item64{0ull, 0u}; }
  static __device__ __forceinline__ Item make(double s, uint32_t id) { return Item64{order_key(s), ~id}; }
  static __device__ __forceinline__ bool better(const Item& a, const Item& b) {
    return a.key > b.key || (a.key == b.key && a.nid > b.nid);
  }
  static __device__ __forceinline__ Item shfl_xor(const Item& v, int m) {
    return Item64{__shfl_xor_sync(kPkFull, v.key, m), __shfl_xor_sync(kPkFull, v.nid, m)};
  }
  static __device__ __forceinline__ Item shfl(const Item& v, int src) {
    return Item64{__shfl_sync(kPkFull, v.key, src), __shfl_sync(kPkFull, v.nid, src)};
  }
  static __device__ __forceinline__ Key key(const Item& v) { return v.key; }
  static __device__ __forceinline__ double value(const Item& v) { return key_value(v.key); }
  static __device__ __forceinline__ uint32_t id(const Item& v) { return ~v.nid; }
};

// ============================================================================================
// Warp top-k: B = 32 * R items sorted across the lanes, position p = r * 32 + lane in register r
// ============================================================================================
// One compare-exchange step of a bitonic network over B positions: partners p and p ^ stride; in
// a block of `size` positions that sorts descending ((p & size) == 0) the lower position keeps
// the better item, otherwise the worse one.
template <typename S, int R>
__device__ __forceinline__ void cmp_step(typename S::Item (&v)[R], int lane, int size, int stride) {
  if constexpr (R == 2) {
    if (stride == 32) {  // partners lane and lane + 32 sit in one thread; size is 64 (descending)
      if (S::better(v[1], v[0])) {
        const typename S::Item t = v[0];
        v[0] = v[1];
        v[1] = t;
      }
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int p = r * 32 + lane;
    const typename S::Item o = S::shfl_xor(v[r], stride);
    const bool keep_better = ((p & stride) == 0) == ((p & size) == 0);
    const bool take = keep_better ? S::better(o, v[r]) : S::better(v[r], o);
    if (take) v[r] = o;
  }
}

// Sorts the B items descending (best at position 0).
template <typename S, int R>
__device__ __forceinline__ void warp_sort(typename S::Item (&v)[R], int lane) {
#pragma unroll 1
  for (int size = 2; size <= 32 * R; size <<= 1)
#pragma unroll 1
    for (int stride = size >> 1; stride > 0; stride >>= 1) cmp_step<S, R>(v, lane, size, stride);
}

// L = the best B of L and X (both sorted descending), sorted descending: the better of L[p] and
// X[B-1-p] at each p forms a bitonic sequence holding the best B of both; one bitonic merge.
template <typename S, int R>
__device__ __forceinline__ void warp_merge(typename S::Item (&L)[R], const typename S::Item (&X)[R], int lane) {
  typename S::Item xr[R];
  if constexpr (R == 1) {
    xr[0] = S::shfl(X[0], 31 - lane);
  } else {
    xr[0] = S::shfl(X[1], 31 - lane);
    xr[1] = S::shfl(X[0], 31 - lane);
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (S::better(xr[r], L[r])) L[r] = xr[r];
#pragma unroll 1
  for (int stride = 16 * R; stride > 0; stride >>= 1) cmp_step<S, R>(L, lane, 32 * R, stride);
}

// The item at position pos (warp-uniform) of a sorted list, in every lane.
template <typename S, int R>
__device__ __forceinline__ typename S::Item item_at(const typename S::Item (&L)[R], int pos) {
  typename S::Item x = L[0];
  if (R > 1 && pos >= 32) x = L[R - 1];
  return S::shfl(x, pos & 31);
}

// L = the best B of the m items gen(0..m-1), sorted descending; its first k positions are the
// exact top k (k <= B <= m is not required: missing items are pads). Warp-uniform m and k; every
// lane of the warp must call it.
template <typename S, int R, typename Gen>
__device__ __forceinline__ void warp_topk(const Gen& gen, int m, int k, int lane, typename S::Item (&L)[R]) {
  constexpr int B = 32 * R;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = r * 32 + lane;
    L[r] = i < m ? gen(i) : S::pad();
  }
  warp_sort<S, R>(L, lane);
  for (int base = B; base < m; base += B) {
    typename S::Item X[R];
    const typename S::Item kth = item_at<S, R>(L, k - 1);
    bool hit = false;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = base + r * 32 + lane;
      X[r] = i < m ? gen(i) : S::pad();
      hit = hit || S::better(X[r], kth);
    }
    if (!__any_sync(kPkFull, hit)) continue;  // nothing here can enter the top k
    warp_sort<S, R>(X, lane);
    warp_merge<S, R>(L, X, lane);
  }
}

// Number of pairs (i, j) of [0, k)^2 with (i+1)(j+1) <= k.
__host__ __device__ __forceinline__ int pruned_pairs(int k) {
  int m = 0;
  for (int i = 0; i < k; ++i) m += k / (i + 1);
  return m;
}

// ============================================================================================
// Forward
// ============================================================================================
// Shared memory (dynamic), in elements: acc_t: keys [2][chunk][half+1], then per warp q [2*half],
// scores [2][n], stage-1 values a [k], b [k]; int32: per warp stage-1 ids a [k], b [k]; uint16:
// the pruned pair list (i << 8 | j), shared by the block.
size_t fwd_smem_bytes(int warps, int chunk, int half, int n, int k, size_t acc) {
  return acc * (size_t(2) * chunk * (half + 1) + size_t(warps) * (size_t(2) * half + 2 * size_t(n) + 2 * size_t(k))) +
         sizeof(int32_t) * size_t(warps) * 2 * k + sizeof(uint16_t) * size_t(pruned_pairs(k));
}

template <typename scalar_t, int R>
__global__ void __launch_bounds__(kPkMaxWarps * 32)
    pk_topk_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ sk, scalar_t* __restrict__ scores,
                       int64_t* __restrict__ indices, int64_t N, int H, int half, int n, int k, int chunk,
                       int tokens_per_block) {
  using acc_t = acc_t_of<scalar_t>;
  using S = Sel<acc_t>;
  using Item = typename S::Item;
  MIDUS_DYNAMIC_SMEM(pk_smem);
  const int W = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y;
  const int d_k = 2 * half, ks = half + 1;
  const int M = pruned_pairs(k);

  acc_t* sK = reinterpret_cast<acc_t*>(pk_smem);
  acc_t* sQ = sK + size_t(2) * chunk * ks;
  acc_t* sS = sQ + size_t(W) * d_k;
  acc_t* sAv = sS + size_t(W) * 2 * n;
  acc_t* sBv = sAv + size_t(W) * k;
  int32_t* sAi = reinterpret_cast<int32_t*>(sBv + size_t(W) * k);
  int32_t* sBi = sAi + W * k;
  uint16_t* sPairs = reinterpret_cast<uint16_t*>(sBi + W * k);

  // The pruned pair list, row i at offset sum_{r<i} floor(k / (r+1)).
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    int off = 0;
    for (int r = 0; r < i; ++r) off += k / (r + 1);
    const int c = k / (i + 1);
    for (int j = 0; j < c; ++j) sPairs[off + j] = static_cast<uint16_t>((i << 8) | j);
  }
  const scalar_t* skh = sk + size_t(h) * 2 * n * half;
  auto stage = [&](int c0) {  // rows c0 .. c0 + chunk of both halves -> sK (block-wide)
    const int rows = min(chunk, n - c0);
    const int per_half = rows * half;
    for (int e = threadIdx.x; e < 2 * per_half; e += blockDim.x) {
      const int p = e >= per_half ? 1 : 0;
      const int rem = e - p * per_half;
      const int i = rem / half, d = rem - i * half;
      sK[(p * chunk + i) * ks + d] = cvt<acc_t>(skh[(size_t(p) * n + c0 + i) * half + d]);
    }
  };
  const bool resident = chunk >= n;
  if (resident) stage(0);
  __syncthreads();

  acc_t* qw = sQ + size_t(warp) * d_k;
  acc_t* sw = sS + size_t(warp) * 2 * n;
  acc_t* av = sAv + warp * k;
  acc_t* bv = sBv + warp * k;
  int32_t* ai = sAi + warp * k;
  int32_t* bi = sBi + warp * k;
  const int64_t t_begin = int64_t(blockIdx.x) * tokens_per_block;
  for (int r0 = 0; r0 < tokens_per_block; r0 += W) {
    if (t_begin + r0 >= N) break;  // block-uniform
    const int64_t t = t_begin + r0 + warp;
    const bool valid = t < N;  // warp-uniform
    const int64_t row = t * H + h;
    if (valid)
      for (int d = lane; d < d_k; d += 32) qw[d] = cvt<acc_t>(q[row * d_k + d]);
    __syncwarp();
    for (int c0 = 0; c0 < n; c0 += chunk) {
      if (!resident) {  // block-uniform: every warp reaches both barriers
        __syncthreads();
        stage(c0);
        __syncthreads();
      }
      if (valid) {
        const int rows = min(chunk, n - c0);
        for (int i = lane; i < rows; i += 32) {
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            const acc_t* kr = sK + (p * chunk + i) * ks;
            const acc_t* qq = qw + p * half;
            acc_t acc = acc_t(0);
            for (int d = 0; d < half; ++d) acc += kr[d] * qq[d];
            sw[p * n + c0 + i] = acc;
          }
        }
      }
    }
    __syncwarp();
    if (!valid) continue;

    // ---- stage 1: top k of each half ----
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const acc_t* sp = sw + p * n;
      Item L[R];
      warp_topk<S, R>([&](int i) { return S::make(sp[i], static_cast<uint32_t>(i)); }, n, k, lane, L);
      acc_t* vals = p == 0 ? av : bv;
      int32_t* ids = p == 0 ? ai : bi;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int pos = r * 32 + lane;
        if (pos < k) {
          const int id = static_cast<int>(S::id(L[r]));
          ids[pos] = id;
          vals[pos] = sp[id];
        }
      }
    }
    __syncwarp();

    // ---- stage 2: top k of the candidate sums ----
    bool fin = true;
    for (int i = lane; i < k; i += 32) fin = fin && isfinite(av[i]) && isfinite(bv[i]);
    bool full = !__all_sync(kPkFull, fin);
    const uint32_t un = static_cast<uint32_t>(n);
    Item L[R];
    if (!full) {
      warp_topk<S, R>(
          [&](int m) {
            const int pr = sPairs[m];
            const int i = pr >> 8, j = pr & 255;
            return S::make(av[i] + bv[j], static_cast<uint32_t>(ai[i]) * un + static_cast<uint32_t>(bi[j]));
          },
          M, k, lane, L);
      // A pruned pair (i, j >= floor(k/(i+1))) scores at most the k-th kept sum; only the first
      // of each row can equal it (sums fall along j).
      const typename S::Key kth = S::key(item_at<S, R>(L, k - 1));
      bool tie = false;
      for (int i = 1 + lane; i < k; i += 32) {
        const int j = k / (i + 1);
        tie = tie || S::key(S::make(av[i] + bv[j], 0u)) == kth;
      }
      full = __any_sync(kPkFull, tie);
    }
    if (full) {
      warp_topk<S, R>(
          [&](int m) {
            const int i = m / k, j = m - i * k;
            return S::make(av[i] + bv[j], static_cast<uint32_t>(ai[i]) * un + static_cast<uint32_t>(bi[j]));
          },
          k * k, k, lane, L);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pos = r * 32 + lane;
      if (pos < k) {
        scores[row * k + pos] = cvt<scalar_t>(S::value(L[r]));
        indices[row * k + pos] = static_cast<int64_t>(S::id(L[r]));
      }
    }
    __syncwarp();  // the warp's buffers are rewritten next round
  }
}

// ============================================================================================
// Backward
// ============================================================================================
// Rows of tokens [t0, t0 + nt) (global ids); dS is the chunk's [nt, 2H, n] (may be null), grad_q
// the full [N, H, d_k] (may be null). Shared memory: per warp one dS row [2][n] (acc_t).
template <typename scalar_t, typename g_t>
__global__ void __launch_bounds__(kPkMaxWarps * 32)
    pk_topk_bwd_kernel(const g_t* __restrict__ grad, const int64_t* __restrict__ idx, const scalar_t* __restrict__ sk,
                       scalar_t* __restrict__ grad_q, acc_t_of<scalar_t>* __restrict__ dS, int64_t t0, int64_t nt,
                       int H, int half, int n, int k, int tokens_per_block) {
  using acc_t = acc_t_of<scalar_t>;
  MIDUS_DYNAMIC_SMEM(pk_smem);
  const int W = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y;
  const int d_k = 2 * half;
  const int64_t nn = int64_t(n) * n;
  acc_t* b = reinterpret_cast<acc_t*>(pk_smem) + size_t(warp) * 2 * n;
  const int64_t tb = int64_t(blockIdx.x) * tokens_per_block;
  for (int r0 = warp; r0 < tokens_per_block; r0 += W) {
    const int64_t tl = tb + r0;
    if (tl >= nt) break;  // warp-uniform; no block-level barrier in this kernel
    const int64_t row = (t0 + tl) * H + h;
    // Position x of the row is owned by lane x % 32: it zeroes it and adds into it (m in order).
    for (int x = lane; x < 2 * n; x += 32) b[x] = acc_t(0);
    for (int m0 = 0; m0 < k; m0 += 32) {
      int64_t my_id = 0;
      acc_t my_g = acc_t(0);
      if (m0 + lane < k) {
        my_id = idx[row * k + m0 + lane];
        my_g = cvt<acc_t>(grad[row * k + m0 + lane]);
      }
      const int cnt = min(32, k - m0);
      for (int mm = 0; mm < cnt; ++mm) {
        const int64_t id = __shfl_sync(kPkFull, my_id, mm);
        const acc_t g = __shfl_sync(kPkFull, my_g, mm);
        const bool ok = id >= 0 && id < nn;
        MIDUS_KERNEL_ASSERT(ok, "midus_ops::pk_topk_backward: indices out of range (every index must be in [0, n*n))");
        if (!ok) continue;
        const int a = static_cast<int>(id / n), bb = n + static_cast<int>(id - int64_t(a) * n);
        if ((a & 31) == lane) b[a] += g;
        if ((bb & 31) == lane) b[bb] += g;
      }
    }
    __syncwarp();
    if (dS != nullptr) {
      acc_t* drow = dS + (tl * H + h) * 2 * n;
      for (int x = lane; x < 2 * n; x += 32) drow[x] = b[x];
    }
    if (grad_q != nullptr) {
      for (int d = lane; d < d_k; d += 32) {
        const int p = d >= half ? 1 : 0, dd = d - p * half;
        const acc_t* bp = b + p * n;
        const scalar_t* kp = sk + (size_t(h) * 2 + p) * n * half + dd;
        acc_t acc = acc_t(0);
        for (int i = 0; i < n; ++i) {
          const acc_t v = bp[i];
          if (v != acc_t(0)) acc += v * cvt<acc_t>(kp[size_t(i) * half]);
        }
        grad_q[row * d_k + d] = cvt<scalar_t>(acc);
      }
    }
    __syncwarp();  // before the next row zeroes b
  }
}

// ============================================================================================
// Launch logic
// ============================================================================================
// Tokens per block: about 8 blocks per SM over all heads, W..16W tokens, a multiple of W.
inline int pk_tokens_per_block(int64_t N, int64_t H, int warps, int sm_count) {
  const int64_t per_head = std::max<int64_t>(1, (int64_t(sm_count) * 8 + H - 1) / H);
  int64_t t = (N + per_head - 1) / per_head;
  t = (t + warps - 1) / warps * warps;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, warps), int64_t(16) * warps));
}

// The forward's shape-dependent choices.
struct PkFwdPlan {
  int chunk;  // sub-key rows staged at once (n when they fit in kPkKeysBudget)
  int warps;  // per block
  size_t smem;
  int tokens_per_block;
  dim3 grid;
};

inline PkFwdPlan plan_pk_topk_fwd(int64_t N, int64_t H, int64_t half, int64_t n, int64_t k, size_t acc, size_t optin,
                                  int sm_count) {
  MIDUS_CHECK(k <= kPkMaxK, "pk_topk: k = ", k, " is above the CUDA kernel's limit of k <= ", kPkMaxK);
  MIDUS_CHECK(n <= kPkMaxN, "pk_topk: subkeys has n = ", n,
              " sub-keys per half, above the CUDA kernel's limit of n <= ", kPkMaxN);
  MIDUS_CHECK(H <= 65535, "pk_topk: q has H = ", H, " heads, above the CUDA kernel's limit of 65535");
  MIDUS_CHECK(half <= (int64_t(1) << 20), "pk_topk: q has d_k = ", 2 * half, ", above the CUDA kernel's limit");
  PkFwdPlan p;
  const size_t row_bytes = 2 * size_t(half + 1) * acc;  // one sub-key row of both halves, staged
  p.chunk = static_cast<int>(n);
  if (size_t(n) * row_bytes > kPkKeysBudget) {
    const int64_t fit = static_cast<int64_t>(kPkKeysBudget / row_bytes);
    p.chunk = static_cast<int>(std::max<int64_t>(1, fit >= 32 ? fit / 32 * 32 : fit));
  }
  p.warps = kPkMaxWarps;
  while (p.warps > 1 && fwd_smem_bytes(p.warps, p.chunk, int(half), int(n), int(k), acc) > optin) p.warps >>= 1;
  p.smem = fwd_smem_bytes(p.warps, p.chunk, int(half), int(n), int(k), acc);
  MIDUS_CHECK(p.smem <= optin, "pk_topk: d_k = ", 2 * half, " and n = ", n, " need ", p.smem,
              " bytes of shared memory per block in the CUDA kernel; this GPU allows ", optin);
  p.tokens_per_block = pk_tokens_per_block(N, H, p.warps, sm_count);
  const int64_t blocks = ceil_div(N, p.tokens_per_block);
  MIDUS_CHECK(blocks <= INT32_MAX, "pk_topk: too many tokens for one launch: ", N);
  p.grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(H));
  return p;
}

// scores, indices [N, H, k] from q [N, H, 2*half] and subkeys [H, 2, n, half] (contiguous).
template <typename Dev, typename scalar_t>
void pk_topk_forward(Dev& dev, const scalar_t* q, const scalar_t* sk, scalar_t* scores, int64_t* indices, int64_t N,
                     int64_t H, int64_t half, int64_t n, int64_t k) {
  const PkFwdPlan p =
      plan_pk_topk_fwd(N, H, half, n, k, sizeof(acc_t_of<scalar_t>), dev.smem_optin(), dev.sm_count());
  if (N == 0 || H == 0) return;
  auto launch = [&](auto kernel) {
    allow_smem(dev, kernel, p.smem);
    dev.launch("pk_topk_fwd", kernel, p.grid, dim3(p.warps * 32), p.smem, q, sk, scores, indices, N, int(H),
               int(half), int(n), int(k), p.chunk, p.tokens_per_block);
  };
  if (k <= 32) {
    launch(pk_topk_fwd_kernel<scalar_t, 1>);
  } else {
    launch(pk_topk_fwd_kernel<scalar_t, 2>);
  }
}

// grad_q [N, H, 2*half] and grad_k [H, 2, n, half] (either may be null: not wanted) from
// grad [N, H, k] (in scalar_t or its accumulation type), indices [N, H, k] (in [0, n*n)), q and
// subkeys. Needs N, H, k >= 1. chunk_tokens > 0 caps the tokens per dS chunk (tests).
template <typename Dev, typename scalar_t, typename g_t>
void pk_topk_backward(Dev& dev, const g_t* grad, const int64_t* idx, const scalar_t* q, const scalar_t* sk,
                      scalar_t* grad_q, scalar_t* grad_k, int64_t N, int64_t H, int64_t half, int64_t n, int64_t k,
                      int64_t chunk_tokens = 0) {
  using acc_t = acc_t_of<scalar_t>;
  MIDUS_CHECK(n <= kPkMaxN, "pk_topk_backward: subkeys has n = ", n,
              " sub-keys per half, above the CUDA kernel's limit of n <= ", kPkMaxN);
  MIDUS_CHECK(H <= 65535, "pk_topk_backward: q has H = ", H, " heads, above the CUDA kernel's limit of 65535");
  MIDUS_CHECK(N > 0 && H > 0 && k > 0, "pk_topk_backward: empty shapes are the caller's");
  const size_t acc = sizeof(acc_t);
  const size_t optin = dev.smem_optin();
  const size_t row_smem = 2 * size_t(n) * acc;
  const int warps = static_cast<int>(std::max<size_t>(1, std::min<size_t>(kPkMaxWarps, optin / row_smem)));
  const size_t smem = size_t(warps) * row_smem;
  MIDUS_CHECK(smem <= optin, "pk_topk_backward: n = ", n, " needs ", smem, " bytes of shared memory; this GPU allows ",
              optin);
  const bool need_k = grad_k != nullptr;
  // Token chunks bound dS [T, 2H, n] to about 128 MiB.
  int64_t T = need_k ? std::min<int64_t>(N, std::max<int64_t>(1, (int64_t(128) << 20) / int64_t(2 * H * n * acc))) : N;
  if (chunk_tokens > 0) T = std::min(T, chunk_tokens);
  acc_t* dS = need_k ? dev.template alloc<acc_t>(size_t(T * 2 * H * n)) : nullptr;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  acc_t* qa = (need_k && !same) ? dev.template alloc<acc_t>(size_t(T * 2 * H * half)) : nullptr;
  acc_t* gk = nullptr;
  if (need_k) {
    if constexpr (same) {
      gk = grad_k;
    } else {
      gk = dev.template alloc<acc_t>(size_t(2 * H * n * half));
    }
  }
  auto kernel = pk_topk_bwd_kernel<scalar_t, g_t>;
  allow_smem(dev, kernel, smem);
  for (int64_t t0 = 0; t0 < N; t0 += T) {
    const int64_t nt = std::min(T, N - t0);
    const int tpb = pk_tokens_per_block(nt, H, warps, dev.sm_count());
    const int64_t blocks = ceil_div(nt, tpb);
    MIDUS_CHECK(blocks <= INT32_MAX, "pk_topk_backward: too many tokens for one launch: ", nt);
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(H));
    dev.launch("pk_topk_bwd", kernel, grid, dim3(warps * 32), smem, grad, idx, sk, grad_q, dS, t0, nt, int(H),
               int(half), int(n), int(k), tpb);
    if (need_k) {
      // grad K_p[h] += dS_p[h]^T Q_p[h] over the chunk: batch b = 2h + p, [n, nt] x [nt, half].
      const acc_t* qc;
      if constexpr (same) {
        qc = q + t0 * 2 * H * half;
      } else {
        launch_convert(dev, q + t0 * 2 * H * half, qa, nt * 2 * H * half);
        qc = qa;
      }
      GemmArgs<acc_t> g{2 * H, n, half, nt,
                        dS, n, 1, 2 * H * n,
                        qc, half, 2 * H * half, 1,
                        gk, n * half, half, 1,
                        t0 > 0};
      dev.gemm(g);
    }
  }
  if constexpr (!same) {
    if (need_k) launch_convert(dev, static_cast<const acc_t*>(gk), grad_k, 2 * H * n * half);
  }
}

}  // namespace
}  // namespace midus
