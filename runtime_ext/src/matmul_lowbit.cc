// lowbit::MatMulLowbit: Y[..., N] = A[..., K] @ W, W in packed 4-bit codes (see kernels.h).
//
// Inputs: A float32 [..., K]; codes uint8 [N, K/2]; scales float32 | uint8 [N, K/block]
// (uint8: E4M3 bits for nvfp4, E8M0 bits for mxfp4); global_scale float32 (1 value);
// act_scale float32 (1 value, only with act_mode=int8_static); mixed NVFP4/FP8 (FGMP) weights
// add fp8_mask uint8 [N, ceil(K/16/8)] (bit b%8 of byte b/8 = block b is FP8), fp8_codes uint8
// [F, 16] (E4M3 bits of the F FP8 blocks, row-major over (n, b)) and fp8_scales float32 [F];
// then format must be nvfp4, block_size 16, act_mode float32 (see kernels.h, Weight).
// Attributes: format (dint4|nvfp4|int4|mxfp4), block_size (16 or a multiple of 32),
// act_mode (float32 | int8_dynamic | int8_static | int8_group, default float32), act_group (G,
// int8_group only: a multiple of 32 and of block_size, which must be a power of two; K % G == 0).
// int8_dynamic / int8_static quantize A symmetrically: q = clamp(rint(a / s), -127, 127) with
// s = max|a_row|/127 per row (dynamic; 1 for an all-zero row) or the static act_scale, then
// Y = s * (q @ W). int8_group quantizes each row per group of G channels exactly as GroupQuant
// with qmax 127 (s_g = max(absmax / 127, FLT_MIN), q = nearbyint(a / s_g)) and sums integer
// products per weight block: Y = GroupQuant(A) @ W up to float32 summation order.
// Special values follow the ONNX fallback (functions.py): a NaN activation stays NaN through the
// quantization (its row of Y is NaN), an Inf makes the dynamic (or its group's) scale Inf (row
// NaN), a static scale clips +-Inf to +-127; float results equal the fallback's up to summation
// order, NaN/Inf positions included, on every kernel path (see kernels.h, "special values").
#include "ops.h"

#include "kernels.h"

