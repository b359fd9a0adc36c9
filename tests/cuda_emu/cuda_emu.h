// A CPU emulation of the CUDA execution model, enough to run midus_ops' kernels
// (csrc/cuda/kernels/*.cuh) unmodified in CI without a GPU. Include it through
// csrc/cuda/kernels/compat.cuh with MIDUS_CUDA_EMU defined; one translation unit per program
// (the test drivers in this folder), C++20, Linux, -fno-strict-aliasing (the kernels view shared
// memory through several types, as CUDA code does).
//
// Model:
//  * Every CUDA thread is a fiber with its own small stack (mmap'd, guard page below). A launch
//    runs its blocks one after another; in a block, a scheduler runs each ready fiber until it
//    reaches a barrier or a warp collective, or exits. The order of blocks and of threads within
//    a pass is forward, reverse or random (set_schedule), so a missing barrier or an order
//    dependence between blocks shows as a wrong result in at least one schedule.
//  * Warp collectives (__syncwarp, __shfl*_sync in 32 and 64 bits, __any/__all/__ballot_sync,
//    mma.sync m16n8k16 bf16/f16 with f32 accumulators) complete when every lane named in the
//    mask has arrived at the same collective (same kind, mask, width and call site; __syncwarp
//    may come from different sites, as on sm_70+). Errors, each naming kernel, block, warp, lanes
//    and source lines: a mask without the calling lane or naming lanes that do not exist, lanes
//    at different collectives or with different masks, a collective naming an exited lane (or a
//    lane exiting while others wait for it), a shuffle reading a lane outside its mask, threads
//    at different __syncthreads or at one after others of the block exited (a non-uniform
//    return before a barrier), and deadlock (nothing can run, not everything has exited).
//  * Shared memory: static (MIDUS_SHARED) and dynamic, one arena each per launch, filled with
//    0xFF bytes (NaN for every float type, -1 for integers) at the start of every block; the
//    dynamic area ends at a guard page. Launch checks: grid.x < 2^31, grid.y/z <= 65535, block
//    <= 1024 threads, dynamic shared memory above 48 KiB only after
//    cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for *that* kernel, and static + dynamic
//    within the device's opt-in limit (sm_80 163 KiB, sm_86/89 99 KiB, sm_90 227 KiB).
//  * Device buffers (dev_alloc) end at a guard page (and start after one), so a read or write
//    past either end faults; the fault handler names the buffer, the kernel, block and thread.
//  * __nv_bfloat16 / __half and their conversions round as the hardware's cvt.rn does (to nearest
//    even, subnormals kept, NaN -> canonical 0x7fff); mma computes D = A*B + C exactly and rounds
//    once to fp32 (the tensor cores may differ from that by a few ulps; tests use tolerances).
// Not modelled: timing, memory coalescing, bank conflicts, registers/occupancy, the memory model
// between blocks (blocks run one after another), global-memory races inside a block between
// barriers, warp-synchronous execution of lanes between collectives (lanes interleave only at
// collectives), and anything compute-sanitizer's racecheck/synccheck/initcheck would see beyond
// the above. This does not replace running on a GPU.
#pragma once
#if !defined(__linux__)
#error "the CUDA emulator needs Linux (mmap, sigaltstack)"
#endif

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__) && !defined(MIDUS_EMU_UCONTEXT)
#define MIDUS_EMU_UCONTEXT 1
#endif
#if defined(MIDUS_EMU_UCONTEXT)
#include <ucontext.h>
#endif

// ================================================================================================
// Keywords, built-in types and intrinsics of CUDA C++ that the kernels use
// ================================================================================================
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

using std::fma;  // the float overload: an fp32 FMA, not a double one rounded twice
using std::isfinite;
using std::isinf;
using std::isnan;

// Device min/max accept mixed integer types (CUDA has overloads for them); std::min does not.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

template <typename To, typename From>
inline To midus_emu_bits(From f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &f, sizeof(t));
  return t;
}
inline int __float_as_int(float f) { return midus_emu_bits<int>(f); }
inline unsigned __float_as_uint(float f) { return midus_emu_bits<unsigned>(f); }
inline float __int_as_float(int i) { return midus_emu_bits<float>(i); }
inline float __uint_as_float(unsigned u) { return midus_emu_bits<float>(u); }
inline long long __double_as_longlong(double d) { return midus_emu_bits<long long>(d); }
inline double __longlong_as_double(long long l) { return midus_emu_bits<double>(l); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline void __threadfence() {}

// 16-bit floats: the bits, as CUDA's own types hold them.
struct __nv_bfloat16 { unsigned short __x; };
struct __half { unsigned short __x; };
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }

// float -> bf16 as cvt.rn.bf16.f32: round to nearest even on the upper 16 bits (an overflow
// rounds to inf by the carry), float subnormals kept, any NaN -> the canonical 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = midus_emu_bits<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  uint32_t r = x >> 16;
  const uint32_t rest = x & 0xffffu;
  if (rest > 0x8000u || (rest == 0x8000u && (r & 1u))) ++r;
  return __nv_bfloat16{static_cast<unsigned short>(r)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return midus_emu_bits<float>(uint32_t(h.__x) << 16); }

