// Separates QMatMul's kernel time from its op overhead: times the active KernelTable called
// directly (quantize_rows + gemm_int, or gemm_a16) against the same model run through ONNX Runtime
// (C++ API, bound input/output, 1 intra-op thread), and an ORT Relu model of the same input as the
// runtime's own per-call floor. Thread CPU time, medians of several rounds.
//   llmfold_op_overhead LIBONNXRUNTIME.so LIBLLMFOLD_OPS.so MODEL.onnx B.bin S.bin K N act_bits [M]
// MODEL.onnx is a QMatMul model (block 32, no zero points) whose packed B/scales are B.bin/S.bin
// (raw bytes / float16 in the packed layout), e.g. written with compiler.custom_ops.pack_int4_blocks.
// Built with the kernels (target llmfold_op_overhead, EXCLUDE_FROM_ALL); ORT is loaded with dlopen.
#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "kernels.h"
#include "paths.h"

using namespace llmfold;

namespace {

double cpu_us() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

// Median over rounds of the mean per-call time of `inner` calls.
double time_us(const std::function<void()>& fn, int inner, int rounds = 9) {
  for (int i = 0; i < inner / 4 + 1; ++i) fn();
  std::vector<double> r;
  for (int k = 0; k < rounds; ++k) {
    const double t = cpu_us();
    for (int i = 0; i < inner; ++i) fn();
    r.push_back((cpu_us() - t) / inner);
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}

template <typename T>
std::vector<T> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<T> v(b.size() / sizeof(T));
  std::memcpy(v.data(), b.data(), v.size() * sizeof(T));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 9) {
    std::fprintf(stderr, "usage: %s LIBORT LIBOPS MODEL B.bin S.bin K N act_bits [M]\n", argv[0]);
    return 2;
  }
  void* h = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!h) {
    std::fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
    return 1;
  }
  auto get_base = reinterpret_cast<const OrtApiBase* (*)()>(dlsym(h, "OrtGetApiBase"));
  Ort::InitApi(get_base()->GetApi(ORT_API_VERSION));
  const int64_t K = std::atoll(argv[6]), N = std::atoll(argv[7]);
  const int act_bits = std::atoi(argv[8]);
  const int64_t M = argc > 9 ? std::atoll(argv[9]) : 1;
  const int64_t bs = 32, nb = (K + bs - 1) / bs, Kp = nb * bs, nt = (N + 15) / 16;
  std::vector<uint8_t> B = read_file<uint8_t>(argv[4]);
  // the kernel-only timing reads a 64-byte aligned copy, as ORT places initializers (a large
  // std::vector sits at a page + 16 bytes: every 64-byte load would straddle two lines)
  std::vector<uint8_t> B_store;
  uint8_t* const Ba = scratch(B_store, B.size());
  std::copy(B.begin(), B.end(), Ba);
  std::vector<uint16_t> S = read_file<uint16_t>(argv[5]);  // fp16 bits
  if (static_cast<int64_t>(B.size()) != nt * Kp / 8 * 64 || static_cast<int64_t>(S.size()) != nt * nb * 16) {
    std::fprintf(stderr, "B.bin/S.bin sizes do not match K=%lld N=%lld block 32\n", (long long)K, (long long)N);
    return 1;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> A(static_cast<size_t>(M * Kp), 0.0f), Y(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) A[m * Kp + k] = nd(rng);
  const int inner = std::max<int>(1, static_cast<int>(20000.0 / (1.0 + M * K * N / 4e5)));

  // Kernel only.
  const KernelTable& kt = active_kernels();
  const PackedInt4 W{Ba, S.data(), nullptr, K, N, bs, nb, nt};
  std::vector<int8_t> q(static_cast<size_t>(M * Kp));
  std::vector<float> qs(static_cast<size_t>(M));
  std::vector<int32_t> bsum(static_cast<size_t>(M * nb));
  const QuantizedRows Q{q.data(), qs.data(), bsum.data(), Kp, nb};
  double t_quant = 0, t_gemm = 0;
  if (act_bits == 16) {
    t_gemm = time_us([&] { kt.gemm_a16(A.data(), M, W, 0, nt, nullptr, Y.data(), N); }, inner);
  } else {
    t_quant = time_us([&] { kt.quantize_rows(A.data(), Kp, K, 0, M, nullptr, act_bits, Q); }, inner);
    t_gemm = time_us([&] { kt.gemm_int(Q, M, act_bits, W, 0, nt, nullptr, Y.data(), N); }, inner);
  }

  // Through ORT.
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "overhead");
  auto run_model = [&](Ort::Session& s, int64_t cols, int64_t ycols) {
    Ort::MemoryInfo mi = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<float> a(static_cast<size_t>(M * cols), 0.5f), y(static_cast<size_t>(M * ycols));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < std::min(cols, K); ++k) a[m * cols + k] = A[m * Kp + k];
    const int64_t ashape[2] = {M, cols}, yshape[2] = {M, ycols};
    Ort::Value av = Ort::Value::CreateTensor<float>(mi, a.data(), a.size(), ashape, 2);
    Ort::Value yv = Ort::Value::CreateTensor<float>(mi, y.data(), y.size(), yshape, 2);
    Ort::IoBinding b(s);
    b.BindInput("A", av);
    b.BindOutput("Y", yv);
    Ort::RunOptions ro;
    return time_us([&] { s.Run(ro, b); }, inner);
  };
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(1);
  so.SetGraphOptimizationLevel(ORT_ENABLE_ALL);
  so.RegisterCustomOpsLibrary(argv[2]);
  Ort::Session sess(env, argv[3], so);
  const double t_ort = run_model(sess, K, N);

  // ORT's own per-call floor: Relu of the same input (a serialized 73-byte ONNX model).
  static const unsigned char relu_model[] = {  // Y = Relu(A), A float [M, K] symbolic; ir 8, opset 17
      0x08, 0x08, 0x3a, 0x3f, 0x0a, 0x0c, 0x0a, 0x01, 0x41, 0x12, 0x01, 0x59, 0x22, 0x04, 0x52, 0x65, 0x6c, 0x75,
      0x12, 0x01, 0x67, 0x5a, 0x15, 0x0a, 0x01, 0x41, 0x12, 0x10, 0x0a, 0x0e, 0x08, 0x01, 0x12, 0x0a, 0x0a, 0x03,
      0x12, 0x01, 0x4d, 0x0a, 0x03, 0x12, 0x01, 0x4b, 0x62, 0x15, 0x0a, 0x01, 0x59, 0x12, 0x10, 0x0a, 0x0e, 0x08,
      0x01, 0x12, 0x0a, 0x0a, 0x03, 0x12, 0x01, 0x4d, 0x0a, 0x03, 0x12, 0x01, 0x4b, 0x42, 0x04, 0x0a, 0x00, 0x10,
      0x11};
  double t_relu = -1;
  try {
    Ort::SessionOptions so2;
    so2.SetIntraOpNumThreads(1);
    Ort::Session relu(env, relu_model, sizeof relu_model, so2);
    t_relu = run_model(relu, K, K);
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "relu model: %s\n", e.what());
  }
  std::printf("%s a%d M=%lld K=%lld N=%lld: kernel %.2f us (quantize %.2f + gemm %.2f); through ORT %.2f us; "
              "ORT Relu floor %.2f us; op overhead %.2f us\n",
              kt.name, act_bits, (long long)M, (long long)K, (long long)N, t_quant + t_gemm, t_quant, t_gemm, t_ort,
              t_relu, t_ort - t_relu - t_quant - t_gemm);
  return 0;
}
