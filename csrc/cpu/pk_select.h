// Two-stage product-key selection on the CPU (docs/design.md §1.1): the top k of each half's n
// sub-key scores, then the top k of their sums, in the selection order
//   larger score first; NaN before everything (as torch.sort descending); among equal scores
//   the lower id first (sub-key id at stage 1, a * n + b at stage 2).
//
// Stage 2 looks only at pairs (i, j) of the stage-1 lists with (i+1)(j+1) <= k: every other
// pair has at least k kept pairs whose sum is >= its own (sums are monotone in i and j, and the
// kept pairs in its upper-left box number >= k). Rounding can make such a sum *equal* to the
// k-th kept one, and then the id decides, so rows where a pruned pair ties the k-th value are
// redone over the ties too: the result is exactly the full k x k selection.
//
// Two implementations: a scalar one (any n, k; fp32 and fp64) and, where the CPU has AVX2, one
// that runs 8 rows at once through branch-free sorting networks (fp32, n <= 256, k <= 32).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MIDUS_HAS_AVX2_PATH 1
#define MIDUS_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define MIDUS_HAS_AVX2_PATH 0
#endif

namespace midus {

// An int32 whose signed order is the float order, with NaN above +inf and -0 folded into +0.
// The map is its own inverse on non-NaN values (key_to_float undoes it).
inline int32_t float_key(float s) {
  if (std::isnan(s)) return INT32_MAX;
  s += 0.0f;
  int32_t b;
  std::memcpy(&b, &s, sizeof(b));
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}
inline float key_to_float(int32_t key) {
  const int32_t b = key ^ ((key >> 31) & 0x7FFFFFFF);
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
// (key, id) packed so that a larger uint64 ranks first.
inline uint64_t pack(int32_t key, uint32_t id) {
  return (uint64_t(uint32_t(key) ^ 0x80000000u) << 32) | uint64_t(~id);
}
inline uint32_t packed_id(uint64_t p) { return ~uint32_t(p & 0xFFFFFFFFu); }

template <typename acc_t>
inline bool ranks_before(acc_t sa, int64_t ia, acc_t sb, int64_t ib) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

// Scalar selection of one row; reusable buffers. fp32 uses packed integer keys, fp64 a comparator.
struct ScalarSelector {
  int64_t n, k;
  std::vector<uint64_t> packed;
  std::vector<int64_t> ids, a, b, cand_id;
  std::vector<double> cand;
  ScalarSelector(int64_t n_, int64_t k_)
      : n(n_), k(k_), packed(std::max(n_, k_ * k_)), ids(std::max(n_, k_ * k_)), a(k_), b(k_) {}

  void top_half(const float* s, int64_t* out) {
    for (int64_t i = 0; i < n; ++i) packed[i] = pack(float_key(s[i]), uint32_t(i));
    std::partial_sort(packed.begin(), packed.begin() + k, packed.begin() + n, std::greater<uint64_t>());
    for (int64_t i = 0; i < k; ++i) out[i] = packed_id(packed[i]);
  }
  void top_half(const double* s, int64_t* out) {
    for (int64_t i = 0; i < n; ++i) ids[i] = i;
    std::partial_sort(ids.begin(), ids.begin() + k, ids.begin() + n,
                      [s](int64_t x, int64_t y) { return ranks_before<double>(s[x], x, s[y], y); });
    std::copy(ids.begin(), ids.begin() + k, out);
  }

  template <typename acc_t, typename scalar_t>
  void run(const acc_t* s1, const acc_t* s2, scalar_t* score_out, int64_t* id_out) {
    top_half(s1, a.data());
    top_half(s2, b.data());
    cand.clear();
    cand_id.clear();
    // The pruning needs finite stage-1 scores (inf + -inf is NaN, which ranks first): rows with
    // an inf or NaN among them score all k x k pairs.
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) finite = finite && std::isfinite(s1[a[i]]) && std::isfinite(s2[b[i]]);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k && (!finite || (i + 1) * (j + 1) <= k); ++j) add(s1, s2, i, j);
    const int64_t kept = static_cast<int64_t>(cand.size());
    select<acc_t>();
    // Pruned pairs whose sum equals the k-th value: the id decides, so include them and redo.
    const acc_t kth = static_cast<acc_t>(cand[ids[k - 1]]);
    for (int64_t i = 1; finite && i < k; ++i)
      for (int64_t j = k / (i + 1); j < k && static_cast<acc_t>(s1[a[i]] + s2[b[j]]) == kth; ++j) add(s1, s2, i, j);
    if (static_cast<int64_t>(cand.size()) > kept) select<acc_t>();
    for (int64_t j = 0; j < k; ++j) {
      score_out[j] = static_cast<scalar_t>(static_cast<acc_t>(cand[ids[j]]));
      id_out[j] = cand_id[ids[j]];
    }
  }

