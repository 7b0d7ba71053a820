// lowbit::FgmpActQuant: FGMP's runtime activation quantizer (per block of 16: FP8 or NVFP4).
//
// For each block of 16 consecutive elements along the last axis:
//   q4 = NVFP4 fake-quantization (E2M1 elements, E4M3 block scale, FP32 global scale),
//   q8 = FP8 E4M3 fake-quantization with a float32 block scale amax / 448,
//   P  = sum_k g2[k] * (q4_k - q8_k)^2   (Fisher-weighted perturbation, in double),
// and the block of Y is q8 when P > threshold, else q4. Rules are those of lowbit.formats
// (scales.py): NVFP4 global g = the optional input, or amax(x) / (6 * 448) over the whole input
// (1 for an all-zero tensor); sb = E4M3(block_amax / (6 * g)), 1 for a zero block, 2^-9 when a
// nonzero block's scale underflows; elements x / fl(sb * g) rounded to E2M1 (ties to even code,
// saturating) times fl(sb * g). FP8: scale amax / 448 (1 for a zero block), x / s rounded to E4M3
// (saturating) times s. So Y's blocks equal lowbit.formats.fake_quantize bit for bit.
// Special values: amax propagates NaN (a NaN in a block makes its amax NaN; in the tensor, the
// dynamic global scale 1), as numpy's max in reference.fgmp_act_quant and the fallback do.
// Inputs: x float32 [..., C] with C % 16 == 0; g2 float32 [C]; threshold float32 (1 value);
// optional nvfp4 global_scale float32 (1 value, > 0).
#include "ops.h"

namespace lowbit {

const char* FgmpActQuant::kName = "FgmpActQuant";

FgmpActQuant::FgmpActQuant(const OrtKernelInfo*) {}

namespace {

constexpr int64_t kBlock = 16;
constexpr float kE2m1Max = 6.0f, kE4m3Max = 448.0f;

// max(m, |v|), NaN as soon as either is NaN (numpy's max; the fallback makes ReduceMax do the
// same), so a NaN anywhere in a block or tensor gives the same result wherever it sits.
inline float NanMaxAbs(float m, float v) {
  const float a = std::fabs(v);
  return (m != m || a != a) ? std::nanf("") : std::max(m, a);
}

// Fake-quantizes one block both ways, returns P and writes the chosen block to y.
void QuantizeBlock(const float* x, const float* g2, float g, float threshold, float* y) {
  float amax = 0.0f;
  for (int i = 0; i < kBlock; ++i) amax = NanMaxAbs(amax, x[i]);
  const float raw = amax / (kE2m1Max * g);
  float sb = RoundToE4M3(raw > 0.0f ? raw : 1.0f);
  if (!(sb > 0.0f)) sb = 0.001953125f;  // 2^-9, the smallest E4M3 subnormal
  const float s4 = sb * g;
  float s8 = amax / kE4m3Max;
  if (!(s8 > 0.0f)) s8 = 1.0f;
  float q4[kBlock], q8[kBlock];
  double p = 0.0;
  for (int i = 0; i < kBlock; ++i) {
    q4[i] = RoundToE2M1(x[i] / s4) * s4;
    q8[i] = RoundToE4M3(x[i] / s8) * s8;
    const double d = static_cast<double>(q4[i]) - q8[i];
    p += static_cast<double>(g2[i]) * (d * d);
  }
  const float* src = p > threshold ? q8 : q4;
  std::memcpy(y, src, sizeof(q4));
}

}  // namespace

void FgmpActQuant::Compute(Ort::KernelContext& ctx) {
  const Input x = GetInput(ctx, 0), g2 = GetInput(ctx, 1), thr = GetInput(ctx, 2),
              gs = GetInput(ctx, 3);
  if (x.shape.empty()) throw OpError(std::string(kName) + ": x must have rank >= 1");
  const int64_t C = x.shape.back(), total = NumElements(x.shape);
  if (C % kBlock != 0)
    throw OpError(std::string(kName) + ": x's last dimension " + std::to_string(C) +
                  " must be a multiple of 16 (the FGMP block)");
  if (g2.shape != std::vector<int64_t>{C})
    throw OpError(std::string(kName) + ": g2 must have shape [" + std::to_string(C) + "], got " +
                  ShapeStr(g2.shape));
  const float threshold = ScalarFloat(kName, "threshold", thr);
  const float* X = x.data<float>();
  float g;
  if (gs.present()) {
    g = ScalarFloat(kName, "global_scale", gs);
    if (!(g > 0.0f) || std::isinf(g))
      throw OpError(std::string(kName) + ": global_scale must be positive and finite");
  } else {
    float amax = 0.0f;
    for (int64_t i = 0; i < total; ++i) amax = NanMaxAbs(amax, X[i]);
    g = amax / (kE2m1Max * kE4m3Max);
    if (!(g > 0.0f)) g = 1.0f;
  }
  float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
  const float* G2 = g2.data<float>();
  const int64_t blocks = total / kBlock, per_row = C / kBlock;
  ParallelRanges(ctx, static_cast<size_t>(blocks), 256, [&](size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; ++b) {
      const int64_t off = static_cast<int64_t>(b) * kBlock;
      QuantizeBlock(X + off, G2 + (static_cast<int64_t>(b) % per_row) * kBlock, g, threshold,
                    y + off);
    }
  });
}

}  // namespace lowbit
