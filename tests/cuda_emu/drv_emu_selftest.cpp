// Tests of the emulator itself (cuda_emu.h) and of the small shared kernels: warp collectives
// against their definitions, the checks that must catch broken kernels (deadlock, divergent
// collectives and masks, exited lanes, launch limits, shared memory limits, poisoned shared
// memory, a missing barrier), the mma fragment layouts against a plain matrix product, the
// GEMM, scan and index-check kernels, and the per-kernel shared-memory opt-in cache.
#include "../../csrc/cuda/kernels/gemm.cuh"
#include "../../csrc/cuda/kernels/hive_grad_bank.cuh"
#include "../../csrc/cuda/kernels/index_check.cuh"
#include "emu_dev.h"
#include "harness.h"

#include <numeric>

using midus_emu::DevBuf;
using midus_emu::EmuDev;
using midus_emu::LaunchError;
using namespace emu_test;

namespace {

// Runs `fn` expecting a LaunchError whose message contains `what` (or one of its '|'-separated
// alternatives: which check fires first can depend on the schedule).
template <typename F>
void expect_launch_error(F&& fn, const std::string& what) {
  try {
    fn();
  } catch (const LaunchError& e) {
    const std::string msg = e.what();
    std::stringstream alts(what);
    std::string alt;
    bool found = false;
    while (std::getline(alts, alt, '|')) found = found || msg.find(alt) != std::string::npos;
    EMU_EXPECT(found, "message: ", msg);
    return;
  }
  fail("no error (expected one mentioning '", what, "')");
}

// ---- warp collectives ------------------------------------------------------------------------------
__global__ void shuffles_kernel(int64_t* out, int width) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long v = (long long)(warp * 1000 + lane) << 33 | lane;  // 64-bit: the upper half matters
  int64_t* o = out + (warp * 32 + lane) * 8;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32, width);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 5, width);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3, width);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3, width);
  o[4] = __shfl_sync(0xffffffffu, int(lane * 3), 31 - lane, width);  // 32-bit
  o[5] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  o[6] = __any_sync(0xffffffffu, lane == 17 && warp == 1);
  o[7] = __all_sync(0xffffffffu, lane < 31 || warp == 0);
}
EMU_CASE("emu_shuffle_vote_semantics") {
  for (int width : {32, 8}) {
    EmuDev dev(90);
    DevBuf<int64_t> out(64 * 8, "out");
    dev.launch("shuffles", shuffles_kernel, dim3(1), dim3(64), 0, out.get(), width);
    for (int warp = 0; warp < 2; ++warp)
      for (int lane = 0; lane < 32; ++lane) {
        auto val = [&](int l) { return (int64_t)((long long)(warp * 1000 + l) << 33 | l); };
        const int seg = lane & ~(width - 1), pos = lane & (width - 1);
        const int64_t* o = out.get() + (warp * 32 + lane) * 8;
        const int src_idx = seg + (((lane * 7 + 3) % 32) & (width - 1));
        const int x = lane ^ 5;
        EMU_EXPECT(o[0] == val(src_idx), "shfl lane ", lane, " width ", width);
        EMU_EXPECT(o[1] == val(x < seg + width ? x : lane), "xor lane ", lane, " width ", width);
        EMU_EXPECT(o[2] == val(pos >= 3 ? lane - 3 : lane), "up lane ", lane, " width ", width);
        EMU_EXPECT(o[3] == val(pos + 3 < width ? lane + 3 : lane), "down lane ", lane, " width ", width);
        EMU_EXPECT(o[4] == (seg + ((31 - lane) & (width - 1))) * 3, "32-bit shfl lane ", lane);
        EMU_EXPECT(o[5] == 0x49249249, "ballot");
        EMU_EXPECT(o[6] == (warp == 1), "any");
        EMU_EXPECT(o[7] == (warp == 0), "all");
      }
  }
}

__global__ void atomics_kernel(unsigned long long* sum, int* mx) {
  atomicAdd(sum, (unsigned long long)(threadIdx.x + 1));
  __syncwarp();
  atomicMax(mx, int(threadIdx.x * 7 % 101));
}
EMU_CASE("emu_atomics") {
  EmuDev dev(90);
  DevBuf<unsigned long long> sum(1, "sum");
  DevBuf<int> mx(1, "max");
  sum[0] = 0;
  mx[0] = -1;
  dev.launch("atomics", atomics_kernel, dim3(3), dim3(96), 0, sum.get(), mx.get());
  EMU_EXPECT(sum[0] == 3ull * 96 * 97 / 2, "sum ", sum[0]);
  EMU_EXPECT(mx[0] == 100, "max ", mx[0]);
}

