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

#include <algorithm>
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

// An int attribute: `dflt` when absent, or an error naming it when `required`.
inline int64_t attr_int(const Ort::ConstKernelInfo& info, const char* name, bool required, int64_t dflt) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    if (required) fail("missing required int attribute '", name, "'");
    return dflt;
  }
}

// An ints attribute, or an empty vector when absent.
inline std::vector<int64_t> attr_ints(const Ort::ConstKernelInfo& info, const char* name) {
  try {
    return info.GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    return {};
  }
}

// Constant inputs (initializers) validated once when the kernel is created: Compute recognizes
// them by their data pointer and skips fetching their type and shape again (a few ORT API calls
// each, a measurable part of a small M = 1 call).
template <size_t NIn>
struct ConstInputs {
  const void* data[NIn] = {};
  ONNXTensorElementDataType type[NIn] = {};
  int64_t count[NIn] = {};

  // Input i when it is a constant of this type and element count: remembered, its data returned.
  // Anything else returns nullptr and Compute validates (and reports) it on every call.
  const void* remember(const Ort::ConstKernelInfo& info, size_t i, ONNXTensorElementDataType t, int64_t n) {
    if (i >= NIn || i >= info.GetInputCount()) return nullptr;
    int is_const = 0;
    Ort::ConstValue v = info.GetTensorConstantInput(i, &is_const);
    if (!is_const || !static_cast<const OrtValue*>(v) || !v.IsTensor()) return nullptr;
    auto ti = v.GetTensorTypeAndShapeInfo();
    if (ti.GetElementType() != t || static_cast<int64_t>(ti.GetElementCount()) != n) return nullptr;
    data[i] = v.GetTensorRawData();
    type[i] = t;
    count[i] = n;
    return data[i];
  }

  // Input i: the remembered constant without further API calls, or get_input.
  In fetch(const Ort::KernelContext& ctx, size_t i) const {
    if (data[i] && i < ctx.GetInputCount()) {
      Ort::ConstValue v = ctx.GetInput(i);
      if (static_cast<const OrtValue*>(v) && v.GetTensorRawData() == data[i]) {
        In in;
        in.value = v;
        in.type = type[i];
        in.count = count[i];
        in.ptr = data[i];
        return in;
      }
    }
    return get_input(ctx, i);
  }
  bool is_const(const In& in, size_t i) const { return in.ptr && in.ptr == data[i]; }
};

// One task runs in the calling thread (no pool round trip), more go to ORT's pool.
inline void run_tasks(const Ort::KernelContext& ctx, void (*fn)(void*, size_t), int64_t tasks, void* work) {
  if (tasks == 1) fn(work, 0);
  else ctx.ParallelFor(fn, static_cast<size_t>(tasks), 0, work);
}

// A product's split into row_tasks x col_tasks tasks of rows_per rows and tiles_per column tiles;
// each output element belongs to exactly one task, so results do not depend on the split or the
// thread count.
struct TaskGrid {
  int64_t row_tasks, col_tasks, rows_per, tiles_per;
};

// Few rows (decode steps): the call is bound by reading the weights, so the column tiles are split
// by weight bytes: a power of two of tasks (1, 2, 4, ... 64: as many per thread with pools of 2, 4,
// 8 threads), each streaming >= kStreamTaskBytes, ceil(tiles / tasks) tiles each, rounded up to a
// multiple of `align` tiles (QMatMul: even counts, measured faster; PackedMatMul's tiles come in
// groups of 4 whose lines interleave, and a task starting mid-group would read half of every line
// pair the hardware prefetchers fetch). ORT's pool threads (the calling one included) claim
// the tasks dynamically, and a task costs a little (per-task setup, the claim): at M = 1, 2 threads
// and a spinning worker, QMatMul 576x576 (weights in L3) takes 5.6 us in 2 tasks, 6.2 in 4, 7.8 in
// 16 (9.5 in one thread; medians, see custom_ops/README.md "Threads").
constexpr int64_t kStreamTaskBytes = int64_t{64} << 10;
inline int64_t round_up(int64_t v, int64_t align) { return (v + align - 1) / align * align; }

inline TaskGrid stream_grid(int64_t M, int64_t n_tiles, int64_t tile_bytes, int64_t align) {
  const int64_t fit = std::min<int64_t>(64, tile_bytes * n_tiles / kStreamTaskBytes);
  int64_t want = 1;
  while (want * 2 <= fit) want *= 2;
  TaskGrid g{1, 0, M, (n_tiles + want - 1) / want};
  if (g.tiles_per > 1) g.tiles_per = round_up(g.tiles_per, align);
  g.col_tasks = (n_tiles + g.tiles_per - 1) / g.tiles_per;
  return g;
}

// More rows: chunks of >= min_tiles column tiles (per-task setup stays small against the work),
// a multiple of `align` tiles, at most 64 tasks and about 2^20 MACs per task at least. Rows are split
// only when there is a single column chunk (a row split repeats the per-tile weight preparation).
inline TaskGrid gemm_grid(int64_t M, int64_t K, int64_t n_tiles, int64_t min_tiles, int64_t align) {
  const int64_t macs = M * K * n_tiles * 16;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(64, macs >> 20));
  TaskGrid g{};
  g.col_tasks = std::max<int64_t>(1, std::min(want, n_tiles / min_tiles));
  g.row_tasks = g.col_tasks > 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(want, M / 32));
  g.tiles_per = round_up((n_tiles + g.col_tasks - 1) / g.col_tasks, align);
  g.col_tasks = (n_tiles + g.tiles_per - 1) / g.tiles_per;
  g.rows_per = (M + g.row_tasks - 1) / g.row_tasks;
  g.row_tasks = (M + g.rows_per - 1) / g.rows_per;
  return g;
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
std::vector<Ort::Custom::OrtLiteCustomOp*> make_packed_matmul_ops();
std::vector<Ort::Custom::OrtLiteCustomOp*> make_token_prune_ops();

}  // namespace ortglue
}  // namespace llmfold
