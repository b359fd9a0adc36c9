// What the ATen glue of the CUDA ops (hive_gather.cpp, pk_topk.cpp) shares: the dtype code the CUDA
// units dispatch on (launch.h), from the tensor's dtype, which the glue has checked.
#pragma once
#include <ATen/ATen.h>

#include "launch.h"

namespace midus {

inline FloatType float_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::f32;
    case at::kDouble: return FloatType::f64;
    case at::kBFloat16: return FloatType::bf16;
    case at::kHalf: return FloatType::f16;
    default: TORCH_CHECK(false, "midus_ops: no CUDA kernel for dtype ", t.scalar_type());
  }
}

}  // namespace midus
