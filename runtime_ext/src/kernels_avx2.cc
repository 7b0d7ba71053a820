// AVX2 + FMA kernels, compiled per function (__attribute__((target))) so the library keeps an
// x86-64 baseline; chosen at run time by SelectKernels (kernels.cc). See kernels.h for layouts.
#include <immintrin.h>

#include <array>

#include "kernels_i8g.h"

namespace lowbit {
namespace detail {
namespace {

// ---- AVX2 + FMA (LB_AVX2: kernels_i8g.h) ----------------------------------------------------

LB_AVX2 inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of codes (one 32-chunk) -> 32 codes (0..15): low lane = the 16 even k, high lane =
// the 16 odd k. Broadcast-load + per-lane shift: no cross-lane shuffle.
LB_AVX2 inline __m256i Codes32(const uint8_t* p) {
  const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sh = _mm256_srlv_epi32(x, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0));
  return _mm256_and_si256(sh, _mm256_set1_epi8(0x0F));
}

// Codes -> int8 values via the 16-entry table in both lanes (int8 path).
LB_AVX2 inline __m256i Unpack32(const uint8_t* p, __m256i lut16) {
  return _mm256_shuffle_epi8(lut16, Codes32(p));
}

LB_AVX2 inline __m256i Lut16(Format f) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(IntTable(f))));
}

// Float path: every table value (an integer of magnitude <= 12, or such an integer times the
// format's multiplier: at most 4 significant bits) is a float32 whose low 16 bits are zero, so
// two byte tables (bits 16-23 and 24-31) plus in-lane interleaves with zero build the float32 bit
// patterns directly: no int->float conversion. Two sets: the integer table (IntTable, the GEMV
// kernels scale by mult * s per block) and the value table (ValueTable, for decoding value * s
// exactly as the fallback does: mult * s is inexact when s is subnormal).
struct FloatBytes {
  uint8_t b2[16], b3[16];
};
const FloatBytes& FloatBytesOf(Format f, bool values = false) {
  static const std::array<FloatBytes, 8> tables = [] {
    std::array<FloatBytes, 8> out{};
    const Format fs[4] = {Format::kDint4, Format::kNvfp4, Format::kInt4, Format::kMxfp4};
    for (int v = 0; v < 2; ++v)
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < 16; ++c) {
          const float x = v ? ValueTable(fs[i])[c] : static_cast<float>(IntTable(fs[i])[c]);
          uint32_t bits;
          std::memcpy(&bits, &x, sizeof(bits));  // low 16 bits are 0 (see above)
          FloatBytes& t = out[4 * v + static_cast<int>(fs[i])];
          t.b2[c] = static_cast<uint8_t>(bits >> 16);
          t.b3[c] = static_cast<uint8_t>(bits >> 24);
        }
    return out;
  }();
  return tables[4 * int(values) + static_cast<int>(f)];
}

struct F32Luts {
  __m256i b2, b3;
};

LB_AVX2 inline F32Luts LoadF32Luts(Format f, bool values = false) {
  const FloatBytes& t = FloatBytesOf(f, values);
  return {_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.b2))),
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.b3)))};
}

// One 32-chunk -> four vectors of 8 float values; v0, v1 hold k 0..15 and v2, v3 k 16..31, each
// 8-group of k as [4 even | 4 odd] (the float activation order, chunk 8).
LB_AVX2 inline void Floats32(const uint8_t* p, const F32Luts& t, __m256& v0, __m256& v1,
                             __m256& v2, __m256& v3) {
  const __m256i c = Codes32(p);
  const __m256i lo = _mm256_shuffle_epi8(t.b2, c), hi = _mm256_shuffle_epi8(t.b3, c);
  const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
  const __m256i z = _mm256_setzero_si256();
  // Per lane: w0 words = k 0..14 step 2 (low lane) / 1..15 (high lane); w1 = k 16..30 / 17..31.
  // unpack*_epi16 keeps lanes, so a vector = [4 even k (low lane) | 4 odd k (high lane)]: in
  // memory order that is lanes 0-3 then 4-7, matching [even4 | odd4] of an 8-group.
  v0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w0));
  v1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w0));
  v2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w1));
  v3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w1));
}

