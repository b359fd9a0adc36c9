// Limits of the CUDA kernels, in one place: the kernels use them, and midus_ops._C exports them
// (midus_ops.ops.CUDA_PK_TOPK_MAX_K / _N) so Python never keeps a copy that could drift.
#pragma once

namespace midus {
// pk_topk: two registers per lane hold the best 64 candidates; a warp's score rows (n per half)
// live in shared memory.
constexpr int kPkMaxK = 64;
constexpr int kPkMaxN = 4096;
}  // namespace midus
