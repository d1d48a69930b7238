// ARMv8.0 Advanced SIMD path (no dotprod / i8mm): runs on every aarch64 core, e.g. Cortex-A72
// (Raspberry Pi 4). Compiled with the baseline -march (armv8-a) only.
//   quantize_rows  vectorized copy of the ref rule (paths.h), bit-exact.
//   gemm_a16       dequantize a 256-k chunk to fp32 once per tile, then vfmaq over the rows
//                  (each chunk summed from zero, then added: short rounding chains).
//   gemm_int A8    vmull_s8 / vmlal_s8 into int16 lanes, widened every 8 groups.
//   gemm_int A4    two variants (see README "ARM"): vmull_s8 like A8 but widened once per block,
//                  or Agile-Quant's SIMD multiplier (two 4-bit operands in one 16-bit lane, one
//                  vmulq_s16, shift-and-split). The one with fewer instructions per MAC is the
//                  "neon" table's default; the other is the "neon-agile"/"neon-mull4" table.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../paths.h"
#include "arm_common.h"
#include "arm_paths.h"

namespace llmfold {
namespace arm {

// ----------------------------------------------------------------------------------------------
// Activation quantization: the ref rule, 16 channels at a time, same float operations in the same
// order (x * 2^-s, x * inv, clamp, round-to-nearest-even), so q, scale and block sums are identical.

namespace {

// 2^-(s & 15) built from exponent bits: exactly the float 1.0f / (1 << s) of shift_factor().
inline float32x4_t shift_factors(uint16x4_t s) {
  const uint32x4_t e = vsubq_u32(vdupq_n_u32(127), vmovl_u16(vand_u16(s, vdup_n_u16(15))));
  return vreinterpretq_f32_u32(vshlq_n_u32(e, 23));
}

// x'[0..16) of row a at channel k.
inline void load16(const float* a, const uint8_t* shift, int64_t k, float32x4_t x[4]) {
  for (int i = 0; i < 4; ++i) x[i] = vld1q_f32(a + k + 4 * i);
  if (shift) {
    const uint16x8_t s = vmovl_u8(vld1_u8(shift + k));
    const uint16x8_t s2 = vmovl_u8(vld1_u8(shift + k + 8));
    x[0] = vmulq_f32(x[0], shift_factors(vget_low_u16(s)));
    x[1] = vmulq_f32(x[1], shift_factors(vget_high_u16(s)));
    x[2] = vmulq_f32(x[2], shift_factors(vget_low_u16(s2)));
    x[3] = vmulq_f32(x[3], shift_factors(vget_high_u16(s2)));
  }
}

inline float load1(const float* a, const uint8_t* shift, int64_t k) {
  return shift ? a[k] * shift_factor(shift[k]) : a[k];
}

}  // namespace

void neon_quantize_rows(const float* A, int64_t lda, int64_t K, int64_t m_begin, int64_t m_end,
                        const uint8_t* shift, int act_bits, const QuantizedRows& out) {
  const float qmax = act_bits == 4 ? 7.0f : 127.0f;
  const int64_t bs = out.Kp / out.n_blocks;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float* a = A + m * lda;
    int8_t* q = out.q + m * out.Kp;
    int32_t* bsum = out.block_sum + m * out.n_blocks;
    // FMAX propagates NaN and |Inf| = Inf, so a non-finite absmax <=> a non-finite row.
    float32x4_t mx = vdupq_n_f32(0.f);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      float32x4_t x[4];
      load16(a, shift, k, x);
      for (int i = 0; i < 4; ++i) mx = vmaxq_f32(mx, vabsq_f32(x[i]));
    }
    float absmax = vmaxvq_f32(mx);
    for (; k < K; ++k) {
      const float ax = std::fabs(load1(a, shift, k));
      absmax = std::isnan(ax) ? ax : (ax > absmax ? ax : absmax);
    }
    std::memset(q, 0, static_cast<size_t>(out.Kp));
    std::memset(bsum, 0, sizeof(int32_t) * static_cast<size_t>(out.n_blocks));
    if (!std::isfinite(absmax)) {
      out.scale[m] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (!(absmax >= kTinyAbsmax)) {
      out.scale[m] = 0.0f;
      continue;
    }
    const float inv = qmax / absmax;
    const float32x4_t vinv = vdupq_n_f32(inv), hi = vdupq_n_f32(qmax), lo = vdupq_n_f32(-qmax);
    for (int64_t b = 0; b * bs < K; ++b) {
      const int64_t kend = std::min((b + 1) * bs, K);
      int32x4_t sum = vdupq_n_s32(0);
      int64_t kk = b * bs;
      for (; kk + 16 <= kend; kk += 16) {
        float32x4_t x[4];
        load16(a, shift, kk, x);
        int32x4_t v[4];
        for (int i = 0; i < 4; ++i) {
          const float32x4_t y = vminq_f32(vmaxq_f32(vmulq_f32(x[i], vinv), lo), hi);
          v[i] = vcvtnq_s32_f32(y);  // round to nearest, ties to even (= nearbyint)
          sum = vaddq_s32(sum, v[i]);
        }
        const int16x8_t h0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        const int16x8_t h1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
        vst1q_s8(q + kk, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
      }
      int32_t s = vaddvq_s32(sum);
      for (; kk < kend; ++kk) {
        float v = load1(a, shift, kk) * inv;
        v = std::min(std::max(v, -qmax), qmax);
        q[kk] = static_cast<int8_t>(std::nearbyint(v));
        s += q[kk];
      }
      bsum[b] = s;
    }
    out.scale[m] = absmax / qmax;
  }
}

// ----------------------------------------------------------------------------------------------
// A16: per tile and 256-k chunk (whole blocks), dequantize W = scale * (q - zp) into wbuf[k][16]
// (the same single float rounding as ref), then 4 rows at a time sum A[m][k] * wbuf[k][:] with
// vfmaq_laneq_f32. Each chunk's sums start from zero and are then added to the row's partial sums
// (as on x86): rounding chains of <= 256 + K / 256 additions instead of K, so same-sign products
// over long K stay within the 1e-5 bound against ref (which sums in double).

namespace {

constexpr int64_t kA16Rows = 64;   // rows whose accumulators live in accbuf
constexpr int64_t kA16ChunkK = 256;  // k values dequantized at once

// Dequantize groups [g0, g1) of one tile into wbuf (row k - 8*g0, 16 columns).
inline void dequant_groups(const uint8_t* wt, int64_t g0, int64_t g1, uint8x16_t zp16,
                           const uint16_t* sw, float* wbuf) {
  // 4x4 byte transpose: byte 4c+j -> 4j+c, so a 32-bit lane holds 4 columns of one k.
  static const uint8_t kTr[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const uint8x16_t tr = vld1q_u8(kTr);
  uint8x16_t zp[4];
  float32x4_t sc[4];
  for (int i = 0; i < 4; ++i) {
    zp[i] = vreinterpretq_u8_u32(vdupq_n_u32(vgetq_lane_u32(vreinterpretq_u32_u8(zp16), 0)));
    zp16 = vextq_u8(zp16, zp16, 4);
    sc[i] = scales4(sw + 4 * i);
  }
  for (int64_t g = g0; g < g1; ++g) {
    const Nibbles n = load_group(wt + g * 64);
    float* dst = wbuf + (g - g0) * kGroupK * kTileN;
    for (int i = 0; i < 4; ++i) {
      for (int h = 0; h < 2; ++h) {
        const int8x16_t d =
            vreinterpretq_s8_u8(vsubq_u8(vqtbl1q_u8(h ? n.hi[i] : n.lo[i], tr), zp[i]));
        const int16x8_t w01 = vmovl_s8(vget_low_s8(d)), w23 = vmovl_high_s8(d);
        const int32x4_t wj[4] = {vmovl_s16(vget_low_s16(w01)), vmovl_high_s16(w01),
                                 vmovl_s16(vget_low_s16(w23)), vmovl_high_s16(w23)};
        for (int j = 0; j < 4; ++j)
          vst1q_f32(dst + (4 * h + j) * kTileN + 4 * i, vmulq_f32(sc[i], vcvtq_f32_s32(wj[j])));
      }
    }
  }
}

template <int R>
inline void fma_rows(const float* A, int64_t Kp, int64_t kbase, int64_t kc, const float* wbuf,
                     float* acc_rows) {
  float32x4_t acc[R][4];  // this chunk's sums, from zero
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = vdupq_n_f32(0.f);
  for (int64_t k = 0; k < kc; k += 4) {
    float32x4_t a[R];
    for (int r = 0; r < R; ++r) a[r] = vld1q_f32(A + r * Kp + kbase + k);
    const float* w = wbuf + k * kTileN;
#define LLMFOLD_FMA_LANE(L)                                                    \
  {                                                                            \
    float32x4_t wv[4];                                                         \
    for (int i = 0; i < 4; ++i) wv[i] = vld1q_f32(w + (L) * kTileN + 4 * i);   \
    for (int r = 0; r < R; ++r)                                                \
      for (int i = 0; i < 4; ++i) acc[r][i] = vfmaq_laneq_f32(acc[r][i], wv[i], a[r], L); \
  }
    LLMFOLD_FMA_LANE(0) LLMFOLD_FMA_LANE(1) LLMFOLD_FMA_LANE(2) LLMFOLD_FMA_LANE(3)
#undef LLMFOLD_FMA_LANE
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) {
      float* dst = acc_rows + r * kTileN + 4 * i;
      vst1q_f32(dst, vaddq_f32(vld1q_f32(dst), acc[r][i]));
    }
}

}  // namespace

void neon_gemm_a16(const float* A, int64_t M, const PackedInt4& W, int64_t t0, int64_t t1,
                   const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp(), bs = W.block_size, nb = W.n_blocks, tb = tile_bytes(W);
  alignas(16) float wbuf[kA16ChunkK * kTileN];
  alignas(16) float accbuf[kA16Rows * kTileN];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = W.data + t * tb;
    const int64_t n0 = t * kTileN;
    const int64_t valid = std::min<int64_t>(kTileN, W.N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kA16Rows) {
      const int64_t mr = std::min(kA16Rows, M - m0);
      std::memset(accbuf, 0, sizeof(float) * static_cast<size_t>(mr * kTileN));
      for (int64_t kc0 = 0; kc0 < Kp; kc0 += kA16ChunkK) {
        const int64_t kc = std::min(kA16ChunkK, Kp - kc0);
        // Dequantize the chunk block piece by block piece (block_size <= 256 divides 256: whole
        // blocks; a piece never crosses a block, whatever the sizes).
        for (int64_t k = kc0; k < kc0 + kc;) {
          const int64_t b = k / bs, k1 = std::min((b + 1) * bs, kc0 + kc);
          const uint8x16_t zp16 = W.zero_points ? vld1q_u8(W.zero_points + (t * nb + b) * kTileN)
                                                : vdupq_n_u8(8);
          dequant_groups(wt, k / kGroupK, k1 / kGroupK, zp16, W.scales + (t * nb + b) * kTileN,
                         wbuf + (k - kc0) * kTileN);
          k = k1;
        }
        const float* a = A + m0 * Kp;
        int64_t m = 0;
        for (; m + 4 <= mr; m += 4) fma_rows<4>(a + m * Kp, Kp, kc0, kc, wbuf, accbuf + m * kTileN);
        for (; m < mr; ++m) fma_rows<1>(a + m * Kp, Kp, kc0, kc, wbuf, accbuf + m * kTileN);
      }
      for (int64_t m = 0; m < mr; ++m) {
        float* c = C + (m0 + m) * ldc + n0;
        const float* acc = accbuf + m * kTileN;
        for (int64_t j = 0; j < valid; ++j) c[j] = bias ? acc[j] + bias[n0 + j] : acc[j];
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Integer paths.

namespace {

// vmull_s8 path. A8: |a*w| <= 1905, 2 products per lane per group -> 8 groups (30480) fit int16.
// A4: |a*w| <= 105 -> 128 groups (26880) fit; blocks have at most 32 groups, so one widening per block.
inline int64_t vmull_chunk(int act_bits) { return act_bits == 4 ? 128 : 8; }

struct VmullKern2 {
  void operator()(const int8_t* a0, const int8_t* a1, const uint8_t* w, int64_t groups,
                  int act_bits, BlockDots& out) const {
    const int8_t* a[2] = {a0, a1};
    vmull_block_dots<2>(a, w, groups, vmull_chunk(act_bits), out);
  }
};
struct VmullKern1 {
  void operator()(const int8_t* a0, const uint8_t* w, int64_t groups, int act_bits,
                  BlockDots& out) const {
    const int8_t* a[1] = {a0};
    vmull_block_dots<1>(a, w, groups, vmull_chunk(act_bits), out);
  }
};

// Agile-Quant's SIMD multiplier (Shen et al., AAAI 2024), for A4 only (a in [-7, 7]).
// Two 4-bit operands share one 16-bit lane: X = x0 + 256 * x1. One vmulq_s16 by a common factor y
// gives P = x0*y + 256 * x1*y, i.e. two products in the two bytes of a lane. We center the weights
// (w - 8 in [-8, 7]) so |x*y| <= 56: each byte field holds the sum of 2 products (|F| <= 112 < 128,
// the guard bit), so P = mul + mla covers 2 k values, and |P| <= 112 + 256*112 < 2^15 (no wrap).
// Split: the rounding shift (P + 128) >> 8 is exactly F1 because F0 is in [-128, 127] (vrsraq
// accumulates sum F1 in int16), and vpadalq adds P itself into int32 (sum F0 + 256 * sum F1), so
// sum F0 = sum P - 256 * sum F1. Centering is undone with 8 * sum(a) over the block.
//   row pair (M >= 2): x0, x1 = activations of rows m, m+1 at the same k; y = a weight.
//   single row: x0, x1 = weights of columns c, c+4 at the same k; y = the activation.

inline int16x8_t dup_lo64(int16x8_t v) {
  return vreinterpretq_s16_s64(vdupq_laneq_s64(vreinterpretq_s64_s16(v), 0));
}
inline int16x8_t dup_hi64(int16x8_t v) {
  return vreinterpretq_s16_s64(vdupq_laneq_s64(vreinterpretq_s64_s16(v), 1));
}

struct AgileKern2 {
  void operator()(const int8_t* a0, const int8_t* a1, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    int32x4_t T[8];
    int16x8_t F1[8];
    for (int i = 0; i < 8; ++i) {
      T[i] = vdupq_n_s32(0);
      F1[i] = vdupq_n_s16(0);
    }
    int16x4_t s0 = vdup_n_s16(0), s1 = vdup_n_s16(0);
    const uint8x16_t eight = vdupq_n_u8(8);
    for (int64_t g = 0; g < groups; ++g) {
      const Nibbles n = load_group(w + g * 64);
      const int8x8_t x0 = vld1_s8(a0 + g * kGroupK), x1 = vld1_s8(a1 + g * kGroupK);
      s0 = vpadal_s8(s0, x0);
      s1 = vpadal_s8(s1, x1);
      const int16x8_t x = vaddq_s16(vmovl_s8(x0), vshll_n_s8(x1, 8));  // lanes k0..k0+7
      const int16x8_t xlo = dup_lo64(x), xhi = dup_hi64(x);          // [k0..3]x2, [k4..7]x2
      for (int i = 0; i < 4; ++i) {
        // Centered weights widened to int16: lanes (c, j) for columns 4i+{0,1} / 4i+{2,3}.
        const int16x8_t l0 = vreinterpretq_s16_u16(vsubl_u8(vget_low_u8(n.lo[i]), vget_low_u8(eight)));
        const int16x8_t l1 = vreinterpretq_s16_u16(vsubl_high_u8(n.lo[i], eight));
        const int16x8_t h0 = vreinterpretq_s16_u16(vsubl_u8(vget_low_u8(n.hi[i]), vget_low_u8(eight)));
        const int16x8_t h1 = vreinterpretq_s16_u16(vsubl_high_u8(n.hi[i], eight));
        const int16x8_t p0 = vmlaq_s16(vmulq_s16(l0, xlo), h0, xhi);
        const int16x8_t p1 = vmlaq_s16(vmulq_s16(l1, xlo), h1, xhi);
        T[2 * i] = vpadalq_s16(T[2 * i], p0);
        T[2 * i + 1] = vpadalq_s16(T[2 * i + 1], p1);
        F1[2 * i] = vrsraq_n_s16(F1[2 * i], p0, 8);
        F1[2 * i + 1] = vrsraq_n_s16(F1[2 * i + 1], p1, 8);
      }
    }
    const int32x4_t c0 = vdupq_n_s32(8 * vaddlv_s16(s0)), c1 = vdupq_n_s32(8 * vaddlv_s16(s1));
    for (int i = 0; i < 4; ++i) {
      const int32x4_t d1 = vpaddq_s32(vpaddlq_s16(F1[2 * i]), vpaddlq_s16(F1[2 * i + 1]));
      const int32x4_t s = vpaddq_s32(T[2 * i], T[2 * i + 1]);
      out.d[0][i] = vaddq_s32(vsubq_s32(s, vshlq_n_s32(d1, 8)), c0);
      out.d[1][i] = vaddq_s32(d1, c1);
    }
  }
};

struct AgileKern1 {
  void operator()(const int8_t* a0, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    int32x4_t T[4];
    int16x8_t F1[4];
    for (int i = 0; i < 4; ++i) {
      T[i] = vdupq_n_s32(0);
      F1[i] = vdupq_n_s16(0);
    }
    int16x4_t s0 = vdup_n_s16(0);
    const uint16x8_t c0808 = vdupq_n_u16(0x0808);
    for (int64_t g = 0; g < groups; ++g) {
      const Nibbles n = load_group(w + g * 64);
      const int8x8_t x0 = vld1_s8(a0 + g * kGroupK);
      s0 = vpadal_s8(s0, x0);
      const int16x8_t x = vmovl_s8(x0);
      const int16x8_t xlo = dup_lo64(x), xhi = dup_hi64(x);
      for (int p = 0; p < 2; ++p) {
        // zip pairs byte i of register 2p (columns 8p + c) with byte i of register 2p+1
        // (columns 8p + 4 + c): one lane = (w[k][c] - 8) + 256 * (w[k][c+4] - 8).
        const int16x8_t l0 = vreinterpretq_s16_u16(
            vsubq_u16(vreinterpretq_u16_u8(vzip1q_u8(n.lo[2 * p], n.lo[2 * p + 1])), c0808));
        const int16x8_t l1 = vreinterpretq_s16_u16(
            vsubq_u16(vreinterpretq_u16_u8(vzip2q_u8(n.lo[2 * p], n.lo[2 * p + 1])), c0808));
        const int16x8_t h0 = vreinterpretq_s16_u16(
            vsubq_u16(vreinterpretq_u16_u8(vzip1q_u8(n.hi[2 * p], n.hi[2 * p + 1])), c0808));
        const int16x8_t h1 = vreinterpretq_s16_u16(
            vsubq_u16(vreinterpretq_u16_u8(vzip2q_u8(n.hi[2 * p], n.hi[2 * p + 1])), c0808));
        const int16x8_t p0 = vmlaq_s16(vmulq_s16(l0, xlo), h0, xhi);
        const int16x8_t p1 = vmlaq_s16(vmulq_s16(l1, xlo), h1, xhi);
        T[2 * p] = vpadalq_s16(T[2 * p], p0);
        T[2 * p + 1] = vpadalq_s16(T[2 * p + 1], p1);
        F1[2 * p] = vrsraq_n_s16(F1[2 * p], p0, 8);
        F1[2 * p + 1] = vrsraq_n_s16(F1[2 * p + 1], p1, 8);
      }
    }
    const int32x4_t c0 = vdupq_n_s32(8 * vaddlv_s16(s0));
    for (int p = 0; p < 2; ++p) {
      const int32x4_t hi = vpaddq_s32(vpaddlq_s16(F1[2 * p]), vpaddlq_s16(F1[2 * p + 1]));
      const int32x4_t s = vpaddq_s32(T[2 * p], T[2 * p + 1]);
      out.d[0][2 * p] = vaddq_s32(vsubq_s32(s, vshlq_n_s32(hi, 8)), c0);
      out.d[0][2 * p + 1] = vaddq_s32(hi, c0);
    }
  }
};

// A4 dispatch inside a table: `agile` picks the multiplier; A8 always uses vmull.
template <bool kAgile>
void neon_int_block_dots(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                         int64_t t0, int64_t t1, int32_t* dots) {
  if (kAgile && act_bits == 4)
    int_block_dots_impl(A, M, act_bits, W, t0, t1, dots, NoKern4{}, AgileKern2{}, AgileKern1{});
  else
    int_block_dots_impl(A, M, act_bits, W, t0, t1, dots, NoKern4{}, VmullKern2{}, VmullKern1{});
}

template <bool kAgile>
void neon_gemm_int(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                   int64_t t0, int64_t t1, const float* bias, float* C, int64_t ldc) {
  if (kAgile && act_bits == 4)
    gemm_int_impl(A, M, act_bits, W, t0, t1, bias, C, ldc, NoKern4{}, AgileKern2{}, AgileKern1{});
  else
    gemm_int_impl(A, M, act_bits, W, t0, t1, bias, C, ldc, NoKern4{}, VmullKern2{}, VmullKern1{});
}

}  // namespace

// Out-of-line entry points per variant, so their inner loops can be found in the disassembly
// (tests/arm/count_insns.sh counts instructions per MAC from them).
void neon_int_block_dots_vmull(const QuantizedRows& A, int64_t M, int act_bits,
                               const PackedInt4& W, int64_t t0, int64_t t1, int32_t* dots) {
  neon_int_block_dots<false>(A, M, act_bits, W, t0, t1, dots);
}
void neon_int_block_dots_agile(const QuantizedRows& A, int64_t M, int act_bits,
                               const PackedInt4& W, int64_t t0, int64_t t1, int32_t* dots) {
  neon_int_block_dots<true>(A, M, act_bits, W, t0, t1, dots);
}

namespace {

// SwiGLU epilogue, 4 lanes (the evaluation and its constants: paths.h, kExpTaylor; the same as
// the x86 paths).
inline float32x4_t exp_f32(float32x4_t x) {
  const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, kExpLog2e));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(kExpLn2Hi));
  r = vfmsq_f32(r, n, vdupq_n_f32(kExpLn2Lo));
  float32x4_t p = vdupq_n_f32(kExpTaylor[0]);
  for (int i = 1; i < 7; ++i) p = vfmaq_f32(vdupq_n_f32(kExpTaylor[i]), p, r);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

inline float32x4_t swiglu4(float32x4_t g, float32x4_t u) {
  const float32x4_t x = vminq_f32(vmaxq_f32(vnegq_f32(g), vdupq_n_f32(kSwigluXMin)), vdupq_n_f32(kSwigluXMax));
  return vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), exp_f32(x))), u);
}

}  // namespace

