// AVX-512 VNNI kernels of act_mode=int8_group (vpdpbusd: unsigned weight bytes u = v + 12 times
// signed int8 activations, four products per int32 lane; see kernels.h): a 256-bit GEMV (the
// AVX2 GEMV's order, chunk 64) and a 512-bit GEMM micro-kernel. Compiled per function
// (__attribute__((target))) like the AVX2 set, whose other kernels the VNNI set reuses
// (kernels.cc, SelectKernels). Integer sums are exact; the float epilogue is the AVX2 kernels'.
#include "kernels_i8g.h"

// GCC 12's AVX-512 headers build "undefined" vectors by self-initialization, which -Wall reports
// wherever an intrinsic using one is inlined (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lowbit {
namespace detail {
namespace {

#define LB_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

// Codes -> u = v + kI8gOffset through vpermb: the 16-entry table repeated, so the index bits
// above the nibble (the neighbouring nibble's, after the shift) need no mask.
LB_VNNI inline __m256i OffsetLut(Format f) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(OffsetTable(f))));
}

// One 64-chunk: 32 bytes of codes -> u of the 32 even k (lo) and the 32 odd k (hi); the int32
// lanes start from corr (-12 * the lane's sum of q) and end as the lane's sum of v * q.
LB_VNNI inline __m256i Dot64(const uint8_t* p, const int8_t* q, const int32_t* corr, __m256i lut) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_permutexvar_epi8(x, lut);
  const __m256i hi = _mm256_permutexvar_epi8(_mm256_srli_epi16(x, 4), lut);
  const __m256i d = _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)),
                                        lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  return _mm256_dpbusd_epi32(d, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
}

// The 32-chunk tail (K % 64 == 32): four lanes.
LB_VNNI inline __m128i Dot32(const uint8_t* p, const int8_t* q, const int32_t* corr, __m256i lut) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i l = _mm256_castsi256_si128(lut);
  const __m128i lo = _mm_permutexvar_epi8(x, l);
  const __m128i hi = _mm_permutexvar_epi8(_mm_srli_epi16(x, 4), l);
  const __m128i d = _mm_dpbusd_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(corr)), lo,
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm_dpbusd_epi32(d, hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
}

// The AVX2 set's GEMV with vpdpbusd. 256-bit: measured faster than a 512-bit version (128-chunks)
// on this Zen 4, from DRAM (28 vs 30-35 us on 576x1536 and 1536x576, one thread) and from L2 (20
// vs 23 us) alike.
#define LB_I8G LB_VNNI
#include "kernels_i8g_gemv.inc"
#undef LB_I8G

// c[i * ldc + j] = lane i of vector j (j < 4, i < 16): 4 x 4 transposes inside the 128-bit
// lanes, then one 16-byte store per panel row.
LB_VNNI inline void StoreTransposed4(__m512 a, __m512 b, __m512 c4, __m512 d, float* c, int64_t ldc) {
  const __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
  const __m512 t2 = _mm512_unpacklo_ps(c4, d), t3 = _mm512_unpackhi_ps(c4, d);
  const __m512 u[4] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE),
                       _mm512_shuffle_ps(t1, t3, 0x44), _mm512_shuffle_ps(t1, t3, 0xEE)};
  for (int j = 0; j < 4; ++j) {  // u[j], 128-bit lane L: row 4L + j
    _mm_storeu_ps(c + j * ldc, _mm512_castps512_ps128(u[j]));
    _mm_storeu_ps(c + (4 + j) * ldc, _mm512_extractf32x4_ps(u[j], 1));
    _mm_storeu_ps(c + (8 + j) * ldc, _mm512_extractf32x4_ps(u[j], 2));
    _mm_storeu_ps(c + (12 + j) * ldc, _mm512_extractf32x4_ps(u[j], 3));
  }
}

// 16 panel rows (one zmm) x 12 weight rows: 12 int32 and 12 float accumulators in registers.
// Per block: int32 dots (vpdpbusd from the corr start), then fl(fl(d * sc) * asc) into the floats.
// 512-bit: 1.25x faster than a 256-bit micro-kernel (two ymm x 6 rows) on this Zen 4 (634 vs
// 792 us on M=128, 576x1536, one thread; ~78% of one vpdpbusd zmm per cycle).
LB_VNNI void GemmI8gVnni(const I8gPanel& a, const I8gTile& t, int64_t K, int64_t block, float* c,
                         int64_t ldc) {
  const int64_t nb = K / block;
  for (int64_t r0 = 0; r0 < t.nr; r0 += 12) {
    const uint8_t* u = t.u + r0 * K;
    const float* sc = t.sc + r0 * nb;
#define LB_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define LB_DECL(r) __m512 f##r = _mm512_setzero_ps(); __m512i i##r;
    LB_ALL(LB_DECL)
#undef LB_DECL
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i corr = _mm512_loadu_si512(a.corr + b * kI8gPanel);
#define LB_INIT(r) i##r = corr;
      LB_ALL(LB_INIT)
#undef LB_INIT
      const int8_t* q = a.q + b * block * kI8gPanel;
      const uint8_t* ub = u + b * block;
      for (int64_t s = 0; s < block; s += 4, q += 4 * kI8gPanel) {
        const __m512i av = _mm512_loadu_si512(q);
#define LB_DOT(r)                                                                                 \
  {                                                                                               \
    int32_t d;                                                                                    \
    std::memcpy(&d, ub + (r) * K + s, 4);                                                         \
    i##r = _mm512_dpbusd_epi32(i##r, _mm512_set1_epi32(d), av);                                   \
  }
        LB_ALL(LB_DOT)
#undef LB_DOT
      }
      const __m512 as = _mm512_loadu_ps(a.asc + b * kI8gPanel);
#define LB_ACC(r)                                                                                 \
  f##r = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i##r), _mm512_set1_ps(sc[(r) * nb + b])), \
                         as, f##r);
      LB_ALL(LB_ACC)
#undef LB_ACC
    }
    StoreTransposed4(f0, f1, f2, f3, c + r0, ldc);
    StoreTransposed4(f4, f5, f6, f7, c + r0 + 4, ldc);
    StoreTransposed4(f8, f9, f10, f11, c + r0 + 8, ldc);
#undef LB_ALL
  }
}

}  // namespace

void SetVnniKernels(Kernels& k) {
  k.name = "avx512vnni";
  k.i8g_chunk = 64;
  k.gemv_i8g = GemvI8g;
  k.gemm_i8g = GemmI8gVnni;
}

}  // namespace detail
}  // namespace lowbit