// ---- what the checks must catch ---------------------------------------------------------------------
__global__ void mismatched_masks_kernel(float* out) {
  const int lane = threadIdx.x;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffffffffu;
  out[lane] = __shfl_sync(mask, float(lane), 0);
}
__global__ void different_collectives_kernel(unsigned* out) {
  const int lane = threadIdx.x;
  out[lane] = lane & 1 ? __ballot_sync(0xffffffffu, 1) : unsigned(__shfl_xor_sync(0xffffffffu, lane, 1));
}
__global__ void exited_lane_kernel(float* out) {
  const int lane = threadIdx.x;
  if (lane >= 16) return;
  out[lane] = __shfl_sync(0xffffffffu, float(lane), lane + 16);
}
__global__ void read_exited_lane_kernel(float* out) {
  const int lane = threadIdx.x;
  if (lane >= 16) return;
  out[lane] = __shfl_sync(0x0000ffffu, float(lane), 20);
}
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x > 0 && threadIdx.x < 32) __syncwarp();  // waits for lane 0, which is at the barrier
  __syncthreads();
  out[threadIdx.x] = 1.f;
}
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}
__global__ void barrier_after_return_kernel(float* out, int n) {
  if (int(threadIdx.x) >= n) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}
__global__ void noop_kernel(float* out) { out[threadIdx.x] = 0.f; }
__global__ void dynamic_smem_kernel(float* out) {
  MIDUS_DYNAMIC_SMEM(smem);
  reinterpret_cast<float*>(smem)[threadIdx.x] = 1.f;
  out[threadIdx.x] = 1.f;
}

EMU_CASE("emu_catches_mismatched_masks") {
  EmuDev dev(90);
  DevBuf<float> out(32, "out");
  expect_launch_error([&] { dev.launch("k", mismatched_masks_kernel, dim3(1), dim3(32), 0, out.get()); },
                      "warp divergence|that have exited");
}
EMU_CASE("emu_catches_different_collectives") {
  EmuDev dev(90);
  DevBuf<unsigned> out(32, "out");
  expect_launch_error([&] { dev.launch("k", different_collectives_kernel, dim3(1), dim3(32), 0, out.get()); },
                      "warp divergence");
}
EMU_CASE("emu_catches_collective_with_exited_lanes") {
  EmuDev dev(90);
  DevBuf<float> out(32, "out");
  expect_launch_error([&] { dev.launch("k", exited_lane_kernel, dim3(1), dim3(32), 0, out.get()); }, "exited");
}
EMU_CASE("emu_catches_shuffle_reading_lane_outside_mask") {
  EmuDev dev(90);
  DevBuf<float> out(32, "out");
  expect_launch_error([&] { dev.launch("k", read_exited_lane_kernel, dim3(1), dim3(32), 0, out.get()); },
                      "reads lane 20, which");
}
EMU_CASE("emu_catches_deadlock") {
  EmuDev dev(90);
  DevBuf<float> out(64, "out");
  expect_launch_error([&] { dev.launch("k", deadlock_kernel, dim3(1), dim3(64), 0, out.get()); }, "deadlock");
}
EMU_CASE("emu_catches_divergent_barriers") {
  EmuDev dev(90);
  DevBuf<float> out(128, "out");
  expect_launch_error([&] { dev.launch("k", divergent_barrier_kernel, dim3(1), dim3(128), 0, out.get()); },
                      "different __syncthreads");
}
EMU_CASE("emu_catches_barrier_after_nonuniform_return") {
  EmuDev dev(90);
  DevBuf<float> out(128, "out");
  expect_launch_error([&] { dev.launch("k", barrier_after_return_kernel, dim3(1), dim3(128), 0, out.get(), 100); },
                      "non-uniform return");
  dev.launch("k", barrier_after_return_kernel, dim3(1), dim3(128), 0, out.get(), 128);
}
EMU_CASE("emu_catches_launch_limits") {
  EmuDev dev(90);
  DevBuf<float> out(2048, "out");
  expect_launch_error([&] { dev.launch("k", noop_kernel, dim3(1, 65536), dim3(32), 0, out.get()); },
                      "grid.y or grid.z above 65535");
  expect_launch_error([&] { dev.launch("k", noop_kernel, dim3(1, 1, 70000), dim3(32), 0, out.get()); },
                      "grid.y or grid.z above 65535");
  expect_launch_error([&] { dev.launch("k", noop_kernel, dim3(1), dim3(2048), 0, out.get()); }, "1024 threads");
  expect_launch_error([&] { dev.launch("k", noop_kernel, dim3(0), dim3(32), 0, out.get()); }, "empty grid");
}
EMU_CASE("emu_catches_shared_memory_limits") {
  DevBuf<float> out(64, "out");
  {  // above 48 KiB without the opt-in for this kernel
    EmuDev dev(90, 3);
    expect_launch_error([&] { dev.launch("k", dynamic_smem_kernel, dim3(1), dim3(64), 50 << 10, out.get()); },
                        "without cudaFuncSetAttribute");
  }
  {  // sm_86 allows 99 KiB: a 100 KiB request fails even with the opt-in
    EmuDev dev(86, 4);
    expect_launch_error([&] { dev.set_max_dynamic_smem(dynamic_smem_kernel, 100 << 10); }, "opt-in limit");
    dev.set_max_dynamic_smem(dynamic_smem_kernel, 99 << 10);
    dev.launch("k", dynamic_smem_kernel, dim3(1), dim3(64), 99 << 10, out.get());
  }
  {  // sm_90 allows 227 KiB
    EmuDev dev(90, 5);
    dev.set_max_dynamic_smem(dynamic_smem_kernel, 227 << 10);
    dev.launch("k", dynamic_smem_kernel, dim3(1), dim3(64), 227 << 10, out.get());
  }
}

