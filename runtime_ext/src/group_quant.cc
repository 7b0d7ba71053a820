// lowbit::GroupQuant: run-time per-token-group symmetric activation fake quantization, the op
// form of lowbit.emit.dynamic_act's nine standard ops.
//
// For each row of x [..., C] and each group g of G = group_size consecutive channels:
//   s = max(absmax(group) / qmax[g], FLT_MIN);   y = nearbyint(x / s) * s
// in float32, rounding half to even (ONNX Round), no fused multiply-add: y equals the standard
// ops' output bit for bit on finite and infinite inputs. A NaN in a group makes its scale NaN and
// so the whole group NaN (ONNX Runtime's ReduceMax may drop a NaN, depending on where it sits).
// Inputs: x float32 [..., C], qmax float32 [C / G, 1] (one code limit per group: 127 int8, 7
// int4). Attribute: group_size (G, dividing C).
#include <cfloat>
#include <cmath>

#include "ops.h"

namespace lowbit {

const char* GroupQuant::kName = "GroupQuant";

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
  ParallelRanges(ctx, static_cast<size_t>(rows), 16, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      const float* xr = X + static_cast<int64_t>(r) * channels;
      float* yr = Y + static_cast<int64_t>(r) * channels;
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = xr + g * G;
        float amax = 0.0f;
        bool nan = false;
        for (int64_t i = 0; i < G; ++i) {
          const float a = std::fabs(xg[i]);
          nan |= a != a;
          amax = a > amax ? a : amax;
        }
        const float raw = amax / Q[g];
        const float s = nan ? std::nanf("") : (raw > FLT_MIN || raw != raw ? raw : FLT_MIN);
        float* yg = yr + g * G;
        for (int64_t i = 0; i < G; ++i) yg[i] = std::nearbyint(xg[i] / s) * s;
      }
    }
  });
}

}  // namespace lowbit
