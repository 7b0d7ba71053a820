// Scalar and AVX2 kernels for 4-bit weights; see kernels.h for layouts and contracts.
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <memory>

namespace lowbit {

void PermuteRow(const float* a, float* out, int64_t K) {
  for (int64_t c = 0; c < K; c += 16)
    for (int i = 0; i < 8; ++i) {
      out[c + i] = a[c + 2 * i];
      out[c + 8 + i] = a[c + 2 * i + 1];
    }
}

void PermuteRowI8(const int8_t* a, int8_t* out, int64_t K) {
  for (int64_t c = 0; c < K; c += 16)
    for (int i = 0; i < 8; ++i) {
      out[c + i] = a[c + 2 * i];
      out[c + 8 + i] = a[c + 2 * i + 1];
    }
}

void QuantizeRowI8(const float* a, int8_t* q, int64_t K, float scale) {
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(a[k] / scale);
    v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
    q[k] = static_cast<int8_t>(v);
  }
}

namespace {

// ---- scalar (portable baseline) -----------------------------------------------------------

// Integer dot of one 16-chunk: 8 bytes of codes against chunk-permuted activations.
template <typename A, typename Acc>
inline Acc ChunkDot(const uint8_t* bytes, const A* ap, const int8_t* lut) {
  Acc s = 0;
  for (int i = 0; i < 8; ++i) {
    s += static_cast<Acc>(ap[i]) * lut[bytes[i] & 0xF];
    s += static_cast<Acc>(ap[8 + i]) * lut[bytes[i] >> 4];
  }
  return s;
}

void GemvF32Scalar(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  const int8_t* lut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  const int64_t nb = w.K / w.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    float acc = 0;
    for (int64_t b = 0; b < nb; ++b) {
      float bs = 0;
      for (int64_t c = b * w.block; c < (b + 1) * w.block; c += 16)
        bs += ChunkDot<float, float>(row + c / 2, ap + c, lut);
      acc += bs * (w.Scale(n, b) * mult);
    }
    y[n] = acc;
  }
}

void GemvI8Scalar(const int8_t* aq, float a_scale, const Weight& w, float* y, int64_t n0,
                  int64_t n1) {
  const int8_t* lut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  const int64_t nb = w.K / w.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    float acc = 0;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t bs = 0;
      for (int64_t c = b * w.block; c < (b + 1) * w.block; c += 16)
        bs += ChunkDot<int8_t, int32_t>(row + c / 2, aq + c, lut);
      acc += static_cast<float>(bs) * (w.Scale(n, b) * mult);
    }
    y[n] = acc * a_scale;
  }
}

void DecodeRowsScalar(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                      float* out, int64_t ldo) {
  const float* table = ValueTable(w.format);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = w.codes + (n0 + r) * (w.K / 2);
    for (int64_t c = k0; c < k0 + kc; c += 16) {
      const float s = w.Scale(n0 + r, c / w.block);
      float* o = out + r * ldo + (c - k0);
      for (int i = 0; i < 8; ++i) {
        o[i] = table[row[c / 2 + i] & 0xF] * s;
        o[8 + i] = table[row[c / 2 + i] >> 4] * s;
      }
    }
  }
}

void MicroScalar(const float* ap, const float* wd, int64_t ldw, int64_t kc, int nr, float* c,
                 int64_t ldc) {
  for (int r = 0; r < nr; ++r)
    for (int i = 0; i < 16; ++i) {
      float s = c[r * ldc + i];
      for (int64_t k = 0; k < kc; ++k) s += ap[k * 16 + i] * wd[r * ldw + k];
      c[r * ldc + i] = s;
    }
}

// ---- AVX2 + FMA -----------------------------------------------------------------------------
#define LB_AVX2 __attribute__((target("avx2,fma")))

LB_AVX2 inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of codes (32 k) -> two 16-chunks of int8 values, each [8 even k | 8 odd k].
LB_AVX2 inline void Unpack32(const uint8_t* p, __m128i lut, __m128i& c0, __m128i& c1) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(x, mask));
  const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 4), mask));
  c0 = _mm_unpacklo_epi64(lo, hi);
  c1 = _mm_unpackhi_epi64(lo, hi);
}

