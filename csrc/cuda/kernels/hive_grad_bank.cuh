// hive_gather's bank gradient (overview in hive_gather.cuh): a deterministic segmented reduction,
// no atomics anywhere. Contributions are keyed by destination (make_keys), sorted stably by key
// (dev.sort_keys), and the sorted list is cut into chunks of C positions; one warp per chunk sums
// each run of equal keys in order and writes complete runs straight to their row; a run that
// crosses a chunk boundary leaves a partial ("carry") that the next level, the same kernel over
// the carries, combines in order. A key hit by millions of contributions is thus spread over many
// warps, and the result is bitwise identical run to run.
#pragma once
#include "common.cuh"

namespace midus {
namespace {

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
        if (col < W) out[key * W + col] = cvt<out_t>(acc[q]);
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
        wt = cvt<acc_t>(weights[e]);
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
          x[i][q] = (q0 + i < cnt && col < W) ? cvt<acc_t>(src[row * W + col]) : acc_t(0);
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
inline int64_t seg_chunk(int64_t M, int sm_count) {
  const int64_t target = M / (int64_t(sm_count) * 48);
  int64_t C = 32;
  while (2 * C <= target && C < 2048) C <<= 1;
  return C;
}

// out[i] = in[0] + ... + in[i] over n int64 values, one block (each thread sums a contiguous run,
// the runs' totals are scanned in shared memory): the carry offsets of the segmented reduction,
// computed on the device so that nothing waits for the host.
constexpr int SCAN_THREADS = 256;
__global__ void __launch_bounds__(SCAN_THREADS)
    inclusive_scan_kernel(const int64_t* __restrict__ in, int64_t* __restrict__ out, int64_t n) {
  MIDUS_SHARED(int64_t, part, [SCAN_THREADS]);
  const int t = threadIdx.x;
  const int64_t per = (n + SCAN_THREADS - 1) / SCAN_THREADS;
  const int64_t b = std::min<int64_t>(n, t * per), e = std::min<int64_t>(n, b + per);
  int64_t s = 0;
  for (int64_t i = b; i < e; ++i) s += in[i];
  part[t] = s;
  __syncthreads();
  for (int o = 1; o < SCAN_THREADS; o <<= 1) {  // Hillis-Steele
    const int64_t v = t >= o ? part[t - o] : 0;
    __syncthreads();
    part[t] += v;
    __syncthreads();
  }
  int64_t run = t > 0 ? part[t - 1] : 0;
  for (int64_t i = b; i < e; ++i) {
    run += in[i];
    out[i] = run;
  }
}

// Keys of the bank-gradient contributions into `keys` (M = N*H*k of them): row * H + h with proj
// (Y is [R, H, d_v]), row without. key_t is int32 when the key space fits.
template <typename Dev, typename index_t, typename key_t>
void launch_make_keys(Dev& dev, const index_t* idx, key_t* keys, int64_t M, int64_t k, int64_t H, int64_t R,
                      bool per_head) {
  if (M == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(M, threads), int64_t(dev.sm_count()) * 16);
  dev.launch("make_keys", make_keys_kernel<index_t, key_t>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0,
             idx, keys, M, k, H, R, per_head);
}

// out[key, :] = sum over contributions e with skeys[i] == key, e = perm[i], of w[e] * src[e / k, :]
// (rows of width W), in the order of i; (skeys, perm) is the stable ascending sort of the keys.
// out must be zero-filled by the caller (untouched keys stay zero).
template <typename Dev, typename scalar_t, typename out_t>
void segmented_scatter(Dev& dev, const int64_t* skeys, const int64_t* perm, int64_t M, const scalar_t* weights,
                       int64_t k, const scalar_t* src, int64_t W, out_t* out) {
  using acc_t = acc_t_of<scalar_t>;
  if (M == 0 || W == 0) return;
  const int64_t C = seg_chunk(M, dev.sm_count());
  const int64_t ncb = ceil_div(W, 32 * S_Q);
  MIDUS_CHECK(ncb <= 65535, "hive_gather_backward: row width ", W, " too large");

  // Level 0: the contributions themselves.
  int64_t nchunks = ceil_div(M, C);
  int64_t *carry_keys = nullptr, *incl = nullptr;  // incl: inclusive prefix sum of the carries per chunk
  acc_t* carry_vals = nullptr;
  // Carry slots of the next level (at most 2 per chunk) and their offsets.
  auto plan_carries = [&](const int64_t* keys, const int64_t* n_dev, int64_t n_host, int64_t nch) {
    int64_t* counts = dev.template alloc<int64_t>(size_t(nch));
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(nch, threads), 65535);
    dev.launch("seg_count", seg_count_kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, keys, n_dev,
               n_host, C, nch, counts);
    incl = dev.template alloc<int64_t>(size_t(nch));
    dev.launch("inclusive_scan", inclusive_scan_kernel, dim3(1), dim3(SCAN_THREADS), 0,
               static_cast<const int64_t*>(counts), incl, nch);
    carry_keys = dev.template alloc<int64_t>(size_t(2 * nch));
    carry_vals = dev.template alloc<acc_t>(size_t(2 * nch * W));
  };
  const dim3 block(S_WARPS * 32);
  {
    const bool multi = nchunks > 1;
    if (multi) plan_carries(skeys, nullptr, M, nchunks);
    const dim3 grid(static_cast<unsigned>(ceil_div(nchunks, S_WARPS)), static_cast<unsigned>(ncb));
    dev.launch("seg_reduce_level0", seg_reduce_kernel<scalar_t, scalar_t, out_t, acc_t, true>, grid, block, 0, skeys,
               static_cast<const int64_t*>(nullptr), M, perm, weights, k, src, W, out,
               multi ? incl : nullptr, multi ? carry_keys : nullptr, multi ? carry_vals : nullptr, C);
    if (!multi) return;
  }
  // Later levels over the carries, until one chunk holds them all.
  while (true) {
    const int64_t* in_keys = carry_keys;
    const acc_t* in_vals = carry_vals;
    const int64_t prev_chunks = nchunks;
    const int64_t* n_dev = incl + (prev_chunks - 1);
    const int64_t n_max = 2 * prev_chunks;  // upper bound; the kernels read the true count at n_dev
    nchunks = ceil_div(n_max, C);
    const bool multi = nchunks > 1;
    if (multi) plan_carries(in_keys, n_dev, n_max, nchunks);
    const dim3 grid(static_cast<unsigned>(ceil_div(nchunks, S_WARPS)), static_cast<unsigned>(ncb));
    dev.launch("seg_reduce", seg_reduce_kernel<acc_t, acc_t, out_t, acc_t, false>, grid, block, 0, in_keys, n_dev,
               n_max, static_cast<const int64_t*>(nullptr), static_cast<const acc_t*>(nullptr), int64_t(1), in_vals, W,
               out, multi ? incl : nullptr, multi ? carry_keys : nullptr, multi ? carry_vals : nullptr, C);
    if (!multi) return;
  }
}

}  // namespace
}  // namespace midus
