// Shared pieces of the ARM kernel paths (neon.cpp, dotprod.cpp, i8mm.cpp): the loops over tiles,
// rows and blocks, the float epilogue and the stores. Each path supplies only its integer
// block-dot micro-kernel.
//
// Everything here has internal linkage (anonymous namespace) on purpose: the three .cpp files are
// compiled with different -march flags, and an inline function with external linkage would be
// merged by the linker, so the v8.0 path could end up calling a copy compiled with dotprod
// instructions and die with SIGILL on a Cortex-A72.
#pragma once
#if !defined(__aarch64__)
#error "arm_common.h is for aarch64 builds only"
#endif
#include <arm_neon.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../kernels.h"

namespace llmfold {
namespace arm {

// The v8.0 functions the dotprod and i8mm tables reuse (defined in neon.cpp, plain v8.0 code).
void neon_quantize_rows(const float* A, int64_t lda, int64_t K, int64_t m_begin, int64_t m_end,
                        const uint8_t* channel_shift, int act_bits, const QuantizedRows& out);
void neon_gemm_a16(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin,
                   int64_t tile_end, const float* bias, float* C, int64_t ldc);
void neon_swiglu(const float* Z, int64_t ldz, int64_t M, int64_t I, float* Y, int64_t ldy);
void neon_gemm_f32(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t tile_begin,
                   int64_t tile_end, const float* bias, float* C, int64_t ldc);

namespace {

// Four fp16 block scales as floats (FCVTL, base ARMv8; exact).
inline float32x4_t scales4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

inline int64_t tile_bytes(const PackedInt4& W) { return (W.Kp() / kGroupK) * 64; }

// Integer dots of up to 4 rows x 16 columns of one block, as 4 x int32x4 per row (columns 0-3,
// 4-7, 8-11, 12-15 of the tile); a kernel for R rows fills d[0..R).
struct BlockDots {
  int32x4_t d[4][4];
};

// No 4-row kernel: walk_blocks then goes by row pairs.
struct NoKern4 {};

// Walks tiles x row groups x blocks. kern4(a, w, groups, act_bits, out) handles 4 rows (a: 4 row
// pointers), kern2(a0, a1, ...) a row pair, kern1(a0, ...) a single row; all get pointers at the
// block start. emit(m, rows, t, b, out) consumes the dots of one block, finish(m, rows, t) ends
// a row group of a tile.
template <class Kern4, class Kern2, class Kern1, class Emit, class Finish>
inline void walk_blocks(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                        int64_t t0, int64_t t1, Kern4 kern4, Kern2 kern2, Kern1 kern1, Emit emit,
                        Finish finish) {
  const int64_t bs = W.block_size, nb = W.n_blocks, Kp = A.Kp;
  const int64_t groups = bs / kGroupK;
  const int64_t tb = tile_bytes(W);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = W.data + t * tb;
    int64_t m = 0;
    if constexpr (!std::is_same<Kern4, NoKern4>::value) {
      for (; m + 4 <= M; m += 4) {
        const int8_t* a = A.q + m * Kp;
        for (int64_t b = 0; b < nb; ++b) {
          const int8_t* rows[4] = {a + b * bs, a + Kp + b * bs, a + 2 * Kp + b * bs,
                                   a + 3 * Kp + b * bs};
          BlockDots out;
          kern4(rows, wt + b * groups * 64, groups, act_bits, out);
          emit(m, 4, t, b, out);
        }
        finish(m, 4, t);
      }
    }
    for (; m + 2 <= M; m += 2) {
      const int8_t* a0 = A.q + m * Kp;
      const int8_t* a1 = a0 + Kp;
      for (int64_t b = 0; b < nb; ++b) {
        BlockDots out;
        kern2(a0 + b * bs, a1 + b * bs, wt + b * groups * 64, groups, act_bits, out);
        emit(m, 2, t, b, out);
      }
      finish(m, 2, t);
    }
    for (; m < M; ++m) {
      const int8_t* a0 = A.q + m * Kp;
      for (int64_t b = 0; b < nb; ++b) {
        BlockDots out;
        kern1(a0 + b * bs, wt + b * groups * 64, groups, act_bits, out);
        emit(m, 1, t, b, out);
      }
      finish(m, 1, t);
    }
  }
}

template <class Kern4, class Kern2, class Kern1>
inline void int_block_dots_impl(const QuantizedRows& A, int64_t M, int act_bits,
                                const PackedInt4& W, int64_t t0, int64_t t1, int32_t* dots,
                                Kern4 kern4, Kern2 kern2, Kern1 kern1) {
  const int64_t nb = W.n_blocks, Np = W.n_tiles * kTileN;
  walk_blocks(
      A, M, act_bits, W, t0, t1, kern4, kern2, kern1,
      [&](int64_t m, int rows, int64_t t, int64_t b, const BlockDots& o) {
        for (int r = 0; r < rows; ++r) {
          int32_t* dst = dots + ((m + r) * nb + b) * Np + t * kTileN;
          for (int i = 0; i < 4; ++i) vst1q_s32(dst + 4 * i, o.d[r][i]);
        }
      },
      [](int64_t, int, int64_t) {});
}

// C[m][n] = scale[m] * sum_b sw[b][n] * (dot - zp[b][n] * block_sum[m][b]) (+ bias[n]).
template <class Kern4, class Kern2, class Kern1>
inline void gemm_int_impl(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                          int64_t t0, int64_t t1, const float* bias, float* C, int64_t ldc,
                          Kern4 kern4, Kern2 kern2, Kern1 kern1) {
  const int64_t nb = W.n_blocks;
  float32x4_t acc[4][4];
  auto zero = [&]() {
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = vdupq_n_f32(0.f);
  };
  zero();
  walk_blocks(
      A, M, act_bits, W, t0, t1, kern4, kern2, kern1,
      [&](int64_t m, int rows, int64_t t, int64_t b, const BlockDots& o) {
        float32x4_t sw[4];
        for (int i = 0; i < 4; ++i) sw[i] = scales4(W.scales + (t * nb + b) * kTileN + 4 * i);
        int32x4_t zp[4];
        if (W.zero_points) {
          const uint8x16_t z8 = vld1q_u8(W.zero_points + (t * nb + b) * kTileN);
          const uint16x8_t lo = vmovl_u8(vget_low_u8(z8)), hi = vmovl_high_u8(z8);
          zp[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo)));
          zp[1] = vreinterpretq_s32_u32(vmovl_high_u16(lo));
          zp[2] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi)));
          zp[3] = vreinterpretq_s32_u32(vmovl_high_u16(hi));
        } else {
          for (int i = 0; i < 4; ++i) zp[i] = vdupq_n_s32(8);
        }
        for (int r = 0; r < rows; ++r) {
          const int32_t bsum = A.block_sum[(m + r) * nb + b];
          for (int i = 0; i < 4; ++i) {
            const int32x4_t corr = vmlsq_n_s32(o.d[r][i], zp[i], bsum);
            acc[r][i] = vmlaq_f32(acc[r][i], sw[i], vcvtq_f32_s32(corr));
          }
        }
      },
      [&](int64_t m, int rows, int64_t t) {
        const int64_t n0 = t * kTileN;
        const int64_t valid = W.N - n0 < kTileN ? W.N - n0 : kTileN;
        for (int r = 0; r < rows; ++r) {
          const float s = A.scale[m + r];
          float tmp[16];
          for (int i = 0; i < 4; ++i) {
            float32x4_t v = vmulq_n_f32(acc[r][i], s);
            if (bias) {
              // Padded columns of the last tile have no bias entry: read only n < N.
              float bb[4] = {0.f, 0.f, 0.f, 0.f};
              for (int c = 0; c < 4; ++c)
                if (4 * i + c < valid) bb[c] = bias[n0 + 4 * i + c];
              v = vaddq_f32(v, vld1q_f32(bb));
            }
            vst1q_f32(tmp + 4 * i, v);
          }
          std::memcpy(C + (m + r) * ldc + n0, tmp, sizeof(float) * valid);
        }
        zero();
      });
}

