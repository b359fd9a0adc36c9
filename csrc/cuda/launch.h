// The entry points of the CUDA translation units, called by the ATen glue in hive_gather.cpp and
// pk_topk.cpp (input checks, outputs, registration), and the ATen services those units use
// (cuda_dev.cpp). The kernel families compile in separate units so that a build runs them in
// parallel (the flash-attn / mamba-ssm layout: kernels in headers per family, thin host files).
// No CUDA unit includes ATen or torch headers: nvcc parses a unit's headers once per
// architecture, so they cost each unit about a minute of CPU (measured with CUDA 13.0 and torch
// 2.14: a trivial kernel took 77 s of CPU to compile with ATen/ATen.h included, 8 s without).
// So everything here is plain pointers and values; the kernels' own types live in anonymous
// namespaces, one copy per unit (see cuda_common.cuh).
//
//   hive_gather_fwd.cu        hive_gather forward (fwd_tc, fwd_generic, bag_gather) and the
//                             host-side index check of both ops
//   hive_gather_bwd.cu        hive_gather backward: grad_weights and grad_proj (bwd_tc, generic)
//   hive_gather_grad_bank.cu  hive_gather backward: grad_bank (segmented reduction)
//   pk_topk_fwd.cu            pk_topk forward
//   pk_topk_bwd.cu            pk_topk backward
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace midus {

// The float dtypes of the ops (float, double, c10::BFloat16 = __nv_bfloat16, c10::Half = __half).
enum class FloatType { f32, f64, bf16, f16 };

// hive_gather's shapes (HiveShapes of kernels/hive_common.cuh) and the options the glue reads from
// the environment (HiveOptions).
struct HiveDims {
  int64_t N, H, k, R, dz, dv;
  bool has_proj;
};
struct HiveEnvOptions {
  bool tensor_cores;
  int fwd_tile, bwd_tile;
};

// ---- entry points of the CUDA units; pointers to contiguous tensors on `device`, the current one

// Raises IndexError naming `indices` for any of the n indices outside [0, R) (check_index_range_cuda).
void check_index_range_cuda_tu(const void* idx, bool idx64, int64_t n, int device, int64_t R, const char* op);

// proj null without one.
void hive_gather_forward_cuda_tu(const HiveDims& d, const HiveEnvOptions& o, FloatType t, bool idx64, int device,
                                 const void* w, const void* idx, const void* bank, const void* proj, void* out);
// gw and gp null when not wanted.
void hive_gather_backward_weights_proj_cuda_tu(const HiveDims& d, const HiveEnvOptions& o, FloatType t, bool idx64,
                                               int device, const void* gout, const void* w, const void* idx,
                                               const void* bank, const void* proj, void* gw, void* gp);
void hive_gather_backward_bank_cuda_tu(const HiveDims& d, FloatType t, bool idx64, int device, const void* gout,
                                       const void* w, const void* idx, const void* proj, void* gb);

// indices int64.
void pk_topk_forward_cuda_tu(FloatType t, int device, const void* q, const void* sk, void* scores, int64_t* indices,
                             int64_t N, int64_t H, int64_t half, int64_t n, int64_t k);
// g in q's dtype when g_native, else in the accumulation type (double for f64, else float);
// grad_q and grad_k null when not wanted.
void pk_topk_backward_cuda_tu(FloatType t, int device, const void* g, bool g_native, const int64_t* idx,
                              const void* q, const void* sk, void* grad_q, void* grad_k, int64_t N, int64_t H,
                              int64_t half, int64_t n, int64_t k);

// ---- ATen services of the CUDA units (cuda_dev.cpp, plain C++)

// c10::cuda::getCurrentCUDAStream() of the current device.
cudaStream_t cuda_current_stream();
// The workspaces of one op call (tensors from the caching allocator), freed together.
struct CudaWorkspaces;
CudaWorkspaces* cuda_workspaces_new(int device);
void cuda_workspaces_delete(CudaWorkspaces* ws);
void* cuda_workspace_alloc(CudaWorkspaces* ws, size_t bytes);
// Stable ascending sort of n int32 (int64 when keys64) keys: the sorted keys and the permutation.
void cuda_sort_keys(int device, const void* keys, bool keys64, int64_t n, int64_t* sorted, int64_t* perm);
// Whether the backward GEMMs run in gemm.cuh's kernel instead of cuBLAS (MIDUS_OPS_CUDA_GEMM, and
// deterministic mode without a deterministic CUBLAS_WORKSPACE_CONFIG).
bool use_own_gemm();
// C[b] (+)= A[b] B[b] in fp32 (fp64 when fp64) through ATen/cuBLAS, never TF32.
void cuda_gemm_no_tf32(int device, bool fp64, int64_t batch, int64_t M, int64_t N, int64_t K, const void* A,
                       int64_t sAb, int64_t sAm, int64_t sAk, const void* B, int64_t sBb, int64_t sBk, int64_t sBn,
                       void* C, int64_t sCb, int64_t sCm, int64_t sCn, bool accumulate);

}  // namespace midus
