// Kernel classes of the lowbit ops (one .cc per op); registered in register.cc.
#pragma once

#include "common.h"

namespace lowbit {

class MatMulLowbit {
 public:
  static const char* kName;
  static constexpr size_t kNumInputs = 8, kNumRequired = 4;
  static ONNXTensorElementDataType InputType(size_t i);
  explicit MatMulLowbit(const OrtKernelInfo* info);
  void Compute(Ort::KernelContext& ctx);

 private:
  enum class ActMode { kFloat, kInt8Dynamic, kInt8Static, kInt8Group };
  Format format_;
  int64_t block_;
  ActMode act_mode_;
  int64_t act_group_ = 0;  // G of act_mode=int8_group
};

}  // namespace lowbit

namespace lowbit {

class GatherLowbit {
 public:
  static const char* kName;
  static constexpr size_t kNumInputs = 4, kNumRequired = 4;
  static ONNXTensorElementDataType InputType(size_t i);
  explicit GatherLowbit(const OrtKernelInfo* info);
  void Compute(Ort::KernelContext& ctx);

 private:
  Format format_;
  int64_t block_;
};

class ReorderNorm {
 public:
  static const char* kName;
  static constexpr size_t kNumInputs = 4, kNumRequired = 3;
  static ONNXTensorElementDataType InputType(size_t i);
  explicit ReorderNorm(const OrtKernelInfo* info);
  void Compute(Ort::KernelContext& ctx);

 private:
  bool layer_;  // LayerNorm (subtract the mean) vs RMSNorm
  float epsilon_;
};

}  // namespace lowbit

namespace lowbit {

class FgmpActQuant {
 public:
  static const char* kName;
  static constexpr size_t kNumInputs = 4, kNumRequired = 3;
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  explicit FgmpActQuant(const OrtKernelInfo* info);
  void Compute(Ort::KernelContext& ctx);
};

}  // namespace lowbit

namespace lowbit {

class Hadamard {
 public:
  static const char* kName;
  static constexpr size_t kNumInputs = 2, kNumRequired = 2;
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  explicit Hadamard(const OrtKernelInfo* info);
  void Compute(Ort::KernelContext& ctx);

 private:
  int64_t size_;
};

}  // namespace lowbit

namespace lowbit {

class GroupQuant {
 public:
  static const char* kName;
  static constexpr size_t kNumInputs = 2, kNumRequired = 2;
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  explicit GroupQuant(const OrtKernelInfo* info);
  void Compute(Ort::KernelContext& ctx);

 private:
  int64_t group_;
};

}  // namespace lowbit
