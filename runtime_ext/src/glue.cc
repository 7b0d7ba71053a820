// ORT C++ API glue shared by all ops: attributes, inputs, error conversion.
#include "common.h"

#include <sstream>

namespace lowbit {

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

int64_t NumElements(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string GetStringAttr(const OrtKernelInfo* info, const char* name, const char* dflt) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    if (dflt == nullptr) throw OpError(std::string("missing required attribute '") + name + "'");
    return dflt;
  }
  std::string out(size, '\0');
  st = api.KernelInfoGetAttribute_string(info, name, &out[0], &size);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    throw OpError(std::string("attribute '") + name + "' is not a string");
  }
  out.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return out;
}

int64_t GetIntAttr(const OrtKernelInfo* info, const char* name, int64_t dflt, bool required) {
  const OrtApi& api = Ort::GetApi();
  int64_t v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    if (required) throw OpError(std::string("missing required int attribute '") + name + "'");
    return dflt;
  }
  return v;
}

float GetFloatAttr(const OrtKernelInfo* info, const char* name, float dflt) {
  const OrtApi& api = Ort::GetApi();
  float v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, &v);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return dflt;
  }
  return v;
}

Input GetInput(Ort::KernelContext& ctx, size_t index) {
  Input in;
  if (index >= ctx.GetInputCount()) return in;
  Ort::ConstValue v = ctx.GetInput(index);
  const OrtValue* raw = v;
  if (raw == nullptr) return in;
  in.value = raw;
  auto info = v.GetTensorTypeAndShapeInfo();
  in.type = info.GetElementType();
  in.shape = info.GetShape();
  return in;
}

static const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "other";
  }
}

void ExpectType(const char* op, const char* what, const Input& in, ONNXTensorElementDataType t) {
  if (in.type != t)
    throw OpError(std::string(op) + ": input '" + what + "' must be " + TypeName(t) + ", got " +
                  TypeName(in.type));
}

float ScalarFloat(const char* op, const char* what, const Input& in) {
  ExpectType(op, what, in, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (NumElements(in.shape) != 1)
    throw OpError(std::string(op) + ": input '" + what + "' must hold one value, got shape " +
                  ShapeStr(in.shape));
  return in.data<float>()[0];
}

OrtStatusPtr ToStatus(const OrtApi& api, const std::exception& e) {
  const bool user = dynamic_cast<const OpError*>(&e) != nullptr ||
                    dynamic_cast<const Ort::Exception*>(&e) != nullptr;
  return api.CreateStatus(user ? ORT_INVALID_ARGUMENT : ORT_FAIL, e.what());
}

}  // namespace lowbit