// float -> fp16 as cvt.rn.f16.f32: round to nearest even, fp16 subnormals produced, values from
// 65520 up (the midpoint above the largest finite 65504) -> inf, any NaN -> canonical 0x7fff.
inline __half __float2half_rn(float f) {
  const uint32_t x = midus_emu_bits<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{0x7fff};
  if (a >= 0x477ff000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};
  uint32_t r, rest, halfway;
  if (a >= 0x38800000u) {  // normal in fp16: rebias the exponent (127 -> 15), 13 bits dropped
    const uint32_t m = a - 0x38000000u;
    r = m >> 13;
    rest = m & 0x1fffu;
    halfway = 0x1000u;
  } else {  // fp16 subnormal (units of 2^-24) or zero
    const int e = static_cast<int>(a >> 23);
    const int shift = 126 - e;  // value / 2^-24 = mantissa * 2^-shift
    if (e == 0 || shift > 24) return __half{static_cast<unsigned short>(sign)};
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    r = mant >> shift;
    rest = mant & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1);
  }
  if (rest > halfway || (rest == halfway && (r & 1u))) ++r;
  return __half{static_cast<unsigned short>(sign | r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  if (e == 0x1f) return midus_emu_bits<float>(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  return midus_emu_bits<float>(sign | ((e + 112u) << 23) | (m << 13));
}

namespace midus_emu {

// ================================================================================================
// Errors
// ================================================================================================
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A failed launch (emulator check, device assert); the launch stops, the program continues.
struct LaunchError : Error {
  using Error::Error;
};
// A failed host-side check (MIDUS_CHECK) of the launch logic.
struct HostCheckError : Error {
  using Error::Error;
};

template <typename... A>
[[noreturn]] inline void host_check_fail(const char* file, int line, A&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  os << " [" << file << ":" << line << "]";
  throw HostCheckError(os.str());
}

// ================================================================================================
// Devices
// ================================================================================================
struct Arch {
  int sm;                  // 80, 86, 89, 90
  const char* example;     // a GPU of that architecture (whose attributes these are)
  int sm_count;
  size_t smem_optin;       // cudaDevAttrMaxSharedMemoryPerBlockOptin
  size_t smem_per_sm;      // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int max_threads_per_sm;
  int max_blocks_per_sm;
};
inline const Arch& arch(int sm) {
  static const Arch table[] = {
      {80, "A100", 108, 166912, 167936, 2048, 32},
      {86, "RTX 3090", 82, 101376, 102400, 1536, 16},
      {89, "RTX 4090", 128, 101376, 102400, 1536, 24},
      {90, "H100 SXM", 132, 232448, 233472, 2048, 32},
  };
  for (const Arch& a : table)
    if (a.sm == sm) return a;
  throw Error("no emulated device sm_" + std::to_string(sm) + " (80, 86, 89 and 90 are known)");
}

enum class Schedule { Forward, Reverse, Random };
inline const char* schedule_name(Schedule s) {
  return s == Schedule::Forward ? "forward" : s == Schedule::Reverse ? "reverse" : "random";
}

// ================================================================================================
// Memory with guard pages
// ================================================================================================
inline size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

struct Mapping {
  char* map = nullptr;  // [guard][data pages][guard]
  size_t len = 0;
  char* base = nullptr;  // first byte handed out
  size_t bytes = 0;
  std::string name;
  bool live = false;
};

inline std::vector<Mapping>& mappings() {
  static std::vector<Mapping> m;
  return m;
}

// `bytes` (>= 1) between two inaccessible pages; the data ends exactly at the upper guard page
// when bytes is a multiple of `align`, else within align - 1 bytes of it.
inline void* guarded_alloc(size_t bytes, const std::string& name, size_t align = 16) {
  const size_t ps = page_size();
  const size_t want = std::max<size_t>(bytes, 1);
  const size_t rounded = (want + align - 1) / align * align;
  const size_t data_pages = (rounded + ps - 1) / ps;
  const size_t len = (data_pages + 2) * ps;
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw Error("mmap failed for device buffer " + name);
  char* c = static_cast<char*>(m);
  mprotect(c, ps, PROT_NONE);
  mprotect(c + (data_pages + 1) * ps, ps, PROT_NONE);
  Mapping mp;
  mp.map = c;
  mp.len = len;
  mp.base = c + (data_pages + 1) * ps - rounded;
  mp.bytes = bytes;
  mp.name = name;
  mp.live = true;
  mappings().push_back(mp);
  return mp.base;
}

inline void guarded_free(void* p) {
  if (p == nullptr) return;
  for (Mapping& m : mappings())
    if (m.live && m.base == p) {
      munmap(m.map, m.len);
      m.live = false;
      return;
    }
  throw Error("guarded_free: not a device buffer");
}

// ================================================================================================
// Fibers
// ================================================================================================
#if !defined(MIDUS_EMU_UCONTEXT)
// x86-64 System V: save the callee-saved registers and the SSE/x87 control words on the old
// stack, switch stacks, restore them from the new one (no signal-mask system call, unlike
// swapcontext: a shuffle switches 32 times).
extern "C" void midus_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.pushsection .text
.weak midus_emu_switch
.type midus_emu_switch,@function
midus_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size midus_emu_switch, .-midus_emu_switch
.popsection
)");
struct Context {
  void* sp = nullptr;
};
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = 0;                                      // a null return address above the entry
  s[-2] = reinterpret_cast<uint64_t>(entry);       // what `ret` jumps to
  for (int i = 3; i <= 8; ++i) s[-i] = 0;          // rbp rbx r12 r13 r14 r15
  uint32_t ctl[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(ctl[0]));
  asm volatile("fnstcw %0" : "=m"(ctl[1]));
  std::memcpy(&s[-9], ctl, 8);
  c.sp = &s[-9];
}
inline void context_switch(Context& from, Context& to) { midus_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum class Coll : uint8_t { SyncWarp, Shfl, ShflUp, ShflDown, ShflXor, Any, All, Ballot, MmaBf16, MmaF16 };
inline const char* coll_name(Coll c) {
  switch (c) {
    case Coll::SyncWarp: return "__syncwarp";
    case Coll::Shfl: return "__shfl_sync";
    case Coll::ShflUp: return "__shfl_up_sync";
    case Coll::ShflDown: return "__shfl_down_sync";
    case Coll::ShflXor: return "__shfl_xor_sync";
    case Coll::Any: return "__any_sync";
    case Coll::All: return "__all_sync";
    case Coll::Ballot: return "__ballot_sync";
    case Coll::MmaBf16: return "mma.sync.m16n8k16.bf16";
    case Coll::MmaF16: return "mma.sync.m16n8k16.f16";
  }
  return "?";
}

struct Site {
  const char* file = "";
  unsigned line = 0, column = 0;
  bool operator==(const Site& o) const { return line == o.line && column == o.column && !std::strcmp(file, o.file); }
};
inline Site site_of(const std::source_location& l) { return Site{l.file_name(), l.line(), l.column()}; }
inline std::string site_str(const Site& s) {
  const char* f = std::strrchr(s.file, '/');
  return std::string(f ? f + 1 : s.file) + ":" + std::to_string(s.line);
}

enum class FState : uint8_t { Ready, Warp, Barrier, Done };

struct Arrival {
  Coll kind;
  unsigned mask;
  Site site;
  int width, bytes;
  uint64_t value;  // shuffle: the value; vote: the predicate
  int arg;         // srcLane / delta / laneMask
  uint64_t result;
  const uint32_t* a;  // mma fragments of this lane
  const uint32_t* b;
  float* d;
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  dim3 tidx;
  int tid = 0, warp = 0, lane = 0;
  FState state = FState::Ready;
  Arrival arr{};
  Site barrier_site;
};

struct OpenColl {
  Coll kind;
  unsigned mask, arrived;
  Site site;
  int width, bytes;
};

struct WarpState {
  unsigned present = 0, exited = 0;
  std::vector<OpenColl> open;
};

struct StaticAlloc {
  size_t offset, bytes;
};

struct Launch {
  std::string kernel;
  dim3 grid, block, bidx;
  size_t dyn_smem = 0;
  const Arch* arch = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int nthreads = 0, live = 0, at_barrier = 0;
  Site barrier_site;
  char* dyn_base = nullptr;
  char* static_base = nullptr;
  size_t static_used = 0;
  std::map<const void*, StaticAlloc> statics;
  bool failed = false;
  std::string error;
};

struct Runtime {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 1;
  uint64_t launches = 0;
  // Per (kernel, device): cudaFuncAttributeMaxDynamicSharedMemorySize.
  std::map<std::pair<const void*, int>, size_t> max_dyn_smem;
  Launch* cur_launch = nullptr;
  Fiber* cur = nullptr;
  Context sched_ctx;
  size_t stack_size = size_t(256) << 10;
  std::vector<char*> stack_pool;  // each stack_size bytes above one guard page
  // Shared memory arenas: dynamic (ends at a guard page) and static, reused across launches.
  char* dyn_map = nullptr;
  size_t dyn_map_len = 0;
  char* static_map = nullptr;
  size_t static_cap = size_t(48) << 10;
  std::string last_fault_context;
};
inline Runtime& rt() {
  static Runtime r;
  return r;
}
inline Fiber* cur() { return rt().cur; }

inline void set_schedule(Schedule s, uint64_t seed) {
  rt().schedule = s;
  rt().seed = seed;
}

// ---- what threadIdx & co. read --------------------------------------------------------------
inline const dim3& thread_idx() { return rt().cur->tidx; }
inline const dim3& block_idx() { return rt().cur_launch->bidx; }
inline const dim3& block_dim() { return rt().cur_launch->block; }
inline const dim3& grid_dim() { return rt().cur_launch->grid; }

inline std::string where() {
  const Launch* L = rt().cur_launch;
  std::ostringstream os;
  if (L == nullptr) return "(no kernel running)";
  os << "kernel " << L->kernel << " block (" << L->bidx.x << "," << L->bidx.y << "," << L->bidx.z << ")";
  if (rt().cur != nullptr) {
    const Fiber* f = rt().cur;
    os << " thread (" << f->tidx.x << "," << f->tidx.y << "," << f->tidx.z << ") warp " << f->warp << " lane "
       << f->lane;
  }
  return os.str();
}

// Fails the running launch from inside a fiber: unwinds to the fiber's entry, which records it.
struct FiberAbort {
  std::string msg;
};
[[noreturn]] inline void fail(const std::string& msg) { throw FiberAbort{msg}; }

[[noreturn]] inline void device_assert_fail(const char* cond, const char* msg, const char* file, int line) {
  std::ostringstream os;
  os << "device-side assert failed: " << msg << " (" << cond << ") at " << site_str(Site{file, unsigned(line), 0});
  fail(os.str());
}

inline std::string lanes_str(unsigned m) {
  std::ostringstream os;
  bool first = true;
  for (int i = 0; i < 32;) {
    if (!((m >> i) & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && ((m >> (j + 1)) & 1u)) ++j;
    os << (first ? "" : ",") << i;
    if (j > i) os << "-" << j;
    first = false;
    i = j + 1;
  }
  return first ? "none" : os.str();
}

// ---- scheduling inside a fiber ----------------------------------------------------------------
inline void yield_to_scheduler() {
  Fiber* f = rt().cur;
  context_switch(f->ctx, rt().sched_ctx);
}

inline void check_exit_hazards(Launch& L, Fiber& f);

// ---- warp collectives -------------------------------------------------------------------------
inline void compute_mma(Launch& L, int warp, Coll kind);

inline void complete(Launch& L, int warp, const OpenColl& oc) {
  Fiber* lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = (oc.mask >> l) & 1u ? &L.fibers[size_t(warp) * 32 + l] : nullptr;
  switch (oc.kind) {
    case Coll::SyncWarp:
      break;
    case Coll::Any:
    case Coll::All:
    case Coll::Ballot: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (lanes[l] && lanes[l]->arr.value) ballot |= 1u << l;
      for (int l = 0; l < 32; ++l)
        if (lanes[l])
          lanes[l]->arr.result = oc.kind == Coll::Ballot ? ballot
                                 : oc.kind == Coll::Any  ? uint64_t(ballot != 0)
                                                         : uint64_t(ballot == oc.mask);
      break;
    }
    case Coll::Shfl:
    case Coll::ShflUp:
    case Coll::ShflDown:
    case Coll::ShflXor: {
      const int w = oc.width;
      for (int l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        const Arrival& a = lanes[l]->arr;
        const int seg = l & ~(w - 1), pos = l & (w - 1);
        int src = l;
        if (oc.kind == Coll::Shfl) {
          src = seg + (a.arg & (w - 1));
        } else if (oc.kind == Coll::ShflUp) {
          src = pos - a.arg >= 0 ? l - a.arg : l;
        } else if (oc.kind == Coll::ShflDown) {
          src = pos + a.arg < w ? l + a.arg : l;
        } else {
          const int x = l ^ a.arg;
          src = x < seg + w ? x : l;  // later groups: own value (CUDA programming guide)
        }
        if (src < 0 || src > 31) src = l;
        if (!((oc.mask >> src) & 1u)) {
          const bool exited = (L.warps[size_t(warp)].exited >> src) & 1u;
          std::ostringstream os;
          os << coll_name(oc.kind) << " at " << site_str(oc.site) << ": lane " << l << " reads lane " << src
             << (exited ? ", which has exited" : ", which is not in the mask") << " (mask lanes "
             << lanes_str(oc.mask) << ")";
          fail(os.str());
        }
        lanes[l]->arr.result = L.fibers[size_t(warp) * 32 + src].arr.value;
      }
      break;
    }
    case Coll::MmaBf16:
    case Coll::MmaF16:
      compute_mma(L, warp, oc.kind);
      break;
  }
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) lanes[l]->state = FState::Ready;
}

inline uint64_t collective(Arrival a) {
  Launch& L = *rt().cur_launch;
  Fiber& f = *rt().cur;
  WarpState& W = L.warps[size_t(f.warp)];
  const unsigned me = 1u << f.lane;
  std::ostringstream os;
  if (!(a.mask & me)) {
    os << coll_name(a.kind) << " at " << site_str(a.site) << ": the mask 0x" << std::hex << a.mask << std::dec
       << " does not include the calling lane " << f.lane;
    fail(os.str());
  }
  if (a.mask & ~W.present) {
    os << coll_name(a.kind) << " at " << site_str(a.site) << ": the mask names lanes " << lanes_str(a.mask & ~W.present)
       << " that this warp does not have";
    fail(os.str());
  }
  if (a.mask & W.exited) {
    os << coll_name(a.kind) << " at " << site_str(a.site) << " by lane " << f.lane << ": the mask names lanes "
       << lanes_str(a.mask & W.exited) << " that have exited";
    fail(os.str());
  }
  OpenColl* oc = nullptr;
  for (OpenColl& o : W.open)
    if (o.mask & me) oc = &o;
  const bool any_site = a.kind == Coll::SyncWarp;
  if (oc != nullptr) {
    if (oc->kind != a.kind || oc->mask != a.mask || oc->width != a.width || oc->bytes != a.bytes ||
        (!any_site && !(oc->site == a.site))) {
      os << "warp divergence: lanes " << lanes_str(oc->arrived) << " wait at " << coll_name(oc->kind) << " ("
         << site_str(oc->site) << ", mask lanes " << lanes_str(oc->mask) << ") but lane " << f.lane << " reached "
         << coll_name(a.kind) << " (" << site_str(a.site) << ", mask lanes " << lanes_str(a.mask) << ")";
      fail(os.str());
    }
  } else {
    // A lane this collective needs that waits at __syncthreads can never come: the barrier cannot
    // complete while this lane waits here.
    for (int l = 0; l < 32; ++l)
      if (((a.mask >> l) & 1u) && L.fibers[size_t(f.warp) * 32 + size_t(l)].state == FState::Barrier) {
        os << "deadlock: lane " << f.lane << " waits at " << coll_name(a.kind) << " (" << site_str(a.site)
           << ") for lane " << l << ", which waits at __syncthreads ("
           << site_str(L.fibers[size_t(f.warp) * 32 + size_t(l)].barrier_site) << ")";
        fail(os.str());
      }
    for (const OpenColl& o : W.open)
      if (o.mask & a.mask) {
        os << "warp divergence: lane " << f.lane << " reached " << coll_name(a.kind) << " (" << site_str(a.site)
           << ", mask lanes " << lanes_str(a.mask) << ") while lanes " << lanes_str(o.arrived) << " wait at "
           << coll_name(o.kind) << " (" << site_str(o.site) << ", mask lanes " << lanes_str(o.mask) << ")";
        fail(os.str());
      }
    W.open.push_back(OpenColl{a.kind, a.mask, 0u, a.site, a.width, a.bytes});
    oc = &W.open.back();
  }
  f.arr = a;
  oc->arrived |= me;
  if (oc->arrived == oc->mask) {
    const OpenColl done = *oc;
    W.open.erase(W.open.begin() + (oc - W.open.data()));
    complete(L, f.warp, done);
    return f.arr.result;
  }
  f.state = FState::Warp;
  yield_to_scheduler();
  return rt().cur->arr.result;
}

inline void syncthreads(const Site& site) {
  Launch& L = *rt().cur_launch;
  Fiber& f = *rt().cur;
  const WarpState& W = L.warps[size_t(f.warp)];
  for (const OpenColl& o : W.open)
    if (o.mask & (1u << f.lane)) {
      std::ostringstream os;
      os << "deadlock: lane " << f.lane << " reached __syncthreads (" << site_str(site) << ") while lanes "
         << lanes_str(o.arrived) << " wait for it at " << coll_name(o.kind) << " (" << site_str(o.site) << ")";
      fail(os.str());
    }
  if (L.live < L.nthreads) {
    std::ostringstream os;
    os << "__syncthreads (" << site_str(site) << ") after " << L.nthreads - L.live
       << " threads of the block exited: a barrier after a non-uniform return is undefined";
    fail(os.str());
  }
  if (L.at_barrier == 0) {
    L.barrier_site = site;
  } else if (!(L.barrier_site == site)) {
    std::ostringstream os;
    os << "threads of one block at different __syncthreads: " << site_str(L.barrier_site) << " and " << site_str(site)
       << " (thread " << f.tid << ")";
    fail(os.str());
  }
  f.barrier_site = site;
  ++L.at_barrier;
  if (L.at_barrier == L.live) {
    for (Fiber& g : L.fibers)
      if (g.state == FState::Barrier) g.state = FState::Ready;
    L.at_barrier = 0;
    return;
  }
  f.state = FState::Barrier;
  yield_to_scheduler();
}

// A lane that exits: no collective may still wait for it; a barrier may now be complete.
inline void check_exit_hazards(Launch& L, Fiber& f) {
  WarpState& W = L.warps[size_t(f.warp)];
  W.exited |= 1u << f.lane;
  for (const OpenColl& o : W.open)
    if (o.mask & (1u << f.lane)) {
      std::ostringstream os;
      os << "lane " << f.lane << " exited while lanes " << lanes_str(o.arrived) << " wait for it at "
         << coll_name(o.kind) << " (" << site_str(o.site) << ", mask lanes " << lanes_str(o.mask) << ")";
      L.failed = true;
      L.error = os.str();
      return;
    }
  --L.live;
  if (L.at_barrier > 0) {
    std::ostringstream os;
    os << "thread " << f.tid << " exited while " << L.at_barrier << " threads wait at __syncthreads ("
       << site_str(L.barrier_site) << "): a barrier after a non-uniform return is undefined";
    L.failed = true;
    L.error = os.str();
  }
}

inline void fiber_entry() {
  Launch& L = *rt().cur_launch;
  Fiber& f = *rt().cur;
  try {
    L.body(L.body_arg);
  } catch (const FiberAbort& e) {
    if (!L.failed) {
      L.failed = true;
      L.error = e.msg + " [" + where() + "]";
    }
  } catch (const std::exception& e) {
    if (!L.failed) {
      L.failed = true;
      L.error = std::string("exception in device code: ") + e.what() + " [" + where() + "]";
    }
  }
  f.state = FState::Done;
  if (!L.failed) check_exit_hazards(L, f);
  if (L.failed && L.error.find(" [kernel ") == std::string::npos) L.error += " [" + where() + "]";
  yield_to_scheduler();
  std::abort();  // never resumed
}

inline std::string deadlock_report(const Launch& L) {
  std::ostringstream os;
  os << "deadlock: no thread can proceed and " << L.live << " have not exited;";
  for (size_t w = 0; w < L.warps.size(); ++w) {
    std::map<std::string, unsigned> groups;
    for (int l = 0; l < 32; ++l) {
      const size_t t = w * 32 + size_t(l);
      if (t >= L.fibers.size()) break;
      const Fiber& f = L.fibers[t];
      std::string st;
      if (f.state == FState::Done) continue;
      if (f.state == FState::Barrier) st = "at __syncthreads (" + site_str(f.barrier_site) + ")";
      if (f.state == FState::Warp)
        st = std::string("at ") + coll_name(f.arr.kind) + " (" + site_str(f.arr.site) + ", mask lanes " +
             lanes_str(f.arr.mask) + ")";
      groups[st] |= 1u << l;
    }
    for (const auto& g : groups) os << " warp " << w << " lanes " << lanes_str(g.second) << " " << g.first << ";";
  }
  return os.str();
}

// ---- the mma collective -------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A * B + C, written from
// the PTX ISA, section 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type"
// (Figures 79, 81, 83). With groupID = laneid >> 2 and threadID_in_group = laneid % 4:
//  A (16x16): four .b32 registers holding a0..a7, low half first (a0 low of register 0, a1 high
//    of register 0, a2 low of register 1, ...); row = groupID for a0,a1,a4,a5 and groupID + 8
//    otherwise; col = threadID_in_group * 2 + (i & 1), plus 8 for a4..a7.
//  B (16x8): two registers holding b0..b3; row = threadID_in_group * 2 + (i & 1), plus 8 for
//    b2,b3; col = groupID.
//  C, D (16x8, f32): c0..c3; row = groupID for c0,c1 and groupID + 8 for c2,c3;
//    col = threadID_in_group * 2 + (i & 1).
inline double mma_in(Coll kind, uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return kind == Coll::MmaBf16 ? double(__bfloat162float(__ushort_as_bfloat16(bits)))
                               : double(__half2float(__ushort_as_half(bits)));
}
inline void compute_mma(Launch& L, int warp, Coll kind) {
  double A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const Arrival& a = L.fibers[size_t(warp) * 32 + size_t(lane)].arr;
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = mma_in(kind, a.a[i >> 1], i & 1);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = mma_in(kind, a.b[i >> 1], i & 1);
    }
    for (int i = 0; i < 4; ++i) C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = double(a.d[i]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const Arrival& a = L.fibers[size_t(warp) * 32 + size_t(lane)].arr;
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      double s = C[row][col];
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];  // exact: products of 16-bit floats
      a.d[i] = static_cast<float>(s);
    }
  }
}

