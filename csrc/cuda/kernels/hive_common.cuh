// What hive_gather's kernel families share (overview in hive_gather.cuh): shapes, options of the
// launch logic, and the staging of a tile's rows and weights for the tensor-core kernels.
#pragma once
#include "common.cuh"

namespace midus {
namespace {

struct HiveShapes {
  int64_t N, H, k, R, dz, dv;
  bool has_proj;
};

// Choices a caller can force (for cross-checks); the defaults pick by shape and device.
struct HiveOptions {
  bool tensor_cores = true;  // false: the generic kernels for bf16/fp16 too (MIDUS_OPS_CUDA_NO_TC=1)
  int fwd_tile = 0;          // fwd_tc tokens per block: 0 = the largest that fits, else 64 or 32
  int bwd_tile = 0;          // bwd_tc tokens per tile:  0 = the largest that fits, else 32 or 16
  int64_t chunk_tokens = 0;  // generic backward's tokens per chunk: 0 = by its memory budget
};

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

}  // namespace
}  // namespace midus
