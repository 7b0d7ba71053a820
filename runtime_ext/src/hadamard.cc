// lowbit::Hadamard: y = x @ (B (x) H_p / sqrt(p)) over the last axis -- an online rotation.
//
// n = size = c * p with p a power of two: the last axis is viewed as c chunks of p. Each chunk
// goes through a fast Walsh-Hadamard transform (p log p butterflies, scaled by 1/sqrt(p)), then
// the chunks are mixed by the small base matrix: y[k, j] = sum_i B[i, k] z[i, j]. B = H_c /
// sqrt(c) for a Hadamard matrix of order c (runtime_ext/hadamard.py builds it; [[1]] when n is
// a power of two), so the whole map is x @ H_n / sqrt(n) without the n x n matrix.
// Inputs: x float32 [..., n], base float32 [c, c]. Attribute: size (= n).
// Float32 arithmetic; results differ from the ONNX fallback (two MatMuls) by summation order.
#include <cmath>

#include "kernels.h"
#include "ops.h"

namespace lowbit {

const char* Hadamard::kName = "Hadamard";

Hadamard::Hadamard(const OrtKernelInfo* info) {
  size_ = GetIntAttr(info, "size", 0, true);
  if (size_ < 1) throw OpError("attribute 'size' must be >= 1, got " + std::to_string(size_));
}

void Hadamard::Compute(Ort::KernelContext& ctx) {
  const Input x = GetInput(ctx, 0), base = GetInput(ctx, 1);
  ExpectType(kName, "x", x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectType(kName, "base", base, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (x.shape.empty() || x.shape.back() != size_)
    throw OpError(std::string(kName) + ": x's last dimension must be size = " + std::to_string(size_) +
                  ", got shape " + ShapeStr(x.shape));
  if (base.shape.size() != 2 || base.shape[0] != base.shape[1] || base.shape[0] < 1 || size_ % base.shape[0])
    throw OpError(std::string(kName) + ": base must be a square [c, c] matrix with c dividing " +
                  std::to_string(size_) + ", got " + ShapeStr(base.shape));
  const int64_t c = base.shape[0], p = size_ / c, n = size_;
  if (p & (p - 1))
    throw OpError(std::string(kName) + ": size / c = " + std::to_string(p) + " is not a power of two");
  const int64_t rows = NumElements(x.shape) / n;
  const float* X = x.data<float>();
  const float* B = base.data<float>();
  float* Y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(p));
  const Kernels& kern = SelectKernels();
  ParallelRanges(ctx, static_cast<size_t>(rows), 8, [&](size_t r0, size_t r1) {
    std::vector<float> z(static_cast<size_t>(c > 1 ? n : 0));
    for (size_t r = r0; r < r1; ++r)
      kern.hadamard_row(X + static_cast<int64_t>(r) * n, B, c, p, scale, z.data(), Y + static_cast<int64_t>(r) * n);
  });
}

}  // namespace lowbit
