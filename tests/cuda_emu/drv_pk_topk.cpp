// Emulated tests of the pk_topk CUDA kernels (csrc/cuda/kernels/pk_topk.cuh) against a
// double-precision reference: the forward (both register layouts R = 1, 2; every dtype; k = 1..64,
// n up to 4096, chunked sub-key staging, tails), exact ties with the lower-index rule, inf/NaN
// rows, rounding ties, the backward (native and fp32 grads, grad_q only / grad_subkeys only,
// several token chunks) and the launch logic's limits.
#include "../../csrc/cuda/kernels/pk_topk.cuh"
#include "emu_dev.h"
#include "harness.h"

#include <algorithm>
#include <map>

using midus_emu::DevBuf;
using midus_emu::EmuDev;
using namespace emu_test;
using bf16 = __nv_bfloat16;
using f16 = __half;

namespace {

// ---- reference --------------------------------------------------------------------------------
// Selection order of pk_select.h: NaN first, larger first, -0 == +0, lower id first.
bool before(double sa, int64_t ia, double sb, int64_t ib) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

struct PkShape {
  int64_t N, H, half, n, k;
};

// Sub-key scores of one (token, head) in double from the stored (rounded) inputs.
template <typename T>
void sub_scores(const std::vector<T>& q, const std::vector<T>& sk, const PkShape& s, int64_t t, int64_t h,
                std::vector<double>& s1, std::vector<double>& s2) {
  s1.assign(size_t(s.n), 0.0);
  s2.assign(size_t(s.n), 0.0);
  const T* qr = &q[size_t((t * s.H + h) * 2 * s.half)];
  for (int p = 0; p < 2; ++p)
    for (int64_t i = 0; i < s.n; ++i) {
      const T* kr = &sk[size_t(((h * 2 + p) * s.n + i) * s.half)];
      double acc = 0;
      for (int64_t d = 0; d < s.half; ++d) acc += to_double(kr[d]) * to_double(qr[p * s.half + d]);
      (p ? s2 : s1)[size_t(i)] = acc;
    }
}

// The two-stage selection of spec/HML.md 1.1 in double: top k of each half, top k of the k*k sums.
template <typename T>
void pk_reference(const std::vector<T>& q, const std::vector<T>& sk, const PkShape& s, std::vector<double>& scores,
                  std::vector<int64_t>& ids) {
  scores.assign(size_t(s.N * s.H * s.k), 0.0);
  ids.assign(size_t(s.N * s.H * s.k), 0);
  std::vector<double> s1, s2;
  std::vector<int64_t> a(size_t(s.n)), b(size_t(s.n));
  for (int64_t t = 0; t < s.N; ++t)
    for (int64_t h = 0; h < s.H; ++h) {
      sub_scores(q, sk, s, t, h, s1, s2);
      for (int64_t i = 0; i < s.n; ++i) a[size_t(i)] = b[size_t(i)] = i;
      std::sort(a.begin(), a.end(), [&](int64_t x, int64_t y) { return before(s1[size_t(x)], x, s1[size_t(y)], y); });
      std::sort(b.begin(), b.end(), [&](int64_t x, int64_t y) { return before(s2[size_t(x)], x, s2[size_t(y)], y); });
      std::vector<std::pair<double, int64_t>> cand;
      for (int64_t i = 0; i < s.k; ++i)
        for (int64_t j = 0; j < s.k; ++j) {
          const int64_t ai = a[size_t(i)], bj = b[size_t(j)];
          cand.push_back({s1[size_t(ai)] + s2[size_t(bj)], ai * s.n + bj});
        }
      std::sort(cand.begin(), cand.end(),
                [](const auto& x, const auto& y) { return before(x.first, x.second, y.first, y.second); });
      for (int64_t m = 0; m < s.k; ++m) {
        scores[size_t((t * s.H + h) * s.k + m)] = cand[size_t(m)].first;
        ids[size_t((t * s.H + h) * s.k + m)] = cand[size_t(m)].second;
      }
    }
}

template <typename T>
std::vector<T> randn(Ctx& ctx, size_t n, double scale = 1.0) {
  std::vector<T> v(n);
  for (T& x : v) x = from_double<T>(scale * ctx.normal());
  return v;
}
// Small integers: every dot product and sum is exact in fp32, so ties are exact ties.
template <typename T>
std::vector<T> small_ints(Ctx& ctx, size_t n, int range) {
  std::vector<T> v(n);
  for (T& x : v) x = from_double<T>(double(ctx.randint(-range, range + 1)));
  return v;
}

struct PkRun {
  std::vector<double> scores;  // kernel output as double
  std::vector<int64_t> ids;
};

template <typename T>
PkRun run_forward(Ctx& ctx, EmuDev& dev, const std::vector<T>& q, const std::vector<T>& sk, const PkShape& s) {
  DevBuf<T> dq(q, "q"), dsk(sk, "subkeys");
  DevBuf<T> scores(size_t(s.N * s.H * s.k), "scores");
  DevBuf<int64_t> ids(size_t(s.N * s.H * s.k), "indices");
  midus::pk_topk_forward(dev, dq.get(), dsk.get(), scores.get(), ids.get(), s.N, s.H, s.half, s.n, s.k);
  ctx.digest(scores.get(), scores.size());
  ctx.digest(ids.get(), ids.size());
  PkRun r;
  for (size_t i = 0; i < scores.size(); ++i) r.scores.push_back(to_double(scores[i]));
  r.ids = ids.host();
  return r;
}

// A valid top k with the right scores (robust to near-ties, as tests/op_testing.py): indices
// distinct and in range, scores descending, equal to the reference's k best values, and each
// equal to the exact score of its own index.
template <typename T>
void check_valid_topk(const std::vector<T>& q, const std::vector<T>& sk, const PkShape& s, const PkRun& r) {
  std::vector<double> want;
  std::vector<int64_t> want_ids;
  pk_reference(q, sk, s, want, want_ids);
  std::vector<double> at(want.size());
  std::vector<double> s1, s2;
  for (int64_t t = 0; t < s.N; ++t)
    for (int64_t h = 0; h < s.H; ++h) {
      sub_scores(q, sk, s, t, h, s1, s2);
      const size_t row = size_t((t * s.H + h) * s.k);
      std::vector<int64_t> seen;
      for (int64_t m = 0; m < s.k; ++m) {
        const int64_t id = r.ids[row + size_t(m)];
        EMU_EXPECT(id >= 0 && id < s.n * s.n, "index ", id, " out of range at row ", t * s.H + h, " (unwritten?)");
        seen.push_back(id);
        at[row + size_t(m)] = s1[size_t(id / s.n)] + s2[size_t(id % s.n)];
        if (m > 0)
          EMU_EXPECT(!(r.scores[row + size_t(m)] > r.scores[row + size_t(m) - 1]), "scores not descending at row ",
                     t * s.H + h);
      }
      std::sort(seen.begin(), seen.end());
      EMU_EXPECT(std::adjacent_find(seen.begin(), seen.end()) == seen.end(), "an index selected twice at row ",
                 t * s.H + h);
    }
  expect_close_as<T>(r.scores.data(), want, "scores vs reference");
  expect_close_as<T>(r.scores.data(), at, "score of the returned index");
}

// Exactly the reference (scores and indices), for inputs whose arithmetic is exact.
template <typename T>
void check_exact(const std::vector<T>& q, const std::vector<T>& sk, const PkShape& s, const PkRun& r) {
  std::vector<double> want;
  std::vector<int64_t> want_ids;
  pk_reference(q, sk, s, want, want_ids);
  for (size_t i = 0; i < want.size(); ++i) {
    const double w = to_double(from_double<T>(want[i]));
    const bool same = (std::isnan(w) && std::isnan(r.scores[i])) || w == r.scores[i];
    if (!same || want_ids[i] != r.ids[i])
      fail("element ", i, " (row ", i / size_t(s.k), ", position ", i % size_t(s.k), "): got (", r.scores[i], ", ",
           r.ids[i], ") want (", w, ", ", want_ids[i], ")");
  }
}

template <typename T>
void forward_random(Ctx& ctx, int sm, PkShape s) {
  EmuDev dev(sm);
  const auto q = randn<T>(ctx, size_t(s.N * s.H * 2 * s.half));
  const auto sk = randn<T>(ctx, size_t(s.H * 2 * s.n * s.half));
  check_valid_topk(q, sk, s, run_forward(ctx, dev, q, sk, s));
}

template <typename T>
void forward_exact(Ctx& ctx, int sm, PkShape s, int range) {
  EmuDev dev(sm);
  const auto q = small_ints<T>(ctx, size_t(s.N * s.H * 2 * s.half), range);
  const auto sk = small_ints<T>(ctx, size_t(s.H * 2 * s.n * s.half), range);
  check_exact(q, sk, s, run_forward(ctx, dev, q, sk, s));
}

// ---- forward cases ------------------------------------------------------------------------------
// Shapes: N not a multiple of the 8 warps, n not a multiple of 32, half odd.
EMU_CASE("pk_fwd_f32_k1") { forward_random<float>(ctx, 90, {13, 2, 8, 45, 1}); }
EMU_CASE("pk_fwd_f32_k5_half3") { forward_random<float>(ctx, 90, {11, 3, 3, 37, 5}); }
EMU_CASE("pk_fwd_f32_k32") { forward_random<float>(ctx, 90, {9, 2, 16, 100, 32}); }
EMU_CASE("pk_fwd_f32_k33_R2") { forward_random<float>(ctx, 80, {7, 2, 16, 70, 33}); }
EMU_CASE("pk_fwd_f32_k64_R2") { forward_random<float>(ctx, 90, {5, 1, 8, 130, 64}); }
EMU_CASE("pk_fwd_f64_k17") { forward_random<double>(ctx, 90, {10, 2, 7, 50, 17}); }
EMU_CASE("pk_fwd_f64_k40_R2") { forward_random<double>(ctx, 86, {4, 2, 5, 64, 40}); }
EMU_CASE("pk_fwd_bf16_k8") { forward_random<bf16>(ctx, 90, {12, 2, 16, 64, 8}); }
EMU_CASE("pk_fwd_f16_k16") { forward_random<f16>(ctx, 89, {9, 2, 12, 48, 16}); }
// n = 4096 (the kernel's limit), k = 64: the warp's score rows fill 32 KiB of shared memory.
EMU_CASE("pk_fwd_f32_n4096_k64") { forward_random<float>(ctx, 90, {2, 1, 4, 4096, 64}); }
// Sub-keys above the 64 KiB staging budget: restaged in chunks of rows per round of tokens.
EMU_CASE("pk_fwd_f32_chunked_staging") { forward_random<float>(ctx, 90, {10, 2, 64, 300, 12}); }
EMU_CASE("pk_fwd_f64_chunked_staging_sm86") { forward_random<double>(ctx, 86, {9, 1, 40, 250, 20}); }

// Exact ties: small-integer inputs make many scores equal; ids must follow the lower-index rule
// at both stages and the pruned stage 2 must match the full k x k selection.
EMU_CASE("pk_fwd_ties_f32_k7") { forward_exact<float>(ctx, 90, {16, 2, 3, 40, 7}, 1); }
EMU_CASE("pk_fwd_ties_f32_k32") { forward_exact<float>(ctx, 90, {9, 2, 2, 64, 32}, 1); }
EMU_CASE("pk_fwd_ties_bf16_k48") { forward_exact<bf16>(ctx, 90, {5, 1, 2, 80, 48}, 2); }
EMU_CASE("pk_fwd_ties_f64_k64") { forward_exact<double>(ctx, 80, {3, 2, 1, 64, 64}, 1); }
EMU_CASE("pk_fwd_ties_f16_k3") { forward_exact<f16>(ctx, 90, {17, 1, 2, 33, 3}, 1); }

// Every k from 1 to 64 (both register layouts, every stage-2 pruning pattern), on exact data so
// that the result must equal the reference bit for bit.
EMU_CASE("pk_fwd_every_k_1_to_64_exact") {
  EmuDev dev(90);
  for (int64_t k = 1; k <= 64; ++k) {
    const PkShape s{3, 1, 2, 70, k};
    const auto q = small_ints<float>(ctx, size_t(s.N * s.H * 2 * s.half), 2);
    const auto sk = small_ints<float>(ctx, size_t(s.H * 2 * s.n * s.half), 2);
    try {
      check_exact(q, sk, s, run_forward(ctx, dev, q, sk, s));
    } catch (const Failure& e) {
      fail("k = ", k, ": ", e.what());
    }
  }
}

// Rounding ties (tests/op_testing.py's rounding_tie_inputs): d_k = 2, s1 = K1 q1 small and
// distinct, s2 = K2 huge (2^24 + 2r): candidate sums round onto multiples of 2 and collide, so
// pairs that the pruned stage 2 skips tie the k-th and the row must be redone in full.
EMU_CASE("pk_fwd_rounding_ties_f32") {
  EmuDev dev(90);
  const PkShape s{21, 3, 1, 64, 10};
  std::vector<float> q(size_t(s.N * s.H * 2)), sk(size_t(s.H * 2 * s.n));
  for (int64_t r = 0; r < s.N * s.H; ++r) {
    q[size_t(2 * r)] = float(1 << ctx.randint(0, 3));
    q[size_t(2 * r + 1)] = 1.f;
  }
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t i = 0; i < s.n; ++i) {
      sk[size_t((h * 2 + 0) * s.n + i)] = 1.f + float(ctx.randint(0, 32)) * std::ldexp(1.f, -20);
      sk[size_t((h * 2 + 1) * s.n + i)] = std::ldexp(1.f, 24) + 2.f * float(ctx.randint(0, 8));
    }
  const PkRun r = run_forward(ctx, dev, q, sk, s);
  // Reference: sums rounded to fp32 as the kernel's (and the CPU's) accumulation type does.
  std::vector<double> want;
  std::vector<int64_t> want_ids;
  for (int64_t t = 0; t < s.N; ++t)
    for (int64_t h = 0; h < s.H; ++h) {
      std::vector<std::pair<double, int64_t>> a, b, cand;
      for (int64_t i = 0; i < s.n; ++i) {
        a.push_back({double(float(sk[size_t((h * 2) * s.n + i)] * q[size_t(2 * (t * s.H + h))])), i});
        b.push_back({double(float(sk[size_t((h * 2 + 1) * s.n + i)] * q[size_t(2 * (t * s.H + h) + 1)])), i});
      }
      auto by = [](const auto& x, const auto& y) { return before(x.first, x.second, y.first, y.second); };
      std::sort(a.begin(), a.end(), by);
      std::sort(b.begin(), b.end(), by);
      for (int64_t i = 0; i < s.k; ++i)
        for (int64_t j = 0; j < s.k; ++j)
          cand.push_back({double(float(a[size_t(i)].first) + float(b[size_t(j)].first)),
                          a[size_t(i)].second * s.n + b[size_t(j)].second});
      std::sort(cand.begin(), cand.end(), by);
      for (int64_t m = 0; m < s.k; ++m) {
        want.push_back(cand[size_t(m)].first);
        want_ids.push_back(cand[size_t(m)].second);
      }
    }
  for (size_t i = 0; i < want.size(); ++i)
    EMU_EXPECT(r.scores[i] == want[i] && r.ids[i] == want_ids[i], "element ", i, ": got (", r.scores[i], ", ",
               r.ids[i], ") want (", want[i], ", ", want_ids[i], ")");
}

