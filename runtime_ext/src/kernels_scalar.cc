// Portable scalar kernels (any x86-64): the baseline and the reference order of operations of
// the SIMD kernels (per-block sums, then the block scale). See kernels.h for layouts.
#include <array>

#include "kernels_impl.h"

namespace lowbit {

template <typename T>
static void PermuteRowT(const T* a, T* out, int64_t K, int64_t chunk) {
  // Same order as PermPos, without a division per element.
  for (int64_t base = 0; base < K; base += chunk) {
    const int64_t half = std::min(chunk, K - base) / 2;
    for (int64_t i = 0; i < half; ++i) {
      out[base + i] = a[base + 2 * i];
      out[base + half + i] = a[base + 2 * i + 1];
    }
  }
}

void PermuteRow(const float* a, float* out, int64_t K) { PermuteRowT(a, out, K, kChunkF32); }
void PermuteRowI8(const int8_t* a, int8_t* out, int64_t K) { PermuteRowT(a, out, K, kChunkI8); }

void PermuteRowI8g(const int8_t* q, int8_t* out, int64_t K, int64_t chunk) {
  int64_t base = 0;
  for (int64_t c = chunk; c >= 32; c /= 2)
    for (; base + c <= K; base += c)
      for (int64_t i = 0; i < c / 2; ++i) {
        out[base + i] = q[base + 2 * i];
        out[base + c / 2 + i] = q[base + 2 * i + 1];
      }
}

void QuantizeRowF(const float* a, float* q, int64_t K, float scale) {
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::nearbyint(a[k] / scale);
    q[k] = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);  // NaN passes through (compares false)
  }
}

namespace detail {

// Per-block sums first (integer in the int8 path), then scaled: the kernels' contract.
template <typename A, typename Acc>
float RowScalar(const A* ap, const Weight& w, int64_t n, int64_t chunk) {
  const uint8_t* row = w.codes + n * (w.K / 2);
  const int8_t* lut = IntTable(w.format);
  const float mult = IntMultiplier(w.format);
  float acc = 0;
  for (int64_t b = 0; b < w.nb; ++b)
    acc += static_cast<float>(RangeDot<A, Acc>(row, ap, lut, b * w.block, (b + 1) * w.block, w.K,
                                               chunk)) * (w.Scale(n, b) * mult);
  return acc;
}

void GemvF32Scalar(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) y[n] = RowScalar<float, float>(ap, w, n, kChunkF32);
}

void GemvI8Scalar(const int8_t* aq, float a_scale, const Weight& w, float* y, int64_t n0,
                  int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) y[n] = RowScalar<int8_t, int32_t>(aq, w, n, kChunkI8) * a_scale;
}

// k0 is a multiple of 8 and kc of 8 (float chunk), so the float order restarts at k0.
void DecodeRowsScalar(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                      float* out, int64_t ldo) {
  const float* table = ValueTable(w.format);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = w.codes + (n0 + r) * (w.K / 2);
    float* o = out + r * ldo - k0;
    for (int64_t k = k0; k < k0 + kc; ++k)
      o[PermPos(k, w.K, kChunkF32)] = table[Code(row, k)] * w.Scale(n0 + r, k / w.block);
  }
}

const float* E4m3Table() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> out{};
    for (int c = 0; c < 256; ++c) out[c] = DecodeE4M3(static_cast<uint8_t>(c));
    return out;
  }();
  return t.data();
}

// Index of the FP8 block that block b of row n is, when it is one.
int64_t Fp8Index(const Weight& w, int64_t n, int64_t b) {
  int64_t i = w.fp8_first[n];
  for (int64_t j = 0; j < b; ++j) i += w.IsFp8(n, j);
  return i;
}

void GemvMixedScalar(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1) {
  const int8_t* lut = IntTable(w.format);
  const float* e4m3 = E4m3Table();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    int64_t i = w.fp8_first[n];
    float acc = 0;
    for (int64_t b = 0; b < w.nb; ++b) {
      float s = 0;
      if (w.IsFp8(n, b)) {
        for (int64_t j = 0; j < 16; ++j)
          s += ap[PermPos(16 * b + j, w.K, kChunkF32)] * e4m3[w.fp8_codes[16 * i + j]];
        acc += s * w.fp8_scales[i++];
      } else {
        s = RangeDot<float, float>(row, ap, lut, 16 * b, 16 * b + 16, w.K, kChunkF32);
        acc += s * (w.Scale(n, b) * 0.5f);
      }
    }
    y[n] = acc;
  }
}