// Unpacks the low / high nibbles of the 4 16-byte registers of one 64-byte group.
struct Nibbles {
  uint8x16_t lo[4], hi[4];
};
inline Nibbles load_group(const uint8_t* w) {
  Nibbles n;
  const uint8x16_t mask = vdupq_n_u8(0x0f);
  for (int i = 0; i < 4; ++i) {
    const uint8x16_t r = vld1q_u8(w + 16 * i);
    n.lo[i] = vandq_u8(r, mask);
    n.hi[i] = vshrq_n_u8(r, 4);
  }
  return n;
}

// Integer dots of R rows with int8 activations by vmull_s8 / vmlal_s8 into int16 lanes, widened
// to int32 every `chunk` groups (the caller picks chunk so int16 cannot overflow: each group adds
// 2 products per lane, |a*w| <= 127*15 = 1905 for A8 and 7*15 = 105 for A4).
// Lane (c, j) of register i holds column 4i+c, k = k0+j (low nibbles) and k0+4+j (high nibbles).
template <int R>
inline void vmull_block_dots(const int8_t* const* a, const uint8_t* w, int64_t groups,
                             int64_t chunk, BlockDots& out) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) out.d[r][i] = vdupq_n_s32(0);
  for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
    const int64_t g1 = g0 + chunk < groups ? g0 + chunk : groups;
    int16x8_t s[R][8];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 8; ++i) s[r][i] = vdupq_n_s16(0);
    for (int64_t g = g0; g < g1; ++g) {
      const Nibbles n = load_group(w + g * 64);
      for (int r = 0; r < R; ++r) {
        // [a0 a1 a2 a3] x 4 for the low nibbles, [a4 .. a7] x 4 for the high ones.
        const int32x2_t a8 = vreinterpret_s32_s8(vld1_s8(a[r] + g * kGroupK));
        const int8x16_t alo = vreinterpretq_s8_s32(vdupq_lane_s32(a8, 0));
        const int8x16_t ahi = vreinterpretq_s8_s32(vdupq_lane_s32(a8, 1));
        for (int i = 0; i < 4; ++i) {
          const int8x16_t wl = vreinterpretq_s8_u8(n.lo[i]), wh = vreinterpretq_s8_u8(n.hi[i]);
          s[r][2 * i] = vmlal_s8(s[r][2 * i], vget_low_s8(wl), vget_low_s8(alo));
          s[r][2 * i] = vmlal_s8(s[r][2 * i], vget_low_s8(wh), vget_low_s8(ahi));
          s[r][2 * i + 1] = vmlal_high_s8(s[r][2 * i + 1], wl, alo);
          s[r][2 * i + 1] = vmlal_high_s8(s[r][2 * i + 1], wh, ahi);
        }
      }
    }
    // Lanes (c, j) -> per column: pairwise widen, then pairwise add the two j pairs.
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i)
        out.d[r][i] = vaddq_s32(
            out.d[r][i], vpaddq_s32(vpaddlq_s16(s[r][2 * i]), vpaddlq_s16(s[r][2 * i + 1])));
  }
}

}  // namespace
}  // namespace arm
}  // namespace llmfold