// fl(scale * global) of scale i; the scale dtype is a template parameter so the hot loops carry
// no per-block branch.
template <bool kBytes>
inline float Sc(const Weight& w, int64_t i) {
  return (kBytes ? w.byte_table[w.scale_u8[i]] : w.scale_f32[i]) * w.global;
}

// Scales of blocks b and b+1 of row n, times mult: [s0, s0, s1, s1] in both lanes (lane layout
// of the int32 partial sums of a 32-chunk holding two 16-blocks).
template <bool kBytes>
LB_AVX2 inline __m256 PairScales(const Weight& w, int64_t i, float mult) {
  const __m128 p = _mm_set_ps(Sc<kBytes>(w, i + 1), Sc<kBytes>(w, i + 1), Sc<kBytes>(w, i), Sc<kBytes>(w, i));
  const __m128 m = _mm_mul_ps(p, _mm_set1_ps(mult));
  return _mm256_set_m128(m, m);
}

// Float dot of one 32-chunk as a short tree (no long FMA chain).
LB_AVX2 inline __m256 ChunkSumF32(const uint8_t* p, const float* a, const F32Luts& t) {
  __m256 v0, v1, v2, v3;
  Floats32(p, t, v0, v1, v2, v3);
  const __m256 s01 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(a + 8), _mm256_mul_ps(v0, _mm256_loadu_ps(a)));
  const __m256 s23 =
      _mm256_fmadd_ps(v3, _mm256_loadu_ps(a + 24), _mm256_mul_ps(v2, _mm256_loadu_ps(a + 16)));
  return _mm256_add_ps(s01, s23);
}

// Float dot of one block of `cpb` 32-chunks (8 partial sums).
LB_AVX2 inline __m256 BlockSumF32(const uint8_t* p, const float* a, int64_t cpb, const F32Luts& t) {
  if (cpb == 1) return ChunkSumF32(p, a, t);
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), v0, v1, v2, v3;
  for (int64_t j = 0; j < cpb; ++j, p += 16, a += 32) {
    Floats32(p, t, v0, v1, v2, v3);
    b0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(a), b0);
    b1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(a + 8), b1);
    b0 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(a + 16), b0);
    b1 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(a + 24), b1);
  }
  return _mm256_add_ps(b0, b1);
}

template <bool kBytes>
LB_AVX2 void GemvF32T(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  const F32Luts t = LoadF32Luts(w.format);
  const int8_t* ilut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  const int64_t K32 = w.K & ~int64_t(31), cpb = w.block / 32;  // chunks per block (block >= 32)
  __m256 v0, v1, v2, v3;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    int64_t si = n * w.nb;  // running scale index
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    if (w.block == 16) {
      for (int64_t k = 0; k < K32; k += 32, si += 2) {
        Floats32(row + k / 2, t, v0, v1, v2, v3);  // v0, v1: block si; v2, v3: block si + 1
        const __m256 b0 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(ap + k + 8),
                                          _mm256_mul_ps(v0, _mm256_loadu_ps(ap + k)));
        const __m256 b1 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(ap + k + 24),
                                          _mm256_mul_ps(v2, _mm256_loadu_ps(ap + k + 16)));
        acc0 = _mm256_fmadd_ps(b0, _mm256_set1_ps(Sc<kBytes>(w, si) * mult), acc0);
        acc1 = _mm256_fmadd_ps(b1, _mm256_set1_ps(Sc<kBytes>(w, si + 1) * mult), acc1);
      }
    } else {
      // Two blocks per step into two accumulators: consecutive blocks never wait on one FMA
      // chain (a runtime-selected accumulator would be spilled to the stack by GCC).
      const int64_t pair_end = w.nb & ~int64_t(1);
      const uint8_t* p = row;
      const float* a = ap;
      for (int64_t b = 0; b < pair_end; b += 2, si += 2) {
        const __m256 s0 = BlockSumF32(p, a, cpb, t);
        const __m256 s1 = BlockSumF32(p + 16 * cpb, a + 32 * cpb, cpb, t);
        acc0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(Sc<kBytes>(w, si) * mult), acc0);
        acc1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(Sc<kBytes>(w, si + 1) * mult), acc1);
        p += 32 * cpb;
        a += 64 * cpb;
      }
      if (pair_end < w.nb) {
        acc0 = _mm256_fmadd_ps(BlockSumF32(p, a, cpb, t), _mm256_set1_ps(Sc<kBytes>(w, si) * mult),
                               acc0);
        ++si;
      }
    }
    float total = HSum(_mm256_add_ps(acc0, acc1));
    if (K32 < w.K)  // K % 32 == 16: one trailing 16-chunk, necessarily one 16-block
      total += RangeDot<float, float>(row, ap, ilut, K32, w.K, w.K, kChunkF32) *
               (Sc<kBytes>(w, si) * mult);
    y[n] = total;
  }
}