// The last block (b) of a row with K % 32 == 16, FP8 index i if it is FP8.
void GemvMixedScalarTail(const float* ap, const Weight& w, int64_t n, int64_t b, int64_t i,
                         float& out) {
  const float* e4m3 = E4m3Table();
  float s = 0;
  if (w.IsFp8(n, b)) {
    for (int64_t j = 0; j < 16; ++j)
      s += ap[PermPos(16 * b + j, w.K, kChunkF32)] * e4m3[w.fp8_codes[16 * i + j]];
    out = s * w.fp8_scales[i];
  } else {
    s = RangeDot<float, float>(w.codes + n * (w.K / 2), ap, IntTable(w.format), 16 * b, 16 * b + 16,
                               w.K, kChunkF32);
    out = s * (w.Scale(n, b) * 0.5f);
  }
}

// DecodeRowsScalar for mixed weights (both ISAs use it in the GEMM path).
void DecodeRowsMixed(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* out,
                     int64_t ldo) {
  const float* table = ValueTable(w.format);
  const float* e4m3 = E4m3Table();
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = w.codes + n * (w.K / 2);
    float* o = out + r * ldo - k0;
    int64_t i = Fp8Index(w, n, k0 / 16);
    for (int64_t b = k0 / 16; b < (k0 + kc) / 16; ++b) {
      const bool fp8 = w.IsFp8(n, b);
      const float s = fp8 ? w.fp8_scales[i] : w.Scale(n, b);
      for (int64_t k = 16 * b; k < 16 * b + 16; ++k)
        o[PermPos(k, w.K, kChunkF32)] =
            fp8 ? e4m3[w.fp8_codes[16 * i + (k - 16 * b)]] * s : table[Code(row, k)] * s;
      i += fp8;
    }
  }
}

void MicroScalar(const float* ap, const float* wd, int64_t ldw, int64_t kc, float* c,
                 int64_t ldc) {
  for (int r = 0; r < 6; ++r)
    for (int i = 0; i < 16; ++i) {
      float s = c[r * ldc + i];
      for (int64_t k = 0; k < kc; ++k) s += ap[k * 16 + i] * wd[r * ldw + k];
      c[r * ldc + i] = s;
    }
}

// Branch-free scans (the compiler vectorizes them): whether every value passes.
bool F32ScalesTameScalar(const float* s, int64_t n, float global) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !TameScale(s[i] * global);
  return bad == 0;
}

bool ByteScalesTameScalar(const Weight& w, const uint8_t* b, int64_t n) {
  int bad = 0;
  if (!w.byte_ranges_exact) {
    for (int64_t i = 0; i < n; ++i) bad |= !w.byte_tame[b[i]];
    return bad == 0;
  }
  const uint8_t mask = w.byte_code_mask, lo = w.byte_lo, span = uint8_t(w.byte_hi - w.byte_lo),
                f0 = w.byte_free[0], f1 = w.byte_free[1];
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t m = b[i] & mask;
    bad |= (uint8_t(m - lo) > span) & (m != f0) & (m != f1);
  }
  return bad == 0;
}

// ---- int8_group (kernels.h) -------------------------------------------------------------------
const uint8_t* OffsetTable(Format f) {
  static const std::array<std::array<uint8_t, 16>, 4> tables = [] {
    std::array<std::array<uint8_t, 16>, 4> out{};
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < 16; ++c)
        out[i][c] = static_cast<uint8_t>(IntTable(static_cast<Format>(i))[c] + kI8gOffset);
    return out;
  }();
  return tables[static_cast<int>(f)].data();
}

bool QuantizeI8gScalar(const float* a, int64_t K, int64_t G, int8_t* q, float* s,
                       int32_t* lane_sum) {
  bool tame = true;
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t i = g0; i < g0 + G; ++i) {
      const float v = std::fabs(a[i]);
      nan |= v != v;
      amax = v > amax ? v : amax;
    }
    const float sg = s[g0 / G] = GroupScale127(amax, nan);
    tame = tame && !nan && TameGroupScale(amax, sg);
    if (!tame) continue;  // the scales are still wanted (the exact path)
    for (int64_t i = g0; i < g0 + G; ++i) q[i] = static_cast<int8_t>(std::nearbyint(a[i] / sg));
  }
  if (tame)
    for (int64_t l = 0; l < K / kI8gLane; ++l) {
      int32_t sum = 0;
      for (int64_t k = l * kI8gLane; k < (l + 1) * kI8gLane; ++k) sum += q[k];
      lane_sum[l] = sum;
    }
  return tame;
}