// ---- shared memory ----------------------------------------------------------------------------
inline unsigned char* dynamic_smem() { return reinterpret_cast<unsigned char*>(rt().cur_launch->dyn_base); }

inline void* static_smem(const void* tag, size_t bytes, size_t align, const char* name) {
  Launch& L = *rt().cur_launch;
  auto it = L.statics.find(tag);
  if (it != L.statics.end()) return L.static_base + it->second.offset;
  const size_t off = (L.static_used + align - 1) / align * align;
  if (off + bytes > rt().static_cap) fail(std::string("static shared memory above 48 KiB at ") + name);
  if (off + bytes + L.dyn_smem > L.arch->smem_optin) {
    std::ostringstream os;
    os << "static (" << off + bytes << " B, at " << name << ") plus dynamic (" << L.dyn_smem
       << " B) shared memory above the sm_" << L.arch->sm << " limit of " << L.arch->smem_optin << " B per block";
    fail(os.str());
  }
  L.statics[tag] = StaticAlloc{off, bytes};
  L.static_used = off + bytes;
  std::memset(L.static_base + off, 0xff, bytes);
  return L.static_base + off;
}

// ---- faults -----------------------------------------------------------------------------------
inline void fault_handler(int sig, siginfo_t* info, void*) {
  char msg[1024];
  const char* addr = static_cast<const char*>(info->si_addr);
  int n = std::snprintf(msg, sizeof(msg), "\n[cuda_emu] %s at address %p", sig == SIGSEGV ? "SIGSEGV" : "SIGBUS",
                        static_cast<const void*>(addr));
  const size_t ps = page_size();
  for (const Mapping& m : mappings()) {
    if (!m.live || addr < m.map || addr >= m.map + m.len) continue;
    if (addr >= m.base + m.bytes)
      n += std::snprintf(msg + n, sizeof(msg) - size_t(n),
                         ": out-of-bounds access %zu bytes past the end of device buffer '%s' (%zu bytes)",
                         size_t(addr - (m.base + m.bytes)), m.name.c_str(), m.bytes);
    else if (addr < m.base)
      n += std::snprintf(msg + n, sizeof(msg) - size_t(n),
                         ": out-of-bounds access %zu bytes before device buffer '%s' (%zu bytes)",
                         size_t(m.base - addr), m.name.c_str(), m.bytes);
  }
  Runtime& r = rt();
  if (r.dyn_map != nullptr && addr >= r.dyn_map && addr < r.dyn_map + r.dyn_map_len)
    n += std::snprintf(msg + n, sizeof(msg) - size_t(n), ": out of the dynamic shared memory");
  for (char* s : r.stack_pool)
    if (addr >= s - ps && addr < s) n += std::snprintf(msg + n, sizeof(msg) - size_t(n), ": fiber stack overflow");
  if (r.cur_launch != nullptr) {
    const Launch& L = *r.cur_launch;
    n += std::snprintf(msg + n, sizeof(msg) - size_t(n), " [kernel %s block (%u,%u,%u)", L.kernel.c_str(), L.bidx.x,
                       L.bidx.y, L.bidx.z);
    if (r.cur != nullptr)
      n += std::snprintf(msg + n, sizeof(msg) - size_t(n), " thread (%u,%u,%u)", r.cur->tidx.x, r.cur->tidx.y,
                         r.cur->tidx.z);
    n += std::snprintf(msg + n, sizeof(msg) - size_t(n), "]");
  }
  n += std::snprintf(msg + n, sizeof(msg) - size_t(n), " %s\n", r.last_fault_context.c_str());
  if (write(2, msg, size_t(n)) < 0) {
  }
  _exit(86);
}