// Shared memory starts every block as 0xFF bytes: a value read before any thread wrote it is NaN.
__global__ void read_unwritten_smem_kernel(float* out) {
  MIDUS_SHARED(float, s, [64]);
  if (threadIdx.x < 32) s[threadIdx.x] = float(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
  __syncthreads();
  s[threadIdx.x] = 5.f;  // not visible to the next block
}
EMU_CASE("emu_shared_memory_poisoned_per_block") {
  EmuDev dev(90);
  DevBuf<float> out(3 * 64, "out");
  dev.launch("k", read_unwritten_smem_kernel, dim3(3), dim3(64), 0, out.get());
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 64; ++t) {
      const float v = out[size_t(b * 64 + t)];
      EMU_EXPECT(t < 32 ? v == float(b) : std::isnan(v), "block ", b, " thread ", t, ": ", v);
    }
}

// A missing barrier: each thread reads what its neighbour wrote, without __syncthreads. Forward
// order runs thread 0 before thread 1 wrote, reverse order thread 255 before thread 0, random
// order some: in every schedule some read sees the poison.
__global__ void missing_barrier_kernel(float* out) {
  MIDUS_SHARED(float, s, [256]);
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 256];
}
EMU_CASE("emu_missing_barrier_shows_in_every_schedule") {
  EmuDev dev(90);
  DevBuf<float> out(256, "out");
  dev.launch("k", missing_barrier_kernel, dim3(1), dim3(256), 0, out.get());
  int poisoned = 0;
  for (int t = 0; t < 256; ++t) poisoned += std::isnan(out[size_t(t)]);
  EMU_EXPECT(poisoned > 0, "no thread read unwritten shared memory");
}

// A device buffer ends at a guard page: reading one element past it faults (the process ends with
// a message naming the buffer; tests/test_cuda_emulated.py checks it).
__global__ void oob_read_kernel(const float* in, float* out, int n) { out[threadIdx.x] = in[threadIdx.x + n]; }
EMU_CASE("crash_oob_read") {
  EmuDev dev(90);
  DevBuf<float> in(37, "in_37", sizeof(float)), out(32, "out");
  dev.launch("oob_read", oob_read_kernel, dim3(1), dim3(32), 0, in.get(), out.get(), 6);
  fail("no fault reading past the end of a device buffer");
}