// int8 dot of one 32-chunk: |w| (unsigned) x sign-corrected a (signed) -> 8 int32 sums; int32
// lane j covers bytes 4j..4j+3 of the chunk-permuted vectors. |w| <= 12, |a| <= 127: the
// int16 pair sums (<= 3048) never saturate.
LB_AVX2 inline __m256i Dot32I8(const uint8_t* p, const int8_t* aq, __m256i lut) {
  const __m256i wv = Unpack32(p, lut);
  const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq));
  const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv));
  return _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
}

LB_AVX2 inline __m256i BlockDotI8(const uint8_t* p, const int8_t* a, int64_t cpb, __m256i lut) {
  __m256i d = Dot32I8(p, a, lut);
  for (int64_t j = 1; j < cpb; ++j) d = _mm256_add_epi32(d, Dot32I8(p + 16 * j, a + 32 * j, lut));
  return d;
}

template <bool kBytes>
LB_AVX2 void GemvI8T(const int8_t* aq, float a_scale, const Weight& w, float* y, int64_t n0,
                     int64_t n1) {
  const __m256i lut = Lut16(w.format);
  const int8_t* ilut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  const int64_t K32 = w.K & ~int64_t(31), cpb = w.block / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    int64_t si = n * w.nb;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    if (w.block == 16) {
      // int32 lanes 0,1,4,5 belong to the first 16-block of the chunk, 2,3,6,7 to the second.
      int64_t k = 0;
      for (; k + 64 <= K32; k += 64, si += 4) {
        const __m256i d0 = Dot32I8(row + k / 2, aq + k, lut);
        const __m256i d1 = Dot32I8(row + k / 2 + 16, aq + k + 32, lut);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), PairScales<kBytes>(w, si, mult), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), PairScales<kBytes>(w, si + 2, mult), acc1);
      }
      if (k < K32) {
        const __m256i d = Dot32I8(row + k / 2, aq + k, lut);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), PairScales<kBytes>(w, si, mult), acc0);
        si += 2;
      }
    } else {
      const int64_t pair_end = w.nb & ~int64_t(1);
      const uint8_t* p = row;
      const int8_t* a = aq;
      for (int64_t b = 0; b < pair_end; b += 2, si += 2) {
        const __m256i d0 = BlockDotI8(p, a, cpb, lut);
        const __m256i d1 = BlockDotI8(p + 16 * cpb, a + 32 * cpb, cpb, lut);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(Sc<kBytes>(w, si) * mult), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(Sc<kBytes>(w, si + 1) * mult),
                               acc1);
        p += 32 * cpb;
        a += 64 * cpb;
      }
      if (pair_end < w.nb) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(BlockDotI8(p, a, cpb, lut)),
                               _mm256_set1_ps(Sc<kBytes>(w, si) * mult), acc0);
        ++si;
      }
    }
    float total = HSum(_mm256_add_ps(acc0, acc1));
    if (K32 < w.K)
      total += static_cast<float>(RangeDot<int8_t, int32_t>(row, aq, ilut, K32, w.K, w.K,
                                                            kChunkI8)) * (Sc<kBytes>(w, si) * mult);
    y[n] = total * a_scale;
  }
}

