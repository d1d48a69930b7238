// sdot micro-kernel shared by dotprod.cpp and i8mm.cpp (both compiled with +dotprod; internal
// linkage keeps each file's copy private, see arm_common.h).
#pragma once
#include "arm_common.h"

#if !defined(__ARM_FEATURE_DOTPROD)
#error "arm_dot.h needs -march=...+dotprod"
#endif

namespace llmfold {
namespace arm {
namespace {

// R rows x 16 columns of one block with vdotq_laneq_s32: register i of a group holds columns
// 4i..4i+3 x 4 consecutive k (low nibbles k0..k0+3, high nibbles k0+4..k0+7), exactly sdot's
// 4-byte operand per lane; the activation lane picks the matching 4 k. Two groups per 16-byte
// activation load.
template <int R>
inline void sdot_block_dots(const int8_t* const* a, const uint8_t* w, int64_t groups,
                            BlockDots& out) {
  int32x4_t acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = vdupq_n_s32(0);
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    int8x16_t av[R];
    for (int r = 0; r < R; ++r) av[r] = vld1q_s8(a[r] + g * kGroupK);
    // One group's 8 weight registers at a time keeps 4 rows within the 32 vector registers.
    const Nibbles n0 = load_group(w + g * 64);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) {
        acc[r][i] = vdotq_laneq_s32(acc[r][i], vreinterpretq_s8_u8(n0.lo[i]), av[r], 0);
        acc[r][i] = vdotq_laneq_s32(acc[r][i], vreinterpretq_s8_u8(n0.hi[i]), av[r], 1);
      }
    const Nibbles n1 = load_group(w + (g + 1) * 64);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) {
        acc[r][i] = vdotq_laneq_s32(acc[r][i], vreinterpretq_s8_u8(n1.lo[i]), av[r], 2);
        acc[r][i] = vdotq_laneq_s32(acc[r][i], vreinterpretq_s8_u8(n1.hi[i]), av[r], 3);
      }
  }
  if (g < groups) {  // odd group count (block_size 8 * odd; not produced today, kept exact)
    const Nibbles n0 = load_group(w + g * 64);
    for (int r = 0; r < R; ++r) {
      const int8x8_t av = vld1_s8(a[r] + g * kGroupK);
      for (int i = 0; i < 4; ++i) {
        acc[r][i] = vdotq_lane_s32(acc[r][i], vreinterpretq_s8_u8(n0.lo[i]), av, 0);
        acc[r][i] = vdotq_lane_s32(acc[r][i], vreinterpretq_s8_u8(n0.hi[i]), av, 1);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) out.d[r][i] = acc[r][i];
}

struct SdotKern4 {
  void operator()(const int8_t* const* a, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    sdot_block_dots<4>(a, w, groups, out);
  }
};
struct SdotKern2 {
  void operator()(const int8_t* a0, const int8_t* a1, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    const int8_t* a[2] = {a0, a1};
    sdot_block_dots<2>(a, w, groups, out);
  }
};
struct SdotKern1 {
  void operator()(const int8_t* a0, const uint8_t* w, int64_t groups, int,
                  BlockDots& out) const {
    const int8_t* a[1] = {a0};
    sdot_block_dots<1>(a, w, groups, out);
  }
};

}  // namespace
}  // namespace arm
}  // namespace llmfold