LB_AVX2 inline __m256 Lo8(__m128i c) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)); }
LB_AVX2 inline __m256 Hi8(__m128i c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
}

// One row's sum over [0, K32) where K32 = K rounded down to 32; a 16-tail is done by scalar code.
LB_AVX2 float GemvRowF32Avx2(const float* ap, const uint8_t* row, const Weight& w, int64_t n,
                             __m128i lut, float mult) {
  const int64_t K32 = w.K & ~int64_t(31);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128i c0, c1;
  if (w.block == 16) {
    for (int64_t k = 0; k < K32; k += 32) {
      Unpack32(row + k / 2, lut, c0, c1);
      __m256 b0 = _mm256_mul_ps(Lo8(c0), _mm256_loadu_ps(ap + k));
      __m256 b1 = _mm256_mul_ps(Lo8(c1), _mm256_loadu_ps(ap + k + 16));
      b0 = _mm256_fmadd_ps(Hi8(c0), _mm256_loadu_ps(ap + k + 8), b0);
      b1 = _mm256_fmadd_ps(Hi8(c1), _mm256_loadu_ps(ap + k + 24), b1);
      acc0 = _mm256_fmadd_ps(b0, _mm256_set1_ps(w.Scale(n, k / 16) * mult), acc0);
      acc1 = _mm256_fmadd_ps(b1, _mm256_set1_ps(w.Scale(n, k / 16 + 1) * mult), acc1);
    }
  } else {
    for (int64_t k = 0; k < K32; k += w.block) {
      __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
      for (int64_t j = k; j < k + w.block; j += 32) {
        Unpack32(row + j / 2, lut, c0, c1);
        b0 = _mm256_fmadd_ps(Lo8(c0), _mm256_loadu_ps(ap + j), b0);
        b1 = _mm256_fmadd_ps(Hi8(c0), _mm256_loadu_ps(ap + j + 8), b1);
        b0 = _mm256_fmadd_ps(Lo8(c1), _mm256_loadu_ps(ap + j + 16), b0);
        b1 = _mm256_fmadd_ps(Hi8(c1), _mm256_loadu_ps(ap + j + 24), b1);
      }
      acc0 = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), _mm256_set1_ps(w.Scale(n, k / w.block) * mult),
                             acc0);
    }
  }
  return HSum(_mm256_add_ps(acc0, acc1));
}

LB_AVX2 void GemvF32Avx2(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(IntTable(w.format)));
  const int8_t* ilut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  const int64_t K32 = w.K & ~int64_t(31);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    float acc = GemvRowF32Avx2(ap, row, w, n, lut, mult);
    if (K32 < w.K)  // K % 32 == 16: one trailing 16-block (block must be 16 then)
      acc += ChunkDot<float, float>(row + K32 / 2, ap + K32, ilut) * (w.Scale(n, K32 / 16) * mult);
    y[n] = acc;
  }
}

// int8 dot of 32 k: |w| (unsigned) x sign-corrected a (signed) -> 8 int32 partial sums; lanes
// 0-3 belong to the first 16-chunk, 4-7 to the second. |w| <= 12, |a| <= 127: no saturation.
LB_AVX2 inline __m256i Dot32I8(const uint8_t* p, const int8_t* aq, __m128i lut) {
  __m128i c0, c1;
  Unpack32(p, lut, c0, c1);
  const __m256i wv = _mm256_set_m128i(c1, c0);
  const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq));
  const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv));
  return _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
}

LB_AVX2 void GemvI8Avx2(const int8_t* aq, float a_scale, const Weight& w, float* y, int64_t n0,
                        int64_t n1) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(IntTable(w.format)));
  const int8_t* ilut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  const int64_t K32 = w.K & ~int64_t(31);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    __m256 acc = _mm256_setzero_ps();
    if (w.block == 16) {
      for (int64_t k = 0; k < K32; k += 32) {
        const __m256i d = Dot32I8(row + k / 2, aq + k, lut);
        const __m256 s = _mm256_set_m128(_mm_set1_ps(w.Scale(n, k / 16 + 1) * mult),
                                         _mm_set1_ps(w.Scale(n, k / 16) * mult));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc);
      }
    } else {
      for (int64_t k = 0; k < K32; k += w.block) {
        __m256i d = _mm256_setzero_si256();
        for (int64_t j = k; j < k + w.block; j += 32)
          d = _mm256_add_epi32(d, Dot32I8(row + j / 2, aq + j, lut));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d),
                              _mm256_set1_ps(w.Scale(n, k / w.block) * mult), acc);
      }
    }
    float total = HSum(acc);
    if (K32 < w.K)
      total += static_cast<float>(ChunkDot<int8_t, int32_t>(row + K32 / 2, aq + K32, ilut)) *
               (w.Scale(n, K32 / 16) * mult);
    y[n] = total * a_scale;
  }
}

