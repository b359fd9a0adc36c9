// Test cases of the emulated kernels: registration, a main() that runs them, and comparisons
// against double-precision references. A driver (drv_*.cpp) defines cases with EMU_CASE and
// includes this header once.
//
//   ./drv --schedule forward|reverse|random [--seed S] [--filter SUBSTR] [--list]
// prints one line per case:  CASE <name> PASS <ms> <hash>   or   CASE <name> FAIL <ms> <message>
// (tests/test_cuda_emulated.py turns each into a pytest case). <hash> digests what the case's
// kernels wrote: every kernel is deterministic, so it must not depend on the schedule.
#pragma once
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace emu_test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Ctx {
  std::mt19937_64 rng;
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over what the case feeds to digest()
  std::vector<std::string> notes;

  double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
  int64_t randint(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi - 1)(rng); }
  template <typename T>
  void digest(const T* p, size_t n) {
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n * sizeof(T); ++i) hash = (hash ^ b[i]) * 1099511628211ull;
  }
};

struct Case {
  std::string name;
  std::function<void(Ctx&)> fn;
};
inline std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
struct Register {
  Register(std::string name, std::function<void(Ctx&)> fn) { registry().push_back({std::move(name), std::move(fn)}); }
};

#define EMU_CONCAT2(a, b) a##b
#define EMU_CONCAT(a, b) EMU_CONCAT2(a, b)
// EMU_CASE("name") { ... ctx ... }
#define EMU_CASE(name)                                                                     \
  static void EMU_CONCAT(emu_case_, __LINE__)(::emu_test::Ctx & ctx);                     \
  static ::emu_test::Register EMU_CONCAT(emu_reg_, __LINE__)(name, EMU_CONCAT(emu_case_, __LINE__)); \
  static void EMU_CONCAT(emu_case_, __LINE__)(::emu_test::Ctx & ctx)

template <typename... A>
[[noreturn]] inline void fail(A&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Failure(os.str());
}
#define EMU_EXPECT(cond, ...)                                                        \
  do {                                                                               \
    if (!(cond)) ::emu_test::fail("expected ", #cond, ": ", __VA_ARGS__, " (line ", __LINE__, ")"); \
  } while (0)

// Values of the storage types as double.
inline double to_double(float x) { return x; }
inline double to_double(double x) { return x; }
inline double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }
inline double to_double(__half x) { return __half2float(x); }
template <typename T>
inline T from_double(double x) {
  return midus::cvt<T>(x);
}

// Tolerances of tests/op_testing.py: rtol 2 ulps of the output dtype; atol relative to the
// largest expected magnitude (fp32 accumulation error of sums that cancel).
template <typename T>
struct Tol;
template <>
struct Tol<double> {
  static constexpr double rtol = 1e-12, atol = 1e-12;
};
template <>
struct Tol<float> {
  static constexpr double rtol = 2e-5, atol = 1e-5;
};
template <>
struct Tol<__nv_bfloat16> {
  static constexpr double rtol = 1.0 / 64, atol = 1e-5;
};
template <>
struct Tol<__half> {
  static constexpr double rtol = 1.0 / 512, atol = 1e-5;
};

// got (n values of T) against want (exact, double): non-finite where want is finite fails first
// (an unwritten, poisoned element); NaN must stay NaN and inf must keep its sign.
// TolT: the dtype whose tolerances apply (the output's storage type; got may be its values as
// double).
template <typename TolT, typename T>
void expect_close_as(const T* got, const std::vector<double>& want, const std::string& what, double factor = 1.0) {
  double scale = 0;
  for (double w : want)
    if (std::isfinite(w)) scale = std::max(scale, std::fabs(w));
  const double rtol = factor * Tol<TolT>::rtol, atol = factor * Tol<TolT>::atol * std::max(scale, 1e-30);
  size_t bad = 0, first = 0;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = to_double(got[i]), w = want[i];
    bool ok;
    if (std::isnan(w)) {
      ok = std::isnan(g);
    } else if (std::isinf(w)) {
      ok = g == w;
    } else {
      ok = std::isfinite(g) && std::fabs(g - w) <= atol + rtol * std::fabs(w);
      if (std::isfinite(g)) worst = std::max(worst, std::fabs(g - w) / (atol + rtol * std::fabs(w)));
    }
    if (!ok && bad++ == 0) first = i;
  }
  if (bad) {
    const double g = to_double(got[first]);
    fail(what, ": ", bad, " of ", want.size(), " elements wrong; first at ", first, ": got ", g, " want ",
         want[first], (std::isfinite(want[first]) && !std::isfinite(g) ? " (unwritten element?)" : ""));
  }
}

template <typename T>
void expect_close(const T* got, const std::vector<double>& want, const std::string& what, double factor = 1.0) {
  expect_close_as<T>(got, want, what, factor);
}

// Bitwise equality of two arrays (e.g. a kernel against an exact reference).
template <typename T>
void expect_equal(const T* got, const T* want, size_t n, const std::string& what) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      std::ostringstream os;
      os << what << ": element " << i << " of " << n << " differs";
      if constexpr (std::is_arithmetic_v<T>) os << ": got " << got[i] << " want " << want[i];
      fail(os.str());
    }
}

inline int run_main(int argc, char** argv) {
  using midus_emu::Schedule;
  Schedule sched = Schedule::Forward;
  uint64_t seed = 1;
  std::string filter;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--schedule" && i + 1 < argc) {
      const std::string s = argv[++i];
      sched = s == "reverse" ? Schedule::Reverse : s == "random" ? Schedule::Random : Schedule::Forward;
      if (s != "forward" && s != "reverse" && s != "random") {
        std::fprintf(stderr, "unknown schedule %s\n", s.c_str());
        return 2;
      }
    } else if (a == "--seed" && i + 1 < argc) {
      seed = std::stoull(argv[++i]);
    } else if (a == "--filter" && i + 1 < argc) {
      filter = argv[++i];
    } else if (a == "--list") {
      list = true;
    } else {
      std::fprintf(stderr, "usage: %s [--schedule forward|reverse|random] [--seed S] [--filter SUBSTR] [--list]\n",
                   argv[0]);
      return 2;
    }
  }
  midus_emu::set_schedule(sched, seed);
  int failed = 0;
  for (const Case& c : registry()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    // Cases that end the process (a fault on a guard page) run only when named exactly.
    if (c.name.rfind("crash_", 0) == 0 && filter != c.name) continue;
    if (list) {
      std::printf("%s\n", c.name.c_str());
      continue;
    }
    midus_emu::set_fault_context("(case " + c.name + ", schedule " + midus_emu::schedule_name(sched) + ")");
    Ctx ctx;
    // The data depend on the case only: every schedule sees the same inputs.
    uint64_t h = 1469598103934665603ull;
    for (char ch : c.name) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
    ctx.rng.seed(h);
    const auto t0 = std::chrono::steady_clock::now();
    std::string err;
    try {
      c.fn(ctx);
    } catch (const std::exception& e) {
      err = e.what();
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (char& ch : err)
      if (ch == '\n') ch = ' ';
    if (err.empty()) {
      std::printf("CASE %s PASS %.0f %016" PRIx64 "\n", c.name.c_str(), ms, ctx.hash);
    } else {
      ++failed;
      std::printf("CASE %s FAIL %.0f %s\n", c.name.c_str(), ms, err.c_str());
    }
    std::fflush(stdout);
  }
  return failed ? 1 : 0;
}

}  // namespace emu_test

int main(int argc, char** argv) { return emu_test::run_main(argc, argv); }
