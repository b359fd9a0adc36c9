// pk_topk backward on CUDA (docs/design.md §1.1): the dtype dispatch into pk_topk_backward of
// kernels/pk_topk.cuh. The checks and outputs are in pk_topk.cpp (launch.h lists the units).
#include "cuda_dev.cuh"
#include "kernels/pk_topk.cuh"
#include "launch.h"

namespace midus {

void pk_topk_backward_cuda_tu(FloatType t, int device, const void* g, bool g_native, const int64_t* idx,
                              const void* q, const void* sk, void* grad_q, void* grad_k, int64_t N, int64_t H,
                              int64_t half, int64_t n, int64_t k) {
  CudaDev dev(device);
  dispatch_float(t, "pk_topk_backward_cuda", [&](auto tt) {
    using T = typename decltype(tt)::type;
    using acc_t = acc_t_of<T>;
    T* gq = static_cast<T*>(grad_q);
    T* gk = static_cast<T*>(grad_k);
    if (g_native) {
      pk_topk_backward<CudaDev, T, T>(dev, static_cast<const T*>(g), idx, static_cast<const T*>(q),
                                      static_cast<const T*>(sk), gq, gk, N, H, half, n, k);
    } else {
      pk_topk_backward<CudaDev, T, acc_t>(dev, static_cast<const acc_t*>(g), idx, static_cast<const T*>(q),
                                          static_cast<const T*>(sk), gq, gk, N, H, half, n, k);
    }
  });
}

}  // namespace midus
