// lowbit::GatherLowbit: Y[*idx.shape, D] = decode(table)[idx], a packed 4-bit embedding lookup.
//
// Inputs: table uint8 [V, D/2] (row v = embedding v, low nibble = even element), scales
// float32 | uint8 [V, D/block], global_scale float32 (1 value), indices int64 or int32 (any
// shape; negative indices count from the end, as ONNX Gather). Attributes: format, block_size.
// Guarantees: every output row equals lowbit.formats.decode of that table row bit for bit
// (value(code) * fl(scale * global)); an index outside [-V, V) is an error, never a read.
#include "kernels.h"
#include "ops.h"

namespace lowbit {

const char* GatherLowbit::kName = "GatherLowbit";

ONNXTensorElementDataType GatherLowbit::InputType(size_t i) {
  switch (i) {
    case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // scales / indices: checked below
  }
}

GatherLowbit::GatherLowbit(const OrtKernelInfo* info) {
  format_ = ParseFormat(kName, GetStringAttr(info, "format", nullptr));
  block_ = GetIntAttr(info, "block_size", 0, true);
  if (block_ != 16 && (block_ < 32 || block_ % 32 != 0))
    throw OpError("attribute 'block_size' must be 16 or a positive multiple of 32, got " +
                  std::to_string(block_));
}

void GatherLowbit::Compute(Ort::KernelContext& ctx) {
  const Input table = GetInput(ctx, 0), scales = GetInput(ctx, 1), global = GetInput(ctx, 2),
              idx = GetInput(ctx, 3);
  ExpectType(kName, "table", table, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  if (table.shape.size() != 2)
    throw OpError(std::string(kName) + ": table must be 2-D [V, D/2], got " + ShapeStr(table.shape));
  const int64_t D = table.shape[1] * 2;
  Weight w;
  BindWeight(kName, format_, block_, table, scales, global, D, w);
  const bool i64 = idx.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (!i64 && idx.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
    throw OpError(std::string(kName) + ": indices must be int64 or int32");
  const int64_t count = NumElements(idx.shape), V = w.N;
  std::vector<int64_t> rows(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    int64_t v = i64 ? idx.data<int64_t>()[i] : idx.data<int32_t>()[i];
    if (v < -V || v >= V)
      throw OpError(std::string(kName) + ": index " + std::to_string(v) + " is out of range for " +
                    std::to_string(V) + " table rows");
    rows[i] = v < 0 ? v + V : v;
  }
  std::vector<int64_t> out_shape = idx.shape;
  out_shape.push_back(D);
  float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
  const float* values = ValueTable(format_);
  ParallelRanges(ctx, static_cast<size_t>(count), 64, [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
      const uint8_t* row = w.codes + rows[i] * (D / 2);
      float* o = y + static_cast<int64_t>(i) * D;
      for (int64_t b = 0; b < w.nb; ++b) {
        const float s = w.Scale(rows[i], b);
        for (int64_t j = b * w.block / 2; j < (b + 1) * w.block / 2; ++j) {
          o[2 * j] = values[row[j] & 0xF] * s;
          o[2 * j + 1] = values[row[j] >> 4] * s;
        }
      }
    }
  });
}

}  // namespace lowbit
