// The ATen services of the CUDA units (declared in launch.h; CudaDev in cuda_dev.cuh calls them):
// plain C++, so that nvcc never parses the ATen headers.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "launch.h"

namespace midus {

cudaStream_t cuda_current_stream() { return c10::cuda::getCurrentCUDAStream(); }

struct CudaWorkspaces {
  at::TensorOptions options;
  std::vector<at::Tensor> keep;
};

CudaWorkspaces* cuda_workspaces_new(int device) {
  return new CudaWorkspaces{at::TensorOptions().device(at::kCUDA, device).dtype(at::kByte), {}};
}

void cuda_workspaces_delete(CudaWorkspaces* ws) { delete ws; }

void* cuda_workspace_alloc(CudaWorkspaces* ws, size_t bytes) {
  at::Tensor t = at::empty({static_cast<int64_t>(bytes)}, ws->options);
  ws->keep.push_back(t);
  return t.data_ptr();
}

void cuda_sort_keys(int device, const void* keys, bool keys64, int64_t n, int64_t* sorted, int64_t* perm) {
  const auto o = at::TensorOptions().device(at::kCUDA, device);
  at::Tensor in = at::from_blob(const_cast<void*>(keys), {n}, o.dtype(keys64 ? at::kLong : at::kInt));
  auto res = at::sort(in, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::from_blob(sorted, {n}, o.dtype(at::kLong)).copy_(std::get<0>(res));
  at::from_blob(perm, {n}, o.dtype(at::kLong)).copy_(std::get<1>(res));
}

// MIDUS_OPS_CUDA_GEMM=own or =cublas decides; otherwise our kernel runs under
// torch.use_deterministic_algorithms(True) unless CUBLAS_WORKSPACE_CONFIG is one of the values that
// make cuBLAS deterministic (without it, torch versions that check raise from cuBLAS calls, and
// nothing else vouches for cuBLAS's order).
bool use_own_gemm() {
  const char* g = std::getenv("MIDUS_OPS_CUDA_GEMM");
  if (g != nullptr && !std::strcmp(g, "own")) return true;
  if (g != nullptr && !std::strcmp(g, "cublas")) return false;
  if (!at::globalContext().deterministicAlgorithms()) return false;
  const char* w = std::getenv("CUBLAS_WORKSPACE_CONFIG");
  return !(w != nullptr && (!std::strcmp(w, ":4096:8") || !std::strcmp(w, ":16:8")));
}

// fp32 meaning fp32: no TF32 even where the user enabled it (torch.backends.cuda.matmul.allow_tf32,
// set_float32_matmul_precision("high")).
void cuda_gemm_no_tf32(int device, bool fp64, int64_t batch, int64_t M, int64_t N, int64_t K, const void* A,
                       int64_t sAb, int64_t sAm, int64_t sAk, const void* B, int64_t sBb, int64_t sBk, int64_t sBn,
                       void* C, int64_t sCb, int64_t sCm, int64_t sCn, bool accumulate) {
  const at::NoTF32Guard no_tf32;
  const auto o = at::TensorOptions().device(at::kCUDA, device).dtype(fp64 ? at::kDouble : at::kFloat);
  at::Tensor a = at::from_blob(const_cast<void*>(A), {batch, M, K}, {sAb, sAm, sAk}, o);
  at::Tensor b = at::from_blob(const_cast<void*>(B), {batch, K, N}, {sBb, sBk, sBn}, o);
  at::Tensor c = at::from_blob(C, {batch, M, N}, {sCb, sCm, sCn}, o);
  if (accumulate) {
    c.baddbmm_(a, b);
  } else {
    at::bmm_out(c, a, b);
  }
}

}  // namespace midus
