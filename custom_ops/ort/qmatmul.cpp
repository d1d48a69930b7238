// llmfold.QMatMul: Y[..., N] = A[..., K] . dequant(B)[K, N] (+ bias), INT4 weights in the packed
// layout of kernels/kernels.h. Inputs: A float, B uint8 (packed), scales float16, zero_points uint8
// (optional), bias float [N] (optional), channel_shift uint8 [K] (optional, TRIP: channel k of A is
// divided by 2^shift[k] before activation quantization; only meaningful for act_bits 8/4, rejected
// with act_bits 16). Attributes: K, N, block_size (16..256, power of two), act_bits (16 | 8 | 4),
// hadamard (0 = none, else h: a power of two >= 2 dividing K; every row of A is first multiplied by
// the block-diagonal Sylvester Hadamard matrix of order h, kernels/ref/hadamard.h).
#include <algorithm>
#include <cstring>
#include <memory>

#include "common.h"
#include "kernels/kernels.h"
#include "kernels/ref/hadamard.h"

namespace llmfold {
namespace ortglue {
namespace {

// Values must all be <= 15 (4-bit zero points, shift exponents).
void check_nibbles(const uint8_t* p, int64_t n, const char* what) {
  uint8_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc |= p[i];
  if (acc & 0xF0) {
    for (int64_t i = 0; i < n; ++i)
      if (p[i] > 15) fail(what, " values must be in [0, 15]; element ", std::to_string(i), " is ", std::to_string(p[i]));
  }
}

struct QMatMulKernel {
  static constexpr const char* kName = "QMatMul";
  int64_t K, N, block_size, act_bits, hadamard, swiglu, n_blocks, n_tiles, Kp;

  explicit QMatMulKernel(const OrtKernelInfo* raw) {
    Ort::ConstKernelInfo info(raw);
    K = attr_int(info, "K", true, 0);
    N = attr_int(info, "N", true, 0);
    block_size = attr_int(info, "block_size", true, 0);
    act_bits = attr_int(info, "act_bits", false, 16);
    hadamard = attr_int(info, "hadamard", false, 0);
    swiglu = attr_int(info, "swiglu", false, 0);
    if (K < 1 || K > (int64_t{1} << 30)) fail("attribute K must be in [1, 2^30], got ", std::to_string(K));
    if (N < 1 || N > (int64_t{1} << 30)) fail("attribute N must be in [1, 2^30], got ", std::to_string(N));
    if (block_size < 16 || block_size > 256 || (block_size & (block_size - 1)))
      fail("attribute block_size must be a power of two in [16, 256], got ", std::to_string(block_size));
    if (act_bits != 16 && act_bits != 8 && act_bits != 4)
      fail("attribute act_bits must be 16, 8 or 4, got ", std::to_string(act_bits));
    if (hadamard != 0 && (hadamard < 2 || (hadamard & (hadamard - 1)) || K % hadamard))
      fail("attribute hadamard must be 0 (none) or a power of two >= 2 dividing K=", std::to_string(K), ", got ",
           std::to_string(hadamard));
    if (swiglu != 0 && swiglu != 1) fail("attribute swiglu must be 0 or 1, got ", std::to_string(swiglu));
    if (swiglu && N % 2)
      fail("attribute swiglu=1 needs an even N (columns [0, N/2) gate, [N/2, N) up), got N=", std::to_string(N));
    n_blocks = (K + block_size - 1) / block_size;
    n_tiles = (N + kTileN - 1) / kTileN;
    Kp = n_blocks * block_size;
    // Constant inputs (B, scales, zero_points, bias, channel_shift): validated here once.
    const int64_t want_b = n_tiles * (Kp / kGroupK) * 64, want_s = n_tiles * n_blocks * kTileN;
    const ONNXTensorElementDataType u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                    f16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const struct {
      ONNXTensorElementDataType type;
      int64_t count;
      const char* nibbles;  // name for check_nibbles, or nullptr
    } expect[6] = {{f32, 0, nullptr}, {u8, want_b, nullptr}, {f16, want_s, nullptr}, {u8, want_s, "zero_points"},
                   {f32, N, nullptr}, {u8, K, "channel_shift"}};
    for (size_t i = 1; i < 6; ++i) {
      const void* d = consts.remember(info, i, expect[i].type, expect[i].count);
      if (d && expect[i].nibbles) check_nibbles(static_cast<const uint8_t*>(d), expect[i].count, expect[i].nibbles);
    }
  }

  ConstInputs<6> consts;

  struct Work {
    const KernelTable* kt;
    PackedInt4 W;
    const float* A;  // [M][Kp], zero beyond K
    QuantizedRows Q;
    int64_t M, act_bits, row_tasks, col_tasks, rows_per, tiles_per;
    const float* bias;
    float* C;
    int64_t ldc;
  };

