// Shared helpers of the lowbit ONNX Runtime custom ops.
//
// Assumes: built against the ORT C/C++ API headers of version 17 (see runtime_ext/build.py);
// the API is initialised once in RegisterCustomOps (register.cc) before any kernel exists.
// Guarantees: every user-facing failure is an OpError carrying a one-line message that starts
// with the op name; op entry points turn it into an OrtStatus (never an exception escaping
// into ONNX Runtime, never an abort).
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace lowbit {

// A bad input, attribute or shape: reported to ORT as ORT_INVALID_ARGUMENT.
struct OpError : std::runtime_error {
  explicit OpError(const std::string& msg) : std::runtime_error(msg) {}
};

// The 4-bit formats a packed code can be in. The code tables live in formats.cc and must equal
// lowbit.formats.code_table(fmt) (tests/runtime_ext checks it bit for bit).
enum class Format { kDint4, kNvfp4, kInt4, kMxfp4 };

Format ParseFormat(const std::string& op, const std::string& name);
const char* FormatName(Format f);

// Code -> value tables. value(code) == kIntTable[f][code] * kIntMultiplier[f] exactly:
// 2 x dINT4 and 2 x E2M1 values are integers in [-12, 12], int4 codes are the integers -8..7.
const int8_t* IntTable(Format f);
float IntMultiplier(Format f);  // 0.5 for dint4/nvfp4/mxfp4, 1 for int4
const float* ValueTable(Format f);

// Scale bytes: FP8 E4M3 (nvfp4) and E8M0 (mxfp4) to float32, exactly.
float DecodeE4M3(uint8_t bits);
float DecodeE8M0(uint8_t bits);
float RoundToE4M3(float x);  // round-to-nearest-even, saturating at 448; NaN stays NaN
float RoundToE2M1(float x);  // nearest E2M1 value, ties to the even code, saturating at 6

// Per-block scales as float32 (scale * global_scale, rounded once to float32, as
// lowbit.formats.decode does), from either float32 scales or uint8 scale bytes.
struct ScaleView {
  const float* f32 = nullptr;
  const uint8_t* bytes = nullptr;
  float global = 1.0f;
  Format format = Format::kDint4;
  inline float Effective(size_t i) const {
    float s = f32 ? f32[i] : (format == Format::kNvfp4 ? DecodeE4M3(bytes[i]) : DecodeE8M0(bytes[i]));
    return s * global;
  }
};

// ---- ORT glue ----------------------------------------------------------------------------
std::string ShapeStr(const std::vector<int64_t>& s);
int64_t NumElements(const std::vector<int64_t>& s);

std::string GetStringAttr(const OrtKernelInfo* info, const char* name, const char* dflt);
int64_t GetIntAttr(const OrtKernelInfo* info, const char* name, int64_t dflt, bool required);
float GetFloatAttr(const OrtKernelInfo* info, const char* name, float dflt);

// A view of one input: null when an optional input is absent.
struct Input {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  bool present() const { return value != nullptr; }
  template <typename T> const T* data() const {
    return Ort::ConstValue(value).GetTensorData<T>();
  }
};
Input GetInput(Ort::KernelContext& ctx, size_t index);
void ExpectType(const char* op, const char* what, const Input& in, ONNXTensorElementDataType t);
float ScalarFloat(const char* op, const char* what, const Input& in);

// Converts an exception into an OrtStatus (ORT_INVALID_ARGUMENT for OpError, ORT_FAIL else).
OrtStatusPtr ToStatus(const OrtApi& api, const std::exception& e);

// Splits [0, total) across ORT's intra-op thread pool; fn(begin, end) runs on each part.
template <typename Fn>
void ParallelRanges(Ort::KernelContext& ctx, size_t total, size_t grain, Fn&& fn) {
  if (total == 0) return;
  size_t tasks = (total + grain - 1) / grain;
  if (tasks <= 1) { fn(size_t(0), total); return; }
  using F = std::remove_reference_t<Fn>;
  struct Closure { F* fn; size_t total, grain; };
  Closure c{&fn, total, grain};
  ctx.ParallelFor(
      [](void* p, size_t i) {
        auto* c = static_cast<Closure*>(p);
        size_t b = i * c->grain, e = b + c->grain < c->total ? b + c->grain : c->total;
        (*c->fn)(b, e);
      },
      tasks, 0, &c);
}

}  // namespace lowbit