// ---- mma fragment layouts --------------------------------------------------------------------------------
// D = A B + C through common.cuh's loaders (row-major A, A as a transpose, B as [n][k] and as
// [k][n]) against a plain product: the loaders and the emulator's PTX-ISA layouts must agree.
template <typename T>
__global__ void mma_layout_kernel(const uint16_t* A, const uint16_t* At, const uint16_t* Bnk, const uint16_t* Bkn,
                                  const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, c = lane & 3;
  for (int variant = 0; variant < 4; ++variant) {
    uint32_t a[4], b[2];
    if (variant & 1) midus::load_a_trans(a, At, 16, 0, 0, g, c); else midus::load_a(a, A, 16, 0, 0, g, c);
    if (variant & 2) midus::load_b_kn(b, Bkn, 8, 0, 0, g, c); else midus::load_b_nk(b, Bnk, 16, 0, 0, g, c);
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * c + (i & 1)];
    midus::mma_native<T>(d, a, b);
    for (int i = 0; i < 4; ++i) D[variant * 128 + (i < 2 ? g : g + 8) * 8 + 2 * c + (i & 1)] = d[i];
  }
}
template <typename T>
void mma_layout_case(Ctx& ctx) {
  EmuDev dev(80);
  std::vector<uint16_t> A(256), At(256), Bnk(128), Bkn(128);
  std::vector<float> C(128);
  std::vector<double> a(256), b(128);
  auto bits = [](double x) {
    const T t = midus::cvt<T>(x);
    uint16_t u;
    std::memcpy(&u, &t, 2);
    return u;
  };
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) {
      const double x = to_double(midus::cvt<T>(ctx.normal()));
      a[size_t(m * 16 + k)] = x;
      A[size_t(m * 16 + k)] = bits(x);
      At[size_t(k * 16 + m)] = bits(x);
    }
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) {
      const double x = to_double(midus::cvt<T>(ctx.normal()));
      b[size_t(k * 8 + n)] = x;
      Bnk[size_t(n * 16 + k)] = bits(x);
      Bkn[size_t(k * 8 + n)] = bits(x);
    }
  for (float& x : C) x = float(ctx.normal());
  DevBuf<uint16_t> dA(A, "A"), dAt(At, "At"), dBnk(Bnk, "Bnk"), dBkn(Bkn, "Bkn");
  DevBuf<float> dC(C, "C"), dD(512, "D");
  dev.launch("mma_layout", mma_layout_kernel<T>, dim3(1), dim3(32), 0, dA.get(), dAt.get(), dBnk.get(), dBkn.get(),
             dC.get(), dD.get());
  std::vector<double> want(128);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double s = C[size_t(m * 8 + n)];
      for (int k = 0; k < 16; ++k) s += a[size_t(m * 16 + k)] * b[size_t(k * 8 + n)];
      want[size_t(m * 8 + n)] = s;
    }
  for (int v = 0; v < 4; ++v) expect_close(dD.get() + v * 128, want, "mma variant " + std::to_string(v));
}
EMU_CASE("emu_mma_layouts_bf16") { mma_layout_case<__nv_bfloat16>(ctx); }
EMU_CASE("emu_mma_layouts_f16") { mma_layout_case<__half>(ctx); }

// The mma is a warp collective of all 32 lanes: a warp where one lane skips it cannot complete.
__global__ void mma_divergent_kernel(float* out) {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4] = {0, 0, 0, 0};
  if (threadIdx.x != 5) midus::mma_bf16(d, a, b);
  out[threadIdx.x] = d[0];
}
EMU_CASE("emu_catches_divergent_mma") {
  EmuDev dev(90);
  DevBuf<float> out(32, "out");
  expect_launch_error([&] { dev.launch("k", mma_divergent_kernel, dim3(1), dim3(32), 0, out.get()); }, "exited");
}