LB_AVX2 void GemvF32Avx2(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  if (w.scale_u8) GemvF32T<true>(ap, w, y, n0, n1);
  else GemvF32T<false>(ap, w, y, n0, n1);
}

LB_AVX2 void GemvI8Avx2(const int8_t* aq, float a_scale, const Weight& w, float* y, int64_t n0,
                        int64_t n1) {
  if (w.scale_u8) GemvI8T<true>(aq, a_scale, w, y, n0, n1);
  else GemvI8T<false>(aq, a_scale, w, y, n0, n1);
}

// 16 E4M3 codes (natural k order) -> two vectors of 8 floats in the float activation order
// ([4 even | 4 odd] per 8-group). E4M3 -> float32 without a table: the 7 magnitude bits moved
// to the float's exponent/mantissa position and multiplied by 2^120 (exact for normals and
// subnormals alike); the sign bit copied. The NaN codes S.1111.111 (0x7F, 0xFF) give NaN, as the
// E4M3 table (E4m3Table, the fallback's ml_dtypes cast) does.
LB_AVX2 inline __m256 E4m3ToF32(__m128i bytes) {
  const __m256i d = _mm256_cvtepu8_epi32(bytes);
  const __m256i m7 = _mm256_and_si256(d, _mm256_set1_epi32(0x7F));
  const __m256i mag = _mm256_slli_epi32(m7, 20);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(d, _mm256_set1_epi32(0x80)), 24);
  const __m256 two120 = _mm256_castsi256_ps(_mm256_set1_epi32(0x7B800000));
  const __m256 v = _mm256_or_ps(_mm256_mul_ps(_mm256_castsi256_ps(mag), two120),
                                _mm256_castsi256_ps(sign));
  const __m256 nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m7, _mm256_set1_epi32(0x7F)));
  return _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
}

LB_AVX2 inline void Fp8Floats16(const uint8_t* p, __m256& v0, __m256& v1) {
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m128i x = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), order);
  v0 = E4m3ToF32(x);
  v1 = E4m3ToF32(_mm_srli_si128(x, 8));
}

LB_AVX2 void GemvMixedAvx2(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  const F32Luts t = LoadF32Luts(w.format);
  const int64_t K32 = w.K & ~int64_t(31);
  __m256 v0, v1, v2, v3;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    int64_t i = w.fp8_first[n];
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
      const int64_t b = k / 16;
      Floats32(row + k / 2, t, v0, v1, v2, v3);
      float s0, s1;
      if (w.IsFp8(n, b)) {
        Fp8Floats16(w.fp8_codes + 16 * i, v0, v1);
        s0 = w.fp8_scales[i++];
      } else {
        s0 = w.Scale(n, b) * 0.5f;
      }
      if (w.IsFp8(n, b + 1)) {
        Fp8Floats16(w.fp8_codes + 16 * i, v2, v3);
        s1 = w.fp8_scales[i++];
      } else {
        s1 = w.Scale(n, b + 1) * 0.5f;
      }
      const __m256 b0 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(ap + k + 8),
                                        _mm256_mul_ps(v0, _mm256_loadu_ps(ap + k)));
      const __m256 b1 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(ap + k + 24),
                                        _mm256_mul_ps(v2, _mm256_loadu_ps(ap + k + 16)));
      acc0 = _mm256_fmadd_ps(b0, _mm256_set1_ps(s0), acc0);
      acc1 = _mm256_fmadd_ps(b1, _mm256_set1_ps(s1), acc1);
    }
    float total = HSum(_mm256_add_ps(acc0, acc1));
    if (K32 < w.K) {  // trailing 16-block
      float tail = 0;
      GemvMixedScalarTail(ap, w, n, K32 / 16, i, tail);
      total += tail;
    }
    y[n] = total;
  }
}

