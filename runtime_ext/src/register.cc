// Library entry point: ORT calls RegisterCustomOps when the library is registered with
// SessionOptions.register_custom_ops_library. Registers every op in domain "lowbit", version 1.
#include "kernels.h"
#include "op_base.h"
#include "ops.h"

namespace {

lowbit::LowbitOp<lowbit::MatMulLowbit> g_matmul;
lowbit::LowbitOp<lowbit::GatherLowbit> g_gather;
lowbit::LowbitOp<lowbit::ReorderNorm> g_reorder_norm;
lowbit::LowbitOp<lowbit::FgmpActQuant> g_fgmp;
lowbit::LowbitOp<lowbit::Hadamard> g_hadamard;
lowbit::LowbitOp<lowbit::GroupQuant> g_group_quant;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // ORT older than API 17: nothing we can report through
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain("lowbit", &domain)) return st;
  OrtCustomOp* ops[] = {&g_matmul, &g_gather, &g_reorder_norm, &g_fgmp, &g_hadamard, &g_group_quant};
  for (OrtCustomOp* op : ops)
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  // The domain must outlive every session using it; it is intentionally never released.
  return api->AddCustomOpDomain(options, domain);
}

// The kernel set this process runs ("scalar", "avx2" or "avx512vnni", see SelectKernels), for
// tests and benchmarks (ctypes): LOWBIT_ORT_ISA is read once, at the first call or kernel run.
extern "C" __attribute__((visibility("default"))) const char* LowbitKernelSet() {
  return lowbit::SelectKernels().name;
}
