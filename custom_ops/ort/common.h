// ORT glue shared by the ops: an op declaration on top of the lite custom-op API's OrtLiteCustomOp
// (which provides the name/type/version plumbing) with our own kernel callbacks:
//  - CreateKernelV2 / KernelComputeV2 return OrtStatus, and every C++ exception is caught here and
//    turned into an ORT error status, so nothing ever unwinds through ORT's C boundary;
//  - inputs are read through Ort::KernelContext, so an absent optional input in the middle of the
//    list (empty name) is a null value we check, never a dereferenced null.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmfold {
namespace ortglue {

constexpr const char* kDomain = "llmfold";

// A validation failure: becomes ORT_INVALID_ARGUMENT with the op name prefixed.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string s;
  (s += ... += std::string(parts));
  throw OpError(s);
}

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

inline const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    default: return "other";
  }
}

// A present input with its type and shape (value == nullptr when absent).
struct In {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t count = 0;
  const void* ptr = nullptr;  // the data, when already fetched
  explicit operator bool() const { return value != nullptr; }
  template <typename T>
  const T* data() const {
    return ptr ? static_cast<const T*>(ptr) : Ort::ConstValue(value).GetTensorData<T>();
  }
};

inline In get_input(const Ort::KernelContext& ctx, size_t i) {
  In in;
  if (i >= ctx.GetInputCount()) return in;
  Ort::ConstValue v = ctx.GetInput(i);
  if (static_cast<const OrtValue*>(v) == nullptr) return in;
  if (!v.IsTensor()) fail("input ", std::to_string(i), " is not a tensor");
  auto info = v.GetTensorTypeAndShapeInfo();
  in.value = v;
  in.type = info.GetElementType();
  in.shape = info.GetShape();
  in.count = static_cast<int64_t>(info.GetElementCount());
  return in;
}

inline void expect_type(const In& in, const char* name, ONNXTensorElementDataType t) {
  if (in.type != t) fail(name, " must be ", type_name(t), ", got ", type_name(in.type));
}

template <typename Kernel>
struct Op : Ort::Custom::OrtLiteCustomOp {
  std::vector<OrtCustomOpInputOutputCharacteristic> in_char, out_char;

  Op(const char* name, std::vector<ONNXTensorElementDataType> in_types,
     std::vector<OrtCustomOpInputOutputCharacteristic> in_chars, std::vector<ONNXTensorElementDataType> out_types,
     std::vector<OrtCustomOpInputOutputCharacteristic> out_chars)
      : OrtLiteCustomOp(name, "CPUExecutionProvider", {}, 1, 1), in_char(std::move(in_chars)),
        out_char(std::move(out_chars)) {
    input_types_ = std::move(in_types);
    output_types_ = std::move(out_types);
    OrtCustomOp::GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return static_cast<const Op*>(op)->in_char.at(i);
    };
    OrtCustomOp::GetOutputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return static_cast<const Op*>(op)->out_char.at(i);
    };
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                     void** kernel) -> OrtStatusPtr {
      *kernel = nullptr;
      try {
        *kernel = new Kernel(info);
        return nullptr;
      } catch (const std::exception& e) {
        return api->CreateStatus(ORT_INVALID_ARGUMENT,
                                 (std::string("llmfold.") + op->GetName(op) + ": " + e.what()).c_str());
      } catch (...) {
        return api->CreateStatus(ORT_FAIL, (std::string("llmfold.") + op->GetName(op) + ": unknown error").c_str());
      }
    };
    OrtCustomOp::KernelComputeV2 = [](void* k, OrtKernelContext* context) -> OrtStatusPtr {
      // (the message prefix is only built on an error: no allocation per call)
      const auto who = [] { return std::string("llmfold.") + Kernel::kName + ": "; };
      try {
        static_cast<Kernel*>(k)->Compute(context);
        return nullptr;
      } catch (const OpError& e) {
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (who() + e.what()).c_str());
      } catch (const Ort::Exception& e) {
        return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), (who() + e.what()).c_str());
      } catch (const std::bad_alloc&) {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (who() + "out of memory").c_str());
      } catch (const std::exception& e) {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (who() + e.what()).c_str());
      } catch (...) {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (who() + "unknown error").c_str());
      }
    };
    OrtCustomOp::KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  }
};

// Builders of the ops (defined next to each kernel).
std::vector<Ort::Custom::OrtLiteCustomOp*> make_qmatmul_ops();
std::vector<Ort::Custom::OrtLiteCustomOp*> make_token_prune_ops();

}  // namespace ortglue
}  // namespace llmfold