LB_AVX2 void DecodeRowsAvx2(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                            float* out, int64_t ldo) {
  const F32Luts t = LoadF32Luts(w.format, /*values=*/true);
  const int64_t kend = k0 + kc, k32 = k0 + (kc & ~int64_t(31));
  __m256 v0, v1, v2, v3;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = w.codes + n * (w.K / 2);
    float* o = out + r * ldo - k0;
    // Block index of k and of k + 16, advanced without a division per chunk.
    int64_t b = k0 / w.block, next = (b + 1) * w.block;
    for (int64_t k = k0; k < k32; k += 32) {
      Floats32(row + k / 2, t, v0, v1, v2, v3);
      // value * s, the fallback's decode bit for bit. k..k+15 lie in block b, k+16..k+31 in
      // block b or b + 1 (block 16).
      if (k >= next) ++b, next += w.block;
      const __m256 s0 = _mm256_set1_ps(w.Scale(n, b));
      if (k + 16 >= next) ++b, next += w.block;
      const __m256 s1 = _mm256_set1_ps(w.Scale(n, b));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(v0, s0));
      _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(v1, s0));
      _mm256_storeu_ps(o + k + 16, _mm256_mul_ps(v2, s1));
      _mm256_storeu_ps(o + k + 24, _mm256_mul_ps(v3, s1));
    }
    if (k32 < kend) DecodeRowsScalar(w, n, 1, k32, kend - k32, o + k32, ldo);
  }
}

// 16 x 6 register tile: 12 named accumulators (an array of __m256 makes GCC spill them).
LB_AVX2 void MicroAvx2(const float* ap, const float* wd, int64_t ldw, int64_t kc, float* c,
                       int64_t ldc) {
#define LB_LOAD(r) __m256 c##r##0 = _mm256_loadu_ps(c + r * ldc), c##r##1 = _mm256_loadu_ps(c + r * ldc + 8)
  LB_LOAD(0); LB_LOAD(1); LB_LOAD(2); LB_LOAD(3); LB_LOAD(4); LB_LOAD(5);
#undef LB_LOAD
  const float *w0 = wd, *w1 = wd + ldw, *w2 = wd + 2 * ldw, *w3 = wd + 3 * ldw,
              *w4 = wd + 4 * ldw, *w5 = wd + 5 * ldw;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 a0 = _mm256_loadu_ps(ap + k * 16), a1 = _mm256_loadu_ps(ap + k * 16 + 8);
    __m256 b;
#define LB_STEP(r)                                \
  b = _mm256_broadcast_ss(w##r + k);              \
  c##r##0 = _mm256_fmadd_ps(a0, b, c##r##0);      \
  c##r##1 = _mm256_fmadd_ps(a1, b, c##r##1)
    LB_STEP(0); LB_STEP(1); LB_STEP(2); LB_STEP(3); LB_STEP(4); LB_STEP(5);
#undef LB_STEP
  }
#define LB_STORE(r) _mm256_storeu_ps(c + r * ldc, c##r##0); _mm256_storeu_ps(c + r * ldc + 8, c##r##1)
  LB_STORE(0); LB_STORE(1); LB_STORE(2); LB_STORE(3); LB_STORE(4); LB_STORE(5);
#undef LB_STORE
}

LB_AVX2 float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  float s = HSum(_mm256_add_ps(s0, s1));
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

LB_AVX2 bool F32ScalesTameAvx2(const float* s, int64_t n, float global) {
  ScaleRange range;
  range.Fold<true>(s, n, global);
  if (range.InRange()) return true;  // the common case; else 0, NaN or untame somewhere
  const __m256 g = _mm256_set1_ps(global), hi = _mm256_set1_ps(kTameHi),
               lo = _mm256_set1_ps(kTameLo), zero = _mm256_setzero_ps(),
               abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // the branch-free TameScale, 8 at a time
    const __m256 a = _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(s + i), g), abs_mask);
    const __m256 small = _mm256_and_ps(_mm256_cmp_ps(a, lo, _CMP_LT_OQ),
                                       _mm256_cmp_ps(a, zero, _CMP_NEQ_OQ));
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a, hi, _CMP_GT_OQ), small));
  }
  return _mm256_movemask_ps(bad) == 0 && F32ScalesTameScalar(s + i, n - i, global);
}

