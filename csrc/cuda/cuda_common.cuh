// Host-side helpers shared by the CUDA kernels of midus_ops (csrc/cuda/*.cu): cached device
// attributes and the default index range check. Everything is in an anonymous namespace (each
// translation unit its own copy): the kernels are compiled without relocatable device code, so a
// kernel template shared across units would otherwise rely on weak-symbol merging of host stubs.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace midus {
namespace {

// ============================================================================================
// Index range check (host side, default): a small reduction kernel and one 16-byte
// device-to-host copy (a stream synchronisation); see the header comment of hive_gather.cu
// ============================================================================================
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

inline int device_sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

inline int device_smem_optin(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

// False when MIDUS_OPS_CUDA_INDEX_CHECK=device (or 0/off), or while `stream` is capturing a CUDA
// graph (no synchronisation is possible there): the kernels' device-side checks remain.
inline bool host_index_check_enabled(cudaStream_t stream) {
  const char* s = std::getenv("MIDUS_OPS_CUDA_INDEX_CHECK");
  if (s != nullptr && (!std::strcmp(s, "device") || !std::strcmp(s, "0") || !std::strcmp(s, "off"))) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone;
}

// Raises IndexError naming `indices` for any index outside [0, R) (see the header comment).
inline void check_index_range_cuda(const at::Tensor& idx, int64_t R, const char* op, cudaStream_t stream) {
  const int64_t n = idx.numel();
  if (n == 0 || !host_index_check_enabled(stream)) return;
  auto buf = at::empty({2}, idx.options().dtype(at::kLong));
  auto* dbuf = reinterpret_cast<unsigned long long*>(buf.data_ptr<int64_t>());
  C10_CUDA_CHECK(cudaMemsetAsync(dbuf, 0, 2 * sizeof(unsigned long long), stream));
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(device_sm_count(idx.get_device())) * 8);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "hive_gather_check_indices", [&] {
    count_bad_indices_kernel<index_t>
        <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(idx.data_ptr<index_t>(), n, R, dbuf);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  unsigned long long host[2] = {0, 0};
  C10_CUDA_CHECK(cudaMemcpyAsync(host, dbuf, sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  TORCH_CHECK_INDEX(host[0] == 0, op, ": indices out of range: found ", static_cast<long long>(host[1]),
                    ", expected every index in [0, ", R, ") (", host[0], " indices out of range)");
}

}  // namespace
}  // namespace midus
