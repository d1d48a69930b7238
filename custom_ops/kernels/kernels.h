// llmfold kernel interface: every ISA path (ref, x86 avx2, x86 avx512vnni, arm neon, arm dotprod,
// arm i8mm) implements the same KernelTable. The ORT glue (custom_ops/ort/) validates inputs, pads
// activations, splits work with ORT's ParallelFor and calls one table chosen once at load time.
//
// Packed INT4 weight layout (written by the compiler, read as is; see custom_ops/README.md):
//   logical weight  W[k][n] = scale[b][n] * (q[k][n] - zp[b][n]),  b = k / block_size,
//   q, zp in [0, 15] (zp = 8 when the model has no zero points: symmetric).
//   Kp = n_blocks * block_size (K rounded up), Np = n_tiles * 16 (N rounded up).
//   data   uint8 [n_tiles][Kp / 8][64]: for tile t, k-group g (k0 = 8 g), byte 4 c + j
//          (c = column in tile 0..15, j = 0..3) holds q[k0 + j][16 t + c] in its low nibble and
//          q[k0 + 4 + j][16 t + c] in its high nibble. So the low nibbles of a 64-byte group are a
//          16-column x 4-k tile with 4 consecutive k per column (the VNNI / sdot operand order), the
//          high nibbles the next 4 k. Padded k rows hold q = zp (dequantize to 0), padded columns
//          hold q = 8 with scale 0.
//   scales fp16 [n_tiles][n_blocks][16] (IEEE binary16 bits; half the bytes of float, which the
//   M = 1 kernels stream from memory), zero_points uint8 [n_tiles][n_blocks][16] (optional).
#pragma once
#include <cstddef>
#include <cstdint>

namespace llmfold {

constexpr int64_t kTileN = 16;   // output columns per packed tile
constexpr int64_t kGroupK = 8;   // k values per 64-byte packed group

struct PackedInt4 {
  const uint8_t* data;         // [n_tiles][Kp/8][64]
  const uint16_t* scales;      // fp16 bits [n_tiles][n_blocks][16]
  const uint8_t* zero_points;  // [n_tiles][n_blocks][16], or nullptr meaning 8 everywhere
  int64_t K, N, block_size, n_blocks, n_tiles;
  int64_t Kp() const { return n_blocks * block_size; }
};

// Float weights in 16-column tiles, 4 tiles to a group (llmfold.PackedMatMul):
//   group g = tiles 4g .. 4g + gt - 1, gt = min(4, n_tiles - 4g), stored [K][gt][16] from
//   data + 4g·K·16 (every earlier group is full), so W[k][n] (t = n / 16, j = t % 4) is at
//   data[4g·K·16 + (k·gt + j)·16 + n % 16]; the padded columns n >= N of the last tile are zero.
// A group's k rows are consecutive runs of gt 64-byte lines and the groups follow each other: the
// kernels read gt tiles in lockstep (gt independent FMA chains per row) as one sequential stream.
constexpr int64_t kTileGroup = 4;
struct PackedFloat {
  const float* data;  // n_tiles * K * 16 floats, in groups as above
  int64_t K, N, n_tiles;
  // Tiles in tile t's group, and tile t's line k (16 floats).
  int64_t group_tiles(int64_t t) const {
    const int64_t left = n_tiles - t / kTileGroup * kTileGroup;
    return left < kTileGroup ? left : kTileGroup;
  }
  const float* line(int64_t t, int64_t k) const {
    const int64_t g0 = t / kTileGroup * kTileGroup;
    return data + g0 * K * kTileN + (k * group_tiles(t) + (t - g0)) * kTileN;
  }
};

// Per-token dynamic symmetric activation quantization (act_bits 8: [-127, 127], 4: [-7, 7]).
// Row m of the float input, after dividing channel k by 2^channel_shift[k] (TRIP; optional),
// becomes q[m][0..Kp) (zero beyond K), scale[m] = absmax / qmax (0 for an all-zero row) and
// block_sum[m][b] = sum of q over block b (used for zero-point correction).
struct QuantizedRows {
  int8_t* q;           // [M][Kp]
  float* scale;        // [M]
  int32_t* block_sum;  // [M][n_blocks]
  int64_t Kp, n_blocks;
};

struct KernelTable {
  const char* name;  // "ref", "avx2", "avx512vnni", "neon", "dotprod", "i8mm"

  // Rows [m_begin, m_end) of A (float, row stride lda, K valid columns) into out.
  void (*quantize_rows)(const float* A, int64_t lda, int64_t K, int64_t m_begin, int64_t m_end,
                        const uint8_t* channel_shift, int act_bits, const QuantizedRows& out);

  // C[m][n] = sum_k A[m][k] * W[k][n] (+ bias[n]) for all M rows and column tiles
  // [tile_begin, tile_end). A is float [M][Kp] with zeros beyond K (the glue pads it).
  // Only columns n < N are written; C has row stride ldc.
  void (*gemm_a16)(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin,
                   int64_t tile_end, const float* bias, float* C, int64_t ldc);

  // Same with quantized activations (act_bits 8 or 4):
  // C[m][n] = scale[m] * sum_b scale_w[b][n] * (dot_b(q_a, q_w) - zp[b][n] * block_sum[m][b])
  // (+ bias[n]). The integer parts are exact; only the float epilogue may round differently.
  void (*gemm_int)(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                   int64_t tile_begin, int64_t tile_end, const float* bias, float* C,
                   int64_t ldc);

  // Test hook: the exact integer block dots dot[m][b][n] = sum_{k in b} q_a[m][k] * q_w[k][n]
  // for columns of tiles [tile_begin, tile_end) (n indexes Np). Must equal ref bit for bit.
  void (*int_block_dots)(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                         int64_t tile_begin, int64_t tile_end, int32_t* dots /*[M][n_blocks][Np]*/);

  // SwiGLU of a fused gate|up product (QMatMul's swiglu epilogue), rows [0, M):
  // Y[m][j] = silu(Z[m][j]) * Z[m][I + j] for j < I, silu(g) = g / (1 + exp(-g)) in float.
  // Paths evaluate exp with their own polynomial: within 1e-6 relative of ref for finite results,
  // non-finite where ref is non-finite.
  void (*swiglu)(const float* Z, int64_t ldz, int64_t M, int64_t I, float* Y, int64_t ldy);

  // PackedMatMul: C[m][n] = sum_k A[m][k] * W[k][n] (+ bias[n]) in float for rows [0, M) (A has
  // row stride lda and K columns, no padding) and column tiles [tile_begin, tile_end). Only
  // columns n < N are written. ref sums in double; the SIMD paths compute each output as one FMA
  // chain over k in order, then + bias, so an output does not depend on M or on the tile range
  // (logits_to_keep relies on it). Every path: within (K + 3) * 2^-24 * (sum_k |a_k w_k| + |bias|)
  // of ref, non-finite where ref is.
  void (*gemm_f32)(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t tile_begin,
                   int64_t tile_end, const float* bias, float* C, int64_t ldc);
};

// Chosen once per process from CPU features; LLMFOLD_KERNELS=<name> forces a path (an unknown or
// unsupported name falls back to the best path with a warning on stderr).
const KernelTable& active_kernels();
// Every path compiled into this binary that the CPU can run (tests sweep them).
int available_kernels(const KernelTable** out, int max_out);

}  // namespace llmfold