LB_AVX2 bool ByteScalesTameAvx2(const Weight& w, const uint8_t* b, int64_t n) {
  if (!w.byte_ranges_exact) return ByteScalesTameScalar(w, b, n);
  const __m256i mask = _mm256_set1_epi8(char(w.byte_code_mask)), lo = _mm256_set1_epi8(char(w.byte_lo)),
                span = _mm256_set1_epi8(char(w.byte_hi - w.byte_lo)),
                f0 = _mm256_set1_epi8(char(w.byte_free[0])), f1 = _mm256_set1_epi8(char(w.byte_free[1]));
  __m256i ok = _mm256_set1_epi8(-1);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i m = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)), mask);
    const __m256i d = _mm256_sub_epi8(m, lo);  // unsigned d <= span <=> max(d, span) == span
    const __m256i in = _mm256_cmpeq_epi8(_mm256_max_epu8(d, span), span);
    const __m256i free = _mm256_or_si256(_mm256_cmpeq_epi8(m, f0), _mm256_cmpeq_epi8(m, f1));
    ok = _mm256_and_si256(ok, _mm256_or_si256(in, free));
  }
  return _mm256_movemask_epi8(ok) == -1 && ByteScalesTameScalar(w, b + i, n - i);
}


// ---- int8_group (kernels.h) -------------------------------------------------------------------
LB_AVX2 bool QuantizeI8gAvx2(const float* a, int64_t K, int64_t G, int8_t* q, float* s,
                             int32_t* lane_sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  bool tame = true;
  for (int64_t g0 = 0; g0 < K; g0 += G) {  // G % 32 == 0
    __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    for (int64_t i = g0; i < g0 + G; i += 8) {
      const __m256 v = _mm256_loadu_ps(a + i);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
    }
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (float l : lanes) amax = l > amax ? l : amax;  // a NaN lane is flagged by vnan
    const bool nan = _mm256_movemask_ps(vnan) != 0;
    const float sg = s[g0 / G] = GroupScale127(amax, nan);
    tame = tame && !nan && TameGroupScale(amax, sg);
    if (!tame) continue;
    const __m256 vs = _mm256_set1_ps(sg);
    for (int64_t i = g0; i < g0 + G; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j)  // nearbyint(a / s): the division and rounding of GroupQuant
        v[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(a + i + 8 * j), vs),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lane_sum + i / kI8gLane),
                       _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(p, order));
    }
  }
  return tame;
}

// One 64-chunk: 32 bytes of codes -> u of the 32 even k (lo) and the 32 odd k (hi); int32 lane j
// = sum of u * q over k0 + 8j .. k0 + 8j + 7, plus corr (int16 pair sums <= 2 * 2 * 24 * 127).
LB_AVX2 inline __m256i Dot64(const uint8_t* p, const int8_t* q, const int32_t* corr, __m256i lut) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, m));
  const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), m));
  const __m256i s16 = _mm256_add_epi16(
      _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
      _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32))));
  return _mm256_add_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)));
}

// The 32-chunk tail (K % 64 == 32): four lanes.
LB_AVX2 inline __m128i Dot32(const uint8_t* p, const int8_t* q, const int32_t* corr, __m256i lut) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x0F);
  const __m128i l = _mm256_castsi256_si128(lut);
  const __m128i lo = _mm_shuffle_epi8(l, _mm_and_si128(x, m));
  const __m128i hi = _mm_shuffle_epi8(l, _mm_and_si128(_mm_srli_epi16(x, 4), m));
  const __m128i s16 = _mm_add_epi16(
      _mm_maddubs_epi16(lo, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q))),
      _mm_maddubs_epi16(hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  return _mm_add_epi32(_mm_madd_epi16(s16, _mm_set1_epi16(1)),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(corr)));
}

#define LB_I8G LB_AVX2
LB_AVX2 inline __m256i OffsetLut(Format f) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(OffsetTable(f))));
}
#include "kernels_i8g_gemv.inc"
#undef LB_I8G

