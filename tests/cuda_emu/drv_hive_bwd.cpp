// Emulated tests of hive_gather's backward (csrc/cuda/kernels/hive_*.cuh) against a
// double-precision reference: bag_dot, bwd_tc in both tile configurations, the generic path
// (GEMMs, token chunks), and the bank gradient's deterministic segmented reduction, including one
// hot key taking every contribution (several levels of carries).
#include "../../csrc/cuda/kernels/hive_gather.cuh"
#include "emu_dev.h"
#include "harness.h"
#include "hive_ref.h"

using midus::HiveOptions;
using midus::HiveShapes;
using midus_emu::DevBuf;
using midus_emu::EmuDev;
using namespace emu_test;
using namespace hive_test;
using bf16 = __nv_bfloat16;
using f16 = __half;

namespace {

struct Want {
  bool w = true, bank = true, proj = true;
};

template <typename T, typename I>
void backward_case(Ctx& ctx, EmuDev& dev, const Inputs<T, I>& in, Want want, const HiveOptions& o = {},
                   double factor = 1.0, bool misalign = false) {
  const HiveShapes& s = in.s;
  DevBuf<T> w(in.w, "weights"), proj(in.proj, "proj"), gout(in.gout, "grad_out");
  DevBuf<I> idx(in.idx, "indices");
  DevBuf<T> bank = misalign ? DevBuf<T>(in.bank.size() + 1, "bank", sizeof(T)) : DevBuf<T>(in.bank.size(), "bank");
  std::copy(in.bank.begin(), in.bank.end(), bank.get());
  if (misalign) EMU_EXPECT(!midus::aligned16(bank.get()), "misaligned bank");
  const bool need_proj = want.proj && s.has_proj;
  DevBuf<T> gw(size_t(s.N * s.H * s.k), "grad_weights"), gb(size_t(s.R * s.dz), "grad_bank"),
      gp(size_t(s.H * s.dz * s.dv), "grad_proj");
  midus::hive_gather_backward<EmuDev, T, I>(dev, s, gout.get(), w.get(), idx.get(), bank.get(),
                                            s.has_proj ? proj.get() : nullptr, want.w ? gw.get() : nullptr,
                                            want.bank ? gb.get() : nullptr, need_proj ? gp.get() : nullptr, o);
  const Grads g = backward_ref(in);
  if (want.w) {
    ctx.digest(gw.get(), gw.size());
    expect_close(gw.get(), g.gw, "grad_weights", factor);
  }
  if (want.bank) {
    ctx.digest(gb.get(), gb.size());
    expect_close(gb.get(), g.gb, "grad_bank", factor);
  }
  if (need_proj) {
    ctx.digest(gp.get(), gp.size());
    expect_close(gp.get(), g.gp, "grad_proj", factor);
  }
}

template <typename T, typename I>
void backward(Ctx& ctx, int sm, HiveShapes s, const char* expect_kernel, Want want = {}, const HiveOptions& o = {},
              Idx mode = Idx::Uniform, double factor = 1.0, bool misalign = false) {
  EmuDev dev(sm);
  const auto in = make_inputs<T, I>(ctx, s, mode);
  backward_case(ctx, dev, in, want, o, factor, misalign);
  if (expect_kernel) EMU_EXPECT(dev.launches[expect_kernel] >= 1, "the path: expected ", expect_kernel, " to run");
}

// ---- no proj: bag_dot and the scatter in d_z space ----------------------------------------------
EMU_CASE("hg_bwd_noproj_f32_vec") { backward<float, int64_t>(ctx, 90, {13, 2, 7, 20, 12, 12, false}, "bag_dot_vec"); }
EMU_CASE("hg_bwd_noproj_bf16_scalar_dz10") {
  backward<bf16, int32_t>(ctx, 90, {11, 3, 5, 25, 10, 10, false}, "bag_dot");
}
EMU_CASE("hg_bwd_noproj_f64_k1") { backward<double, int64_t>(ctx, 80, {9, 2, 1, 6, 70, 70, false}, "bag_dot_vec"); }
EMU_CASE("hg_bwd_noproj_f16_misaligned") {
  backward<f16, int64_t>(ctx, 90, {7, 2, 9, 15, 16, 16, false}, "bag_dot", {}, {}, Idx::Uniform, 1.0, true);
}

// ---- bwd_tc ------------------------------------------------------------------------------------------
// N past the 32-token tile, d_z not a multiple of 16 (zero-padded k-steps), d_v < 64, k past 16
// rows in flight.
EMU_CASE("hg_bwd_tc32_bf16_tails") { backward<bf16, int64_t>(ctx, 90, {45, 2, 20, 60, 40, 24, true}, "bwd_tc_32"); }
EMU_CASE("hg_bwd_tc32_f16") { backward<f16, int32_t>(ctx, 80, {37, 1, 17, 40, 24, 56, true}, "bwd_tc_32"); }
EMU_CASE("hg_bwd_tc32_bf16_dz256_dv64_k64") {
  backward<bf16, int32_t>(ctx, 90, {33, 1, 64, 120, 256, 64, true}, "bwd_tc_32");
}
EMU_CASE("hg_bwd_tc32_bf16_weights_only") {
  backward<bf16, int64_t>(ctx, 90, {40, 2, 9, 30, 32, 16, true}, "bwd_tc_32", {true, false, false});
}
EMU_CASE("hg_bwd_tc32_f16_proj_only") {
  backward<f16, int64_t>(ctx, 90, {70, 3, 5, 30, 16, 8, true}, "bwd_tc_32", {false, false, true});
}
// sm_86/sm_89 (99 KiB): the 32-token tile needs about 117 KiB at d_z = 256, d_v = 64, k = 32.
EMU_CASE("hg_bwd_tc16_sm86_bf16_dz256") {
  backward<bf16, int64_t>(ctx, 86, {37, 2, 32, 80, 256, 64, true}, "bwd_tc_16");
}
EMU_CASE("hg_bwd_tc16_sm89_f16") { backward<f16, int32_t>(ctx, 89, {21, 1, 64, 50, 248, 64, true}, "bwd_tc_16"); }
EMU_CASE("hg_bwd_tc_choice_by_device") {
  const HiveShapes s{1, 1, 32, 1, 256, 64, true};
  EMU_EXPECT(midus::bwd_tc_tile(s, true, midus_emu::arch(90).smem_optin, {}) == 32, "sm_90: 32-token tile");
  EMU_EXPECT(midus::bwd_tc_tile(s, true, midus_emu::arch(80).smem_optin, {}) == 32, "sm_80: 32-token tile");
  EMU_EXPECT(midus::bwd_tc_tile(s, true, midus_emu::arch(86).smem_optin, {}) == 16, "sm_86: 16-token tile");
  EMU_EXPECT(midus::bwd_tc_smem_bytes(32, 256, 64, 32) > midus_emu::arch(86).smem_optin, "the 32 tile misses 99 KiB");
  for (int sm : {80, 86, 89, 90})
    for (int k : {1, 32, 64}) {
      HiveShapes t = s;
      t.k = k;
      const int tm = midus::bwd_tc_tile(t, true, midus_emu::arch(sm).smem_optin, {});
      EMU_EXPECT(tm != 0 && midus::bwd_tc_smem_bytes(tm, 256, 64, k) <= midus_emu::arch(sm).smem_optin, "sm_", sm,
                 " k ", k);
    }
}
// Many tiles per block: grad_proj accumulates in registers over a block's run of tiles, then the
// per-block partials are summed in order.
EMU_CASE("hg_bwd_tc32_bf16_many_tiles") {
  backward<bf16, int64_t>(ctx, 90, {700, 1, 3, 40, 16, 8, true}, "bwd_tc_32", {false, false, true});
}
// More tiles than block slots: each block accumulates grad_proj over a run of tiles in registers.
EMU_CASE("hg_bwd_tc32_f16_runs_of_tiles") {
  EmuDev dev(86);
  const auto in = make_inputs<f16, int32_t>(ctx, {9000, 2, 2, 30, 16, 8, true});
  const int occ = midus_emu::max_active_blocks(midus::B_THREADS, midus::bwd_tc_smem_bytes(32, 16, 8, 2), dev.arch_info());
  const int64_t tpb = midus::bwd_tc_tiles_per_block(midus::ceil_div(9000, 32), 2, dev.sm_count(), occ, true);
  EMU_EXPECT(tpb >= 2, "tiles per block ", tpb);
  backward_case(ctx, dev, in, {false, false, true});
  EMU_EXPECT(dev.launches["bwd_tc_32"] == 1 && dev.launches["sum_partials"] == 1, "bwd_tc path");
}
EMU_CASE("hg_bwd_tc_bf16_inf_grad_out") {
  EmuDev dev(90);
  auto in = make_inputs<bf16, int64_t>(ctx, {20, 1, 4, 10, 16, 8, true});
  in.gout[3] = from_double<bf16>(std::numeric_limits<double>::infinity());
  backward_case(ctx, dev, in, {false, false, true});
  EMU_EXPECT(dev.launches["bwd_tc_32"] == 1, "bwd_tc ran");
}

// ---- generic backward ------------------------------------------------------------------------------
EMU_CASE("hg_bwd_generic_f32") { backward<float, int64_t>(ctx, 90, {23, 2, 6, 30, 20, 70, true}, "gemm"); }
EMU_CASE("hg_bwd_generic_f64") { backward<double, int32_t>(ctx, 80, {15, 3, 4, 12, 9, 5, true}, "gemm"); }
EMU_CASE("hg_bwd_generic_bf16_dz300") {  // d_z above bwd_tc's 256
  backward<bf16, int64_t>(ctx, 90, {12, 1, 5, 20, 300, 8, true}, "gemm");
}
EMU_CASE("hg_bwd_generic_f16_k65") { backward<f16, int32_t>(ctx, 90, {7, 2, 65, 90, 16, 16, true}, "gemm"); }
EMU_CASE("hg_bwd_generic_bf16_misaligned") {
  backward<bf16, int64_t>(ctx, 90, {10, 2, 6, 20, 16, 8, true}, "gemm", {}, {}, Idx::Uniform, 1.0, true);
}
// Token chunks: gu and u per chunk, grad_proj accumulated over them.
EMU_CASE("hg_bwd_generic_f32_token_chunks") {
  HiveOptions o;
  o.chunk_tokens = 6;
  EmuDev dev(90);
  const auto in = make_inputs<float, int64_t>(ctx, {29, 2, 5, 30, 12, 10, true});
  backward_case(ctx, dev, in, {}, o);
  EMU_EXPECT(dev.launches["bag_dot_vec"] == 5, "5 chunks of gu, got ", dev.launches["bag_dot_vec"]);
}
EMU_CASE("hg_bwd_generic_bf16_token_chunks_proj_only") {
  HiveOptions o;
  o.chunk_tokens = 4;
  o.tensor_cores = false;
  backward<bf16, int64_t>(ctx, 90, {15, 1, 3, 10, 24, 16, true}, "gemm", {false, false, true}, o);
}

// ---- grad_bank: the deterministic segmented reduction ------------------------------------------------
// One hot key takes every contribution: 64 * 4 * 40 = 10240 of them in one row, i.e. chunks of
// 32, then 640 carries, 40, 2: three levels of the reduction. Bitwise identical in every schedule
// (the harness compares the hashes).
EMU_CASE("hg_bank_one_hot_key_f32_noproj") {
  EmuDev dev(90);
  const auto in = make_inputs<float, int64_t>(ctx, {64, 4, 40, 50, 8, 8, false}, Idx::OneHot);
  backward_case(ctx, dev, in, {false, true, false}, {}, 4.0);
  EMU_EXPECT(dev.launches["seg_reduce"] == 3, "levels after the first: ", dev.launches["seg_reduce"]);
}
EMU_CASE("hg_bank_one_hot_key_bf16_proj") {
  backward<bf16, int32_t>(ctx, 90, {48, 2, 40, 30, 16, 8, true}, "seg_reduce", {false, true, false}, {}, Idx::OneHot,
                          4.0);
}
EMU_CASE("hg_bank_few_rows_f64_proj") {
  backward<double, int64_t>(ctx, 80, {40, 3, 12, 20, 7, 5, true}, "seg_reduce", {false, true, false}, {},
                            Idx::FewRows);
}
EMU_CASE("hg_bank_wide_rows_f32") {  // W = 300 columns: three column blocks of 128
  backward<float, int32_t>(ctx, 90, {9, 2, 5, 11, 300, 300, false}, nullptr, {false, true, false});
}
EMU_CASE("hg_bank_single_chunk_f16") {  // fewer contributions than one chunk: no carries
  backward<f16, int64_t>(ctx, 90, {2, 1, 9, 5, 16, 16, false}, "seg_reduce_level0", {false, true, false});
}

// ---- empty and degenerate shapes ---------------------------------------------------------------------
EMU_CASE("hg_bwd_k0_zeros") {
  EmuDev dev(90);
  const auto in = make_inputs<float, int64_t>(ctx, {5, 2, 0, 7, 6, 4, true});
  backward_case(ctx, dev, in, {});
  EMU_EXPECT(dev.launches.empty(), "no kernel for k = 0");
}

}  // namespace
