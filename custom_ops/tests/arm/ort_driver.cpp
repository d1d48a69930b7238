// Minimal ONNX Runtime driver (C API) for running llmfold models on aarch64 under qemu: loads a
// model with the llmfold custom op library, feeds one float input [M, K] from a raw file and
// writes every (float) output i as raw float32 to OUT_PREFIX.i.f32, printing its name and shape.
//   ort_driver LIBLLMFOLD_OPS MODEL.onnx INPUT.f32 M K OUT_PREFIX [THREADS]
// Built against ORT 1.21 headers, run against the 1.31 aarch64 libonnxruntime.so (older headers on
// a newer runtime is the supported direction of ORT's C API).
#include <onnxruntime_c_api.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

const OrtApi* g_ort = nullptr;

void check(OrtStatus* st, const char* what) {
  if (!st) return;
  std::fprintf(stderr, "ort_driver: %s: %s\n", what, g_ort->GetErrorMessage(st));
  g_ort->ReleaseStatus(st);
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s LIB MODEL INPUT.f32 M K OUT_PREFIX [THREADS]\n", argv[0]);
    return 2;
  }
  const char* lib = argv[1];
  const char* model = argv[2];
  const int64_t M = std::atoll(argv[4]), K = std::atoll(argv[5]);
  const int threads = argc > 7 ? std::atoi(argv[7]) : 1;
  g_ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!g_ort) {
    std::fprintf(stderr, "ort_driver: runtime does not offer C API version %d\n", ORT_API_VERSION);
    return 1;
  }
  std::vector<float> in(static_cast<size_t>(M * K));
  {
    FILE* f = std::fopen(argv[3], "rb");
    if (!f || std::fread(in.data(), sizeof(float), in.size(), f) != in.size()) {
      std::fprintf(stderr, "ort_driver: cannot read %lld floats from %s\n", (long long)in.size(), argv[3]);
      return 1;
    }
    std::fclose(f);
  }
  OrtEnv* env;
  check(g_ort->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "ort_driver", &env), "CreateEnv");
  OrtSessionOptions* so;
  check(g_ort->CreateSessionOptions(&so), "CreateSessionOptions");
  check(g_ort->SetIntraOpNumThreads(so, threads), "SetIntraOpNumThreads");
  check(g_ort->RegisterCustomOpsLibrary_V2(so, lib), "RegisterCustomOpsLibrary_V2");
  OrtSession* sess;
  check(g_ort->CreateSession(env, model, so, &sess), "CreateSession");

  OrtAllocator* alloc;
  check(g_ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocator");
  char* in_name;
  check(g_ort->SessionGetInputName(sess, 0, alloc, &in_name), "SessionGetInputName");
  size_t n_out;
  check(g_ort->SessionGetOutputCount(sess, &n_out), "SessionGetOutputCount");
  std::vector<char*> out_names(n_out);
  for (size_t i = 0; i < n_out; ++i)
    check(g_ort->SessionGetOutputName(sess, i, alloc, &out_names[i]), "SessionGetOutputName");

  OrtMemoryInfo* mem;
  check(g_ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem), "CreateCpuMemoryInfo");
  const int64_t shape[2] = {M, K};
  OrtValue* input = nullptr;
  check(g_ort->CreateTensorWithDataAsOrtValue(mem, in.data(), in.size() * sizeof(float), shape, 2,
                                              ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input),
        "CreateTensor");
  std::vector<OrtValue*> outputs(n_out, nullptr);
  const char* in_names[] = {in_name};
  check(g_ort->Run(sess, nullptr, in_names, &input, 1, out_names.data(), n_out, outputs.data()), "Run");

  for (size_t o = 0; o < n_out; ++o) {
    OrtTensorTypeAndShapeInfo* info;
    check(g_ort->GetTensorTypeAndShape(outputs[o], &info), "GetTensorTypeAndShape");
    ONNXTensorElementDataType type;
    check(g_ort->GetTensorElementType(info, &type), "GetTensorElementType");
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      std::fprintf(stderr, "ort_driver: output %s is not float\n", out_names[o]);
      return 1;
    }
    size_t rank, count;
    check(g_ort->GetDimensionsCount(info, &rank), "GetDimensionsCount");
    std::vector<int64_t> dims(rank);
    check(g_ort->GetDimensions(info, dims.data(), rank), "GetDimensions");
    check(g_ort->GetTensorShapeElementCount(info, &count), "GetTensorShapeElementCount");
    float* out;
    check(g_ort->GetTensorMutableData(outputs[o], reinterpret_cast<void**>(&out)), "GetTensorMutableData");
    const std::string path = std::string(argv[6]) + "." + std::to_string(o) + ".f32";
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(out, sizeof(float), count, f) != count) {
      std::fprintf(stderr, "ort_driver: cannot write %s\n", path.c_str());
      return 1;
    }
    std::fclose(f);
    std::printf("output %zu %s shape [", o, out_names[o]);
    for (size_t i = 0; i < rank; ++i) std::printf(i ? ",%lld" : "%lld", (long long)dims[i]);
    std::printf("]\n");
    g_ort->ReleaseTensorTypeAndShapeInfo(info);
    g_ort->ReleaseValue(outputs[o]);
    alloc->Free(alloc, out_names[o]);
  }
  g_ort->ReleaseValue(input);
  g_ort->ReleaseMemoryInfo(mem);
  alloc->Free(alloc, in_name);
  g_ort->ReleaseSession(sess);
  g_ort->ReleaseSessionOptions(so);
  g_ort->ReleaseEnv(env);
  return 0;
}