LB_AVX2 void UnpackI8gAvx2(const Weight& w, int64_t n0, int64_t nr, int64_t tile_rows, uint8_t* u,
                           float* sc) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(OffsetTable(w.format)));
  const __m256i lut2 = _mm256_broadcastsi128_si256(lut), m2 = _mm256_set1_epi8(0x0F);
  const __m128i m = _mm_set1_epi8(0x0F);
  const int64_t K = w.K;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = w.codes + (n0 + r) * (K / 2);
    uint8_t* out = u + r * K;
    int64_t j = 0;
    for (; j + 32 <= K / 2; j += 32) {  // natural k order: interleave low and high nibbles
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
      const __m256i lo = _mm256_shuffle_epi8(lut2, _mm256_and_si256(x, m2));
      const __m256i hi = _mm256_shuffle_epi8(lut2, _mm256_and_si256(_mm256_srli_epi16(x, 4), m2));
      const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);  // in lanes
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j), _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
    for (; j < K / 2; j += 16) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
      const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(x, m));
      const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 4), m));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * j), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * j + 16), _mm_unpackhi_epi8(lo, hi));
    }
    for (int64_t b = 0; b < w.nb; ++b) sc[r * w.nb + b] = w.Scale(n0 + r, b);
  }
  std::memset(u + nr * K, kI8gOffset, static_cast<size_t>((tile_rows - nr) * K));
  std::fill(sc + nr * w.nb, sc + tile_rows * w.nb, 0.0f);
}

// c[i * ldc + j] = lane i of vector j (j < 4, i < 8): 4 x 4 transposes inside the 128-bit lanes.
LB_AVX2 inline void StoreTransposed4(__m256 a, __m256 b, __m256 c4, __m256 d, float* c, int64_t ldc) {
  const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
  const __m256 t2 = _mm256_unpacklo_ps(c4, d), t3 = _mm256_unpackhi_ps(c4, d);
  const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                       _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
  for (int j = 0; j < 4; ++j) {  // u[j], 128-bit lane L: row 4L + j
    _mm_storeu_ps(c + j * ldc, _mm256_castps256_ps128(u[j]));
    _mm_storeu_ps(c + (4 + j) * ldc, _mm256_extractf128_ps(u[j], 1));
  }
}

// 16 panel rows (two ymm of 8) x 4 weight rows per step; float sums per block in `acc` (L1).
LB_AVX2 void GemmI8gAvx2(const I8gPanel& a, const I8gTile& t, int64_t K, int64_t block, float* c,
                         int64_t ldc) {
  const int64_t nb = K / block;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float acc[4][kI8gPanel];
  for (int64_t r0 = 0; r0 < t.nr; r0 += 4) {
    std::fill(&acc[0][0], &acc[0][0] + 4 * kI8gPanel, 0.0f);
    const uint8_t* u = t.u + r0 * K;
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.corr + b * 16));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.corr + b * 16 + 8));
      __m256i i00 = c0, i01 = c1, i10 = c0, i11 = c1, i20 = c0, i21 = c1, i30 = c0, i31 = c1;
      const int8_t* q = a.q + b * block * kI8gPanel;
      const uint8_t* ub = u + b * block;
      for (int64_t s = 0; s < block; s += 8, q += 128) {  // two k4 steps: int16 sums <= 12192
        const __m256i a00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i a01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
        const __m256i a10 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64));
        const __m256i a11 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 96));
#define LB_STEP(r)                                                                                \
  {                                                                                               \
    int32_t d0, d1;                                                                               \
    std::memcpy(&d0, ub + r * K + s, 4);                                                          \
    std::memcpy(&d1, ub + r * K + s + 4, 4);                                                      \
    const __m256i w0 = _mm256_set1_epi32(d0), w1 = _mm256_set1_epi32(d1);                         \
    i##r##0 = _mm256_add_epi32(i##r##0, _mm256_madd_epi16(_mm256_add_epi16(                       \
        _mm256_maddubs_epi16(w0, a00), _mm256_maddubs_epi16(w1, a10)), ones));                    \
    i##r##1 = _mm256_add_epi32(i##r##1, _mm256_madd_epi16(_mm256_add_epi16(                       \
        _mm256_maddubs_epi16(w0, a01), _mm256_maddubs_epi16(w1, a11)), ones));                    \
  }
        LB_STEP(0) LB_STEP(1) LB_STEP(2) LB_STEP(3)