inline void install_fault_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  static char altstack[1 << 16];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof(altstack);
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

// A note printed with a fault (e.g. the test case that was running).
inline void set_fault_context(const std::string& s) { rt().last_fault_context = s; }

// ---- attributes -------------------------------------------------------------------------------
constexpr size_t kDefaultSmemLimit = size_t(48) << 10;

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
inline void func_set_max_dynamic_smem(const void* kernel, int device, size_t bytes, const Arch& a) {
  if (bytes > a.smem_optin) {
    std::ostringstream os;
    os << "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " << bytes << ") above the sm_" << a.sm << " opt-in limit "
       << a.smem_optin;
    throw LaunchError(os.str());
  }
  rt().max_dyn_smem[{kernel, device}] = bytes;
}
inline void reset_attributes() { rt().max_dyn_smem.clear(); }

// cudaOccupancyMaxActiveBlocksPerMultiprocessor without registers (not modelled).
inline int max_active_blocks(int threads, size_t smem, const Arch& a) {
  const int by_threads = a.max_threads_per_sm / std::max(threads, 1);
  const int by_smem = static_cast<int>(a.smem_per_sm / (smem + 1024));
  return std::max(0, std::min({a.max_blocks_per_sm, by_threads, by_smem}));
}

// ---- launch -------------------------------------------------------------------------------------
inline char* stack_for(size_t i) {
  Runtime& r = rt();
  const size_t ps = page_size();
  while (r.stack_pool.size() <= i) {
    void* m = mmap(nullptr, r.stack_size + ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw Error("mmap failed for a fiber stack");
    mprotect(m, ps, PROT_NONE);
    r.stack_pool.push_back(static_cast<char*>(m) + ps);
  }
  return r.stack_pool[i];
}

inline void prepare_smem(Launch& L) {
  Runtime& r = rt();
  const size_t ps = page_size();
  const size_t dyn = (L.dyn_smem + 15) / 16 * 16;
  const size_t need = ((dyn + ps - 1) / ps + 1) * ps;  // data pages + guard
  if (r.dyn_map_len < need) {
    if (r.dyn_map) munmap(r.dyn_map, r.dyn_map_len);
    r.dyn_map = static_cast<char*>(mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (r.dyn_map == MAP_FAILED) throw Error("mmap failed for shared memory");
    r.dyn_map_len = need;
    mprotect(r.dyn_map + need - ps, ps, PROT_NONE);
  }
  L.dyn_base = r.dyn_map + r.dyn_map_len - ps - dyn;
  if (r.static_map == nullptr) r.static_map = static_cast<char*>(std::malloc(r.static_cap));
  L.static_base = r.static_map;
}

inline std::vector<size_t> order(size_t n, std::mt19937_64& rng) {
  std::vector<size_t> o(n);
  for (size_t i = 0; i < n; ++i) o[i] = i;
  if (rt().schedule == Schedule::Reverse) std::reverse(o.begin(), o.end());
  if (rt().schedule == Schedule::Random) std::shuffle(o.begin(), o.end(), rng);
  return o;
}

inline void run_block(Launch& L, std::mt19937_64& rng) {
  Runtime& r = rt();
  std::memset(L.dyn_base, 0xff, (L.dyn_smem + 15) / 16 * 16);
  std::memset(L.static_base, 0xff, r.static_cap);
  L.live = L.nthreads;
  L.at_barrier = 0;
  for (WarpState& w : L.warps) {
    w.exited = 0;
    w.open.clear();
  }
  for (int t = 0; t < L.nthreads; ++t) {
    Fiber& f = L.fibers[size_t(t)];
    f.state = FState::Ready;
    f.arr = Arrival{};
    context_init(f.ctx, f.stack, r.stack_size, &fiber_entry);
  }
  while (true) {
    bool progress = false;
    for (size_t t : order(size_t(L.nthreads), rng)) {
      Fiber& f = L.fibers[t];
      if (f.state != FState::Ready) continue;
      progress = true;
      r.cur = &f;
      context_switch(r.sched_ctx, f.ctx);
      r.cur = nullptr;
      if (L.failed) return;
    }
    if (L.live == 0) return;
    if (!progress) {
      L.failed = true;
      L.error = deadlock_report(L) + " [kernel " + L.kernel + " block (" + std::to_string(L.bidx.x) + "," +
                std::to_string(L.bidx.y) + "," + std::to_string(L.bidx.z) + ")]";
      return;
    }
  }
}

template <typename F>
void run_launch(const char* name, const void* kernel_key, dim3 grid, dim3 block, size_t dyn_smem, const Arch& a,
                int device, F& body) {
  install_fault_handler();
  Runtime& r = rt();
  if (r.cur_launch != nullptr) throw Error("a kernel launched from device code (not supported)");
  std::ostringstream os;
  os << "launch of " << name << " <<<(" << grid.x << "," << grid.y << "," << grid.z << "), (" << block.x << ","
     << block.y << "," << block.z << "), " << dyn_smem << ">>> on sm_" << a.sm << ": ";
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
    throw LaunchError(os.str() + "an empty grid or block (invalid configuration)");
  if (grid.x > 2147483647u) throw LaunchError(os.str() + "grid.x above 2^31 - 1");
  if (grid.y > 65535u || grid.z > 65535u) throw LaunchError(os.str() + "grid.y or grid.z above 65535");
  if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw LaunchError(os.str() + "more than 1024 threads per block (or block.z > 64)");
  if (dyn_smem > kDefaultSmemLimit) {
    auto it = r.max_dyn_smem.find({kernel_key, device});
    if (it == r.max_dyn_smem.end() || it->second < dyn_smem)
      throw LaunchError(os.str() + "dynamic shared memory above 48 KiB without cudaFuncSetAttribute(" +
                        "MaxDynamicSharedMemorySize) for this kernel (its limit: " +
                        std::to_string(it == r.max_dyn_smem.end() ? kDefaultSmemLimit : it->second) + " B)");
  }
  if (dyn_smem > a.smem_optin) throw LaunchError(os.str() + "dynamic shared memory above the device's opt-in limit");
  Launch L;
  L.kernel = name;
  L.grid = grid;
  L.block = block;
  L.dyn_smem = dyn_smem;
  L.arch = &a;
  L.body = [](void* p) { (*static_cast<F*>(p))(); };
  L.body_arg = &body;
  L.nthreads = static_cast<int>(threads);
  L.fibers.resize(threads);
  L.warps.resize((threads + 31) / 32);
  for (int t = 0; t < L.nthreads; ++t) {
    Fiber& f = L.fibers[size_t(t)];
    f.tid = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.tidx = dim3(unsigned(t) % block.x, (unsigned(t) / block.x) % block.y, unsigned(t) / (block.x * block.y));
    f.stack = stack_for(size_t(t));
    L.warps[size_t(f.warp)].present |= 1u << f.lane;
  }
  prepare_smem(L);
  std::mt19937_64 rng(r.seed * 0x9e3779b97f4a7c15ull + (++r.launches));
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> blocks(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = i;
  if (r.schedule == Schedule::Reverse) std::reverse(blocks.begin(), blocks.end());
  if (r.schedule == Schedule::Random) std::shuffle(blocks.begin(), blocks.end(), rng);
  r.cur_launch = &L;
  for (uint64_t b : blocks) {
    L.bidx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
    L.statics.clear();
    L.static_used = 0;
    run_block(L, rng);
    if (L.failed) break;
  }
  r.cur_launch = nullptr;
  r.cur = nullptr;
  if (L.failed) throw LaunchError(L.error);
}

// kernel<<<grid, block, dyn_smem>>>(args...): the arguments converted to the kernel's parameter
// types, as a real launch does.
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn_smem, const Arch& a,
            int device, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...> t{static_cast<P>(std::forward<A>(args))...};
  auto body = [&] { std::apply(kernel, t); };
  run_launch(name, reinterpret_cast<const void*>(kernel), grid, block, dyn_smem, a, device, body);
}

}  // namespace midus_emu

// ================================================================================================
// The device-side API
// ================================================================================================
#define threadIdx (::midus_emu::thread_idx())
#define blockIdx (::midus_emu::block_idx())
#define blockDim (::midus_emu::block_dim())
#define gridDim (::midus_emu::grid_dim())
constexpr int warpSize = 32;

#define MIDUS_EMU_SHARED(T, name, dims)                                                                     \
  static char name##_midus_emu_tag;                                                                         \
  using name##_midus_emu_t = T dims;                                                                        \
  name##_midus_emu_t& name = *static_cast<name##_midus_emu_t*>(::midus_emu::static_smem(                     \
      &name##_midus_emu_tag, sizeof(name##_midus_emu_t), alignof(name##_midus_emu_t), #name))

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::midus_emu::syncthreads(::midus_emu::site_of(loc));
}

