// What the CUDA kernels of pk_topk and hive_gather share: accumulation types, conversions, warp
// reductions, 16-bit float bit helpers, the tensor-core (mma.sync m16n8k16) wrappers with their
// fragment loaders, and the host-side shared-memory opt-in. Plain CUDA C++ (see compat.cuh): the
// extension and the CPU emulator in tests/cuda_emu build the same code.
//
// Launch logic is written against a "device" object `dev` (a template parameter), so that the
// choice of kernel, grid, block and shared memory is the same code on a GPU and in the emulator:
//   int device() const; int sm_count() const; size_t smem_optin() const;
//   dev.launch(name, kernel, grid, block, dyn_smem, args...)        kernel<<<...>>>(args...)
//   dev.set_max_dynamic_smem(kernel, bytes)                          cudaFuncSetAttribute
//   dev.max_active_blocks(kernel, threads, dyn_smem)                 occupancy query
//   dev.template alloc<T>(n)        workspace of n T, valid until `dev` is destroyed
//   dev.sort_keys(keys, n, sorted, perm)  stable ascending sort of int32/int64 keys (+ positions)
//   dev.gemm(...)                   fp32/fp64 batched GEMM (see gemm.cuh), fp32 meaning fp32
// csrc/cuda/cuda_dev.cuh implements it with the CUDA runtime and ATen, tests/cuda_emu/emu_dev.h
// with the emulator.
#pragma once
#include "compat.cuh"

#if !defined(MIDUS_CUDA_EMU)
#include <mutex>
#endif
#include <set>
#include <utility>

