// AVX2 helpers of the int8_group GEMV shared by kernels_avx2.cc and kernels_vnni.cc (a VNNI
// function may inline them: AVX2 is a subset of its target). See kernels.h for the scheme.
#pragma once

#include <immintrin.h>

#include "kernels_impl.h"

#define LB_AVX2 __attribute__((target("avx2,fma")))

namespace lowbit {
namespace detail {

// The weight block scales of the lanes of a 64-chunk (8 lanes) or 32-chunk (4 lanes): lane j
// covers k0 + 8j .. k0 + 8j + 7, so its block is k0 / block + (8j) / block for power-of-two
// blocks (a chunk starts on a block boundary or lies inside one block). A 64-chunk holds
// kScales = 4 (block 16), 2 (block 32) or 1 (block >= 64) scales, a 32-chunk max(1, kScales / 2):
// exactly those are loaded (no masked load: vmaskmovps made the GEMV 1.5x slower from DRAM),
// spread over the lanes and, when kGlobal, multiplied by global_scale (fl(scale * global);
// without it the scale itself, global being 1).
struct LaneScales {
  __m256i idx8;
  __m128i idx4;
  int shift;  // log2(block)
  __m256 global;
};

LB_AVX2 inline LaneScales MakeLaneScales(int64_t block, float global) {
  alignas(32) int32_t x8[8];
  for (int j = 0; j < 8; ++j) x8[j] = static_cast<int32_t>(8 * j / block);
  const __m256i idx8 = _mm256_load_si256(reinterpret_cast<const __m256i*>(x8));
  return {idx8, _mm256_castsi256_si128(idx8), __builtin_ctzll(static_cast<uint64_t>(block)),
          _mm256_set1_ps(global)};
}

// Scales per block size: 16 -> 4, 32 -> 2, >= 64 -> 1 (the kScales template argument).
inline int ScalesPerChunk64(int64_t block) { return block == 16 ? 4 : block == 32 ? 2 : 1; }

template <int kCount>
LB_AVX2 inline __m128 LoadScales(const float* p) {
  if (kCount == 4) return _mm_loadu_ps(p);
  if (kCount == 2) return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  return _mm_load_ss(p);
}

template <int kScales, bool kGlobal>
LB_AVX2 inline __m256 Scales8(const float* srow, int64_t k0, const LaneScales& l) {
  const float* p = srow + (k0 >> l.shift);
  const __m256 s =
      kScales == 1 ? _mm256_broadcast_ss(p)
                   : _mm256_permutevar8x32_ps(_mm256_castps128_ps256(LoadScales<kScales>(p)), l.idx8);
  return kGlobal ? _mm256_mul_ps(s, l.global) : s;
}

template <int kScales, bool kGlobal>
LB_AVX2 inline __m128 Scales4(const float* srow, int64_t k0, const LaneScales& l) {
  const float* p = srow + (k0 >> l.shift);
  const __m128 s = kScales == 4 ? _mm_permutevar_ps(LoadScales<2>(p), l.idx4) : _mm_broadcast_ss(p);
  return kGlobal ? _mm_mul_ps(s, _mm256_castps256_ps128(l.global)) : s;
}

// Whether scales fl(s * global) lie in [2^-96, 2^96] (hence tame), on their bit patterns:
// |v| - bits(2^-96) as unsigned never exceeds bits(2^96) - bits(2^-96). Rows are folded in one at
// a time, three operations per 8 scales.
struct ScaleRange {
  __m256i worst;
  uint32_t tail = 0;

  LB_AVX2 ScaleRange() : worst(_mm256_setzero_si256()) {}

  template <bool kGlobal>
  LB_AVX2 void Fold8(const float* s, __m256 g) {
    const __m256 v = kGlobal ? _mm256_mul_ps(_mm256_loadu_ps(s), g) : _mm256_loadu_ps(s);
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
    worst = _mm256_max_epu32(worst, _mm256_sub_epi32(bits, _mm256_set1_epi32(0x0F800000)));
  }
  template <bool kGlobal>
  LB_AVX2 void Fold(const float* s, int64_t n, float global) {
    const __m256 g = _mm256_set1_ps(global);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) Fold8<kGlobal>(s + i, g);
    if (i < n && n >= 8) {  // the last 8 again, overlapping: no scalar tail
      Fold8<kGlobal>(s + n - 8, g);
      i = n;
    }
    for (; i < n; ++i) {
      const float v = kGlobal ? s[i] * global : s[i];
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof(bits));
      tail = std::max(tail, (bits & 0x7FFFFFFFu) - 0x0F800000u);
    }
  }
  LB_AVX2 bool InRange() const {
    const __m256i span = _mm256_set1_epi32(0x6F800000 - 0x0F800000);
    const __m256i over = _mm256_cmpeq_epi32(_mm256_max_epu32(worst, span), span);  // lanes <= span
    return _mm256_movemask_epi8(over) == -1 && tail <= 0x6F800000u - 0x0F800000u;
  }
};

// [sum a, sum b, sum c, sum d] of four vectors.
LB_AVX2 inline __m128 Sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 x = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

// y[n] for n in [n0, n1) from `row_sum(n)` (a vector whose lanes sum to y[n]): four rows share
// one horizontal reduction. The rows are computed in order (named temporaries: argument order
// is unspecified, and rows fetched backwards defeat the hardware prefetcher: measured 3x slower
// from DRAM).
template <typename RowSum>
LB_AVX2 inline void StoreRowSums(float* y, int64_t n0, int64_t n1, RowSum& row_sum) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const __m256 r0 = row_sum(n), r1 = row_sum(n + 1), r2 = row_sum(n + 2), r3 = row_sum(n + 3);
    _mm_storeu_ps(y + n, Sum4(r0, r1, r2, r3));
  }
  const __m256 z = _mm256_setzero_ps();
  for (; n < n1; ++n) y[n] = _mm_cvtss_f32(Sum4(row_sum(n), z, z, z));
}

}  // namespace detail
}  // namespace lowbit
