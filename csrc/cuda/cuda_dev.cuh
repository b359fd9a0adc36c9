// The real GPU behind the launch logic of csrc/cuda/kernels (the `dev` object described in
// kernels/common.cuh): launches on the current stream, workspaces from the caching allocator, the
// stable sort and the fp32 GEMMs from ATen/cuBLAS. tests/cuda_emu/emu_dev.h is its emulated twin.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_common.cuh"
#include "kernels/common.cuh"
#include "kernels/gemm.cuh"
#include "kernels/index_check.cuh"

namespace midus {
namespace {

// c10's 16-bit types -> CUDA's (same bits), as the kernels are written for the latter.
template <typename T>
struct native {
  using type = T;
};
template <>
struct native<c10::BFloat16> {
  using type = bf16_t;
};
template <>
struct native<c10::Half> {
  using type = f16_t;
};
template <typename T>
auto* nat(const at::Tensor& t) {
  return reinterpret_cast<typename native<T>::type*>(t.data_ptr<T>());
}

// Whether the backward GEMMs run in gemm.cuh's kernel instead of cuBLAS. MIDUS_OPS_CUDA_GEMM=own or
// =cublas decides; otherwise our kernel runs under torch.use_deterministic_algorithms(True) unless
// CUBLAS_WORKSPACE_CONFIG is one of the values that make cuBLAS deterministic (without it, torch
// versions that check raise from cuBLAS calls, and nothing else vouches for cuBLAS's order).
inline bool use_own_gemm() {
  const char* g = std::getenv("MIDUS_OPS_CUDA_GEMM");
  if (g != nullptr && !std::strcmp(g, "own")) return true;
  if (g != nullptr && !std::strcmp(g, "cublas")) return false;
  if (!at::globalContext().deterministicAlgorithms()) return false;
  const char* w = std::getenv("CUBLAS_WORKSPACE_CONFIG");
  return !(w != nullptr && (!std::strcmp(w, ":4096:8") || !std::strcmp(w, ":16:8")));
}

class CudaDev {
 public:
  explicit CudaDev(const at::Tensor& like)
      : options_(like.options()), device_(like.get_device()), stream_(c10::cuda::getCurrentCUDAStream()) {}

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
  // Workspace of n T; the tensor lives as long as this object (one op call).
  template <typename T>
  T* alloc(size_t n) {
    at::Tensor t = at::empty({static_cast<int64_t>(std::max<size_t>(n, 1) * sizeof(T))}, options_.dtype(at::kByte));
    keep_.push_back(t);
    return reinterpret_cast<T*>(t.data_ptr());
  }
  template <typename T>
  void zero(T* p, int64_t n) {
    if (n > 0) C10_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(n) * sizeof(T), stream_));
  }
  template <typename K>
  void sort_keys(const K* keys, int64_t n, int64_t* sorted, int64_t* perm) {
    if (n == 0) return;
    const auto kt = std::is_same_v<K, int32_t> ? at::kInt : at::kLong;
    at::Tensor in = at::from_blob(const_cast<K*>(keys), {n}, options_.dtype(kt));
    auto res = at::sort(in, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    at::from_blob(sorted, {n}, options_.dtype(at::kLong)).copy_(std::get<0>(res));
    at::from_blob(perm, {n}, options_.dtype(at::kLong)).copy_(std::get<1>(res));
  }
  // fp32 (fp64) GEMM, fp32 meaning fp32: cuBLAS without TF32 even where the user enabled it
  // (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high")), or our kernel.
  template <typename acc_t>
  void gemm(const GemmArgs<acc_t>& g) {
    if (g.batch == 0 || g.M == 0 || g.N == 0) return;
    if (use_own_gemm()) return launch_gemm(*this, g);
    const at::NoTF32Guard no_tf32;
    const auto o = options_.dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat);
    at::Tensor A = at::from_blob(const_cast<acc_t*>(g.A), {g.batch, g.M, g.K}, {g.sAb, g.sAm, g.sAk}, o);
    at::Tensor B = at::from_blob(const_cast<acc_t*>(g.B), {g.batch, g.K, g.N}, {g.sBb, g.sBk, g.sBn}, o);
    at::Tensor C = at::from_blob(g.C, {g.batch, g.M, g.N}, {g.sCb, g.sCm, g.sCn}, o);
    if (g.accumulate) {
      C.baddbmm_(A, B);
    } else {
      at::bmm_out(C, A, B);
    }
  }

 private:
  at::TensorOptions options_;
  int device_;
  cudaStream_t stream_;
  std::vector<at::Tensor> keep_;
};

// Raises IndexError naming `indices` for any index outside [0, R): a small reduction kernel and
// one 16-byte device-to-host copy (a stream synchronisation); skipped where
// host_index_check_enabled says so (see the header comment of kernels/hive_gather.cuh).
inline void check_index_range_cuda(const at::Tensor& idx, int64_t R, const char* op) {
  const int64_t n = idx.numel();
  CudaDev dev(idx);
  if (n == 0 || !host_index_check_enabled(dev.stream())) return;
  auto* dbuf = dev.alloc<unsigned long long>(2);
  dev.zero(dbuf, 2);
  if (idx.scalar_type() == at::kInt) {
    launch_count_bad_indices(dev, idx.data_ptr<int32_t>(), n, R, dbuf);
  } else {
    launch_count_bad_indices(dev, idx.data_ptr<int64_t>(), n, R, dbuf);
  }
  unsigned long long host[2] = {0, 0};
  C10_CUDA_CHECK(cudaMemcpyAsync(host, dbuf, sizeof(host), cudaMemcpyDeviceToHost, dev.stream()));
  C10_CUDA_CHECK(cudaStreamSynchronize(dev.stream()));
  TORCH_CHECK_INDEX(host[0] == 0, op, ": indices out of range: found ", static_cast<long long>(host[1]),
                    ", expected every index in [0, ", R, ") (", host[0], " indices out of range)");
}

}  // namespace
}  // namespace midus
