// Small cases that the mutation tests (tests/test_cuda_emulated.py) build against kernels with a
// planted bug, each calling one kernel's launcher directly so that a mutant builds in seconds; they
// also run, unmutated, with the other drivers.
#include "../../csrc/cuda/kernels/hive_bag.cuh"
#include "../../csrc/cuda/kernels/hive_bwd_tc.cuh"
#include "../../csrc/cuda/kernels/hive_fwd.cuh"
#include "../../csrc/cuda/kernels/gemm.cuh"
#include "emu_dev.h"
#include "harness.h"
#include "hive_ref.h"

using midus::HiveShapes;
using midus_emu::DevBuf;
using midus_emu::EmuDev;
using namespace emu_test;
using namespace hive_test;
using bf16 = __nv_bfloat16;

namespace {

// fwd_tc (64-token tile): N, d_z and d_v past their tiles.
EMU_CASE("mut_fwd_tc64_bf16") {
  EmuDev dev(90);
  const auto in = make_inputs<bf16, int64_t>(ctx, {70, 1, 9, 40, 264, 72, true});
  const HiveShapes& s = in.s;
  DevBuf<bf16> w(in.w, "weights"), bank(in.bank, "bank"), proj(in.proj, "proj"), out(size_t(s.N * s.H * s.dv), "out");
  DevBuf<int64_t> idx(in.idx, "indices");
  midus::launch_fwd_tc<EmuDev, bf16, int64_t, 64>(dev, s, w.get(), idx.get(), bank.get(), proj.get(), out.get());
  ctx.digest(out.get(), out.size());
  expect_close(out.get(), forward_ref(in), "out");
}

// bwd_tc (32-token tile): grad_weights and grad_proj.
EMU_CASE("mut_bwd_tc32_bf16") {
  EmuDev dev(90);
  const auto in = make_inputs<bf16, int64_t>(ctx, {45, 1, 20, 60, 40, 24, true});
  const HiveShapes& s = in.s;
  DevBuf<bf16> w(in.w, "weights"), bank(in.bank, "bank"), proj(in.proj, "proj"), gout(in.gout, "grad_out");
  DevBuf<bf16> gw(size_t(s.N * s.H * s.k), "grad_weights"), gp(size_t(s.H * s.dz * s.dv), "grad_proj");
  DevBuf<int64_t> idx(in.idx, "indices");
  midus::launch_bwd_tc<EmuDev, bf16, int64_t, 32>(dev, s, gout.get(), w.get(), idx.get(), bank.get(), proj.get(),
                                                  gw.get(), gp.get());
  const Grads g = backward_ref(in);
  ctx.digest(gw.get(), gw.size());
  ctx.digest(gp.get(), gp.size());
  expect_close(gw.get(), g.gw, "grad_weights");
  expect_close(gp.get(), g.gp, "grad_proj");
}

// bag_dot: grad_weights without proj, a butterfly reduction per (bag, row).
EMU_CASE("mut_bag_dot_f32") {
  EmuDev dev(90);
  const auto in = make_inputs<float, int64_t>(ctx, {13, 2, 7, 20, 12, 12, false});
  const HiveShapes& s = in.s;
  DevBuf<float> bank(in.bank, "bank"), gout(in.gout, "grad_out"), gw(size_t(s.N * s.H * s.k), "grad_weights");
  DevBuf<int64_t> idx(in.idx, "indices");
  midus::launch_bag_dot<EmuDev, float, float, int64_t>(dev, gout.get(), idx.get(), bank.get(), gw.get(), s.N * s.H,
                                                       s.k, s.R, s.dz);
  ctx.digest(gw.get(), gw.size());
  expect_close(gw.get(), backward_ref(in).gw, "grad_weights");
}

}  // namespace