void neon_swiglu(const float* Z, int64_t ldz, int64_t M, int64_t I, float* Y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* g = Z + m * ldz;
    const float* u = g + I;
    float* y = Y + m * ldy;
    int64_t j = 0;
    for (; j + 4 <= I; j += 4) vst1q_f32(y + j, swiglu4(vld1q_f32(g + j), vld1q_f32(u + j)));
    if (j < I) {  // tail through a padded copy (no read past the row)
      float gt[4] = {}, ut[4] = {}, yt[4];
      std::memcpy(gt, g + j, sizeof(float) * (I - j));
      std::memcpy(ut, u + j, sizeof(float) * (I - j));
      vst1q_f32(yt, swiglu4(vld1q_f32(gt), vld1q_f32(ut)));
      std::memcpy(y + j, yt, sizeof(float) * (I - j));
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Float weights (PackedMatMul): a 16-column tile is four q registers.

namespace {

// C row (first `valid` columns) = acc (+ bias); through a copy for a partial last tile.
inline void store_tile(float* c, const float32x4_t acc[4], const float* bias, int64_t valid) {
  float out[kTileN];
  for (int q = 0; q < 4; ++q) vst1q_f32(out + 4 * q, acc[q]);
  for (int64_t j = 0; j < valid; ++j) c[j] = bias ? out[j] + bias[j] : out[j];
}

// R rows x one tile over all of K, four k per step: each row's four activations in one register,
// each weight line used through vfmaq_laneq (R = 4: 16 accumulators, 4 weight and 4 activation
// registers). The rows share every weight load. One FMA chain per output over k in order, then
// + bias, as the x86 paths: a row's result does not depend on the row count.
template <int R>
void f32_rows(const float* A, int64_t lda, const PackedFloat& W, int64_t t, const float* bias, float* C,
              int64_t ldc) {
  const int64_t K = W.K, kstride = W.group_tiles(t) * kTileN;
  const float* w = W.line(t, 0);
  float32x4_t c[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) c[r][q] = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    float32x4_t a[R];
    for (int r = 0; r < R; ++r) a[r] = vld1q_f32(A + r * lda + k);
#define LLMFOLD_F32_LANE(L)                                                                      \
  {                                                                                              \
    const float* wl = w + (k + L) * kstride;                                                     \
    const float32x4_t w0 = vld1q_f32(wl), w1 = vld1q_f32(wl + 4), w2 = vld1q_f32(wl + 8),        \
                      w3 = vld1q_f32(wl + 12);                                                   \
    for (int r = 0; r < R; ++r) {                                                                \
      c[r][0] = vfmaq_laneq_f32(c[r][0], w0, a[r], L);                                           \
      c[r][1] = vfmaq_laneq_f32(c[r][1], w1, a[r], L);                                           \
      c[r][2] = vfmaq_laneq_f32(c[r][2], w2, a[r], L);                                           \
      c[r][3] = vfmaq_laneq_f32(c[r][3], w3, a[r], L);                                           \
    }                                                                                            \
  }
    LLMFOLD_F32_LANE(0)
    LLMFOLD_F32_LANE(1)
    LLMFOLD_F32_LANE(2)
    LLMFOLD_F32_LANE(3)
#undef LLMFOLD_F32_LANE
  }
  for (; k < K; ++k) {
    const float* wl = w + k * kstride;
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) c[r][q] = vfmaq_n_f32(c[r][q], vld1q_f32(wl + 4 * q), A[r * lda + k]);
  }
  const int64_t n0 = t * kTileN, valid = std::min<int64_t>(kTileN, W.N - n0);
  for (int r = 0; r < R; ++r) store_tile(C + r * ldc + n0, c[r], bias ? bias + n0 : nullptr, valid);
}

}  // namespace

