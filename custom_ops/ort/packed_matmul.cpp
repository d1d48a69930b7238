// llmfold.PackedMatMul: Y[..., N] = A[..., K] . W[K, N] (+ bias) with float32 weights in 16-column
// tiles (kernels/kernels.h, PackedFloat): the same product as ONNX MatMul, with the weights laid out
// so that a decode step reads each matrix once, in memory order. Inputs: A float, B float (the
// packed weights, n_tiles*K*16 elements), bias float [N] (optional). Attributes: K, N.
//
// Block-diagonal form (attributes group_k, group_n, G >= 2 entries summing to K and N; G outputs):
// output g is A[..., k_g .. k_g + group_k[g]) . W_g (+ bias[n_g .. n_g + group_n[g])), W_g
// [group_k[g], group_n[g]] packed as above, the G packings one after another in B. The second
// factors of low-rank pairs that share a first factor (passes/pack_lowrank.py) are one such node:
// one stream and one thread-pool round for all of them.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"

namespace llmfold {
namespace ortglue {
namespace {

constexpr size_t kMaxGroups = 8;  // outputs the op declares (1 required + 7 optional)

struct PackedMatMulKernel {
  static constexpr const char* kName = "PackedMatMul";
  int64_t K = 0, N = 0, n_tiles = 0, elements = 0;
  // Per group: rows, columns, first input column, first output column, first tile (global tile
  // numbering runs through the groups; tile_begin has one more entry, the total) and first element of B.
  std::vector<int64_t> group_k, group_n, k_begin, n_begin, tile_begin, data_begin;
  ConstInputs<3> consts;

  explicit PackedMatMulKernel(const OrtKernelInfo* raw) {
    Ort::ConstKernelInfo info(raw);
    K = attr_int(info, "K", true, 0);
    N = attr_int(info, "N", true, 0);
    if (K < 1 || K > (int64_t{1} << 30)) fail("attribute K must be in [1, 2^30], got ", std::to_string(K));
    if (N < 1 || N > (int64_t{1} << 30)) fail("attribute N must be in [1, 2^30], got ", std::to_string(N));
    group_k = attr_ints(info, "group_k");
    group_n = attr_ints(info, "group_n");
    if (group_k.empty() != group_n.empty()) fail("attributes group_k and group_n come together (one is missing)");
    if (group_k.empty()) {
      group_k = {K};
      group_n = {N};
    }
    if (group_k.size() != group_n.size() || group_k.size() > kMaxGroups)
      fail("group_k and group_n must have the same number of entries, 1 to ", std::to_string(kMaxGroups), "; got ",
           std::to_string(group_k.size()), " and ", std::to_string(group_n.size()));
    int64_t k0 = 0, n0 = 0;
    for (size_t g = 0; g < group_k.size(); ++g) {
      if (group_k[g] < 1 || group_n[g] < 1)
        fail("group ", std::to_string(g), " is empty: group_k ", std::to_string(group_k[g]), ", group_n ", std::to_string(group_n[g]));
      k_begin.push_back(k0);
      n_begin.push_back(n0);
      tile_begin.push_back(n_tiles);
      data_begin.push_back(elements);
      k0 += group_k[g];
      n0 += group_n[g];
      if (k0 > K || n0 > N) break;  // (reported below, before any product can overflow)
      const int64_t tiles = (group_n[g] + kTileN - 1) / kTileN;
      n_tiles += tiles;
      elements += tiles * group_k[g] * kTileN;
    }
    if (k0 != K || n0 != N)
      fail("group_k must sum to K=", std::to_string(K), " and group_n to N=", std::to_string(N), "; they sum to ",
           std::to_string(k0), " and ", std::to_string(n0));
    tile_begin.push_back(n_tiles);
    consts.remember(info, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, elements);
    consts.remember(info, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, N);
  }

  struct Work {
    const PackedMatMulKernel* op;
    const KernelTable* kt;
    const float* B;
    const float* A;
    const float* bias;
    float* C[kMaxGroups];
    int64_t M;
    TaskGrid grid;
  };

