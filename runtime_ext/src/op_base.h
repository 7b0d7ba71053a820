// Boilerplate shared by every lowbit op: a CustomOpBase whose kernel is constructed from the
// node's attributes and whose compute reports failures as OrtStatus (never throws into ORT).
//
// A kernel class K provides: static const char* kName; static constexpr size_t kNumInputs,
// kNumRequired; static ONNXTensorElementDataType InputType(size_t);
// explicit K(const OrtKernelInfo*) (throws OpError on bad attributes);
// void Compute(Ort::KernelContext&) (throws OpError on bad inputs).
#pragma once

#include "common.h"

namespace lowbit {

template <typename K>
struct KernelAdapter {
  K impl;
  explicit KernelAdapter(const OrtKernelInfo* info) : impl(info) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      impl.Compute(ctx);
      return nullptr;
    } catch (const std::exception& e) {
      return ToStatus(Ort::GetApi(), e);
    }
  }
};

template <typename K>
struct LowbitOp : Ort::CustomOpBase<LowbitOp<K>, KernelAdapter<K>, true> {
  const char* GetName() const { return K::kName; }
  size_t GetInputTypeCount() const { return K::kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K::InputType(i); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < K::kNumRequired ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      *out = new KernelAdapter<K>(info);
      return nullptr;
    } catch (const OpError& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string(K::kName) + ": " + e.what()).c_str());
    } catch (const std::exception& e) {
      return ToStatus(api, e);
    }
  }
};

}  // namespace lowbit
