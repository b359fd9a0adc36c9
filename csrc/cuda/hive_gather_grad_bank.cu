// hive_gather backward on CUDA, grad_bank (docs/design.md §1.2): the dtype dispatch into
// hive_gather_backward_bank of kernels/hive_gather.cuh (the deterministic segmented reduction of
// kernels/hive_grad_bank.cuh). The checks and outputs are in hive_gather.cpp.
#include "hive_unit.cuh"

namespace midus {

void hive_gather_backward_bank_cuda_tu(const HiveDims& d, FloatType t, bool idx64, int device, const void* gout,
                                       const void* w, const void* idx, const void* proj, void* gb) {
  const HiveShapes s = shapes_of(d);
  CudaDev dev(device);
  dispatch_float(t, "hive_gather_backward_cuda", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const T* pp = s.has_proj ? static_cast<const T*>(proj) : nullptr;
    dispatch_index(idx64, [&](auto it) {
      using index_t = typename decltype(it)::type;
      hive_gather_backward_bank<CudaDev, T, index_t>(dev, s, static_cast<const T*>(gout), static_cast<const T*>(w),
                                                     static_cast<const index_t*>(idx), pp, static_cast<T*>(gb));
    });
  });
}

}  // namespace midus