  // Task i: rows and global tiles of its grid cell, group by group (a cell may span groups).
  static void run_task(void* p, size_t i) {
    const Work& w = *static_cast<const Work*>(p);
    const PackedMatMulKernel& op = *w.op;
    const int64_t rt = static_cast<int64_t>(i) / w.grid.col_tasks, ct = static_cast<int64_t>(i) % w.grid.col_tasks;
    const int64_t m0 = rt * w.grid.rows_per, m1 = std::min(w.M, m0 + w.grid.rows_per);
    const int64_t t0 = ct * w.grid.tiles_per, t1 = std::min(op.n_tiles, t0 + w.grid.tiles_per);
    if (m0 >= m1) return;
    for (size_t g = 0; g < op.group_k.size(); ++g) {
      const int64_t a = std::max(t0, op.tile_begin[g]), b = std::min(t1, op.tile_begin[g + 1]);
      if (a >= b) continue;
      const int64_t kg = op.group_k[g], ng = op.group_n[g];
      const PackedFloat W{w.B + op.data_begin[g], kg, ng, op.tile_begin[g + 1] - op.tile_begin[g]};
      w.kt->gemm_f32(w.A + m0 * op.K + op.k_begin[g], op.K, m1 - m0, W, a - op.tile_begin[g], b - op.tile_begin[g],
                     w.bias ? w.bias + op.n_begin[g] : nullptr, w.C[g] + m0 * ng, ng);
    }
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
    if (B.count != elements)
      fail("packed B has ", std::to_string(B.count), " elements; K=", std::to_string(K), " N=", std::to_string(N),
           group_k.size() > 1 ? " in groups needs exactly " : " needs exactly ", std::to_string(elements),
           " (n_tiles*K*16", group_k.size() > 1 ? " summed over the groups)" : ")");
    const float* bp = nullptr;
    if (bias) {
      expect_type(bias, "bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (bias.count != N) fail("bias has ", std::to_string(bias.count), " elements; needs N=", std::to_string(N));
      bp = bias.data<float>();
    }
    if (ctx.GetOutputCount() != group_k.size())
      fail("the node has ", std::to_string(ctx.GetOutputCount()), " outputs; its ", std::to_string(group_k.size()),
           " group(s) need exactly as many");
    const int64_t M = A.count / K;
    Work w{this, &active_kernels(), B.data<float>(), A.data<float>(), bp, {}, M, {}};
    std::vector<int64_t> yshape(A.shape.begin(), A.shape.end() - 1);
    yshape.push_back(0);
    for (size_t g = 0; g < group_k.size(); ++g) {
      yshape.back() = group_n[g];
      Ort::UnownedValue y = ctx.GetOutput(g, yshape);
      if (!static_cast<OrtValue*>(y)) fail("output ", std::to_string(g), " is missing; every group needs its output");
      w.C[g] = y.GetTensorMutableData<float>();
    }
    if (M == 0) return;
    // Few rows (M <= 3, decode steps) split by weight bytes, more rows in chunks of tiles; either
    // way in whole tile groups, so that each task reads whole lines of the layout (common.h).
    w.grid = M <= 3 ? stream_grid(M, n_tiles, elements * 4 / n_tiles, kTileGroup)
                    : gemm_grid(M, elements / (n_tiles * kTileN), n_tiles, kTileGroup, kTileGroup);  // (mean rows per tile)
    run_tasks(ctx, &PackedMatMulKernel::run_task, w.grid.row_tasks * w.grid.col_tasks, &w);
  }
};

}  // namespace

std::vector<Ort::Custom::OrtLiteCustomOp*> make_packed_matmul_ops() {
  using C = OrtCustomOpInputOutputCharacteristic;
  std::vector<ONNXTensorElementDataType> out_types(kMaxGroups, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  std::vector<C> out_chars(kMaxGroups, C::INPUT_OUTPUT_OPTIONAL);
  out_chars[0] = C::INPUT_OUTPUT_REQUIRED;
  return {new Op<PackedMatMulKernel>(
      "PackedMatMul", {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL}, out_types, out_chars)};
}

}  // namespace ortglue
}  // namespace llmfold
