// lowbit::GroupQuant: run-time per-token-group symmetric activation fake quantization, the op
// form of lowbit.emit.dynamic_act's nine standard ops.
//
// For each row of x [..., C] and each group g of G = group_size consecutive channels:
//   s = max(absmax(group) / qmax[g], FLT_MIN);   y = nearbyint(x / s) * s
// in float32, rounding half to even (ONNX Round), no fused multiply-add: y equals the standard
// ops' output bit for bit on finite and infinite inputs. A NaN in a group makes its scale NaN and
// so the whole group NaN (ONNX Runtime's ReduceMax may drop a NaN, depending on where it sits).
// Inputs: x float32 [..., C], qmax float32 [C / G, 1] (one code limit per group: 127 int8, 7
// int4). Attribute: group_size (G, dividing C). AVX2 when the CPU has it (LOWBIT_ORT_ISA=scalar
// forces the scalar loop): the same bits either way.
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <string>

#include "ops.h"

namespace lowbit {

const char* GroupQuant::kName = "GroupQuant";

namespace {

// One group: the scale from its absmax, then nearbyint(x / s) * s per element. The AVX2 version
// below computes the same IEEE operations (division, round-half-even, multiplication) lane by
// lane, so both give the same bits; the max over |x| is order-free once NaN is set aside.
void QuantizeGroupScalar(const float* x, int64_t n, float qmax, float* y) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
  const float raw = amax / qmax;
  const float s = nan ? std::nanf("") : (raw > FLT_MIN || raw != raw ? raw : FLT_MIN);
  for (int64_t i = 0; i < n; ++i) y[i] = std::nearbyint(x[i] / s) * s;
}

__attribute__((target("avx2"))) void QuantizeGroupAvx2(const float* x, int64_t n, float qmax, float* y) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float amax = 0.0f;
  for (float l : lanes) amax = l > amax ? l : amax;
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (int64_t j = i; j < n; ++j) {
    const float a = std::fabs(x[j]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
  const float raw = amax / qmax;
  const float s = nan ? std::nanf("") : (raw > FLT_MIN || raw != raw ? raw : FLT_MIN);
  const __m256 vs = _mm256_set1_ps(s);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(q, vs));
  }
  for (; i < n; ++i) y[i] = std::nearbyint(x[i] / s) * s;
}

using GroupFn = void (*)(const float*, int64_t, float, float*);

GroupFn SelectGroupFn() {
  static const GroupFn chosen = [] {
    const char* isa = std::getenv("LOWBIT_ORT_ISA");
    if (isa != nullptr && std::string(isa) == "scalar") return &QuantizeGroupScalar;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? &QuantizeGroupAvx2 : &QuantizeGroupScalar;
  }();
  return chosen;
}

}  // namespace

GroupQuant::GroupQuant(const OrtKernelInfo* info) {
  group_ = GetIntAttr(info, "group_size", 0, true);
  if (group_ < 1) throw OpError("attribute 'group_size' must be >= 1, got " + std::to_string(group_));
}

void GroupQuant::Compute(Ort::KernelContext& ctx) {
  const Input x = GetInput(ctx, 0), qmax = GetInput(ctx, 1);
  ExpectType(kName, "x", x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectType(kName, "qmax", qmax, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (x.shape.empty() || x.shape.back() % group_)
    throw OpError(std::string(kName) + ": x's last dimension must be a multiple of group_size = " +
                  std::to_string(group_) + ", got shape " + ShapeStr(x.shape));
  const int64_t channels = x.shape.back(), groups = channels / group_;
  if (NumElements(qmax.shape) != groups)
    throw OpError(std::string(kName) + ": qmax must hold one value per group (" + std::to_string(groups) +
                  "), got shape " + ShapeStr(qmax.shape));
  const int64_t rows = channels ? NumElements(x.shape) / channels : 0;
  const float* X = x.data<float>();
  const float* Q = qmax.data<float>();
  float* Y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
  const int64_t G = group_;
  const GroupFn quantize = SelectGroupFn();
  ParallelRanges(ctx, static_cast<size_t>(rows), 16, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      const float* xr = X + static_cast<int64_t>(r) * channels;
      float* yr = Y + static_cast<int64_t>(r) * channels;
      for (int64_t g = 0; g < groups; ++g) quantize(xr + g * G, G, Q[g], yr + g * G);
    }
  });
}

}  // namespace lowbit