namespace lowbit {

const char* MatMulLowbit::kName = "MatMulLowbit";

ONNXTensorElementDataType MatMulLowbit::InputType(size_t i) {
  switch (i) {
    case 1: case 5: case 6: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float32 or uint8, checked below
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

MatMulLowbit::MatMulLowbit(const OrtKernelInfo* info) {
  format_ = ParseFormat(kName, GetStringAttr(info, "format", nullptr));
  block_ = GetIntAttr(info, "block_size", 0, true);
  if (block_ != 16 && (block_ < 32 || block_ % 32 != 0))
    throw OpError("attribute 'block_size' must be 16 or a positive multiple of 32, got " +
                  std::to_string(block_));

  const std::string mode = GetStringAttr(info, "act_mode", "float32");
  if (mode == "float32") act_mode_ = ActMode::kFloat;
  else if (mode == "int8_dynamic") act_mode_ = ActMode::kInt8Dynamic;
  else if (mode == "int8_static") act_mode_ = ActMode::kInt8Static;
  else if (mode == "int8_group") act_mode_ = ActMode::kInt8Group;
  else
    throw OpError("attribute 'act_mode' must be float32, int8_dynamic, int8_static or int8_group, "
                  "got '" + mode + "'");
  act_group_ = GetIntAttr(info, "act_group", 0, act_mode_ == ActMode::kInt8Group);
  if (act_mode_ != ActMode::kInt8Group && act_group_ != 0)
    throw OpError("attribute 'act_group' is only used with act_mode=int8_group, not " + mode);
  if (act_mode_ == ActMode::kInt8Group &&
      (act_group_ < 32 || act_group_ % 32 != 0 || act_group_ % block_ != 0 || (block_ & (block_ - 1))))
    throw OpError("act_mode=int8_group needs 'act_group' a positive multiple of 32 and of a "
                  "power-of-two block_size, got act_group=" + std::to_string(act_group_) +
                  ", block_size=" + std::to_string(block_));
}

// Checks the weight inputs against A's K and fills `w`; shared with the fallback-free paths.
void BindWeight(const char* op, Format format, int64_t block, const Input& codes,
                       const Input& scales, const Input& global, int64_t K, Weight& w) {
  if (codes.shape.size() != 2)
    throw OpError(std::string(op) + ": codes must be 2-D [N, K/2], got " + ShapeStr(codes.shape));
  const int64_t N = codes.shape[0];
  if (codes.shape[1] * 2 != K)
    throw OpError(std::string(op) + ": codes " + ShapeStr(codes.shape) +
                  " do not match the unpacked length " + std::to_string(K) +
                  " (expected [N, " + std::to_string(K / 2) + "])");
  if (K % 16 != 0 || K % block != 0)
    throw OpError(std::string(op) + ": the packed axis length " + std::to_string(K) +
                  " must be a multiple of 16 and of block_size=" + std::to_string(block));
  const std::vector<int64_t> want{N, K / block};
  if (scales.shape != want)
    throw OpError(std::string(op) + ": scales must have shape " + ShapeStr(want) + ", got " +
                  ShapeStr(scales.shape));
  w.codes = codes.data<uint8_t>();
  w.N = N;
  w.K = K;
  w.block = block;
  w.nb = K / block;
  w.format = format;
  if (scales.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    w.scale_f32 = scales.data<float>();
  } else if (scales.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 &&
             (format == Format::kNvfp4 || format == Format::kMxfp4)) {
    w.scale_u8 = scales.data<uint8_t>();
    for (int b = 0; b < 256; ++b)
      w.byte_table[b] = format == Format::kNvfp4 ? DecodeE4M3(uint8_t(b)) : DecodeE8M0(uint8_t(b));
  } else {
    throw OpError(std::string(op) +
                  ": scales must be float32 (any format) or uint8 (E4M3 bits for nvfp4, E8M0 "
                  "bits for mxfp4); format is " + FormatName(format));
  }
  w.global = ScalarFloat(op, "global_scale", global);
  ClassifyScaleBytes(w);
}

// Validates the FGMP mixed-precision inputs and attaches them to `w`.
static void BindFp8Blocks(const char* op, Ort::KernelContext& ctx, Weight& w) {
  const Input mask = GetInput(ctx, 5), codes = GetInput(ctx, 6), scales = GetInput(ctx, 7);
  if (!codes.present() || !scales.present())
    throw OpError(std::string(op) + ": fp8_mask needs fp8_codes (input 6) and fp8_scales (input 7)");
  if (w.format != Format::kNvfp4 || w.block != 16)
    throw OpError(std::string(op) + ": FP8 blocks (fp8_mask) need format nvfp4 with block_size 16");
  const int64_t stride = (w.nb + 7) / 8;
  const std::vector<int64_t> want{w.N, stride};
  if (mask.shape != want)
    throw OpError(std::string(op) + ": fp8_mask must have shape " + ShapeStr(want) + ", got " +
                  ShapeStr(mask.shape));
  w.fp8_mask = mask.data<uint8_t>();
  w.mask_stride = stride;
  w.fp8_first.resize(static_cast<size_t>(w.N));
  int64_t count = 0;
  for (int64_t n = 0; n < w.N; ++n) {
    w.fp8_first[n] = count;
    for (int64_t j = 0; j < stride; ++j) {
      const uint8_t byte = w.fp8_mask[n * stride + j];
      const int64_t valid = std::min<int64_t>(8, w.nb - 8 * j);
      if (valid < 8 && (byte >> valid) != 0)
        throw OpError(std::string(op) + ": fp8_mask has bits set past the last block of row " +
                      std::to_string(n));
      count += __builtin_popcount(byte);
    }
  }
  if (codes.shape != std::vector<int64_t>{count, 16} || scales.shape != std::vector<int64_t>{count})
    throw OpError(std::string(op) + ": fp8_mask marks " + std::to_string(count) +
                  " FP8 blocks, so fp8_codes must be [" + std::to_string(count) +
                  ", 16] and fp8_scales [" + std::to_string(count) + "]; got " +
                  ShapeStr(codes.shape) + " and " + ShapeStr(scales.shape));
  w.fp8_codes = codes.data<uint8_t>();
  w.fp8_scales = scales.data<float>();
  w.fp8_count = count;
}

void MatMulLowbit::Compute(Ort::KernelContext& ctx) {
  const Input a = GetInput(ctx, 0), codes = GetInput(ctx, 1), scales = GetInput(ctx, 2),
              global = GetInput(ctx, 3), act_scale = GetInput(ctx, 4);
  ExpectType(kName, "A", a, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectType(kName, "codes", codes, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  if (a.shape.empty()) throw OpError(std::string(kName) + ": A must have rank >= 1");
  const int64_t K = a.shape.back();
  std::vector<int64_t> batch(a.shape.begin(), a.shape.end() - 1);
  const int64_t M = NumElements(batch);
  Weight w;
  BindWeight(kName, format_, block_, codes, scales, global, K, w);
  if (act_mode_ == ActMode::kInt8Group && K % act_group_ != 0)
    throw OpError(std::string(kName) + ": A's last dimension " + std::to_string(K) +
                  " must be a multiple of act_group=" + std::to_string(act_group_));
  if (GetInput(ctx, 5).present()) {
    if (act_mode_ != ActMode::kFloat)
      throw OpError(std::string(kName) + ": FP8 blocks (fp8_mask) need act_mode=float32");
    BindFp8Blocks(kName, ctx, w);
  }

  std::vector<int64_t> out_shape = batch;
  out_shape.push_back(w.N);
  float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
  if (M == 0 || w.N == 0) return;
  if (K == 0) {  // empty reduction: Y = 0
    std::fill(y, y + M * w.N, 0.0f);
    return;
  }
  const float* A = a.data<float>();
  const Kernels& kern = SelectKernels();

  if (act_mode_ == ActMode::kFloat) return MatMulF32(ctx, kern, A, M, w, y);
  if (act_mode_ == ActMode::kInt8Group) return MatMulI8Group(ctx, kern, A, M, w, act_group_, y);
  std::vector<float> row_scales(static_cast<size_t>(M));
  if (act_mode_ == ActMode::kInt8Static) {
    if (!act_scale.present())
      throw OpError(std::string(kName) + ": act_mode=int8_static needs input 4 (act_scale)");
    const float s = ScalarFloat(kName, "act_scale", act_scale);
    if (!(s > 0.0f) || std::isinf(s))
      throw OpError(std::string(kName) + ": act_scale must be positive and finite, got " +
                    std::to_string(s));
    std::fill(row_scales.begin(), row_scales.end(), s);
  } else {
    for (int64_t m = 0; m < M; ++m) {
      float amax = 0.0f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(A[m * K + k]));
      row_scales[m] = amax > 0.0f ? amax / 127.0f : 1.0f;
    }
  }
  MatMulI8(ctx, kern, A, M, w, row_scales.data(), y);
}

}  // namespace lowbit
