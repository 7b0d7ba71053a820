// Code tables and scale-byte decoders; the single native definition of each 4-bit format.
//
// Guarantees: ValueTable(f)[c] == IntTable(f)[c] * IntMultiplier(f) exactly for all 16 codes,
// and both equal lowbit.formats.code_table(fmt) (checked by tests/runtime_ext).
#include "common.h"

namespace lowbit {
namespace {

// dINT4 (lowbit's definition, see formats/): sign-magnitude, bit 3 = sign; magnitude code m
// decodes to 0 (m=0), 0.5 (m=1), m-1 (m>=2). Stored doubled so every entry is an integer.
constexpr int8_t kDint4x2[16] = {0, 1, 2, 4, 6, 8, 10, 12, 0, -1, -2, -4, -6, -8, -10, -12};
// FP4 E2M1 (NVFP4 and MXFP4 elements): s.ee.m, values {0, .5, 1, 1.5, 2, 3, 4, 6}, doubled.
constexpr int8_t kE2m1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// Symmetric int4: two's complement nibble.
constexpr int8_t kInt4[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

struct FloatTables {
  float dint4[16], e2m1[16], int4[16];
  FloatTables() {
    for (int c = 0; c < 16; ++c) {
      dint4[c] = 0.5f * kDint4x2[c];
      e2m1[c] = 0.5f * kE2m1x2[c];
      int4[c] = static_cast<float>(kInt4[c]);
    }
  }
};
const FloatTables kFloat;

}  // namespace

Format ParseFormat(const std::string& op, const std::string& name) {
  if (name == "dint4") return Format::kDint4;
  if (name == "nvfp4") return Format::kNvfp4;
  if (name == "int4") return Format::kInt4;
  if (name == "mxfp4") return Format::kMxfp4;
  throw OpError(op + ": attribute 'format' must be one of dint4, nvfp4, int4, mxfp4; got '" +
                name + "'");
}

const char* FormatName(Format f) {
  switch (f) {
    case Format::kDint4: return "dint4";
    case Format::kNvfp4: return "nvfp4";
    case Format::kInt4: return "int4";
    case Format::kMxfp4: return "mxfp4";
  }
  return "?";
}

const int8_t* IntTable(Format f) {
  switch (f) {
    case Format::kDint4: return kDint4x2;
    case Format::kInt4: return kInt4;
    default: return kE2m1x2;
  }
}

float IntMultiplier(Format f) { return f == Format::kInt4 ? 1.0f : 0.5f; }

const float* ValueTable(Format f) {
  switch (f) {
    case Format::kDint4: return kFloat.dint4;
    case Format::kInt4: return kFloat.int4;
    default: return kFloat.e2m1;
  }
}

float DecodeE4M3(uint8_t bits) {
  // E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa; no infinities, S.1111.111 is NaN.
  const int sign = bits >> 7, exp = (bits >> 3) & 0xF, man = bits & 0x7;
  float v;
  if (exp == 0xF && man == 0x7) return std::nanf("");
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -9);  // subnormal: m/8 * 2^-6
  else v = std::ldexp(static_cast<float>(8 + man), exp - 7 - 3);
  return sign ? -v : v;
}

float DecodeE8M0(uint8_t bits) {
  // OCP MX E8M0: 2^(bits - 127); 0xFF is NaN.
  if (bits == 0xFF) return std::nanf("");
  return std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

float RoundToE4M3(float x) {
  if (std::isnan(x)) return x;
  const float a = std::fabs(x);
  float q;
  if (a >= 448.0f) {
    q = 448.0f;  // saturate (E4M3FN has no infinity)
  } else {
    // Quantum: 2^-9 in the subnormal range (< 2^-6), else 2^(floor(log2 a) - 3).
    int e;
    std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
    const int qexp = a < 0.015625f ? -9 : (e - 1) - 3;
    q = std::ldexp(std::nearbyint(std::ldexp(a, -qexp)), qexp);
    if (q > 448.0f) q = 448.0f;
  }
  return std::copysign(q, x);
}

float RoundToE2M1(float x) {
  if (std::isnan(x)) return x;
  const float a = std::fabs(x);
  // Spacing 0.5 below 2, 1 below 4, 2 above; rint ties to even, which is the even code here
  // (code = 2a below 2, a + 2 for 2..4, a / 2 + 4 above: even code <=> even multiple).
  float q;
  if (a < 2.0f) q = std::nearbyint(a * 2.0f) * 0.5f;
  else if (a < 4.0f) q = std::nearbyint(a);
  else q = std::min(std::nearbyint(a * 0.5f) * 2.0f, 6.0f);
  return std::copysign(q, x);
}

}  // namespace lowbit