 private:
  template <typename acc_t>
  void add(const acc_t* s1, const acc_t* s2, int64_t i, int64_t j) {
    cand.push_back(static_cast<double>(static_cast<acc_t>(s1[a[i]] + s2[b[j]])));  // the sum rounded in acc_t
    cand_id.push_back(a[i] * n + b[j]);
  }
  template <typename acc_t>
  void select() {
    const int64_t m = static_cast<int64_t>(cand.size());
    if (ids.size() < static_cast<size_t>(m)) ids.resize(m);
    for (int64_t c = 0; c < m; ++c) ids[c] = c;
    std::partial_sort(ids.begin(), ids.begin() + k, ids.begin() + m, [&](int64_t x, int64_t y) {
      return ranks_before<double>(cand[x], cand_id[x], cand[y], cand_id[y]);
    });
  }
};

#if MIDUS_HAS_AVX2_PATH
constexpr int kSimdMaxN = 256;
constexpr int kSimdMaxK = 32;

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// Compare-exchange of 8 lanes: afterwards (ka, ia) ranks before (kb, ib) in every lane.
MIDUS_TARGET_AVX2 inline void ce8(__m256i& ka, __m256i& ia, __m256i& kb, __m256i& ib) {
  const __m256i swap = _mm256_or_si256(
      _mm256_cmpgt_epi32(kb, ka), _mm256_and_si256(_mm256_cmpeq_epi32(kb, ka), _mm256_cmpgt_epi32(ia, ib)));
  const __m256i nka = _mm256_blendv_epi8(ka, kb, swap), nkb = _mm256_blendv_epi8(kb, ka, swap);
  const __m256i nia = _mm256_blendv_epi8(ia, ib, swap), nib = _mm256_blendv_epi8(ib, ia, swap);
  ka = nka; kb = nkb; ia = nia; ib = nib;
}

// Bitonic sort of B (a power of two) lanes-vectors into selection order.
MIDUS_TARGET_AVX2 inline void sort8(__m256i* K, __m256i* I, int B) {
  for (int size = 2; size <= B; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1)
      for (int i = 0; i < B; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          if ((i & size) == 0) ce8(K[i], I[i], K[j], I[j]);
          else ce8(K[j], I[j], K[i], I[i]);
        }
      }
}
MIDUS_TARGET_AVX2 inline void merge8(__m256i* K, __m256i* I, int B) {
  for (int stride = B >> 1; stride > 0; stride >>= 1)
    for (int i = 0; i < B; ++i) {
      const int j = i ^ stride;
      if (j > i) ce8(K[i], I[i], K[j], I[j]);
    }
}
// The best B of m (key, id) vectors, in selection order, into (KO, IO). Padding ranks last.
MIDUS_TARGET_AVX2 inline void topk8(const __m256i* K, const __m256i* I, int m, int B, __m256i* KO, __m256i* IO) {
  const __m256i pad_k = _mm256_set1_epi32(INT32_MIN), pad_i = _mm256_set1_epi32(INT32_MAX);
  __m256i BK[kSimdMaxK], BI[kSimdMaxK];
  for (int i = 0; i < B; ++i) { KO[i] = i < m ? K[i] : pad_k; IO[i] = i < m ? I[i] : pad_i; }
  sort8(KO, IO, B);
  for (int s = B; s < m; s += B) {
    for (int i = 0; i < B; ++i) { BK[i] = s + i < m ? K[s + i] : pad_k; BI[i] = s + i < m ? I[s + i] : pad_i; }
    sort8(BK, BI, B);
    // The better of KO[i] and BK[B-1-i] forms a bitonic sequence holding the best B of both.
    for (int i = 0; i < B; ++i) ce8(KO[i], IO[i], BK[B - 1 - i], BI[B - 1 - i]);
    merge8(KO, IO, B);
  }
}