namespace midus {
namespace {

// ============================================================================================
// Types and conversions
// ============================================================================================
using bf16_t = __nv_bfloat16;
using f16_t = __half;

// Accumulation type: fp64 for fp64, fp32 for everything else.
template <typename T>
using acc_t_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool is_16bit_v = std::is_same_v<T, bf16_t> || std::is_same_v<T, f16_t>;

// cvt<To>(x) between float, double, bf16 and fp16, rounding to nearest even (fp64 -> 16-bit goes
// through fp32: the kernels only narrow fp32 accumulators).
template <typename To, typename From>
__host__ __device__ __forceinline__ To cvt(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<From, bf16_t>) {
    return cvt<To>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<From, f16_t>) {
    return cvt<To>(__half2float(x));
  } else if constexpr (std::is_same_v<To, bf16_t>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, f16_t>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kDefaultSmem = size_t(48) << 10;  // dynamic shared memory without an opt-in

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The row an index names, checked: a device-side assert on a bad index, and row 0 instead of an
// out-of-bounds address should the assert be compiled out.
template <typename index_t>
__device__ __forceinline__ int64_t checked_row(index_t r, int64_t R) {
  const int64_t v = static_cast<int64_t>(r);
  const bool ok = v >= 0 && v < R;
  MIDUS_KERNEL_ASSERT(ok, "midus_ops::hive_gather: indices out of range (every index must be in [0, R))");
  return ok ? v : 0;
}

// Butterfly sum over the 32 lanes (fixed order: every lane ends with the same bits).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ============================================================================================
// 16-bit floats as raw bits (one in a uint16_t, two in a uint32_t: lower index in the low half)
// ============================================================================================
template <typename T>
struct F16;
template <>
struct F16<bf16_t> {
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ float to_float(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};
template <>
struct F16<f16_t> {
  static __device__ __forceinline__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ float lo(uint32_t w) { return to_float(static_cast<uint16_t>(w & 0xffffu)); }
  static __device__ __forceinline__ float hi(uint32_t w) { return to_float(static_cast<uint16_t>(w >> 16)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

__device__ __forceinline__ uint16_t bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float bf16_value(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): two bf16 terms, ~2^-17 relative error.
// A non-finite hi (x = +-inf or NaN) gets lo = 0: x - hi would be NaN there, and the lo product
// would turn an infinite result (what the reference gives) into NaN.
__device__ __forceinline__ void split_bf16(float x, uint16_t& hi, uint16_t& lo) {
  hi = bf16_bits(x);
  const float h = bf16_value(hi);
  lo = bf16_bits(isfinite(h) ? x - h : 0.f);
}

// 8 consecutive 16-bit elements (one 16-byte load) to fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&x)[8]) {
  x[0] = F16<T>::lo(v.x);
  x[1] = F16<T>::hi(v.x);
  x[2] = F16<T>::lo(v.y);
  x[3] = F16<T>::hi(v.y);
  x[4] = F16<T>::lo(v.z);
  x[5] = F16<T>::hi(v.z);
  x[6] = F16<T>::lo(v.w);
  x[7] = F16<T>::hi(v.w);
}

__device__ __forceinline__ uint4 ldg16(const uint16_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Vector of VEC elements loaded/stored with one access of at most 16 bytes per 16 bytes.
template <typename T, int VEC>
struct alignas((sizeof(T) * VEC > 16) ? 16 : sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ============================================================================================
// Tensor cores: mma.sync m16n8k16, fp32 accumulate (sm_80+)
// ============================================================================================
// The one place with the instruction; the emulator implements it from the PTX ISA's fragment
// layouts (tests/cuda_emu/cuda_emu.h), independently of the loaders below. Layouts (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"), g = lane / 4, c = lane % 4:
// A regs {a0,a1} (row g, cols 2c,2c+1), {a2,a3} (row g+8, same cols), {a4,a5} (row g, cols
// 2c+8,+9), {a6,a7} (row g+8, cols 2c+8,+9); B regs {b0,b1} (rows 2c,2c+1, col g), {b2,b3} (rows
// 2c+8,+9, col g); C {c0,c1} (row g, cols 2c,2c+1), {c2,c3} (row g+8). The element with the lower
// index sits in the low 16 bits of a register.
template <bool kBf16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MIDUS_CUDA_EMU)
  midus_emu_mma_m16n8k16(kBf16, d, a, b);
#else
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16<true>(d, a, b);
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16<false>(d, a, b);
}
// Both operands in T's own 16-bit format (exact inputs: no split needed).
template <typename T>
__device__ __forceinline__ void mma_native(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16<std::is_same_v<T, bf16_t>>(d, a, b);
}

// A fragment (16x16 at rows m0, cols k0) of a row-major tile X[m][k] (row stride ld, even).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* X, int ld, int m0, int k0, int g, int c) {
  a[0] = lds32(X + (m0 + g) * ld + k0 + 2 * c);
  a[1] = lds32(X + (m0 + g + 8) * ld + k0 + 2 * c);
  a[2] = lds32(X + (m0 + g) * ld + k0 + 8 + 2 * c);
  a[3] = lds32(X + (m0 + g + 8) * ld + k0 + 8 + 2 * c);
}
// A fragment of A = X^T where X[k][m] is stored row-major (stride ld): A[m][k] = X[k][m].
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const uint16_t* X, int ld, int m0, int k0, int g,
                                             int c) {
  const uint16_t* r0 = X + (k0 + 2 * c) * ld + m0 + g;  // rows k0+2c, k0+2c+1, +8, +9
  a[0] = pack2(r0[0], r0[ld]);
  a[1] = pack2(r0[8], r0[ld + 8]);
  a[2] = pack2(r0[8 * ld], r0[9 * ld]);
  a[3] = pack2(r0[8 * ld + 8], r0[9 * ld + 8]);
}
// B fragment (16x8 at rows k0, cols n0) of B[k][n] stored as Y[n][k] (k contiguous, stride ld).
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[2], const uint16_t* Y, int ld, int k0, int n0, int g, int c) {
  b[0] = lds32(Y + (n0 + g) * ld + k0 + 2 * c);
  b[1] = lds32(Y + (n0 + g) * ld + k0 + 8 + 2 * c);
}
// B fragment of B[k][n] stored row-major as X[k][n] (stride ld): pairs along k are gathered.
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[2], const uint16_t* X, int ld, int k0, int n0, int g, int c) {
  const uint16_t* r0 = X + (k0 + 2 * c) * ld + n0 + g;
  b[0] = pack2(r0[0], r0[ld]);
  b[1] = pack2(r0[8 * ld], r0[9 * ld]);
}
// fp16 B fragment -> two bf16 fragments with b = hi + lo exactly (fp16 has 11 significant bits).
__device__ __forceinline__ void split_b_f16(const uint32_t (&b)[2], uint32_t (&bh)[2], uint32_t (&bl)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint16_t h0, l0, h1, l1;
    split_bf16(F16<f16_t>::lo(b[i]), h0, l0);
    split_bf16(F16<f16_t>::hi(b[i]), h1, l1);
    bh[i] = pack2(h0, h1);
    bl[i] = pack2(l0, l1);
  }
}
// Two bf16 in a register with any inf/NaN replaced by 0.
__device__ __forceinline__ uint32_t bf16x2_finite_or_zero(uint32_t r) {
  if ((r & 0x7f80u) == 0x7f80u) r &= 0xffff0000u;
  if ((r & 0x7f800000u) == 0x7f800000u) r &= 0x0000ffffu;
  return r;
}
template <int N>
__device__ __forceinline__ void finite_or_zero(const uint32_t (&x)[N], uint32_t (&y)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) y[i] = bf16x2_finite_or_zero(x[i]);
}