  static void run_task(void* p, size_t i) {
    const Work& w = *static_cast<const Work*>(p);
    const int64_t rt = static_cast<int64_t>(i) / w.col_tasks, ct = static_cast<int64_t>(i) % w.col_tasks;
    const int64_t m0 = rt * w.rows_per, m1 = std::min(w.M, m0 + w.rows_per);
    const int64_t t0 = ct * w.tiles_per, t1 = std::min(w.W.n_tiles, t0 + w.tiles_per);
    if (m0 >= m1 || t0 >= t1) return;
    if (w.act_bits == 16) {
      w.kt->gemm_a16(w.A + m0 * w.W.Kp(), m1 - m0, w.W, t0, t1, w.bias, w.C + m0 * w.ldc, w.ldc);
    } else {
      const QuantizedRows q{w.Q.q + m0 * w.Q.Kp, w.Q.scale + m0, w.Q.block_sum + m0 * w.Q.n_blocks, w.Q.Kp,
                            w.Q.n_blocks};
      w.kt->gemm_int(q, m1 - m0, static_cast<int>(w.act_bits), w.W, t0, t1, w.bias, w.C + m0 * w.ldc, w.ldc);
    }
  }

  // Per-row preparation of A, rows split into tasks: the Hadamard transform into `rotated` (when
  // set), then the activation quantization (act_bits 8/4) of the same rows while they are in cache.
  struct RowWork {
    const KernelTable* kt;
    const float* A;
    float* rotated;  // [M][K], or nullptr: no transform
    int64_t K, h, M, rows_per, act_bits;
    const uint8_t* shift;
    QuantizedRows Q;
  };
  // SwiGLU epilogue over rows: Y[m][j] = silu(Z[m][j]) * Z[m][N/2 + j].
  struct GluWork {
    const KernelTable* kt;
    const float* Z;
    float* Y;
    int64_t M, N, rows_per;
  };
  static void glu_task(void* p, size_t i) {
    const GluWork& w = *static_cast<const GluWork*>(p);
    const int64_t m0 = static_cast<int64_t>(i) * w.rows_per, m1 = std::min(w.M, m0 + w.rows_per);
    if (m0 < m1) w.kt->swiglu(w.Z + m0 * w.N, w.N, m1 - m0, w.N / 2, w.Y + m0 * (w.N / 2), w.N / 2);
  }