MIDUS_TARGET_AVX2 inline __m256i keys_of(__m256 v) {
  v = _mm256_add_ps(v, _mm256_setzero_ps());  // -0 -> +0
  const __m256i b = _mm256_castps_si256(v);
  const __m256i key = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32(0x7FFFFFFF)));
  return _mm256_blendv_epi8(key, _mm256_set1_epi32(INT32_MAX), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
MIDUS_TARGET_AVX2 inline __m256 floats_of(__m256i key) {
  return _mm256_castsi256_ps(
      _mm256_xor_si256(key, _mm256_and_si256(_mm256_srai_epi32(key, 31), _mm256_set1_epi32(0x7FFFFFFF))));
}

// Selects 8 rows at once. Lane l reads s1 + l * stride and s2 + l * stride (n scores each) and
// writes k scores and ids at score_out[l * out_stride], id_out[l * out_stride]. Returns a bit
// mask of lanes where a pruned pair ties the k-th value, or a stage-1 score is not finite: the
// caller redoes those rows exactly.
template <typename scalar_t>
MIDUS_TARGET_AVX2 int select8(const float* s1, const float* s2, int64_t stride, int n, int k, scalar_t* score_out,
                              int64_t* id_out, int64_t out_stride) {
  int B = 1;
  while (B < k) B <<= 1;
  __m256i K[kSimdMaxN], I[kSimdMaxN], AK[kSimdMaxK], AI[kSimdMaxK], BK[kSimdMaxK], BI[kSimdMaxK];
  const __m256i lane_off = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                              _mm256_set1_epi32(static_cast<int>(stride)));
  for (int half = 0; half < 2; ++half) {
    const float* s = half == 0 ? s1 : s2;
    for (int i = 0; i < n; ++i) {
      K[i] = keys_of(_mm256_i32gather_ps(s + i, lane_off, 4));
      I[i] = _mm256_set1_epi32(i);
    }
    topk8(K, I, n, B, half == 0 ? AK : BK, half == 0 ? AI : BI);
  }
  __m256 av[kSimdMaxK], bv[kSimdMaxK];
  __m256i an[kSimdMaxK];
  const __m256i nv = _mm256_set1_epi32(n);
  for (int i = 0; i < k; ++i) {
    av[i] = floats_of(AK[i]);
    bv[i] = floats_of(BK[i]);
    an[i] = _mm256_mullo_epi32(AI[i], nv);
  }
  int m = 0;
  for (int i = 0; i < k; ++i)
    for (int j = 0; (i + 1) * (j + 1) <= k; ++j) {
      K[m] = keys_of(_mm256_add_ps(av[i], bv[j]));
      I[m] = _mm256_add_epi32(an[i], BI[j]);
      ++m;
    }
  __m256i OK[kSimdMaxK], OI[kSimdMaxK];
  topk8(K, I, m, B, OK, OI);
  __m256i tie = _mm256_setzero_si256();
  for (int i = 0; i < k; ++i) {  // lanes with a non-finite stage-1 score: redone without pruning
    const __m256 da = _mm256_sub_ps(av[i], av[i]), db = _mm256_sub_ps(bv[i], bv[i]);  // NaN iff not finite
    tie = _mm256_or_si256(tie, _mm256_castps_si256(_mm256_cmp_ps(da, db, _CMP_UNORD_Q)));
  }
  for (int i = 1; i < k; ++i) {
    const int j = k / (i + 1);
    if (j < k) tie = _mm256_or_si256(tie, _mm256_cmpeq_epi32(keys_of(_mm256_add_ps(av[i], bv[j])), OK[k - 1]));
  }
  alignas(32) float sc[kSimdMaxK][8];
  alignas(32) int32_t id[kSimdMaxK][8];
  for (int j = 0; j < k; ++j) {
    _mm256_store_ps(sc[j], floats_of(OK[j]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(id[j]), OI[j]);
  }
  for (int l = 0; l < 8; ++l)
    for (int j = 0; j < k; ++j) {
      score_out[l * out_stride + j] = static_cast<scalar_t>(sc[j][l]);
      id_out[l * out_stride + j] = id[j][l];
    }
  return _mm256_movemask_ps(_mm256_castsi256_ps(tie));
}
#endif

}  // namespace midus
