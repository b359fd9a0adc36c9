// pk_topk forward on CUDA (docs/design.md §1.1): the dtype dispatch into pk_topk_forward of
// kernels/pk_topk.cuh. The checks and outputs are in pk_topk.cpp (launch.h lists the units).
#include "cuda_dev.cuh"
#include "kernels/pk_topk.cuh"
#include "launch.h"

namespace midus {

void pk_topk_forward_cuda_tu(FloatType t, int device, const void* q, const void* sk, void* scores, int64_t* indices,
                             int64_t N, int64_t H, int64_t half, int64_t n, int64_t k) {
  CudaDev dev(device);
  dispatch_float(t, "pk_topk_cuda", [&](auto tt) {
    using T = typename decltype(tt)::type;
    pk_topk_forward(dev, static_cast<const T*>(q), static_cast<const T*>(sk), static_cast<T*>(scores), indices, N, H,
                    half, n, k);
  });
}

}  // namespace midus