LB_AVX2 void DecodeRowsAvx2(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                            float* out, int64_t ldo) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(IntTable(w.format)));
  const float mult = IntMultiplier(w.format);
  const int64_t kend = k0 + kc, k32 = k0 + ((kend - k0) & ~int64_t(31));
  __m128i c0, c1;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = w.codes + n * (w.K / 2);
    float* o = out + r * ldo - k0;
    for (int64_t k = k0; k < k32; k += 32) {
      Unpack32(row + k / 2, lut, c0, c1);
      // value * s == int_value * (mult * s) exactly: mult is a power of two.
      const __m256 s0 = _mm256_set1_ps(w.Scale(n, k / w.block) * mult);
      const __m256 s1 = _mm256_set1_ps(w.Scale(n, (k + 16) / w.block) * mult);
      _mm256_storeu_ps(o + k, _mm256_mul_ps(Lo8(c0), s0));
      _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(Hi8(c0), s0));
      _mm256_storeu_ps(o + k + 16, _mm256_mul_ps(Lo8(c1), s1));
      _mm256_storeu_ps(o + k + 24, _mm256_mul_ps(Hi8(c1), s1));
    }
    if (k32 < kend) DecodeRowsScalar(w, n, 1, k32, kend - k32, o + k32, ldo);
  }
}

