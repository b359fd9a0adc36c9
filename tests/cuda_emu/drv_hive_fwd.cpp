// Emulated tests of hive_gather's forward kernels (csrc/cuda/kernels/hive_*.cuh) against a
// double-precision reference: bag_gather (vectorised and scalar), fwd_generic and fwd_tc in both
// tile configurations, with tails past every tile, misaligned banks, inf/NaN, and the device
// limits that choose the path (sm_86's 99 KiB against sm_80/90).
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

// Runs the forward on a device of architecture `sm`; `misalign` shifts the bank off 16 bytes.
template <typename T, typename I>
std::vector<T> run_forward(Ctx& ctx, EmuDev& dev, const Inputs<T, I>& in, const HiveOptions& o = {},
                           bool misalign = false) {
  const HiveShapes& s = in.s;
  DevBuf<T> w(in.w, "weights"), proj(in.proj, "proj"), out(size_t(s.N * s.H * s.dv), "out");
  DevBuf<I> idx(in.idx, "indices");
  DevBuf<T> bank;
  T* bp;
  if (misalign) {  // one spare element: the bank starts 2 or 4 bytes past a 16-byte boundary
    bank = DevBuf<T>(in.bank.size() + 1, "bank", sizeof(T));
    bp = bank.get();
    EMU_EXPECT(!midus::aligned16(bp), "misaligned bank");
  } else {
    bank = DevBuf<T>(in.bank.size(), "bank");
    bp = bank.get();
  }
  std::copy(in.bank.begin(), in.bank.end(), bp);
  midus::hive_gather_forward<EmuDev, T, I>(dev, s, w.get(), idx.get(), bp, s.has_proj ? proj.get() : nullptr,
                                           out.get(), o);
  ctx.digest(out.get(), out.size());
  return out.host();
}

template <typename T, typename I>
void forward_case(Ctx& ctx, int sm, HiveShapes s, const char* expect_kernel, const HiveOptions& o = {},
                  bool misalign = false) {
  EmuDev dev(sm);
  const auto in = make_inputs<T, I>(ctx, s);
  const auto out = run_forward(ctx, dev, in, o, misalign);
  expect_close(out.data(), forward_ref(in), "out");
  EMU_EXPECT(dev.launches[expect_kernel] == 1, "the path: expected ", expect_kernel, " to run once");
}

// ---- bag_gather (no proj) ---------------------------------------------------------------------
EMU_CASE("hg_bag_bf16_vec") { forward_case<bf16, int64_t>(ctx, 90, {7, 3, 5, 40, 24, 24, false}, "bag_gather_vec"); }
EMU_CASE("hg_bag_f32_scalar_dz13") { forward_case<float, int32_t>(ctx, 90, {9, 2, 11, 30, 13, 13, false}, "bag_gather"); }
EMU_CASE("hg_bag_f64_vec_k1") { forward_case<double, int64_t>(ctx, 80, {10, 3, 1, 7, 6, 6, false}, "bag_gather_vec"); }
EMU_CASE("hg_bag_f16_wide_rows") {  // d_z above 256 threads x 8 columns: the column loop wraps
  forward_case<f16, int32_t>(ctx, 90, {3, 1, 9, 12, 2072, 2072, false}, "bag_gather_vec");
}
EMU_CASE("hg_bag_bf16_misaligned_bank") {
  forward_case<bf16, int64_t>(ctx, 90, {5, 2, 6, 20, 16, 16, false}, "bag_gather", {}, true);
}

// ---- fwd_generic --------------------------------------------------------------------------------
// N past the 16-token tile, d_z past the 64-wide chunk, d_v past the 64-wide tile.
EMU_CASE("hg_fwd_generic_f32_tails") { forward_case<float, int64_t>(ctx, 90, {37, 2, 3, 50, 70, 65, true}, "fwd_generic"); }
EMU_CASE("hg_fwd_generic_f64") { forward_case<double, int32_t>(ctx, 80, {18, 3, 4, 33, 20, 9, true}, "fwd_generic"); }
EMU_CASE("hg_fwd_generic_bf16_dz12") {  // d_z % 8 != 0: no tensor cores
  forward_case<bf16, int64_t>(ctx, 90, {20, 2, 6, 40, 12, 16, true}, "fwd_generic");
}
EMU_CASE("hg_fwd_generic_bf16_k65") {  // k above the tensor-core path's 64
  forward_case<bf16, int32_t>(ctx, 90, {9, 1, 65, 80, 16, 8, true}, "fwd_generic");
}
EMU_CASE("hg_fwd_generic_f16_misaligned") {
  forward_case<f16, int64_t>(ctx, 90, {17, 2, 5, 30, 32, 24, true}, "fwd_generic", {}, true);
}
EMU_CASE("hg_fwd_generic_bf16_no_tc_option") {  // MIDUS_OPS_CUDA_NO_TC=1
  HiveOptions o;
  o.tensor_cores = false;
  forward_case<bf16, int64_t>(ctx, 90, {21, 2, 7, 30, 32, 40, true}, "fwd_generic", o);
}

