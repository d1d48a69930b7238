// Registration of the llmfold custom-op domain (version 1).
//  - RegisterCustomOps: the entry point SessionOptions.register_custom_ops_library(path) looks up.
//  - RegisterLlmfoldOps: the same, under a name that cannot clash when the library is linked
//    statically into an app (SessionOptions::RegisterCustomOpsUsingFunction("RegisterLlmfoldOps")).
#include <cstdio>
#include <mutex>

#include "common.h"

#define LLMFOLD_EXPORT __attribute__((visibility("default")))

namespace llmfold {
namespace ortglue {
namespace {

OrtStatus* register_domain(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base ? api_base->GetApi(ORT_API_VERSION) : nullptr;
  if (!api) {
    std::fprintf(stderr, "llmfold: this ONNX Runtime (%s) is older than the headers the op library was built with (API %d)\n",
                 api_base ? api_base->GetVersionString() : "?", ORT_API_VERSION);
    return nullptr;  // no OrtApi to build an error status with
  }
  Ort::InitApi(api);
  // Ops and domains must outlive every session that uses them: keep them for the process lifetime.
  // The ops are never deleted: OrtLiteCustomOp has no virtual destructor, so deleting an Op<Kernel>
  // through it (as a unique_ptr of the base did at exit) is undefined (ASan: new-delete-type-mismatch).
  static std::mutex mu;
  static std::vector<Ort::Custom::OrtLiteCustomOp*> ops;
  static std::vector<Ort::CustomOpDomain> domains;
  std::lock_guard<std::mutex> lock(mu);
  try {
    if (ops.empty()) {
      for (auto* op : make_qmatmul_ops()) ops.emplace_back(op);
      for (auto* op : make_packed_matmul_ops()) ops.emplace_back(op);
      for (auto* op : make_token_prune_ops()) ops.emplace_back(op);
    }
    Ort::CustomOpDomain domain{kDomain};
    for (auto* op : ops) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("llmfold: registering custom ops failed: ") + e.what()).c_str());
  }
  return nullptr;
}

}  // namespace
}  // namespace ortglue
}  // namespace llmfold

extern "C" {
LLMFOLD_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return llmfold::ortglue::register_domain(options, api_base);
}
LLMFOLD_EXPORT OrtStatus* ORT_API_CALL RegisterLlmfoldOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return llmfold::ortglue::register_domain(options, api_base);
}
}
