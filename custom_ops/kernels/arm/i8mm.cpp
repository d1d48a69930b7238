// ARMv8.6 i8mm path (smmla, vmmlaq_s32) for row pairs; a single leftover row (M odd, M = 1) uses
// sdot. This file alone is compiled with -march=armv8.2-a+dotprod+i8mm and only runs after
// dispatch saw both HWCAP_ASIMDDP and HWCAP2_I8MM.
#include "arm_dot.h"
#include "../paths.h"

#if !defined(__ARM_FEATURE_MATMUL_INT8)
#error "i8mm.cpp needs -march=...+i8mm"
#endif

namespace llmfold {
namespace arm {
namespace {

// smmla: acc (2x2, [r0c0 r0c1 r1c0 r1c1]) += A (2 rows x 8 k) * B^T (2 columns x 8 k).
// A column's 8 k of a group are the 4 low nibbles then the 4 high nibbles of its 4 bytes, so
// zipping the low- and high-nibble registers by 32-bit lanes gives B for columns (c, c+1).
// 4 rows (two pairs) share one unpacking of the weights: 16 accumulators + 8 B + 2 A registers.
template <int P>  // P row pairs sharing the unpacked weights
inline void smmla_block_dots(const int8_t* const* a, const uint8_t* w, int64_t groups,
                             BlockDots& out) {
  int32x4_t acc[P][8];
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < 8; ++i) acc[p][i] = vdupq_n_s32(0);
  for (int64_t g = 0; g < groups; ++g) {
    const Nibbles n = load_group(w + g * 64);
    int8x16_t bm[8];
    for (int i = 0; i < 4; ++i) {
      const uint32x4_t lo = vreinterpretq_u32_u8(n.lo[i]), hi = vreinterpretq_u32_u8(n.hi[i]);
      bm[2 * i] = vreinterpretq_s8_u32(vzip1q_u32(lo, hi));      // columns 4i, 4i+1
      bm[2 * i + 1] = vreinterpretq_s8_u32(vzip2q_u32(lo, hi));  // columns 4i+2, 4i+3
    }
    for (int p = 0; p < P; ++p) {
      const int8x16_t av =
          vcombine_s8(vld1_s8(a[2 * p] + g * kGroupK), vld1_s8(a[2 * p + 1] + g * kGroupK));
      for (int i = 0; i < 8; ++i) acc[p][i] = vmmlaq_s32(acc[p][i], av, bm[i]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < 4; ++i) {
      const int64x2_t x = vreinterpretq_s64_s32(acc[p][2 * i]);
      const int64x2_t y = vreinterpretq_s64_s32(acc[p][2 * i + 1]);
      out.d[2 * p][i] = vreinterpretq_s32_s64(vzip1q_s64(x, y));
      out.d[2 * p + 1][i] = vreinterpretq_s32_s64(vzip2q_s64(x, y));
    }
}

struct SmmlaKern4 {
  void operator()(const int8_t* const* a, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    smmla_block_dots<2>(a, w, groups, out);
  }
};
struct SmmlaKern2 {
  void operator()(const int8_t* a0, const int8_t* a1, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    const int8_t* a[2] = {a0, a1};
    smmla_block_dots<1>(a, w, groups, out);
  }
};

void i8mm_int_block_dots(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                         int64_t t0, int64_t t1, int32_t* dots) {
  int_block_dots_impl(A, M, act_bits, W, t0, t1, dots, SmmlaKern4{}, SmmlaKern2{}, SdotKern1{});
}

void i8mm_gemm_int(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                   int64_t t0, int64_t t1, const float* bias, float* C, int64_t ldc) {
  gemm_int_impl(A, M, act_bits, W, t0, t1, bias, C, ldc, SmmlaKern4{}, SmmlaKern2{}, SdotKern1{});
}

}  // namespace
}  // namespace arm

const KernelTable& i8mm_kernels() {
  static const KernelTable t{"i8mm", arm::neon_quantize_rows, arm::neon_gemm_a16,
                             arm::i8mm_gemm_int, arm::i8mm_int_block_dots, arm::neon_swiglu,
                             arm::neon_gemm_f32};
  return t;
}

}  // namespace llmfold