// ---- small shared kernels ------------------------------------------------------------------------------
template <typename acc_t>
void gemm_case(Ctx& ctx, int64_t batch, int64_t M, int64_t N, int64_t K, bool transA, bool accumulate) {
  EmuDev dev(90);
  std::vector<acc_t> A(size_t(batch * M * K)), B(size_t(batch * K * N)), C(size_t(batch * M * N));
  for (auto& x : A) x = acc_t(ctx.normal());
  for (auto& x : B) x = acc_t(ctx.normal());
  for (auto& x : C) x = acc_t(ctx.normal());
  DevBuf<acc_t> dA(A, "A"), dB(B, "B"), dC(C, "C");
  if (!accumulate) dC.poison();
  // A stored [b][k][m] when transposed, else [b][m][k]; B stored [b][k][n].
  midus::GemmArgs<acc_t> g{batch, M, N, K, dA.get(), M * K, transA ? 1 : K, transA ? M : 1,
                           dB.get(), K * N, N, 1, dC.get(), M * N, N, 1, accumulate};
  dev.gemm(g);
  std::vector<double> want(C.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = accumulate ? double(C[size_t((b * M + m) * N + n)]) : 0.0;
        for (int64_t k = 0; k < K; ++k)
          s += double(A[size_t(b * M * K + (transA ? k * M + m : m * K + k))]) * double(B[size_t((b * K + k) * N + n)]);
        want[size_t((b * M + m) * N + n)] = s;
      }
  ctx.digest(dC.get(), dC.size());
  expect_close(dC.get(), want, "gemm");
}
EMU_CASE("gemm_f32_tails") { gemm_case<float>(ctx, 3, 70, 65, 37, false, false); }
EMU_CASE("gemm_f32_transposed_accumulate") { gemm_case<float>(ctx, 2, 33, 9, 130, true, true); }
EMU_CASE("gemm_f64") { gemm_case<double>(ctx, 1, 64, 64, 17, false, true); }

EMU_CASE("inclusive_scan_tails") {
  for (int64_t n : {int64_t(1), int64_t(255), int64_t(257), int64_t(3000)}) {
    EmuDev dev(90);
    std::vector<int64_t> in(static_cast<size_t>(n));
    for (auto& x : in) x = ctx.randint(0, 3);
    DevBuf<int64_t> din(in, "counts"), dout(size_t(n), "incl");
    dev.launch("scan", midus::inclusive_scan_kernel, dim3(1), dim3(midus::SCAN_THREADS), 0,
               static_cast<const int64_t*>(din.get()), dout.get(), n);
    std::vector<int64_t> want(static_cast<size_t>(n));
    std::partial_sum(in.begin(), in.end(), want.begin());
    expect_equal(dout.get(), want.data(), size_t(n), "scan of " + std::to_string(n));
  }
}

EMU_CASE("count_bad_indices") {
  EmuDev dev(90);
  std::vector<int32_t> idx(5000);
  for (auto& x : idx) x = int32_t(ctx.randint(0, 100));
  idx[17] = 100;
  idx[4000] = -3;
  DevBuf<int32_t> di(idx, "indices");
  DevBuf<unsigned long long> out(2, "out");
  dev.zero(out.get(), 2);
  midus::launch_count_bad_indices(dev, static_cast<const int32_t*>(di.get()), int64_t(idx.size()), 100, out.get());
  EMU_EXPECT(out[0] == 2, "count ", out[0]);
  EMU_EXPECT((long long)out[1] == 100 || (long long)out[1] == -3, "example ", (long long)out[1]);
}

// The opt-in cache is keyed by kernel address and device, not by the kernel's type.
__global__ void twin_a(float* out) { out[0] = 1.f; }
__global__ void twin_b(float* out) { out[0] = 2.f; }
EMU_CASE("smem_optin_cache_per_kernel_and_device") {
  EmuDev dev0(90, 11), dev1(90, 12);
  midus::allow_smem(dev0, twin_a, 60 << 10);
  midus::allow_smem(dev0, twin_b, 60 << 10);  // same type as twin_a
  midus::allow_smem(dev0, twin_a, 60 << 10);  // cached
  midus::allow_smem(dev1, twin_a, 60 << 10);  // another device
  midus::allow_smem(dev0, twin_b, 40 << 10);  // no opt-in needed
  EMU_EXPECT(dev0.attribute_sets == 2 && dev1.attribute_sets == 1, "attribute calls ", dev0.attribute_sets, " ",
             dev1.attribute_sets);
  DevBuf<float> out(1, "out");
  dev0.launch("twin_b", twin_b, dim3(1), dim3(1), 60 << 10, out.get());
  dev1.launch("twin_a", twin_a, dim3(1), dim3(1), 60 << 10, out.get());
}

}  // namespace