// ---- fwd_tc ---------------------------------------------------------------------------------------
// N past the 64-token tile, d_z past one 256-wide chunk and not a multiple of 16 (zero padding of
// the last mma k-step), d_v past one 64-wide tile, k past 32.
EMU_CASE("hg_fwd_tc64_bf16_tails") { forward_case<bf16, int64_t>(ctx, 90, {70, 2, 33, 100, 264, 72, true}, "fwd_tc_64"); }
EMU_CASE("hg_fwd_tc64_f16_tails") { forward_case<f16, int32_t>(ctx, 80, {67, 1, 12, 64, 280, 70, true}, "fwd_tc_64"); }
EMU_CASE("hg_fwd_tc64_bf16_k64") { forward_case<bf16, int32_t>(ctx, 90, {65, 1, 64, 200, 8, 8, true}, "fwd_tc_64"); }
// sm_86/sm_89 (99 KiB): the 64-token tile does not fit even at k = 1; the 32-token one does.
EMU_CASE("hg_fwd_tc32_sm86_bf16_dz256") {
  forward_case<bf16, int64_t>(ctx, 86, {45, 2, 64, 90, 256, 64, true}, "fwd_tc_32");
}
EMU_CASE("hg_fwd_tc32_sm89_f16") { forward_case<f16, int32_t>(ctx, 89, {33, 2, 20, 50, 136, 40, true}, "fwd_tc_32"); }
EMU_CASE("hg_fwd_tc_choice_by_device") {
  // fwd_tc's shared memory: 102 KiB + 512 B per k at 64 tokens; 69 KiB + 256 B per k at 32.
  const HiveShapes s{1, 1, 64, 1, 256, 64, true};
  EMU_EXPECT(midus::fwd_tc_tile(s, true, midus_emu::arch(90).smem_optin, {}) == 64, "sm_90: 64-token tile");
  EMU_EXPECT(midus::fwd_tc_tile(s, true, midus_emu::arch(80).smem_optin, {}) == 64, "sm_80: 64-token tile");
  EMU_EXPECT(midus::fwd_tc_tile(s, true, midus_emu::arch(86).smem_optin, {}) == 32, "sm_86: 32-token tile");
  EMU_EXPECT(midus::fwd_tc_tile(s, true, midus_emu::arch(89).smem_optin, {}) == 32, "sm_89: 32-token tile");
  EMU_EXPECT(midus::fwd_tc_tile(s, false, midus_emu::arch(90).smem_optin, {}) == 0, "misaligned bank: generic");
  for (int sm : {80, 86, 89, 90})
    for (int k : {1, 32, 64}) {
      HiveShapes t = s;
      t.k = k;
      const int tm = midus::fwd_tc_tile(t, true, midus_emu::arch(sm).smem_optin, {});
      EMU_EXPECT(tm != 0 && midus::fwd_tc_smem_bytes(tm, k) <= midus_emu::arch(sm).smem_optin, "sm_", sm, " k ", k);
    }
}
// Forcing the 32-token tile on a big GPU (MIDUS_OPS_CUDA_FWD_TC_TILE=32) gives the same values.
EMU_CASE("hg_fwd_tc32_forced_sm90_same_as_tc64") {
  EmuDev dev(90);
  const auto in = make_inputs<bf16, int64_t>(ctx, {50, 2, 9, 40, 48, 24, true});
  HiveOptions o32;
  o32.fwd_tile = 32;
  const auto a = run_forward(ctx, dev, in), b = run_forward(ctx, dev, in, o32);
  EMU_EXPECT(dev.launches["fwd_tc_64"] == 1 && dev.launches["fwd_tc_32"] == 1, "both tiles ran");
  expect_close(b.data(), forward_ref(in), "out (32-token tile)");
  expect_equal(a.data(), b.data(), a.size(), "64- and 32-token tiles");  // same per-element arithmetic
}

