// Scalar reference: the readable specification of every KernelTable function. Every ISA path must
// match it (bit for bit on integers, within float rounding elsewhere). Written for clarity, not speed.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../paths.h"

namespace llmfold {
namespace ref {

// q[k][n] of the packed layout (see kernels.h): tile t = n / 16, column c = n % 16,
// group g = k / 8, j = k % 8; byte 4c + (j % 4) of the group, low nibble for j < 4.
inline int weight_q(const PackedInt4& W, int64_t k, int64_t n) {
  const int64_t t = n / kTileN, c = n % kTileN, g = k / kGroupK, j = k % kGroupK;
  const uint8_t byte = W.data[(t * (W.Kp() / kGroupK) + g) * 64 + 4 * c + (j & 3)];
  return j < 4 ? (byte & 15) : (byte >> 4);
}
inline float weight_scale(const PackedInt4& W, int64_t b, int64_t n) {
  return half_to_float(W.scales[((n / kTileN) * W.n_blocks + b) * kTileN + n % kTileN]);
}
inline int weight_zp(const PackedInt4& W, int64_t b, int64_t n) {
  if (!W.zero_points) return 8;
  return W.zero_points[((n / kTileN) * W.n_blocks + b) * kTileN + n % kTileN];
}

void quantize_rows(const float* A, int64_t lda, int64_t K, int64_t m_begin, int64_t m_end,
                   const uint8_t* channel_shift, int act_bits, const QuantizedRows& out) {
  const int qmax = act_bits == 4 ? 7 : 127;
  const int64_t bs = out.Kp / out.n_blocks;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float* a = A + m * lda;
    int8_t* q = out.q + m * out.Kp;
    int32_t* bsum = out.block_sum + m * out.n_blocks;
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float x = channel_shift ? a[k] * shift_factor(channel_shift[k]) : a[k];
      if (!std::isfinite(x)) finite = false;
      absmax = std::max(absmax, std::fabs(x));
    }
    std::fill(q, q + out.Kp, int8_t{0});
    std::fill(bsum, bsum + out.n_blocks, 0);
    if (!finite) {
      out.scale[m] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (!(absmax >= kTinyAbsmax)) {
      out.scale[m] = 0.0f;
      continue;
    }
    const float inv = static_cast<float>(qmax) / absmax;
    for (int64_t k = 0; k < K; ++k) {
      const float x = channel_shift ? a[k] * shift_factor(channel_shift[k]) : a[k];
      float v = x * inv;
      v = std::min(std::max(v, -static_cast<float>(qmax)), static_cast<float>(qmax));
      q[k] = static_cast<int8_t>(std::nearbyint(v));  // round half to even (default FP mode)
      bsum[k / bs] += q[k];
    }
    out.scale[m] = absmax / static_cast<float>(qmax);
  }
}

// Float activations: sum in double over the dequantized weights W = scale * (q - zp).
void gemm_a16(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin, int64_t tile_end,
              const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = tile_begin * kTileN; n < std::min(tile_end * kTileN, W.N); ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < Kp; ++k) {
        const int64_t b = k / W.block_size;
        const float w = weight_scale(W, b, n) * static_cast<float>(weight_q(W, k, n) - weight_zp(W, b, n));
        acc += static_cast<double>(A[m * Kp + k]) * w;
      }
      if (bias) acc += bias[n];
      C[m * ldc + n] = static_cast<float>(acc);
    }
  }
}

void int_block_dots(const QuantizedRows& A, int64_t M, int /*act_bits*/, const PackedInt4& W,
                    int64_t tile_begin, int64_t tile_end, int32_t* dots) {
  const int64_t Np = W.n_tiles * kTileN;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < W.n_blocks; ++b)
      for (int64_t n = tile_begin * kTileN; n < tile_end * kTileN; ++n) {
        int32_t d = 0;
        for (int64_t k = b * W.block_size; k < (b + 1) * W.block_size; ++k)
          d += static_cast<int32_t>(A.q[m * A.Kp + k]) * weight_q(W, k, n);
        dots[(m * W.n_blocks + b) * Np + n] = d;
      }
}

// Integer dots per block with the zero-point correction done in integers; the float epilogue
// (per-block weight scale, row scale) is summed in double.
void gemm_int(const QuantizedRows& A, int64_t M, int /*act_bits*/, const PackedInt4& W,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = tile_begin * kTileN; n < std::min(tile_end * kTileN, W.N); ++n) {
      double acc = 0.0;
      for (int64_t b = 0; b < W.n_blocks; ++b) {
        int32_t d = 0;
        for (int64_t k = b * W.block_size; k < (b + 1) * W.block_size; ++k)
          d += static_cast<int32_t>(A.q[m * A.Kp + k]) * weight_q(W, k, n);
        d -= weight_zp(W, b, n) * A.block_sum[m * A.n_blocks + b];
        acc += static_cast<double>(weight_scale(W, b, n)) * d;
      }
      float y = static_cast<float>(acc) * A.scale[m];
      if (bias) y += bias[n];
      C[m * ldc + n] = y;
    }
  }
}

void swiglu(const float* Z, int64_t ldz, int64_t M, int64_t I, float* Y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < I; ++j) {
      const float g = Z[m * ldz + j], u = Z[m * ldz + I + j];
      Y[m * ldy + j] = g / (1.0f + std::exp(-g)) * u;
    }
}

// Float weights: W[k][n] read from the tile-group layout (see kernels.h), summed in double.
void gemm_f32(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t tile_begin, int64_t tile_end,
              const float* bias, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = tile_begin * kTileN; n < std::min(tile_end * kTileN, W.N); ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < W.K; ++k)
        acc += static_cast<double>(A[m * lda + k]) * W.line(n / kTileN, k)[n % kTileN];
      if (bias) acc += bias[n];
      C[m * ldc + n] = static_cast<float>(acc);
    }
}

}  // namespace ref

const KernelTable& ref_kernels() {
  static const KernelTable t{"ref", ref::quantize_rows, ref::gemm_a16, ref::gemm_int,
                             ref::int_block_dots, ref::swiglu, ref::gemm_f32};
  return t;
}

}  // namespace llmfold
