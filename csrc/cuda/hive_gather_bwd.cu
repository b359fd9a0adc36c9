// hive_gather backward on CUDA, grad_weights and grad_proj (docs/design.md §1.2): the dtype dispatch
// into hive_gather_backward_weights_proj of kernels/hive_gather.cuh (bwd_tc, the generic path,
// bag_dot). grad_bank compiles in hive_gather_grad_bank.cu; the checks and outputs are in
// hive_gather.cpp.
#include "hive_unit.cuh"

namespace midus {

void hive_gather_backward_weights_proj_cuda_tu(const HiveDims& d, const HiveEnvOptions& e, FloatType t, bool idx64,
                                               int device, const void* gout, const void* w, const void* idx,
                                               const void* bank, const void* proj, void* gw, void* gp) {
  const HiveShapes s = shapes_of(d);
  CudaDev dev(device);
  const HiveOptions o = options_of(e);
  dispatch_float(t, "hive_gather_backward_cuda", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const T* pp = s.has_proj ? static_cast<const T*>(proj) : nullptr;
    dispatch_index(idx64, [&](auto it) {
      using index_t = typename decltype(it)::type;
      hive_gather_backward_weights_proj<CudaDev, T, index_t>(
          dev, s, static_cast<const T*>(gout), static_cast<const T*>(w), static_cast<const index_t*>(idx),
          static_cast<const T*>(bank), pp, static_cast<T*>(gw), static_cast<T*>(gp), o);
    });
  });
}

}  // namespace midus
