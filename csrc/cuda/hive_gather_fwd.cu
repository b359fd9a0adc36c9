// hive_gather forward on CUDA (docs/design.md §1.2): the dtype dispatch into the launch logic of
// kernels/hive_gather.cuh (fwd_tc, fwd_generic, bag_gather); also the host-side index check of
// both ops. The checks and outputs are in hive_gather.cpp (launch.h lists the units).
#include "hive_unit.cuh"

namespace midus {

void check_index_range_cuda_tu(const void* idx, bool idx64, int64_t n, int device, int64_t R, const char* op) {
  check_index_range_cuda(idx, idx64, n, device, R, op);
}

void hive_gather_forward_cuda_tu(const HiveDims& d, const HiveEnvOptions& e, FloatType t, bool idx64, int device,
                                 const void* w, const void* idx, const void* bank, const void* proj, void* out) {
  const HiveShapes s = shapes_of(d);
  CudaDev dev(device);
  const HiveOptions o = options_of(e);
  dispatch_float(t, "hive_gather_cuda", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const T* pp = s.has_proj ? static_cast<const T*>(proj) : nullptr;
    dispatch_index(idx64, [&](auto it) {
      using index_t = typename decltype(it)::type;
      hive_gather_forward<CudaDev, T, index_t>(dev, s, static_cast<const T*>(w), static_cast<const index_t*>(idx),
                                               static_cast<const T*>(bank), pp, static_cast<T*>(out), o);
    });
  });
}

}  // namespace midus
