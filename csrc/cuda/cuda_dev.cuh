// The real GPU behind the launch logic of csrc/cuda/kernels (the `dev` object described in
// kernels/common.cuh): launches on the current stream, workspaces from the caching allocator, the
// stable sort and the fp32 GEMMs from ATen/cuBLAS. tests/cuda_emu/emu_dev.h is its emulated twin.
// What needs ATen (workspaces, sort, cuBLAS, the current stream) is out of line in cuda_dev.cpp,
// declared in launch.h, which says why.
#pragma once
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "cuda_common.cuh"
#include "kernels/common.cuh"
#include "kernels/gemm.cuh"
#include "kernels/index_check.cuh"
#include "launch.h"

namespace midus {
namespace {

class CudaDev {
 public:
  // On the current device (the glue's CUDAGuard sets it to the tensors' device).
  explicit CudaDev(int device)
      : device_(device),
        stream_(cuda_current_stream()),
        workspaces_(cuda_workspaces_new(device), cuda_workspaces_delete) {}

  int device() const { return device_; }
  int sm_count() const { return device_sm_count(device_); }
  size_t smem_optin() const { return static_cast<size_t>(device_smem_optin(device_)); }
  cudaStream_t stream() const { return stream_; }

  template <typename... P, typename... A>
  void launch(const char* /*name*/, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    kernel<<<grid, block, smem, stream_>>>(static_cast<P>(std::forward<A>(args))...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename... P>
  void set_max_dynamic_smem(void (*kernel)(P...), size_t bytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  template <typename... P>
  int max_active_blocks(void (*kernel)(P...), int threads, size_t smem) {
    int occ = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem));
    return occ;
  }
  // Workspace of n T; it lives as long as this object (one op call).
  template <typename T>
  T* alloc(size_t n) {
    return static_cast<T*>(cuda_workspace_alloc(workspaces_.get(), std::max<size_t>(n, 1) * sizeof(T)));
  }
  template <typename T>
  void zero(T* p, int64_t n) {
    if (n > 0) C10_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(n) * sizeof(T), stream_));
  }
  template <typename K>
  void sort_keys(const K* keys, int64_t n, int64_t* sorted, int64_t* perm) {
    if (n == 0) return;
    cuda_sort_keys(device_, keys, std::is_same_v<K, int64_t>, n, sorted, perm);
  }
  // fp32 (fp64) GEMM, fp32 meaning fp32: cuBLAS without TF32 even where the user enabled it
  // (cuda_gemm_no_tf32 in cuda_dev.cpp), or our kernel.
  template <typename acc_t>
  void gemm(const GemmArgs<acc_t>& g) {
    if (g.batch == 0 || g.M == 0 || g.N == 0) return;
    if (use_own_gemm()) return launch_gemm(*this, g);
    cuda_gemm_no_tf32(device_, std::is_same_v<acc_t, double>, g.batch, g.M, g.N, g.K, g.A, g.sAb, g.sAm, g.sAk, g.B,
                      g.sBb, g.sBk, g.sBn, g.C, g.sCb, g.sCm, g.sCn, g.accumulate);
  }

 private:
  int device_;
  cudaStream_t stream_;
  std::unique_ptr<CudaWorkspaces, void (*)(CudaWorkspaces*)> workspaces_;
};

// Raises IndexError naming `indices` for any index outside [0, R): a small reduction kernel and
// one 16-byte device-to-host copy (a stream synchronisation); skipped where
// host_index_check_enabled says so (see the header comment of kernels/hive_gather.cuh).
inline void check_index_range_cuda(const void* idx_ptr, bool idx64, int64_t n, int device, int64_t R, const char* op) {
  CudaDev dev(device);
  if (n == 0 || !host_index_check_enabled(dev.stream())) return;
  auto* dbuf = dev.alloc<unsigned long long>(2);
  dev.zero(dbuf, 2);
  if (!idx64) {
    launch_count_bad_indices(dev, static_cast<const int32_t*>(idx_ptr), n, R, dbuf);
  } else {
    launch_count_bad_indices(dev, static_cast<const int64_t*>(idx_ptr), n, R, dbuf);
  }
  unsigned long long host[2] = {0, 0};
  C10_CUDA_CHECK(cudaMemcpyAsync(host, dbuf, sizeof(host), cudaMemcpyDeviceToHost, dev.stream()));
  C10_CUDA_CHECK(cudaStreamSynchronize(dev.stream()));
  TORCH_CHECK_INDEX(host[0] == 0, op, ": indices out of range: found ", static_cast<long long>(host[1]),
                    ", expected every index in [0, ", R, ") (", host[0], " indices out of range)");
}

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}) with T the CUDA type of a float dtype (launch.h), as AT_DISPATCH_FLOATING_TYPES_AND2
// would with c10's types; the glue has checked the dtype.
template <typename F>
void dispatch_float(FloatType t, const char* name, F&& f) {
  switch (t) {
    case FloatType::f32: return f(Type<float>{});
    case FloatType::f64: return f(Type<double>{});
    case FloatType::bf16: return f(Type<bf16_t>{});
    case FloatType::f16: return f(Type<f16_t>{});
  }
  TORCH_CHECK(false, '"', name, "\" not implemented for this dtype");
}
template <typename F>
void dispatch_index(bool idx64, F&& f) {
  if (idx64) return f(Type<int64_t>{});
  return f(Type<int32_t>{});
}

}  // namespace
}  // namespace midus