namespace midus_emu {
inline Arrival arrival(Coll kind, unsigned mask, const std::source_location& loc, int width = 32, int bytes = 0) {
  Arrival a{};
  a.kind = kind;
  a.mask = mask;
  a.site = site_of(loc);
  a.width = width;
  a.bytes = bytes;
  return a;
}
template <typename T>
inline T shuffle(Coll kind, unsigned mask, T var, int arg, int width, const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "shuffles move 32- or 64-bit values");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("shuffle width " + std::to_string(width) + " is not a power of two in [1, 32] at " + site_str(site_of(loc)));
  Arrival a = arrival(kind, mask, loc, width, int(sizeof(T)));
  uint64_t v = 0;
  std::memcpy(&v, &var, sizeof(T));
  a.value = v;
  a.arg = arg;
  const uint64_t r = collective(a);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
}  // namespace midus_emu

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  ::midus_emu::collective(::midus_emu::arrival(::midus_emu::Coll::SyncWarp, mask, loc));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32,
                     std::source_location loc = std::source_location::current()) {
  return ::midus_emu::shuffle(::midus_emu::Coll::Shfl, mask, var, src, width, loc);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        std::source_location loc = std::source_location::current()) {
  return ::midus_emu::shuffle(::midus_emu::Coll::ShflUp, mask, var, int(delta), width, loc);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          std::source_location loc = std::source_location::current()) {
  return ::midus_emu::shuffle(::midus_emu::Coll::ShflDown, mask, var, int(delta), width, loc);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         std::source_location loc = std::source_location::current()) {
  return ::midus_emu::shuffle(::midus_emu::Coll::ShflXor, mask, var, lane_mask, width, loc);
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  auto a = ::midus_emu::arrival(::midus_emu::Coll::Any, mask, loc);
  a.value = pred != 0;
  return static_cast<int>(::midus_emu::collective(a));
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  auto a = ::midus_emu::arrival(::midus_emu::Coll::All, mask, loc);
  a.value = pred != 0;
  return static_cast<int>(::midus_emu::collective(a));
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  auto a = ::midus_emu::arrival(::midus_emu::Coll::Ballot, mask, loc);
  a.value = pred != 0;
  return static_cast<unsigned>(::midus_emu::collective(a));
}

// Atomics: fibers switch only at collectives and barriers, so a read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  if (old < v) *p = v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}

// The mma helpers of csrc/cuda/kernels/common.cuh call these where a GPU runs the instruction.
inline void midus_emu_mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                   std::source_location loc = std::source_location::current()) {
  auto arr = ::midus_emu::arrival(bf16 ? ::midus_emu::Coll::MmaBf16 : ::midus_emu::Coll::MmaF16, 0xffffffffu, loc);
  arr.a = a;
  arr.b = b;
  arr.d = d;
  ::midus_emu::collective(arr);
}
