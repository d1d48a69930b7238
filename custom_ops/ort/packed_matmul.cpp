// llmfold.PackedMatMul: Y[..., N] = A[..., K] . W[K, N] (+ bias) with float32 weights in 16-column
// tiles (kernels/kernels.h, PackedFloat): the same product as ONNX MatMul, with the weights laid out
// so that a decode step reads each matrix once, in memory order. Inputs: A float, B float (the
// packed weights, n_tiles*K*16 elements), bias float [N] (optional). Attributes: K, N.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"

namespace llmfold {
namespace ortglue {
namespace {

struct PackedMatMulKernel {
  static constexpr const char* kName = "PackedMatMul";
  int64_t K = 0, N = 0, n_tiles = 0;
  ConstInputs<3> consts;

  explicit PackedMatMulKernel(const OrtKernelInfo* raw) {
    Ort::ConstKernelInfo info(raw);
    K = attr_int(info, "K", true, 0);
    N = attr_int(info, "N", true, 0);
    if (K < 1 || K > (int64_t{1} << 30)) fail("attribute K must be in [1, 2^30], got ", std::to_string(K));
    if (N < 1 || N > (int64_t{1} << 30)) fail("attribute N must be in [1, 2^30], got ", std::to_string(N));
    n_tiles = (N + kTileN - 1) / kTileN;
    consts.remember(info, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, n_tiles * K * kTileN);
    consts.remember(info, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, N);
  }

  struct Work {
    const KernelTable* kt;
    PackedFloat W;
    const float* A;
    const float* bias;
    float* C;
    int64_t M;
    TaskGrid grid;
  };

  static void run_task(void* p, size_t i) {
    const Work& w = *static_cast<const Work*>(p);
    const int64_t rt = static_cast<int64_t>(i) / w.grid.col_tasks, ct = static_cast<int64_t>(i) % w.grid.col_tasks;
    const int64_t m0 = rt * w.grid.rows_per, m1 = std::min(w.M, m0 + w.grid.rows_per);
    const int64_t t0 = ct * w.grid.tiles_per, t1 = std::min(w.W.n_tiles, t0 + w.grid.tiles_per);
    if (m0 < m1 && t0 < t1) w.kt->gemm_f32(w.A + m0 * w.W.K, w.W.K, m1 - m0, w.W, t0, t1, w.bias, w.C + m0 * w.W.N, w.W.N);
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const In A = get_input(ctx, 0), B = consts.fetch(ctx, 1), bias = consts.fetch(ctx, 2);
    if (!A) fail("input A is required");
    if (!B) fail("input B (packed weights) is required");
    expect_type(A, "A", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    expect_type(B, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (A.shape.empty()) fail("A must have rank >= 1");
    if (A.shape.back() != K)
      fail("A's last dimension is ", std::to_string(A.shape.back()), " but attribute K is ", std::to_string(K),
           " (A shape ", shape_str(A.shape), ")");
    if (B.count != n_tiles * K * kTileN)
      fail("packed B has ", std::to_string(B.count), " elements; K=", std::to_string(K), " N=", std::to_string(N),
           " needs exactly ", std::to_string(n_tiles * K * kTileN), " (n_tiles*K*16)");
    const float* bp = nullptr;
    if (bias) {
      expect_type(bias, "bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (bias.count != N) fail("bias has ", std::to_string(bias.count), " elements; needs N=", std::to_string(N));
      bp = bias.data<float>();
    }
    std::vector<int64_t> yshape(A.shape.begin(), A.shape.end() - 1);
    yshape.push_back(N);
    const int64_t M = A.count / K;
    Ort::UnownedValue Yv = ctx.GetOutput(0, yshape);
    if (M == 0) return;
    Work w{&active_kernels(), PackedFloat{B.data<float>(), K, N, n_tiles}, A.data<float>(), bp,
           Yv.GetTensorMutableData<float>(), M, {}};
    // Few rows (M <= 3, decode steps) split by weight bytes, more rows in chunks of tiles; either
    // way in whole tile groups, so that each task reads whole lines of the layout (common.h).
    w.grid = M <= 3 ? stream_grid(M, n_tiles, K * kTileN * 4, kTileGroup) : gemm_grid(M, K, n_tiles, kTileGroup, kTileGroup);
    run_tasks(ctx, &PackedMatMulKernel::run_task, w.grid.row_tasks * w.grid.col_tasks, &w);
  }
};

}  // namespace

std::vector<Ort::Custom::OrtLiteCustomOp*> make_packed_matmul_ops() {
  using C = OrtCustomOpInputOutputCharacteristic;
  return {new Op<PackedMatMulKernel>(
      "PackedMatMul", {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL}, {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {C::INPUT_OUTPUT_REQUIRED})};
}

}  // namespace ortglue
}  // namespace llmfold