template <int NR>
LB_AVX2 void MicroAvx2T(const float* ap, const float* wd, int64_t ldw, int64_t kc, float* c,
                        int64_t ldc) {
  __m256 acc[NR][2];
  for (int r = 0; r < NR; ++r) {
    acc[r][0] = _mm256_loadu_ps(c + r * ldc);
    acc[r][1] = _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 a0 = _mm256_loadu_ps(ap + k * 16), a1 = _mm256_loadu_ps(ap + k * 16 + 8);
    for (int r = 0; r < NR; ++r) {
      const __m256 b = _mm256_broadcast_ss(wd + r * ldw + k);
      acc[r][0] = _mm256_fmadd_ps(a0, b, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a1, b, acc[r][1]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

LB_AVX2 void MicroAvx2(const float* ap, const float* wd, int64_t ldw, int64_t kc, int nr, float* c,
                       int64_t ldc) {
  switch (nr) {
    case 6: return MicroAvx2T<6>(ap, wd, ldw, kc, c, ldc);
    case 5: return MicroAvx2T<5>(ap, wd, ldw, kc, c, ldc);
    case 4: return MicroAvx2T<4>(ap, wd, ldw, kc, c, ldc);
    case 3: return MicroAvx2T<3>(ap, wd, ldw, kc, c, ldc);
    case 2: return MicroAvx2T<2>(ap, wd, ldw, kc, c, ldc);
    default: return MicroAvx2T<1>(ap, wd, ldw, kc, c, ldc);
  }
}

const Kernels kScalar{"scalar", GemvF32Scalar, GemvI8Scalar, DecodeRowsScalar, MicroScalar};
const Kernels kAvx2{"avx2", GemvF32Avx2, GemvI8Avx2, DecodeRowsAvx2, MicroAvx2};

// ---- multi-row drivers ------------------------------------------------------------------------
constexpr int64_t kMR = 16;   // activation rows per micro tile (two ymm)
constexpr int64_t kNR = 6;    // weight rows per micro tile
constexpr int64_t kNB = 48;   // weight rows per thread task
constexpr int64_t kKC = 256;  // K block kept in L1/L2

// Float GEMM for M >= kGemmMinRows: W decoded per (task rows x kKC) and multiplied against a
// packed, chunk-permuted copy of A: Apack[mb][k][16].
void GemmF32(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
             const Weight& w, float* Y) {
  const int64_t K = w.K, N = w.N, MB = (M + kMR - 1) / kMR, Mpad = MB * kMR;
  std::vector<float> apack(static_cast<size_t>(Mpad * K), 0.0f);
  ParallelRanges(ctx, static_cast<size_t>(MB), 1, [&](size_t b0, size_t b1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t mb = int64_t(b0); mb < int64_t(b1); ++mb)
      for (int64_t i = 0; i < kMR && mb * kMR + i < M; ++i) {
        PermuteRow(A + (mb * kMR + i) * K, row.data(), K);
        float* dst = apack.data() + mb * K * kMR + i;
        for (int64_t k = 0; k < K; ++k) dst[k * kMR] = row[k];
      }
  });
  ParallelRanges(ctx, static_cast<size_t>(N), kNB, [&](size_t s0, size_t s1) {
    const int64_t n0 = int64_t(s0), nb = int64_t(s1) - n0;
    std::vector<float> wdec(static_cast<size_t>(nb * kKC)), cbuf(static_cast<size_t>(nb * Mpad), 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      kern.decode_rows(w, n0, nb, k0, kc, wdec.data(), kKC);
      for (int64_t mb = 0; mb < MB; ++mb) {
        const float* ap = apack.data() + mb * K * kMR + k0 * kMR;
        for (int64_t r = 0; r < nb; r += kNR)
          kern.micro(ap, wdec.data() + r * kKC, kKC, kc, int(std::min(kNR, nb - r)),
                     cbuf.data() + r * Mpad + mb * kMR, Mpad);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < nb; ++r) Y[m * N + n0 + r] = cbuf[r * Mpad + m];
  });
}

constexpr int64_t kGemmMinRows = 4;
constexpr int64_t kGemvGrain = 16;  // weight rows per thread task in GEMV

}  // namespace

const Kernels& ScalarKernels() { return kScalar; }

const Kernels& SelectKernels() {
  static const Kernels* chosen = [] {
    const char* isa = std::getenv("LOWBIT_ORT_ISA");
    if (isa != nullptr && std::string(isa) == "scalar") return &kScalar;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kAvx2;
    return &kScalar;
  }();
  return *chosen;
}

void MatMulF32(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
               const Weight& w, float* Y) {
  if (M >= kGemmMinRows) return GemmF32(ctx, kern, A, M, w, Y);
  std::vector<float> ap(static_cast<size_t>(w.K));
  for (int64_t m = 0; m < M; ++m) {
    PermuteRow(A + m * w.K, ap.data(), w.K);
    float* y = Y + m * w.N;
    ParallelRanges(ctx, static_cast<size_t>(w.N), kGemvGrain, [&](size_t n0, size_t n1) {
      kern.gemv_f32(ap.data(), w, y, int64_t(n0), int64_t(n1));
    });
  }
}

void MatMulI8(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
              const Weight& w, const float* row_scales, float* Y) {
  const int64_t K = w.K;
  std::vector<int8_t> q(static_cast<size_t>(K)), qp(static_cast<size_t>(K));
  if (M >= kGemmMinRows) {
    // Multi-row: the quantized activations (exact small integers times the row scale) go
    // through the float GEMM; the result differs from integer accumulation only by float
    // rounding of the sums.
    std::vector<float> deq(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) {
      QuantizeRowI8(A + m * K, q.data(), K, row_scales[m]);
      for (int64_t k = 0; k < K; ++k) deq[m * K + k] = q[k] * row_scales[m];
    }
    return GemmF32(ctx, kern, deq.data(), M, w, Y);
  }
  for (int64_t m = 0; m < M; ++m) {
    QuantizeRowI8(A + m * K, q.data(), K, row_scales[m]);
    PermuteRowI8(q.data(), qp.data(), K);
    float* y = Y + m * w.N;
    const float s = row_scales[m];
    ParallelRanges(ctx, static_cast<size_t>(w.N), kGemvGrain, [&](size_t n0, size_t n1) {
      kern.gemv_i8(qp.data(), s, w, y, int64_t(n0), int64_t(n1));
    });
  }
}

}  // namespace lowbit