// Non-finite rows: +-inf and NaN in queries and sub-keys on exact small-integer data. NaN ranks
// first, inf + -inf is NaN, and such rows are scored over all k x k pairs.
template <typename T>
void forward_nonfinite(Ctx& ctx, PkShape s) {
  EmuDev dev(90);
  auto q = small_ints<T>(ctx, size_t(s.N * s.H * 2 * s.half), 2);
  auto sk = small_ints<T>(ctx, size_t(s.H * 2 * s.n * s.half), 2);
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t t = 0; t < s.N; t += 2) {  // every other token: one special value in its query
    const double v = (t / 2) % 3 == 0 ? inf : (t / 2) % 3 == 1 ? -inf : nan;
    q[size_t(t * s.H * 2 * s.half + ctx.randint(0, 2 * s.half))] = from_double<T>(v);
  }
  sk[size_t(ctx.randint(0, int64_t(sk.size())))] = from_double<T>(inf);
  sk[size_t(ctx.randint(0, int64_t(sk.size())))] = from_double<T>(nan);
  check_exact(q, sk, s, run_forward(ctx, dev, q, sk, s));
}
EMU_CASE("pk_fwd_nonfinite_f32") { forward_nonfinite<float>(ctx, {12, 2, 3, 40, 6}); }
EMU_CASE("pk_fwd_nonfinite_bf16_R2") { forward_nonfinite<bf16>(ctx, {6, 1, 2, 50, 36}); }

