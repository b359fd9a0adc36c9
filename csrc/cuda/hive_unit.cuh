// What the three hive_gather CUDA units share: the launch.h values turned into the kernels' own
// types (kernels/hive_common.cuh), which live in an anonymous namespace, one copy per unit.
#pragma once
#include "cuda_dev.cuh"
#include "kernels/hive_gather.cuh"
#include "launch.h"

namespace midus {
namespace {

inline HiveShapes shapes_of(const HiveDims& d) { return HiveShapes{d.N, d.H, d.k, d.R, d.dz, d.dv, d.has_proj}; }

inline HiveOptions options_of(const HiveEnvOptions& e) {
  HiveOptions o;
  o.tensor_cores = e.tensor_cores;
  o.fwd_tile = e.fwd_tile;
  o.bwd_tile = e.bwd_tile;
  return o;
}

}  // namespace
}  // namespace midus