void neon_gemm_f32(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t t0, int64_t t1,
                   const float* bias, float* C, int64_t ldc) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f32_rows<4>(A + m * lda, lda, W, t, bias, C + m * ldc, ldc);
    switch (M - m) {
      case 3: f32_rows<3>(A + m * lda, lda, W, t, bias, C + m * ldc, ldc); break;
      case 2: f32_rows<2>(A + m * lda, lda, W, t, bias, C + m * ldc, ldc); break;
      case 1: f32_rows<1>(A + m * lda, lda, W, t, bias, C + m * ldc, ldc); break;
      default: break;
    }
  }
}

}  // namespace arm

// Default A4 variant of the "neon" table, chosen by instructions per MAC of the inner loops
// (counts in custom_ops/README.md, "ARM"): the vmull_s8 path.
constexpr bool kNeonA4Agile = false;

const KernelTable& neon_kernels() {
  static const KernelTable t{"neon", arm::neon_quantize_rows, arm::neon_gemm_a16,
                             arm::neon_gemm_int<kNeonA4Agile>,
                             arm::neon_int_block_dots<kNeonA4Agile>, arm::neon_swiglu, arm::neon_gemm_f32};
  return t;
}

const KernelTable& neon_alt_a4_kernels() {
  static const KernelTable t{kNeonA4Agile ? "neon-mull4" : "neon-agile", arm::neon_quantize_rows,
                             arm::neon_gemm_a16, arm::neon_gemm_int<!kNeonA4Agile>,
                             arm::neon_int_block_dots<!kNeonA4Agile>, arm::neon_swiglu, arm::neon_gemm_f32};
  return t;
}

}  // namespace llmfold