// The shared-memory opt-in is per kernel (issue 13, 4e): both tile configurations have the same
// function-pointer type and both need more than 48 KiB, so a cache keyed by type would skip the
// second kernel's cudaFuncSetAttribute and its launch would fail.
EMU_CASE("hg_smem_optin_per_kernel") {
  EmuDev dev(90, /*device_id=*/7);
  const auto in = make_inputs<bf16, int32_t>(ctx, {40, 1, 64, 30, 16, 16, true});
  static_assert(std::is_same_v<decltype(&midus::fwd_tc_kernel<bf16, int32_t, 64>),
                               decltype(&midus::fwd_tc_kernel<bf16, int32_t, 32>)>);
  EMU_EXPECT(midus::fwd_tc_smem_bytes(32, 64) > midus::kDefaultSmem, "the 32-token tile needs the opt-in too");
  HiveOptions o32;
  o32.fwd_tile = 32;
  run_forward(ctx, dev, in);
  run_forward(ctx, dev, in, o32);
  run_forward(ctx, dev, in);  // cached: no second attribute call
  EMU_EXPECT(dev.attribute_sets == 2, "one cudaFuncSetAttribute per kernel, got ", dev.attribute_sets);
}

// inf and NaN in the bank reach the output as in the fp32 reference: the hi/lo split's lo part
// (0 for inf and for bf16-exact values) must not meet the inf in a correction term (0 x inf).
template <typename T>
void forward_nonfinite(Ctx& ctx, int sm, HiveShapes s, const char* kernel) {
  EmuDev dev(sm);
  auto in = make_inputs<T, int64_t>(ctx, s);
  const double inf = std::numeric_limits<double>::infinity();
  // bank row 0: +inf in column 1, row 1: NaN in column 2; proj entry (h 0, z 3, v 0) = inf.
  in.bank[1] = from_double<T>(inf);
  in.bank[size_t(s.dz) + 2] = from_double<T>(std::numeric_limits<double>::quiet_NaN());
  if (s.has_proj) in.proj[size_t(3 * s.dv)] = from_double<T>(-inf);
  for (size_t e = 0; e < in.idx.size(); e += 7) in.idx[e] = 0;
  in.idx[5] = 1;
  const auto out = run_forward(ctx, dev, in);
  expect_close(out.data(), forward_ref(in), "out with inf/NaN");
  EMU_EXPECT(dev.launches[kernel] == 1, "path ", kernel);
}
EMU_CASE("hg_fwd_tc_bf16_inf_nan") { forward_nonfinite<bf16>(ctx, 90, {20, 2, 6, 12, 16, 16, true}, "fwd_tc_64"); }
EMU_CASE("hg_fwd_tc_f16_inf_nan") { forward_nonfinite<f16>(ctx, 90, {20, 2, 6, 12, 16, 16, true}, "fwd_tc_64"); }
EMU_CASE("hg_fwd_generic_f32_inf_nan") {
  forward_nonfinite<float>(ctx, 90, {20, 2, 6, 12, 16, 16, true}, "fwd_generic");
}
EMU_CASE("hg_bag_bf16_inf_nan") { forward_nonfinite<bf16>(ctx, 90, {20, 2, 6, 12, 16, 16, false}, "bag_gather_vec"); }

// A bad index: the device-side assert fires with a message naming indices (not a stray read).
EMU_CASE("hg_fwd_bad_index_device_assert") {
  EmuDev dev(90);
  auto in = make_inputs<float, int64_t>(ctx, {6, 1, 3, 10, 8, 8, true});
  in.idx[4] = 10;  // == R
  try {
    run_forward(ctx, dev, in);
  } catch (const midus_emu::LaunchError& e) {
    EMU_EXPECT(std::string(e.what()).find("indices out of range") != std::string::npos, "message: ", e.what());
    return;
  }
  fail("no device-side assert for an index equal to R");
}

}  // namespace
