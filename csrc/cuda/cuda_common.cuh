// Host-side helpers shared by the CUDA units (csrc/cuda/*.cu; launch.h lists them): cached device
// attributes and whether the host-side index check runs. Everything is in an anonymous namespace
// (each translation unit its own copy): the kernels are compiled without relocatable device code,
// so a kernel template shared across units would otherwise rely on weak-symbol merging of host
// stubs.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace midus {
namespace {

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

}  // namespace
}  // namespace midus