// d += [ah; al] x b with b in T's format: bf16 directly, fp16 as two bf16 terms. The correction
// terms (a lo part times anything, anything times b's lo part) see the other operand with its
// inf/NaN entries zeroed: a lo part is 0 where its hi part is not finite, or where the value is
// exact in bf16, and 0 x inf would turn the inf (or NaN) that the main term gives, as the fp32
// reference does, into NaN.
template <typename T>
__device__ __forceinline__ void mma_split(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    uint32_t bf[2];
    finite_or_zero(b, bf);
    mma_bf16(d, ah, b);
    mma_bf16(d, al, bf);
  } else {
    uint32_t bh[2], bl[2], bhf[2], ahf[4];
    split_b_f16(b, bh, bl);
    finite_or_zero(bh, bhf);
    finite_or_zero(ah, ahf);
    mma_bf16(d, ah, bh);
    mma_bf16(d, al, bhf);
    mma_bf16(d, ahf, bl);
  }
}

// ============================================================================================
// Host side: the dynamic shared-memory opt-in
// ============================================================================================
// Kernels whose dynamic shared-memory limit was raised, per device. Keyed by the kernel's
// address: instantiations with one signature (e.g. two tile configurations) share a function
// pointer *type*, so a cache keyed by type would skip the second kernel, whose launch would then
// fail. Raising it once per kernel and device means that a CUDA graph capture after the first
// eager call sees launches only.
class SmemOptInCache {
 public:
  // True the first time for (kernel, device): the caller then sets the attribute.
  bool first(const void* kernel, int device) {
#if !defined(MIDUS_CUDA_EMU)
    std::lock_guard<std::mutex> lock(mutex_);
#endif
    return done_.insert({kernel, device}).second;
  }
  void forget(const void* kernel, int device) {
#if !defined(MIDUS_CUDA_EMU)
    std::lock_guard<std::mutex> lock(mutex_);
#endif
    done_.erase({kernel, device});
  }

 private:
#if !defined(MIDUS_CUDA_EMU)
  std::mutex mutex_;
#endif
  std::set<std::pair<const void*, int>> done_;
};
inline SmemOptInCache& smem_optin_cache() {
  static SmemOptInCache cache;
  return cache;
}

// Raises `kernel`'s dynamic shared-memory limit to the device's opt-in maximum when a launch
// needs more than the default 48 KiB (once per kernel and device).
template <typename Dev, typename... P>
void allow_smem(Dev& dev, void (*kernel)(P...), size_t bytes) {
  if (bytes <= kDefaultSmem) return;
  const void* key = reinterpret_cast<const void*>(kernel);
  if (!smem_optin_cache().first(key, dev.device())) return;
  try {
    dev.set_max_dynamic_smem(kernel, dev.smem_optin());
  } catch (...) {
    smem_optin_cache().forget(key, dev.device());
    throw;
  }
}

}  // namespace
}  // namespace midus