  static void row_task(void* p, size_t i) {
    const RowWork& w = *static_cast<const RowWork*>(p);
    const int64_t m0 = static_cast<int64_t>(i) * w.rows_per, m1 = std::min(w.M, m0 + w.rows_per);
    if (m0 >= m1) return;
    const float* src = w.A;
    if (w.rotated) {
      hadamard_rows(w.A, w.K, w.rotated, w.K, w.K, w.h, m0, m1);
      src = w.rotated;
    }
    if (w.act_bits != 16) w.kt->quantize_rows(src, w.K, w.K, m0, m1, w.shift, static_cast<int>(w.act_bits), w.Q);
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const In A = get_input(ctx, 0), B = consts.fetch(ctx, 1), S = consts.fetch(ctx, 2), Z = consts.fetch(ctx, 3),
             bias = consts.fetch(ctx, 4), shift = consts.fetch(ctx, 5);
    if (!A) fail("input A is required");
    if (!B) fail("input B (packed weights) is required");
    if (!S) fail("input scales is required");
    expect_type(A, "A", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    expect_type(B, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    if (S.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)  // declared as any type so that this message is ours
      fail("scales must be float16 (the packed layout's block scales), got ", type_name(S.type),
           S.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
               ? " (a model compiled with float scales by llmfold before the fp16 layout: recompile it)"
               : "");
    if (A.shape.empty()) fail("A must have rank >= 1");
    if (A.shape.back() != K)
      fail("A's last dimension is ", std::to_string(A.shape.back()), " but attribute K is ", std::to_string(K),
           " (A shape ", shape_str(A.shape), ")");
    const int64_t want_b = n_tiles * (Kp / kGroupK) * 64, want_s = n_tiles * n_blocks * kTileN;
    if (B.count != want_b)
      fail("packed B has ", std::to_string(B.count), " bytes; K=", std::to_string(K), " N=", std::to_string(N),
           " block_size=", std::to_string(block_size), " needs exactly ", std::to_string(want_b),
           " (n_tiles*Kp/8*64)");
    if (S.count != want_s)
      fail("scales has ", std::to_string(S.count), " elements; needs exactly ", std::to_string(want_s),
           " (n_tiles*n_blocks*16)");
    const uint8_t* zp = nullptr;
    if (Z) {
      expect_type(Z, "zero_points", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
      if (Z.count != want_s)
        fail("zero_points has ", std::to_string(Z.count), " elements; needs exactly ", std::to_string(want_s),
             " (n_tiles*n_blocks*16)");
      zp = Z.data<uint8_t>();
      if (!consts.is_const(Z, 3)) check_nibbles(zp, Z.count, "zero_points");
    }
    const float* bp = nullptr;
    if (bias) {
      expect_type(bias, "bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (bias.count != N) fail("bias has ", std::to_string(bias.count), " elements; needs N=", std::to_string(N));
      bp = bias.data<float>();
    }
    const uint8_t* sh = nullptr;
    if (shift) {
      expect_type(shift, "channel_shift", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
      if (shift.count != K)
        fail("channel_shift has ", std::to_string(shift.count), " elements; needs K=", std::to_string(K));
      if (act_bits == 16) fail("channel_shift requires act_bits 8 or 4 (it scales activations before quantization)");
      sh = shift.data<uint8_t>();
      if (!consts.is_const(shift, 5)) check_nibbles(sh, K, "channel_shift");
    }

    std::vector<int64_t> yshape(A.shape.begin(), A.shape.end() - 1);
    yshape.push_back(swiglu ? N / 2 : N);
    const int64_t M = K ? A.count / K : 0;
    Ort::UnownedValue Yv = ctx.GetOutput(0, yshape);
    if (M == 0) return;
    float* Y = Yv.GetTensorMutableData<float>();
    const float* a = A.data<float>();

    Work w{};
    w.kt = &active_kernels();
    w.W = PackedInt4{B.data<uint8_t>(), S.data<uint16_t>(), zp, K, N, block_size, n_blocks, n_tiles};
    w.M = M;
    w.act_bits = act_bits;
    w.bias = bp;
    w.C = Y;
    w.ldc = N;

    // Per-thread buffers reused across calls (no allocation or zero-filling per call; quantize_rows
    // writes every element the kernels read; with swiglu the product [gate | up] goes to glu_in
    // and the epilogue writes Y).
    thread_local std::vector<float> padded, rotated, glu_in;
    thread_local std::vector<int32_t> qstore;
    if (swiglu) {
      if (glu_in.size() < static_cast<size_t>(M * N)) glu_in.resize(static_cast<size_t>(M * N));
      w.C = glu_in.data();
    }
    RowWork rw{w.kt, a, nullptr, K, hadamard, M, 0, act_bits, sh, {}};
    if (hadamard) {  // x <- x . H_h per block of h channels, before anything else sees A
      if (rotated.size() < static_cast<size_t>(M * K)) rotated.resize(static_cast<size_t>(M * K));
      rw.rotated = rotated.data();
    }
    if (act_bits != 16) {
      const size_t qwords = static_cast<size_t>((M * Kp + 3) / 4), need = qwords + static_cast<size_t>(M + M * n_blocks);
      if (qstore.size() < need) qstore.resize(need);
      int32_t* base = qstore.data();
      w.Q = rw.Q = QuantizedRows{reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + qwords),
                                 base + qwords + M, Kp, n_blocks};
    }
    if (hadamard || act_bits != 16) {
      const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(M / 8, 16));
      rw.rows_per = (M + tasks - 1) / tasks;
      run_tasks(ctx, &QMatMulKernel::row_task, tasks, &rw);
      if (hadamard) a = rotated.data();
    }
    if (act_bits == 16) {
      if (Kp == K) {
        w.A = a;
      } else {  // the kernels read Kp columns; pad with zeros only when K is not a block multiple
        padded.assign(static_cast<size_t>(M * Kp), 0.0f);  // (zero padding needed; A16 only)
        for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * Kp], a + m * K, sizeof(float) * K);
        w.A = padded.data();
      }
    }

    // Task grid (common.h). Few rows (M < 4 int, M < 3 A16: the streaming kernels) split by weight
    // bytes, in even tile counts (4096x11008 in 58 tasks of 12 tiles instead of 64 of 11 measured
    // 1.01-1.08x faster, weights from DRAM; 1536x576 as 10, 10, 10, 6). More rows: chunks of >= 8
    // column tiles, >= 16 for 4+ rows (per-task setup - activation packing, per-row prescaling).
    const bool streaming = act_bits == 16 ? M < 3 : M < 4;
    const TaskGrid grid = streaming ? stream_grid(M, n_tiles, Kp / 2 * kTileN + n_blocks * kTileN * (zp ? 3 : 2), 2)
                                    : gemm_grid(M, Kp, n_tiles, M >= 4 ? 16 : 8, 1);
    w.row_tasks = grid.row_tasks;
    w.col_tasks = grid.col_tasks;
    w.rows_per = grid.rows_per;
    w.tiles_per = grid.tiles_per;
    const int64_t tasks = w.row_tasks * w.col_tasks;
    run_tasks(ctx, &QMatMulKernel::run_task, tasks, &w);
    if (swiglu) {  // O(M·N) after the O(M·K·N) product: row chunks of >= 16 rows
      GluWork gw{w.kt, w.C, Y, M, N, 0};
      const int64_t gtasks = std::max<int64_t>(1, std::min<int64_t>(M / 16, 16));
      gw.rows_per = (M + gtasks - 1) / gtasks;
      run_tasks(ctx, &QMatMulKernel::glu_task, gtasks, &gw);
    }
  }
};

}  // namespace

std::vector<Ort::Custom::OrtLiteCustomOp*> make_qmatmul_ops() {
  using C = OrtCustomOpInputOutputCharacteristic;
  return {new Op<QMatMulKernel>(
      "QMatMul",
      {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
       ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
      {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL,
       C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL},
      {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}, {C::INPUT_OUTPUT_REQUIRED})};
}

}  // namespace ortglue
}  // namespace llmfold