#undef LB_STEP
      }
      const __m256 s0 = _mm256_loadu_ps(a.asc + b * 16), s1 = _mm256_loadu_ps(a.asc + b * 16 + 8);
#define LB_ACC(r)                                                                                 \
  {                                                                                               \
    const __m256 sc = _mm256_set1_ps(t.sc[(r0 + r) * nb + b]);                                    \
    _mm256_store_ps(acc[r], _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i##r##0), sc), s0,   \
                                            _mm256_load_ps(acc[r])));                             \
    _mm256_store_ps(acc[r] + 8, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i##r##1), sc),   \
                                                s1, _mm256_load_ps(acc[r] + 8)));                 \
  }
      LB_ACC(0) LB_ACC(1) LB_ACC(2) LB_ACC(3)
#undef LB_ACC
    }
    for (int h = 0; h < 2; ++h)
      StoreTransposed4(_mm256_load_ps(acc[0] + 8 * h), _mm256_load_ps(acc[1] + 8 * h),
                       _mm256_load_ps(acc[2] + 8 * h), _mm256_load_ps(acc[3] + 8 * h),
                       c + 8 * h * ldc + r0, ldc);
  }
}
// ---- lowbit::Hadamard rows (see kernels.h): the scalar set's operations, 8 lanes at a time ----
// Butterflies of distance 1, 2 and 4 stay inside a vector: the partner lanes come from a permute
// and each lane keeps a + b or a - b of the same two floats as the scalar loop. GCC contracts a
// vector mul + add into an FMA by default; here that would change bits against the scalar set.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
LB_AVX2 inline __m256 InVectorButterflies(__m256 v) {
  __m256 s = _mm256_permute_ps(v, 0xB1);  // h = 1: lanes (0 1)(2 3)...
  v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
  s = _mm256_permute_ps(v, 0x4E);  // h = 2: lanes (0 2)(1 3)...
  v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
  s = _mm256_permute2f128_ps(v, v, 0x01);  // h = 4: the two halves
  return _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
}

LB_AVX2 void HadamardRowAvx2(const float* x, const float* base, int64_t c, int64_t p, float scale,
                             float* z, float* y) {
  if (p < 8) return HadamardRowScalar(x, base, c, p, scale, z, y);
  const int64_t n = c * p;
  float* v = c > 1 ? z : y;
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 8)
    _mm256_storeu_ps(v + j, InVectorButterflies(_mm256_mul_ps(_mm256_loadu_ps(x + j), sc)));
  for (int64_t i = 0; i < c; ++i) {
    float* chunk = v + i * p;
    for (int64_t h = 8; h < p; h *= 2)
      for (int64_t s = 0; s < p; s += 2 * h)
        for (int64_t j = s; j < s + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(chunk + j), b = _mm256_loadu_ps(chunk + j + h);
          _mm256_storeu_ps(chunk + j, _mm256_add_ps(a, b));
          _mm256_storeu_ps(chunk + j + h, _mm256_sub_ps(a, b));
        }
  }
  if (c == 1) return;
  for (int64_t k = 0; k < c; ++k) {
    for (int64_t j = 0; j < p; j += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < c; ++i)  // mul then add: no fused multiply-add, as the scalar set
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(base[i * c + k]), _mm256_loadu_ps(v + i * p + j)));
      _mm256_storeu_ps(y + k * p + j, acc);
    }
  }
}
#pragma GCC pop_options

}  // namespace

const Kernels kAvx2{"avx2",           GemvF32Avx2,   GemvI8Avx2, DecodeRowsAvx2,
                    MicroAvx2,        GemvMixedAvx2, DotAvx2,    F32ScalesTameAvx2,
                    ByteScalesTameAvx2, QuantizeI8gAvx2, 64, GemvI8g, UnpackI8gAvx2,
                    GemmI8gAvx2, HadamardRowAvx2};

}  // namespace detail
}  // namespace lowbit
