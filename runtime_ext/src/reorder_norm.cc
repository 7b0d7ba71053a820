// lowbit::ReorderNorm: y[..., j] = norm(x)[..., perm[j]] * gamma[j] (+ beta[j]).
//
// RPTQ's fused reorder: a Gather of the input channels by `perm` fused with RMSNorm (kind="rms":
// x / sqrt(mean(x^2) + eps)) or LayerNorm (kind="layer": (x - mean) / sqrt(var + eps)) over the
// last axis. The statistics are taken over the gathered row x[perm], as the fallback does (the
// same as over x when perm is a permutation; perm may repeat channels); gamma and beta are given
// already permuted (gamma_perm[j] = gamma[perm[j]]).
// Inputs: x float32 [..., C], perm int64 [C] (values in [-C, C)), gamma float32 [C], optional
// beta float32 [C]. Attributes: kind (rms | layer, default rms), epsilon (default 1e-5).
// Float32 arithmetic as the ONNX fallback (overflow, underflow and NaN included); the two sums
// accumulate in double and are rounded to float32 once.
#include "ops.h"

namespace lowbit {

const char* ReorderNorm::kName = "ReorderNorm";

ONNXTensorElementDataType ReorderNorm::InputType(size_t i) {
  return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

ReorderNorm::ReorderNorm(const OrtKernelInfo* info) {
  const std::string kind = GetStringAttr(info, "kind", "rms");
  if (kind != "rms" && kind != "layer")
    throw OpError("attribute 'kind' must be rms or layer, got '" + kind + "'");
  layer_ = kind == "layer";
  epsilon_ = GetFloatAttr(info, "epsilon", 1e-5f);
  if (!(epsilon_ >= 0.0f) || std::isinf(epsilon_))
    throw OpError("attribute 'epsilon' must be finite and >= 0, got " + std::to_string(epsilon_));
}

void ReorderNorm::Compute(Ort::KernelContext& ctx) {
  const Input x = GetInput(ctx, 0), perm = GetInput(ctx, 1), gamma = GetInput(ctx, 2),
              beta = GetInput(ctx, 3);
  ExpectType(kName, "x", x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (x.shape.empty()) throw OpError(std::string(kName) + ": x must have rank >= 1");
  const int64_t C = x.shape.back(), rows = C > 0 ? NumElements(x.shape) / C : 0;
  const std::vector<int64_t> vec{C};
  auto check_vec = [&](const Input& in, const char* what) {
    if (in.shape != vec)
      throw OpError(std::string(kName) + ": " + what + " must have shape " + ShapeStr(vec) +
                    " (x's last dimension), got " + ShapeStr(in.shape));
  };
  check_vec(perm, "perm");
  check_vec(gamma, "gamma");
  if (beta.present()) check_vec(beta, "beta");
  std::vector<int64_t> p(static_cast<size_t>(C));
  for (int64_t j = 0; j < C; ++j) {
    const int64_t v = perm.data<int64_t>()[j];
    if (v < -C || v >= C)
      throw OpError(std::string(kName) + ": perm[" + std::to_string(j) + "] = " +
                    std::to_string(v) + " is out of range for " + std::to_string(C) + " channels");
    p[j] = v < 0 ? v + C : v;
  }
  float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
  const float* X = x.data<float>();
  const float* g = gamma.data<float>();
  const float* bt = beta.present() ? beta.data<float>() : nullptr;
  ParallelRanges(ctx, static_cast<size_t>(rows), 16, [&](size_t r0, size_t r1) {
    std::vector<float> d(static_cast<size_t>(C));
    for (size_t r = r0; r < r1; ++r) {
      const float* xr = X + static_cast<int64_t>(r) * C;
      float* yr = y + static_cast<int64_t>(r) * C;
      // The fallback's float32 operations on the gathered row: mean = ReduceMean(x[perm]),
      // d = x[perm] - mean, ms = ReduceMean(d * d), y = d / sqrt(ms + eps) * gamma (+ beta).
      // Only the two sums differ (double accumulation, rounded once to float32 before the
      // division by C, so a sum past FLT_MAX is Inf there too); squares, quotients and the
      // overflow / underflow / NaN they produce are the fallback's.
      float mean = 0.0f;
      if (layer_) {
        double sum = 0.0;
        for (int64_t j = 0; j < C; ++j) sum += xr[p[j]];
        mean = static_cast<float>(sum) / static_cast<float>(C);
      }
      double sq = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        d[j] = xr[p[j]] - mean;
        const float d2 = d[j] * d[j];  // the float32 square, as Mul(x, x)
        sq += d2;
      }
      const float denom = std::sqrt(static_cast<float>(sq) / static_cast<float>(C) + epsilon_);
      for (int64_t j = 0; j < C; ++j) {
        const float v = d[j] / denom * g[j];
        yr[j] = bt ? v + bt[j] : v;
      }
    }
  });
}

}  // namespace lowbit
