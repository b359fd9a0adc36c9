// The default host-side index range check of the CUDA ops: a small reduction kernel whose count
// and example the glue copies back (one stream synchronisation; see csrc/cuda/cuda_common.cuh).
#pragma once
#include "common.cuh"

namespace midus {
namespace {

// out[0] += number of indices outside [0, R); out[1] = one of them.
template <typename index_t>
__global__ void count_bad_indices_kernel(const index_t* __restrict__ idx, int64_t n, int64_t R,
                                         unsigned long long* __restrict__ out) {
  unsigned long long bad = 0;
  long long example = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = static_cast<int64_t>(idx[i]);
    if (r < 0 || r >= R) {
      ++bad;
      example = r;
    }
  }
  if (bad) {
    atomicAdd(out, bad);
    atomicExch(out + 1, static_cast<unsigned long long>(example));
  }
}

// `out` (2 values) must be zeroed by the caller.
template <typename Dev, typename index_t>
void launch_count_bad_indices(Dev& dev, const index_t* idx, int64_t n, int64_t R, unsigned long long* out) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), int64_t(dev.sm_count()) * 8);
  dev.launch("count_bad_indices", count_bad_indices_kernel<index_t>, dim3(static_cast<unsigned>(blocks)),
             dim3(threads), 0, idx, n, R, out);
}

}  // namespace
}  // namespace midus
