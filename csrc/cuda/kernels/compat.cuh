// Portability layer of the CUDA kernels in csrc/cuda/kernels/*.cuh. The same headers are compiled
// twice: by nvcc for the extension (csrc/cuda/*.cu, thin dtype dispatch), and by a plain C++
// compiler for the CPU emulation of the CUDA execution model in tests/cuda_emu (MIDUS_CUDA_EMU
// defined), which runs every kernel and its launch logic in CI without a GPU. So these headers
// include neither ATen nor torch, and the few things that differ between the two builds go through
// the macros below:
//   MIDUS_SHARED(T, name, dims)   static shared memory  (`__shared__ T name dims;`)
//   MIDUS_DYNAMIC_SMEM(name)      the dynamic shared memory, an `unsigned char*` aligned to 16
//   MIDUS_KERNEL_ASSERT(c, msg)   device-side assert (CUDA_KERNEL_ASSERT_MSG on a GPU)
//   MIDUS_CHECK(c, ...)           host-side check (TORCH_CHECK in the extension)
// 16-bit floats are CUDA's own __nv_bfloat16 / __half (the glue reinterprets c10::BFloat16 /
// c10::Half pointers, which have the same bits); conversions go through cvt<To>(from) in
// common.cuh because torch compiles with __CUDA_NO_BFLOAT16_CONVERSIONS__ and friends.
#pragma once

#if defined(MIDUS_CUDA_EMU)
#include "cuda_emu.h"
#define MIDUS_SHARED(T, name, dims) MIDUS_EMU_SHARED(T, name, dims)
#define MIDUS_DYNAMIC_SMEM(name) unsigned char* name = ::midus_emu::dynamic_smem()
#define MIDUS_KERNEL_ASSERT(cond, msg) \
  do {                                 \
    if (!(cond)) ::midus_emu::device_assert_fail(#cond, msg, __FILE__, __LINE__); \
  } while (0)
#define MIDUS_CHECK(cond, ...) \
  do {                         \
    if (!(cond)) ::midus_emu::host_check_fail(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
#else
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define MIDUS_SHARED(T, name, dims) __shared__ T name dims
#define MIDUS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MIDUS_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#define MIDUS_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