// ---- backward ---------------------------------------------------------------------------------------
template <typename T, typename G>
void backward_case(Ctx& ctx, int sm, PkShape s, bool need_q, bool need_k, int64_t chunk_tokens = 0) {
  EmuDev dev(sm);
  const auto q = randn<T>(ctx, size_t(s.N * s.H * 2 * s.half));
  const auto sk = randn<T>(ctx, size_t(s.H * 2 * s.n * s.half));
  const auto g = randn<G>(ctx, size_t(s.N * s.H * s.k));
  std::vector<int64_t> idx(size_t(s.N * s.H * s.k));
  // Random indices with repeats of the same sub-key rows (the scatter into dS must add them).
  for (auto& x : idx) x = ctx.randint(0, s.n) * s.n + ctx.randint(0, std::min<int64_t>(s.n, 5));
  DevBuf<T> dq(q, "q"), dsk(sk, "subkeys");
  DevBuf<G> dg(g, "grad_scores");
  DevBuf<int64_t> di(idx, "indices");
  DevBuf<T> gq(size_t(s.N * s.H * 2 * s.half), "grad_q"), gk(size_t(s.H * 2 * s.n * s.half), "grad_subkeys");
  midus::pk_topk_backward<EmuDev, T, G>(dev, dg.get(), di.get(), dq.get(), dsk.get(), need_q ? gq.get() : nullptr,
                                        need_k ? gk.get() : nullptr, s.N, s.H, s.half, s.n, s.k, chunk_tokens);
  if (chunk_tokens > 0 && need_k)
    EMU_EXPECT(dev.launches["pk_topk_bwd"] == int(midus::ceil_div(s.N, chunk_tokens)), "token chunks: ",
               dev.launches["pk_topk_bwd"]);
  std::vector<double> wq(gq.size(), 0.0), wk(gk.size(), 0.0);
  for (int64_t t = 0; t < s.N; ++t)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t m = 0; m < s.k; ++m) {
        const size_t e = size_t((t * s.H + h) * s.k + m);
        const double gv = to_double(g[e]);
        const int64_t ab[2] = {idx[e] / s.n, idx[e] % s.n};
        for (int p = 0; p < 2; ++p)
          for (int64_t d = 0; d < s.half; ++d) {
            const size_t qi = size_t((t * s.H + h) * 2 * s.half + p * s.half + d);
            const size_t ki = size_t(((h * 2 + p) * s.n + ab[p]) * s.half + d);
            wq[qi] += gv * to_double(sk[ki]);
            wk[ki] += gv * to_double(q[qi]);
          }
      }
  if (need_q) {
    ctx.digest(gq.get(), gq.size());
    expect_close(gq.get(), wq, "grad_q");
  }
  if (need_k) {
    ctx.digest(gk.get(), gk.size());
    expect_close(gk.get(), wk, "grad_subkeys", 2.0);
  }
}
EMU_CASE("pk_bwd_f32_both") { backward_case<float, float>(ctx, 90, {19, 2, 8, 40, 7}, true, true); }
EMU_CASE("pk_bwd_f32_k64_q_only") { backward_case<float, float>(ctx, 90, {5, 2, 4, 70, 64}, true, false); }
EMU_CASE("pk_bwd_f64_subkeys_only") { backward_case<double, double>(ctx, 80, {11, 3, 5, 33, 9}, false, true); }
EMU_CASE("pk_bwd_bf16_native_grad") { backward_case<bf16, bf16>(ctx, 90, {13, 2, 8, 50, 12}, true, true); }
EMU_CASE("pk_bwd_bf16_fp32_grad") { backward_case<bf16, float>(ctx, 90, {10, 1, 16, 64, 33}, true, true); }
EMU_CASE("pk_bwd_f16_native_grad") { backward_case<f16, f16>(ctx, 86, {9, 2, 6, 41, 5}, true, true); }
// Several dS chunks: grad_subkeys accumulates over them (the GEMM's accumulate flag).
EMU_CASE("pk_bwd_f32_token_chunks") { backward_case<float, float>(ctx, 90, {23, 2, 4, 30, 6}, true, true, 7); }
EMU_CASE("pk_bwd_bf16_token_chunks") { backward_case<bf16, float>(ctx, 90, {17, 1, 8, 20, 3}, false, true, 5); }
EMU_CASE("pk_bwd_f32_n4096") { backward_case<float, float>(ctx, 86, {3, 1, 2, 4096, 16}, true, true); }

// ---- limits of the launch logic -------------------------------------------------------------------
EMU_CASE("pk_limits_raise") {
  EmuDev dev(90);
  DevBuf<float> q(64, "q"), sk(2 * 4097 * 1, "sk"), sc(65 * 2, "scores");
  DevBuf<int64_t> id(65 * 2, "ids");
  auto expect_error = [&](int64_t n, int64_t k, const char* what) {
    try {
      midus::pk_topk_forward(dev, q.get(), sk.get(), sc.get(), id.get(), 1, 1, 1, n, k);
    } catch (const midus_emu::HostCheckError& e) {
      EMU_EXPECT(std::string(e.what()).find(what) != std::string::npos, "message ", e.what());
      return;
    }
    fail("no error for n = ", n, ", k = ", k);
  };
  expect_error(4097, 4, "n <= 4096");
  expect_error(100, 65, "k <= 64");
}

}  // namespace