// Lane by lane as the SIMD kernels (no unsigned offset needed here): the int32 dot of a lane,
// times the block scale, times the lane's group scale.
bool GemvI8gScalar(const I8gRow& a, const Weight& w, float* y, int64_t n0, int64_t n1) {
  const int8_t* lut = IntTable(w.format);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    float acc = 0;
    for (int64_t l = 0; l < w.K / kI8gLane; ++l) {
      const int64_t k0 = l * kI8gLane;
      const int32_t d = RangeDot<int8_t, int32_t>(row, a.qp, lut, k0, k0 + kI8gLane, w.K, 32);
      acc += (static_cast<float>(d) * w.Scale(n, k0 / w.block)) * a.lsc[l];
    }
    y[n] = acc;
  }
  return false;  // the caller checks the scales
}

void UnpackI8gScalar(const Weight& w, int64_t n0, int64_t nr, int64_t tile_rows, uint8_t* u,
                     float* sc) {
  const int8_t* lut = IntTable(w.format);
  for (int64_t r = 0; r < tile_rows; ++r) {
    const uint8_t* row = r < nr ? w.codes + (n0 + r) * (w.K / 2) : nullptr;
    for (int64_t k = 0; k < w.K; ++k)
      u[r * w.K + k] = static_cast<uint8_t>((row ? lut[Code(row, k)] : 0) + kI8gOffset);
    for (int64_t b = 0; b < w.nb; ++b) sc[r * w.nb + b] = row ? w.Scale(n0 + r, b) : 0.0f;
  }
}

// Block by block with the unsigned offset and its correction, as the SIMD GEMM kernels.
void GemmI8gScalar(const I8gPanel& a, const I8gTile& t, int64_t K, int64_t block, float* c,
                   int64_t ldc) {
  const int64_t nb = K / block;
  for (int64_t r = 0; r < t.nr; ++r)
    for (int64_t i = 0; i < kI8gPanel; ++i) {
      float acc = 0;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t d = a.corr[b * kI8gPanel + i];
        for (int64_t k = b * block; k < (b + 1) * block; ++k)
          d += int32_t(t.u[r * K + k]) * a.q[((k / 4) * kI8gPanel + i) * 4 + k % 4];
        acc += (static_cast<float>(d) * t.sc[r * nb + b]) * a.asc[b * kI8gPanel + i];
      }
      c[i * ldc + r] = acc;
    }
}

float DotScalar(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

void HadamardRowScalar(const float* x, const float* base, int64_t c, int64_t p, float scale,
                       float* z, float* y) {
  const int64_t n = c * p;
  float* v = c > 1 ? z : y;
  for (int64_t j = 0; j < n; ++j) v[j] = x[j] * scale;
  for (int64_t i = 0; i < c; ++i) {
    float* chunk = v + i * p;
    for (int64_t h = 1; h < p; h *= 2)
      for (int64_t s = 0; s < p; s += 2 * h)
        for (int64_t j = s; j < s + h; ++j) {
          const float a = chunk[j], b = chunk[j + h];
          chunk[j] = a + b;
          chunk[j + h] = a - b;
        }
  }
  if (c == 1) return;
  for (int64_t k = 0; k < c; ++k) {
    float* out = y + k * p;
    for (int64_t j = 0; j < p; ++j) out[j] = 0.0f;
    for (int64_t i = 0; i < c; ++i) {
      const float w = base[i * c + k];
      const float* in = v + i * p;
      for (int64_t j = 0; j < p; ++j) out[j] += w * in[j];
    }
  }
}

const Kernels kScalar{"scalar",        GemvF32Scalar, GemvI8Scalar,        DecodeRowsScalar,
                      MicroScalar,     GemvMixedScalar, DotScalar, F32ScalesTameScalar,
                      ByteScalesTameScalar, QuantizeI8gScalar, 32, GemvI8gScalar,
                      UnpackI8gScalar, GemmI8gScalar, HadamardRowScalar};

}  // namespace detail
}  // namespace lowbit
