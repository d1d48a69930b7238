// x86 AVX2 + FMA kernels. Compiled with -mavx2 -mfma for this file only; dispatch calls them only
// when cpuid/xgetbv report AVX2, FMA and OS support for YMM state.
//
// Integer path: a 64-byte packed group is two YMM vectors (columns 0-7 and 8-15), each a
// column x 4-k byte matrix whose low nibbles are k0..k0+3 and high nibbles k0+4..k0+7.
// vpmaddubsw(u8 weight nibbles, s8 activations broadcast per 4 k) gives exact int16 pair sums
// (|.| <= 2*15*127 = 3810); up to 8 of them are summed in int16 (<= 30480, A8) before vpmaddwd
// widens to int32, so the integer dots are exact and equal ref's. For 4+ rows (int_driver) the
// zero points are folded into those int16 lanes (see pack_strip4) and a 4-row assembly
// micro-kernel (strip4_groups / strip4_groups4) runs on tiles unpacked per K chunk, in two passes
// per chunk when a phase is a block (strip4_onephase: integer phases first, then widening and the
// scale FMAs).
// Float path: a weight nibble is isolated in its int32 lane with an AND (no shift) and converted;
// the activation is pre-multiplied by the matching power of two, which is exact.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "../paths.h"

namespace llmfold {
namespace avx2 {
namespace {

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Eight fp16 block scales as floats (F16C's vcvtph2ps; exact).
inline __m256 scales8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 2^-s for 8 shift bytes (exactly shift_factor()).
inline __m256 shift_factors8(const uint8_t* s) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
  v = _mm256_sub_epi32(_mm256_set1_epi32(127), _mm256_and_si256(v, _mm256_set1_epi32(15)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 23));
}

// Stores the first n (<= 16) of 16 values (two vectors) to dst.
inline void store_cols(float* dst, __m256 v0, __m256 v1, int64_t n) {
  if (n >= 16) {
    _mm256_storeu_ps(dst, v0);
    _mm256_storeu_ps(dst + 8, v1);
    return;
  }
  alignas(32) float tmp[16];
  _mm256_store_ps(tmp, v0);
  _mm256_store_ps(tmp + 8, v1);
  for (int64_t i = 0; i < n; ++i) dst[i] = tmp[i];
}

// Bias for columns n0..n0+15, zero beyond the n valid ones (never reads past bias[N-1]).
inline void load_bias(const float* bias, int64_t n0, int64_t n, __m256& b0, __m256& b1) {
  if (!bias) {
    b0 = b1 = _mm256_setzero_ps();
  } else if (n >= 16) {
    b0 = _mm256_loadu_ps(bias + n0);
    b1 = _mm256_loadu_ps(bias + n0 + 8);
  } else {
    alignas(32) float tmp[16] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = bias[n0 + i];
    b0 = _mm256_load_ps(tmp);
    b1 = _mm256_load_ps(tmp + 8);
  }
}

// ------------------------------------------------------------------------------------------------
// Activation quantization (same rule as ref, see paths.h).
void quantize_rows(const float* A, int64_t lda, int64_t K, int64_t m_begin, int64_t m_end,
                   const uint8_t* cs, int act_bits, const QuantizedRows& out) {
  const float qmax = act_bits == 4 ? 7.0f : 127.0f;
  const int64_t bs = out.Kp / out.n_blocks;
  const int64_t K8 = K & ~int64_t{7};
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float* a = A + m * lda;
    int8_t* q = out.q + m * out.Kp;
    int32_t* bsum = out.block_sum + m * out.n_blocks;
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 x = _mm256_loadu_ps(a + k);
      if (cs) x = _mm256_mul_ps(x, shift_factors8(cs + k));
      const __m256 ax = _mm256_andnot_ps(sign, x);
      vmax = _mm256_max_ps(vmax, ax);
      vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(ax, big, _CMP_NLE_UQ));  // Inf or NaN
    }
    float absmax = hmax8(vmax);
    bool finite = _mm256_movemask_ps(vbad) == 0;
    for (int64_t k = K8; k < K; ++k) {
      const float x = cs ? a[k] * shift_factor(cs[k]) : a[k];
      if (!std::isfinite(x)) finite = false;
      absmax = std::max(absmax, std::fabs(x));
    }
    std::memset(q, 0, static_cast<size_t>(out.Kp));
    std::memset(bsum, 0, sizeof(int32_t) * static_cast<size_t>(out.n_blocks));
    if (!finite) {
      out.scale[m] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (!(absmax >= kTinyAbsmax)) {
      out.scale[m] = 0.0f;
      continue;
    }
    const float inv = qmax / absmax;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 x = _mm256_loadu_ps(a + k);
      if (cs) x = _mm256_mul_ps(x, shift_factors8(cs + k));
      __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, vinv), lo), hi);
      const __m256i i = _mm256_cvtps_epi32(v);  // round half to even (MXCSR default)
      const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(p16, p16));
    }
    for (int64_t k = K8; k < K; ++k) {
      const float x = cs ? a[k] * shift_factor(cs[k]) : a[k];
      float v = x * inv;
      v = std::min(std::max(v, -qmax), qmax);
      q[k] = static_cast<int8_t>(std::nearbyint(v));
    }
    // Block sums over the written row (zeros beyond K).
    const __m128i ones8 = _mm_set1_epi8(1), ones16 = _mm_set1_epi16(1);
    for (int64_t b = 0; b < out.n_blocks; ++b) {
      __m128i acc = _mm_setzero_si128();
      for (int64_t k = b * bs; k < (b + 1) * bs; k += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
        acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_maddubs_epi16(ones8, v), ones16));
      }
      acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4e));
      acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xb1));
      bsum[b] = _mm_cvtsi128_si32(acc);
    }
    out.scale[m] = absmax / qmax;
  }
}

// ------------------------------------------------------------------------------------------------
// Integer GEMM. Weights either unpacked on the fly from the packed group (few rows) or read from
// a per-tile buffer of unpacked nibbles [group][lo0, hi0, lo1, hi1] x 32 bytes (many rows).
inline void unpack_group(const uint8_t* g, __m256i& l0, __m256i& h0, __m256i& l1, __m256i& h1) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32));
  l0 = _mm256_and_si256(v0, mask);
  h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
  l1 = _mm256_and_si256(v1, mask);
  h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
}

// Unpacks groups of a tile to one byte per nibble; pf (optional): the next piece of weights the
// caller will unpack, fetched one line per group meanwhile (the hardware prefetcher does not follow
// the strided chunk order).
void unpack_tile(const uint8_t* tdata, int64_t groups, uint8_t* dst, const uint8_t* pf) {
  for (int64_t g = 0; g < groups; ++g) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + g * 64), _MM_HINT_T0);
    __m256i l0, h0, l1, h1;
    unpack_group(tdata + g * 64, l0, h0, l1, h1);
    __m256i* d = reinterpret_cast<__m256i*>(dst + g * 128);
    _mm256_storeu_si256(d, l0);
    _mm256_storeu_si256(d + 1, h0);
    _mm256_storeu_si256(d + 2, l1);
    _mm256_storeu_si256(d + 3, h1);
  }
}

struct IntArgs {
  const QuantizedRows* A;
  const PackedInt4* W;
  int act_bits;
  const float* bias;
  float* C;
  int64_t ldc;
  int32_t* dots;  // test hook output, or nullptr
  const int8_t* apack = nullptr;  // packed activation strip for int_rows, or nullptr
};

constexpr int64_t kPrefetchBytes = 2048;
// One row (row1_tiles): the weights stream from memory (decode: every layer's weights once per
// token), so fetch further ahead. Measured in one process, alternating, weights not in L3, one
// thread: 576x1536 54 -> 41 us, 576x576 22 -> 17 us, 576x49152 2.1 -> 1.7 ms against 2048 bytes
// (8192-16384 alike; 1536x576 improves up to 16384, tiles of 12 KB there).
constexpr int64_t kRow1PrefetchBytes = 16384;
constexpr int64_t kEpiRows = 8;  // rows per block of the GEMM epilogues

// Exact integer dots of rows m0..m0+R over groups [g0, g1) for both column halves of a tile:
// int16 lanes (caller bounds g1 - g0 so they cannot overflow), widened to int32 pair sums.
// kUnpacked: unp holds unpacked groups [ug0, ...) of this tile (a K chunk), else tdata is read.
// kFixed > 0: g1 - g0 == kFixed, fully unrolled (no short inner loop per block).
template <int R, bool kUnpacked, int kFixed = 0>
inline void int_dots(const int8_t* aq, int64_t rs, int64_t gs, const uint8_t* tdata, const uint8_t* unp, int64_t ug0,
                     int64_t g0, int64_t g1, __m256i (*out32)[2]) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  if (kFixed) g1 = g0 + kFixed;
#pragma GCC unroll 4
  for (int64_t g = g0; g < g1; ++g) {
    __m256i l0, h0, l1, h1;
    if (kUnpacked) {
      const __m256i* u = reinterpret_cast<const __m256i*>(unp + (g - ug0) * 128);
      l0 = _mm256_loadu_si256(u);
      h0 = _mm256_loadu_si256(u + 1);
      l1 = _mm256_loadu_si256(u + 2);
      h1 = _mm256_loadu_si256(u + 3);
    } else {
      // Streaming the weights once: fetch well ahead of the hardware prefetcher's reach.
      _mm_prefetch(reinterpret_cast<const char*>(tdata + g * 64 + kPrefetchBytes), _MM_HINT_T0);
      unpack_group(tdata + g * 64, l0, h0, l1, h1);
    }
    // One broadcast and one product live at a time: 2R accumulators + 4 weights + 2 temporaries
    // fit the 16 YMM registers for R = 4 (GCC keeps this order on x86).
    for (int r = 0; r < R; ++r) {
      const int8_t* ar = aq + r * rs + g * gs;
      const __m256i alo = _mm256_set1_epi32(load_i32(ar));
      acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(l0, alo));
      acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(l1, alo));
      const __m256i ahi = _mm256_set1_epi32(load_i32(ar + 4));
      acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(h0, ahi));
      acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(h1, ahi));
    }
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) {
    out32[r][0] = _mm256_madd_epi16(acc[r][0], ones16);
    out32[r][1] = _mm256_madd_epi16(acc[r][1], ones16);
  }
}

// One activation row of a group: G = group offset (128-byte weight steps, 32-byte activation
// steps), off = the row's 8-byte offset in the group; A0/A1 its two int16 accumulators.
#define LLMFOLD_MADD_ROW(G, off, A0, A1)                        \
  "vpbroadcastd " #G "*32+" #off "(%[a]), %%ymm12\n\t"     \
  "vpbroadcastd " #G "*32+4+" #off "(%[a]), %%ymm13\n\t"   \
  "vpmaddubsw %%ymm12, %%ymm8, %%ymm14\n\t"               \
  "vpmaddubsw %%ymm12, %%ymm10, %%ymm15\n\t"              \
  "vpaddw %%ymm14, %" A0 ", %" A0 "\n\t"                  \
  "vpaddw %%ymm15, %" A1 ", %" A1 "\n\t"                  \
  "vpmaddubsw %%ymm13, %%ymm9, %%ymm14\n\t"               \
  "vpmaddubsw %%ymm13, %%ymm11, %%ymm15\n\t"              \
  "vpaddw %%ymm14, %" A0 ", %" A0 "\n\t"                  \
  "vpaddw %%ymm15, %" A1 ", %" A1 "\n\t"

// The 4-row x 16-column integer micro-kernel over n >= 1 unpacked groups u (128 bytes each) and a
// packed activation strip a ([group][4][8]), accumulating into acc (int16 lanes, wrapping adds).
// Assembly because GCC's allocation of the intrinsics version spills two of the eight
// accumulators. Registers: acc = 8 operands (ymm0-7), weights ymm8-11 (lo0, hi0, lo1, hi1),
// activations ymm12-13 (4 k broadcast), products ymm14-15.
// AT&T order: vpmaddubsw act, w, dst = maddubs(w u8, act s8).
inline void strip4_groups(const uint8_t* u, const int8_t* a, int64_t n, __m256i (&acc)[4][2]) {
  __asm__ volatile(
      "1:\n\t"
      "vmovdqu (%[u]), %%ymm8\n\t"
      "vmovdqu 32(%[u]), %%ymm9\n\t"
      "vmovdqu 64(%[u]), %%ymm10\n\t"
      "vmovdqu 96(%[u]), %%ymm11\n\t"
      LLMFOLD_MADD_ROW(0, 0, "[c00]", "[c01]")
      LLMFOLD_MADD_ROW(0, 8, "[c10]", "[c11]")
      LLMFOLD_MADD_ROW(0, 16, "[c20]", "[c21]")
      LLMFOLD_MADD_ROW(0, 24, "[c30]", "[c31]")
      "add $128, %[u]\n\t"
      "add $32, %[a]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      : [u] "+r"(u), [a] "+r"(a), [n] "+r"(n), [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]),
        [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]), [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]),
        [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1])
      :
      : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
}

// strip4_groups for exactly 4 groups (an A8 phase), straight-line: no loop branch per phase.
inline void strip4_groups4(const uint8_t* u, const int8_t* a, __m256i (&acc)[4][2]) {
#define LLMFOLD_GROUP4(G)                                   \
  "vmovdqu " #G "*128(%[u]), %%ymm8\n\t"                   \
  "vmovdqu " #G "*128+32(%[u]), %%ymm9\n\t"                \
  "vmovdqu " #G "*128+64(%[u]), %%ymm10\n\t"               \
  "vmovdqu " #G "*128+96(%[u]), %%ymm11\n\t"               \
  LLMFOLD_MADD_ROW(G, 0, "[c00]", "[c01]")                      \
  LLMFOLD_MADD_ROW(G, 8, "[c10]", "[c11]")                      \
  LLMFOLD_MADD_ROW(G, 16, "[c20]", "[c21]")                     \
  LLMFOLD_MADD_ROW(G, 24, "[c30]", "[c31]")
  __asm__ volatile(
      LLMFOLD_GROUP4(0) LLMFOLD_GROUP4(1) LLMFOLD_GROUP4(2) LLMFOLD_GROUP4(3)
      : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]),
        [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1])
      : [u] "r"(u), [a] "r"(a)
      : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
#undef LLMFOLD_GROUP4
#undef LLMFOLD_MADD_ROW
}

// Rows m0..m0+R of tile t over blocks [b0, b1). Per block: exact int32 dots, zero-point
// correction in integers, one FMA with the weight scales into float accumulators.
// kUnpacked: weights from unp (unpacked groups of this tile starting at group b0 * gpb), float
// partial sums read from and written back to facc_mem [R][16] (K chunks); otherwise the whole K
// range is done here and the outputs are written (or the dots, for the test hook).
template <int R, bool kUnpacked>
void int_rows(const IntArgs& p, int64_t m0, int64_t t, const uint8_t* unp, int64_t b0, int64_t b1, float* facc_mem) {
  const QuantizedRows& A = *p.A;
  const PackedInt4& W = *p.W;
  // Locals, so the stores below cannot force reloads through p.
  const uint16_t* const scales = W.scales;
  const uint8_t* const zps = W.zero_points;
  const int32_t* const bsum = A.block_sum + m0 * W.n_blocks;
  int32_t* const dots = p.dots;
  const int64_t Kp = W.Kp(), nb = W.n_blocks, gpb = W.block_size / kGroupK;
  // int16 bound: A8 lanes grow by <= 2 * 3810 per group, so at most 4 groups; A4 never overflows.
  const int64_t flush = p.act_bits == 4 ? gpb : std::min<int64_t>(gpb, 4);
  const uint8_t* tdata = W.data + t * (Kp / kGroupK) * 64;
  const int64_t ug0 = b0 * gpb;
  // Activations: row-major rows (few rows), or a strip packed as [group][R][8] (see int_driver)
  // so the broadcasts read one line instead of R rows 4 KB apart (which alias in L1).
  const int8_t* aq = p.apack ? p.apack : A.q + m0 * Kp;
  const int64_t rs = p.apack ? kGroupK : Kp, gs = p.apack ? R * kGroupK : kGroupK;
  // Float accumulators: registers for few rows (whole K here); for strips (K chunks) they stay in
  // facc_mem (L1), updated once per block, so the integer loop keeps all 16 YMM registers.
  __m256 facc[R][2];
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    __m256i d[R][2];
    if (flush == 4) int_dots<R, kUnpacked, 4>(aq, rs, gs, tdata, unp, ug0, b * gpb, b * gpb + 4, d);
    else int_dots<R, kUnpacked>(aq, rs, gs, tdata, unp, ug0, b * gpb, b * gpb + flush, d);
    for (int64_t g0 = b * gpb + flush; g0 < (b + 1) * gpb; g0 += flush) {
      __m256i e[R][2];
      if (flush == 4) int_dots<R, kUnpacked, 4>(aq, rs, gs, tdata, unp, ug0, g0, g0 + 4, e);
      else int_dots<R, kUnpacked>(aq, rs, gs, tdata, unp, ug0, g0, g0 + flush, e);
      for (int r = 0; r < R; ++r) {
        d[r][0] = _mm256_add_epi32(d[r][0], e[r][0]);
        d[r][1] = _mm256_add_epi32(d[r][1], e[r][1]);
      }
    }
    if (dots) {
      const int64_t Np = W.n_tiles * kTileN;
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + ((m0 + r) * nb + b) * Np + t * kTileN + 8 * h),
                              d[r][h]);
      continue;
    }
    const int64_t sidx = (t * nb + b) * kTileN;
    const __m256 sw0 = scales8(scales + sidx), sw1 = scales8(scales + sidx + 8);
    if (zps) {
      const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zps + sidx));
      const __m256i z0 = _mm256_cvtepu8_epi32(z), z1 = _mm256_cvtepu8_epi32(_mm_srli_si128(z, 8));
      for (int r = 0; r < R; ++r) {
        const __m256i s = _mm256_set1_epi32(bsum[r * nb + b]);
        d[r][0] = _mm256_sub_epi32(d[r][0], _mm256_mullo_epi32(z0, s));
        d[r][1] = _mm256_sub_epi32(d[r][1], _mm256_mullo_epi32(z1, s));
      }
    } else {  // zp = 8: subtract 8 * block sum (a shift of the broadcast)
      for (int r = 0; r < R; ++r) {
        const __m256i s = _mm256_slli_epi32(_mm256_set1_epi32(bsum[r * nb + b]), 3);
        d[r][0] = _mm256_sub_epi32(d[r][0], s);
        d[r][1] = _mm256_sub_epi32(d[r][1], s);
      }
    }
    if (facc_mem) {  // block 0 starts the partial sums (the buffer is not cleared beforehand)
      for (int r = 0; r < R; ++r) {
        float* f = facc_mem + r * kTileN;
        const __m256 p0 = b == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(f);
        const __m256 p1 = b == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(f + 8);
        _mm256_storeu_ps(f, _mm256_fmadd_ps(sw0, _mm256_cvtepi32_ps(d[r][0]), p0));
        _mm256_storeu_ps(f + 8, _mm256_fmadd_ps(sw1, _mm256_cvtepi32_ps(d[r][1]), p1));
      }
      continue;
    }
    for (int r = 0; r < R; ++r) {
      facc[r][0] = _mm256_fmadd_ps(sw0, _mm256_cvtepi32_ps(d[r][0]), facc[r][0]);
      facc[r][1] = _mm256_fmadd_ps(sw1, _mm256_cvtepi32_ps(d[r][1]), facc[r][1]);
    }
  }
  if (dots || facc_mem) return;
  const int64_t n0 = t * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
  __m256 bb0, bb1;
  load_bias(p.bias, n0, nvalid, bb0, bb1);
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(A.scale[m0 + r]);
    store_cols(p.C + (m0 + r) * p.ldc + n0, _mm256_fmadd_ps(facc[r][0], s, bb0),
               _mm256_fmadd_ps(facc[r][1], s, bb1), nvalid);
  }
}

thread_local std::vector<uint8_t> t_unpacked;
thread_local std::vector<int8_t> t_apack;
thread_local std::vector<float> t_intacc;

// Rows [m0, m0 + R) of the quantized activations as [group][R][8].
void pack_strip(const QuantizedRows& A, int64_t m0, int R, int8_t* dst) {
  const int64_t groups = A.Kp / kGroupK;
  for (int r = 0; r < R; ++r) {
    const int8_t* src = A.q + (m0 + r) * A.Kp;
    for (int64_t g = 0; g < groups; ++g) std::memcpy(dst + (g * R + r) * kGroupK, src + g * kGroupK, kGroupK);
  }
}

// Zero points folded into the int16 accumulators (4-row strips). A phase is the run of groups
// whose products stay in int16 lanes (A8: 4 groups, A4: the block). Lane 0 of a column's 32-bit
// lane collects k = 0, 1 (mod 4) of each group, lane 1 k = 2, 3. Starting each lane at
// -zp * (sum of the activations it will see) makes it end at sum a * (q - zp) over its 4P k,
// |.| <= 16 * 127 * 15 (A8) or 128 * 7 * 15 (A4) < 2^15: exact even though the running value may
// wrap (vpaddw is modular; vpmaddubsw never saturates here, |2 * 15 * 127| < 2^15).
// corr[phase][r] holds the two lane sums of row r as int16 (s0, s1).
// With symmetric weights (no zero points, zp = 8) the pair is stored premultiplied by -8, which is
// then the accumulators' initial value as is.
// Packs rows [m0, m0 + 4) as [group][4][8] and computes their lane sums per phase (Kp / 8 groups,
// an even count, as are phase_groups).
void pack_strip4(const QuantizedRows& A, int64_t m0, int64_t phase_groups, bool times_minus8, int8_t* dst,
                 int32_t* corr) {
  const int64_t groups = A.Kp / kGroupK;
  const int8_t* q0 = A.q + m0 * A.Kp;
  const int8_t *q1 = q0 + A.Kp, *q2 = q1 + A.Kp, *q3 = q2 + A.Kp;
  const __m256i ones8 = _mm256_set1_epi8(1), m8 = _mm256_set1_epi16(times_minus8 ? -8 : 1);
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; g += 2) {
    const int64_t k = g * kGroupK;
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + k));
    const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q1 + k));
    const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q2 + k));
    const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q3 + k));
    const __m256i va = _mm256_setr_m128i(_mm_unpacklo_epi64(r0, r1), _mm_unpacklo_epi64(r2, r3));  // group g
    const __m256i vb = _mm256_setr_m128i(_mm_unpackhi_epi64(r0, r1), _mm_unpackhi_epi64(r2, r3));  // group g + 1
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 32), va);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 32 + 32), vb);
    // int16 pair sums (q0+q1, q2+q3, q4+q5, q6+q7) per row, then (q0+q1+q4+q5, q2+q3+q6+q7).
    __m256i pr = _mm256_add_epi16(_mm256_maddubs_epi16(ones8, va), _mm256_maddubs_epi16(ones8, vb));
    sum = _mm256_add_epi16(sum, _mm256_add_epi16(pr, _mm256_shuffle_epi32(pr, 0xB1)));
    if ((g + 2) % phase_groups == 0) {
      const __m256i c = _mm256_permutevar8x32_epi32(_mm256_mullo_epi16(sum, m8), pick);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(corr + (g + 2 - phase_groups) / phase_groups * 4),
                       _mm256_castsi256_si128(c));
      sum = _mm256_setzero_si256();
    }
  }
}

// Rows m0..m0+3 (a full strip, activations apack [group][4][8], lane sums corr) of tile t over
// blocks [b0, b1), weights from unp (unpacked groups from b0 * gpb). Float partial sums in facc
// [4][16] (one FMA per block with the weight scales), or the exact dots for the test hook.
template <bool kOnePhase>
void strip4_blocks_t(const IntArgs& p, int64_t m0, int64_t t, const int8_t* apack, const int32_t* corr,
                     const uint8_t* unp, int64_t b0, int64_t b1, int64_t phase_groups, float* facc) {
  const PackedInt4& W = *p.W;
  const int64_t nb = W.n_blocks, gpb = W.block_size / kGroupK, phases = kOnePhase ? 1 : gpb / phase_groups;
  const uint16_t* const scales = W.scales;
  const uint8_t* const zps = W.zero_points;
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t sidx = (t * nb + b) * kTileN;
    // -zp per column as int16 pairs (both lanes of a column's 32-bit lane).
    __m256i nz0, nz1;
    if (zps) {
      const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zps + sidx));
      const __m256i dup = _mm256_set1_epi32(0x00010001), zero = _mm256_setzero_si256();  // zp in both halves, negated
      nz0 = _mm256_sub_epi16(zero, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(z), dup));
      nz1 = _mm256_sub_epi16(zero, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(z, 8)), dup));
    } else {
      nz0 = nz1 = _mm256_set1_epi16(-8);  // (unused: corr is premultiplied)
    }
    __m256i d[4][2] = {};
    for (int64_t ph = 0; ph < phases; ++ph) {
      const int64_t g0 = b * gpb + ph * phase_groups;
      const int32_t* c = corr + (g0 / phase_groups) * 4;
      __m256i acc[4][2];
      for (int r = 0; r < 4; ++r) {
        const __m256i s = _mm256_set1_epi32(c[r]);
        acc[r][0] = zps ? _mm256_mullo_epi16(s, nz0) : s;
        acc[r][1] = zps ? _mm256_mullo_epi16(s, nz1) : s;
      }
      if (phase_groups == 4) strip4_groups4(unp + (g0 - b0 * gpb) * 128, apack + g0 * 4 * kGroupK, acc);
      else strip4_groups(unp + (g0 - b0 * gpb) * 128, apack + g0 * 4 * kGroupK, phase_groups, acc);
      if (kOnePhase && !p.dots) {  // widen, scale and accumulate row by row (no int32 array live)
        const __m256 sw0 = scales8(scales + sidx), sw1 = scales8(scales + sidx + 8);
        for (int r = 0; r < 4; ++r) {
          float* f = facc + r * kTileN;
          const __m256 v0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][0], ones16));
          const __m256 v1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][1], ones16));
          if (b == 0) {  // block 0 starts the partial sums (the buffer is not cleared beforehand)
            _mm256_storeu_ps(f, _mm256_mul_ps(sw0, v0));
            _mm256_storeu_ps(f + 8, _mm256_mul_ps(sw1, v1));
          } else {
            _mm256_storeu_ps(f, _mm256_fmadd_ps(sw0, v0, _mm256_loadu_ps(f)));
            _mm256_storeu_ps(f + 8, _mm256_fmadd_ps(sw1, v1, _mm256_loadu_ps(f + 8)));
          }
        }
        break;
      }
      for (int r = 0; r < 4; ++r) {
        const __m256i w0 = _mm256_madd_epi16(acc[r][0], ones16), w1 = _mm256_madd_epi16(acc[r][1], ones16);
        d[r][0] = kOnePhase ? w0 : _mm256_add_epi32(d[r][0], w0);
        d[r][1] = kOnePhase ? w1 : _mm256_add_epi32(d[r][1], w1);
      }
    }
    if (kOnePhase && !p.dots) continue;
    if (p.dots) {  // test hook: the plain dots, sum a q = sum a (q - zp) + zp * block sum
      const int64_t Np = W.n_tiles * kTileN;
      __m256i z0 = _mm256_set1_epi32(8), z1 = z0;
      if (zps) {
        const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zps + sidx));
        z0 = _mm256_cvtepu8_epi32(z);
        z1 = _mm256_cvtepu8_epi32(_mm_srli_si128(z, 8));
      }
      for (int r = 0; r < 4; ++r) {
        const __m256i bs = _mm256_set1_epi32(p.A->block_sum[(m0 + r) * nb + b]);
        int32_t* o = p.dots + ((m0 + r) * nb + b) * Np + t * kTileN;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_add_epi32(d[r][0], _mm256_mullo_epi32(z0, bs)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_add_epi32(d[r][1], _mm256_mullo_epi32(z1, bs)));
      }
      continue;
    }
    const __m256 sw0 = scales8(scales + sidx), sw1 = scales8(scales + sidx + 8);
    for (int r = 0; r < 4; ++r) {
      float* f = facc + r * kTileN;
      const __m256 p0 = b == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(f);  // block 0 starts the sums
      const __m256 p1 = b == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(f + 8);
      _mm256_storeu_ps(f, _mm256_fmadd_ps(sw0, _mm256_cvtepi32_ps(d[r][0]), p0));
      _mm256_storeu_ps(f + 8, _mm256_fmadd_ps(sw1, _mm256_cvtepi32_ps(d[r][1]), p1));
    }
  }
}

// strip4_blocks_t's common case (one phase per block: A8 with block 32 or 16, A4 with any block;
// float output) in two passes: first the integer micro-kernel for every block of the chunk, its
// int16 accumulators stored as they are (8 stores per block); then widening, conversion and the
// scale FMA for all blocks with the float partial sums in registers (loaded and stored once per
// chunk). The second pass is independent work the core overlaps freely, where the per-block
// load-FMA-store chain through facc between two short micro-kernel calls did not (A8 at block 32:
// about 10 % less time in total). Same float operations in the same order as strip4_blocks_t.
// (A version generalised to several phases per block, for A8 with blocks >= 64, measured 15 %
// slower in this case and no faster than strip4_blocks_t in that one, so it was dropped.)
constexpr int64_t kMaxChunkPhases = 32;  // blocks per K chunk (int_driver), e.g. 1024 k at block 32
void strip4_onephase(const IntArgs& p, int64_t t, const int8_t* apack, const int32_t* corr, const uint8_t* unp,
                     int64_t b0, int64_t b1, int64_t phase_groups, float* facc) {
  const PackedInt4& W = *p.W;
  const int64_t nb = W.n_blocks;
  const uint8_t* const zps = W.zero_points;
  __m256i iacc[kMaxChunkPhases][4][2];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t g0 = b * phase_groups;
    const int32_t* c = corr + b * 4;
    __m256i acc[4][2];
    if (zps) {  // -zp per column as int16 pairs (both lanes of a column's 32-bit lane)
      const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zps + (t * nb + b) * kTileN));
      const __m256i dup = _mm256_set1_epi32(0x00010001), zero = _mm256_setzero_si256();
      const __m256i nz0 = _mm256_sub_epi16(zero, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(z), dup));
      const __m256i nz1 = _mm256_sub_epi16(zero, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(z, 8)), dup));
      for (int r = 0; r < 4; ++r) {
        const __m256i sr = _mm256_set1_epi32(c[r]);
        acc[r][0] = _mm256_mullo_epi16(sr, nz0);
        acc[r][1] = _mm256_mullo_epi16(sr, nz1);
      }
    } else {  // corr premultiplied by -8
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_set1_epi32(c[r]);
    }
    const uint8_t* u = unp + (g0 - b0 * phase_groups) * 128;
    if (phase_groups == 4) strip4_groups4(u, apack + g0 * 4 * kGroupK, acc);
    else strip4_groups(u, apack + g0 * 4 * kGroupK, phase_groups, acc);
    for (int r = 0; r < 4; ++r) {
      iacc[b - b0][r][0] = acc[r][0];
      iacc[b - b0][r][1] = acc[r][1];
    }
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  const uint16_t* sc = W.scales + (t * nb + b0) * kTileN;
  __m256 f[4][2];
  int64_t b = b0;
  if (b0 == 0) {  // block 0 starts the partial sums (the buffer is not cleared beforehand)
    const __m256 sw0 = scales8(sc), sw1 = scales8(sc + 8);
    for (int r = 0; r < 4; ++r) {
      f[r][0] = _mm256_mul_ps(sw0, _mm256_cvtepi32_ps(_mm256_madd_epi16(iacc[0][r][0], ones16)));
      f[r][1] = _mm256_mul_ps(sw1, _mm256_cvtepi32_ps(_mm256_madd_epi16(iacc[0][r][1], ones16)));
    }
    ++b;
  } else {
    for (int r = 0; r < 4; ++r) {
      f[r][0] = _mm256_loadu_ps(facc + r * kTileN);
      f[r][1] = _mm256_loadu_ps(facc + r * kTileN + 8);
    }
  }
  for (; b < b1; ++b) {
    const uint16_t* sw = sc + (b - b0) * kTileN;
    const __m256 sw0 = scales8(sw), sw1 = scales8(sw + 8);
    for (int r = 0; r < 4; ++r) {
      f[r][0] = _mm256_fmadd_ps(sw0, _mm256_cvtepi32_ps(_mm256_madd_epi16(iacc[b - b0][r][0], ones16)), f[r][0]);
      f[r][1] = _mm256_fmadd_ps(sw1, _mm256_cvtepi32_ps(_mm256_madd_epi16(iacc[b - b0][r][1], ones16)), f[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_ps(facc + r * kTileN, f[r][0]);
    _mm256_storeu_ps(facc + r * kTileN + 8, f[r][1]);
  }
}

void strip4_blocks(const IntArgs& p, int64_t m0, int64_t t, const int8_t* apack, const int32_t* corr,
                   const uint8_t* unp, int64_t b0, int64_t b1, int64_t phase_groups, float* facc) {
  const bool one = phase_groups == p.W->block_size / kGroupK;
  if (!p.dots && one && b1 - b0 <= kMaxChunkPhases)
    strip4_onephase(p, t, apack, corr, unp, b0, b1, phase_groups, facc);
  else if (one) strip4_blocks_t<true>(p, m0, t, apack, corr, unp, b0, b1, phase_groups, facc);
  else strip4_blocks_t<false>(p, m0, t, apack, corr, unp, b0, b1, phase_groups, facc);
}

// Rows [m0, m1) of tile t over blocks [b0, b1): full 4-row strips by strip4_blocks, the last
// 1-3 rows by int_rows.
void int_strips(const IntArgs& p, int64_t m0, int64_t m1, const int8_t* apack, const int32_t* corr,
                int64_t corr_stride, int64_t phase_groups, int64_t t, const uint8_t* unp, int64_t b0, int64_t b1,
                float* acc /*[m1-m0][16] or nullptr*/) {
  const int64_t Kp = p.W->Kp();
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4)
    strip4_blocks(p, m, t, apack + (m - m0) * Kp, corr + (m - m0) / 4 * corr_stride, unp, b0, b1, phase_groups,
                  acc ? acc + (m - m0) * kTileN : nullptr);
  IntArgs q = p;
  q.apack = apack + (m - m0) * Kp;
  float* a = acc ? acc + (m - m0) * kTileN : nullptr;
  const int64_t rest = m1 - m;
  if (rest == 1) int_rows<1, true>(q, m, t, unp, b0, b1, a);
  else if (rest == 2) int_rows<2, true>(q, m, t, unp, b0, b1, a);
  else if (rest == 3) int_rows<3, true>(q, m, t, unp, b0, b1, a);
}

thread_local std::vector<int32_t> t_corr;

// One row (decode), two tiles at a time (the activation broadcasts and the loop serve both), with
// the zero points folded into the int16 lanes as for the strips: lane sums of the row per phase,
// lsum[phase] = (s0, s1) premultiplied by -8 for symmetric weights.
void row_lane_sums(const int8_t* q, int64_t Kp, int64_t phase_groups, bool times_minus8, int32_t* lsum) {
  const __m256i ones8 = _mm256_set1_epi8(1), m8 = _mm256_set1_epi16(times_minus8 ? -8 : 1);
  const int64_t groups = Kp / kGroupK;
  // 32 bytes = 4 groups; phases of 2 groups (block 16) use the halves.
  for (int64_t g = 0; g < groups; g += 4) {
    __m256i pr;
    if (g + 4 <= groups) {
      pr = _mm256_maddubs_epi16(ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * kGroupK)));
    } else {  // 2 groups left
      pr = _mm256_maddubs_epi16(ones8, _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * kGroupK)), 0));
    }
    pr = _mm256_mullo_epi16(_mm256_add_epi16(pr, _mm256_shuffle_epi32(pr, 0xB1)), m8);  // group pairs in 32-bit lanes 0, 2, 4, 6
    alignas(32) int16_t v[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), pr);
    for (int j = 0; j < 4 && g + j < groups; ++j) {
      const int64_t ph = (g + j) / phase_groups;
      if ((g + j) % phase_groups == 0) lsum[2 * ph] = lsum[2 * ph + 1] = 0;
      lsum[2 * ph] += v[4 * j];
      lsum[2 * ph + 1] += v[4 * j + 1];
    }
  }
}

// lpair[phase]: the row's two lane sums of the phase as int16 halves of one int32 (row1_driver).
template <int NT, bool kOnePhase>
void row1_tiles(const IntArgs& p, int64_t t, const int32_t* lpair, int64_t phase_groups) {
  const QuantizedRows& A = *p.A;
  const PackedInt4& W = *p.W;
  const int64_t Kp = W.Kp(), nb = W.n_blocks, gpb = W.block_size / kGroupK;
  const int64_t phases = kOnePhase ? 1 : gpb / phase_groups, tstride = (Kp / kGroupK) * 64;
  const uint8_t* const zps = W.zero_points;
  const uint16_t* const scales = W.scales;
  const int8_t* const aq = A.q;
  const uint8_t* td = W.data + t * tstride;
  const __m256i ones16 = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  // Prefetch in consumption order, kRow1PrefetchBytes ahead in each tile: pf_off bytes from each
  // weight group, pf_soff fp16 scales from each block (zero points: pf_soff bytes). Past the
  // end of these tiles that is the same place in the next NT tiles, which the caller processes
  // next (a tile is only 4.6 KB at K = 576): the offsets grow by NT - 1 tiles at block wrap_b.
  const int64_t pf_blocks = std::max<int64_t>(1, kRow1PrefetchBytes / (gpb * 64));
  const int64_t wrap_b = nb - pf_blocks % nb;
  int64_t pf_off = pf_blocks / nb * NT * tstride + pf_blocks % nb * gpb * 64;
  int64_t pf_soff = (pf_blocks / nb * NT * nb + pf_blocks % nb) * kTileN;
  __m256 facc[NT][2];
  for (int i = 0; i < NT; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (b == wrap_b) pf_off += (NT - 1) * tstride, pf_soff += (NT - 1) * nb * kTileN;
    for (int i = 0; i < NT; ++i) {
      const int64_t sidx = ((t + i) * nb + b) * kTileN + pf_soff;
      _mm_prefetch(reinterpret_cast<const char*>(scales + sidx), _MM_HINT_T0);
      if (zps) _mm_prefetch(reinterpret_cast<const char*>(zps + sidx), _MM_HINT_T0);
    }
    __m256i nz[NT][2];
    if (zps) {
      const __m256i dup = _mm256_set1_epi32(0x00010001), zero = _mm256_setzero_si256();
      for (int i = 0; i < NT; ++i) {
        const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zps + ((t + i) * nb + b) * kTileN));
        nz[i][0] = _mm256_sub_epi16(zero, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(z), dup));
        nz[i][1] = _mm256_sub_epi16(zero, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(z, 8)), dup));
      }
    }
    __m256i d[NT][2] = {};
    for (int64_t ph = 0; ph < phases; ++ph) {
      const int64_t g0 = b * gpb + ph * phase_groups;
      const __m256i s = _mm256_set1_epi32(lpair[b * phases + ph]);  // phase g0 / phase_groups
      __m256i acc[NT][2];
      for (int i = 0; i < NT; ++i) {
        acc[i][0] = zps ? _mm256_mullo_epi16(s, nz[i][0]) : s;
        acc[i][1] = zps ? _mm256_mullo_epi16(s, nz[i][1]) : s;
      }
      for (int64_t g = g0; g < g0 + phase_groups; ++g) {
        const __m256i alo = _mm256_set1_epi32(load_i32(aq + g * kGroupK));
        const __m256i ahi = _mm256_set1_epi32(load_i32(aq + g * kGroupK + 4));
        for (int i = 0; i < NT; ++i) {
          const uint8_t* gp = td + i * tstride + g * 64;
          _mm_prefetch(reinterpret_cast<const char*>(gp + pf_off), _MM_HINT_T0);
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + 32));
          acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_maddubs_epi16(_mm256_and_si256(v0, mask), alo));
          acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_maddubs_epi16(_mm256_and_si256(v1, mask), alo));
          acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), mask), ahi));
          acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), mask), ahi));
        }
      }
      for (int i = 0; i < NT; ++i)
        for (int h = 0; h < 2; ++h) {
          const __m256i w = _mm256_madd_epi16(acc[i][h], ones16);
          d[i][h] = (kOnePhase || ph == 0) ? w : _mm256_add_epi32(d[i][h], w);
        }
    }
    if (p.dots) {  // test hook: sum a q = sum a (q - zp) + zp * block sum
      const int64_t Np = W.n_tiles * kTileN;
      const __m256i bs = _mm256_set1_epi32(A.block_sum[b]);
      for (int i = 0; i < NT; ++i) {
        __m256i z0 = _mm256_set1_epi32(8), z1 = z0;
        if (zps) {
          const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zps + ((t + i) * nb + b) * kTileN));
          z0 = _mm256_cvtepu8_epi32(z);
          z1 = _mm256_cvtepu8_epi32(_mm_srli_si128(z, 8));
        }
        int32_t* o = p.dots + b * Np + (t + i) * kTileN;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_add_epi32(d[i][0], _mm256_mullo_epi32(z0, bs)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_add_epi32(d[i][1], _mm256_mullo_epi32(z1, bs)));
      }
      continue;
    }
    for (int i = 0; i < NT; ++i) {
      const uint16_t* sw = scales + ((t + i) * nb + b) * kTileN;
      facc[i][0] = _mm256_fmadd_ps(scales8(sw), _mm256_cvtepi32_ps(d[i][0]), facc[i][0]);
      facc[i][1] = _mm256_fmadd_ps(scales8(sw + 8), _mm256_cvtepi32_ps(d[i][1]), facc[i][1]);
    }
  }
  if (p.dots) return;
  const __m256 rs = _mm256_set1_ps(A.scale[0]);
  for (int i = 0; i < NT; ++i) {
    const int64_t n0 = (t + i) * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
    __m256 bb0, bb1;
    load_bias(p.bias, n0, nvalid, bb0, bb1);
    store_cols(p.C + n0, _mm256_fmadd_ps(facc[i][0], rs, bb0), _mm256_fmadd_ps(facc[i][1], rs, bb1), nvalid);
  }
}

thread_local std::vector<int32_t> t_lsum;

void row1_driver(const IntArgs& p, int64_t tile_begin, int64_t tile_end) {
  const PackedInt4& W = *p.W;
  const int64_t Kp = W.Kp(), gpb = W.block_size / kGroupK;
  const int64_t phase_groups = p.act_bits == 4 ? gpb : std::min<int64_t>(gpb, 4);  // int16 lane bound, see pack_strip4
  const int64_t nph = Kp / kGroupK / phase_groups;
  int32_t* lsum = scratch(t_lsum, static_cast<size_t>(3 * nph));
  row_lane_sums(p.A->q, Kp, phase_groups, W.zero_points == nullptr, lsum);
  int32_t* lpair = lsum + 2 * nph;  // (s0, s1) as the int16 halves of one int32, broadcast per phase
  for (int64_t i = 0; i < nph; ++i)
    lpair[i] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(lsum[2 * i])) |
                                    (static_cast<uint32_t>(static_cast<uint16_t>(lsum[2 * i + 1])) << 16));
  const bool one = phase_groups == gpb;
  int64_t t = tile_begin;
  for (; t + 2 <= tile_end; t += 2) {
    if (one) row1_tiles<2, true>(p, t, lpair, phase_groups);
    else row1_tiles<2, false>(p, t, lpair, phase_groups);
  }
  if (t < tile_end) {
    if (one) row1_tiles<1, true>(p, t, lpair, phase_groups);
    else row1_tiles<1, false>(p, t, lpair, phase_groups);
  }
}

void int_driver(const IntArgs& p, int64_t M, int64_t tile_begin, int64_t tile_end) {
  const PackedInt4& W = *p.W;
  const int64_t nb = W.n_blocks;
  if (M == 1) {
    row1_driver(p, tile_begin, tile_end);
    return;
  }
  if (M < 4) {
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      if (M == 2) int_rows<2, false>(p, 0, t, nullptr, 0, nb, nullptr);
      else if (M == 3) int_rows<3, false>(p, 0, t, nullptr, 0, nb, nullptr);
    }
    return;
  }
  // GEMM blocking: K chunks of <= 1024 k (whole blocks, at most kMaxChunkPhases of them, K split
  // evenly: 576 = one chunk, 1536 = 2 x 768, 4096 = 4 x 1024; the chunk of a tile, unpacked to one
  // byte per nibble, is 16 bytes per k <= 16 KB and stays in L1; 512-k chunks, 576 as 512 + 64,
  // executed 2-4 % more instructions: per-chunk calls, partial-sum loads and stores, unpacking
  // calls), each tile's chunk unpacked once per
  // row block and reused by all its 4-row strips (4 rows x 16 columns: 8 int16 accumulators,
  // 4 weight and 2 activation registers). Activations are packed per 4-row strip as [group][4][8]
  // (one row block: up to 1 MB, usually all rows, so the packed weights stream from memory once);
  // the chunk of every strip (4 bytes per k) is read from L2 per tile. Float partial sums live
  // in acc [tile][row][16] between chunks; tile groups bound it to ~512 KB.
  const int64_t Kp = W.Kp(), bs = W.block_size, gpb = bs / kGroupK;
  const int64_t max_chunk_blocks = std::max<int64_t>(1, std::min<int64_t>(kMaxChunkPhases, 1024 / bs));
  const int64_t n_chunks = (nb + max_chunk_blocks - 1) / max_chunk_blocks;
  const int64_t chunk_blocks = (nb + n_chunks - 1) / n_chunks;
  const int64_t rb = std::max<int64_t>(4, std::min<int64_t>(M, (int64_t{1} << 20) / Kp / 4 * 4));
  uint8_t* unp = scratch(t_unpacked, static_cast<size_t>(chunk_blocks * gpb * 128));
  int8_t* apack = scratch(t_apack, static_cast<size_t>(rb * Kp));
  const int64_t groups = Kp / kGroupK;
  const int64_t phase_groups = p.act_bits == 4 ? gpb : std::min<int64_t>(gpb, 4);  // see pack_strip4
  const int64_t corr_stride = groups / phase_groups * 4;
  int32_t* corr = scratch(t_corr, static_cast<size_t>(rb / 4 * corr_stride + 1));
  const int64_t tgroup = std::max<int64_t>(1, (int64_t{1} << 19) / (rb * kTileN * 4));
  float* acc = p.dots ? nullptr : scratch(t_intacc, static_cast<size_t>(std::min(tgroup, tile_end - tile_begin) * rb * kTileN));
  for (int64_t m0 = 0; m0 < M; m0 += rb) {
    const int64_t m1 = std::min(M, m0 + rb), rows = m1 - m0;
    for (int64_t m = m0; m < m1; m += 4) {
      if (m + 4 <= m1)
        pack_strip4(*p.A, m, phase_groups, W.zero_points == nullptr, apack + (m - m0) * Kp,
                    corr + (m - m0) / 4 * corr_stride);
      else
        pack_strip(*p.A, m, static_cast<int>(m1 - m), apack + (m - m0) * Kp);
    }
    for (int64_t tg = tile_begin; tg < tile_end; tg += tgroup) {
      const int64_t tg1 = std::min(tile_end, tg + tgroup);
      // (acc is not cleared: block 0 of the first chunk writes it)
      for (int64_t b0 = 0; b0 < nb; b0 += chunk_blocks) {
        const int64_t b1 = std::min(nb, b0 + chunk_blocks);
        for (int64_t t = tg; t < tg1; ++t) {
          const uint8_t* src = W.data + (t * (Kp / kGroupK) + b0 * gpb) * 64;
          const uint8_t* next = t + 1 < tg1 ? src + (Kp / kGroupK) * 64
                                : b1 < nb  ? W.data + (tg * (Kp / kGroupK) + b1 * gpb) * 64
                                           : nullptr;
          unpack_tile(src, (b1 - b0) * gpb, unp, next);
          int_strips(p, m0, m1, apack, corr, corr_stride, phase_groups, t, unp, b0, b1,
                     acc ? acc + (t - tg) * rows * kTileN : nullptr);
        }
      }
      if (!acc) continue;
      // Epilogue (row scale and bias) in blocks of kEpiRows rows, tiles inner: acc ([tile][row][16])
      // is read in runs of kEpiRows * 64 bytes and each row of C is written in whole lines, run after
      // run (row by row over all tiles would read acc with a stride of rows * 64 bytes, a multiple of
      // 4 KB: one L1 set; tile by tile over all rows writes one line of every row per tile).
      for (int64_t e0 = m0; e0 < m1; e0 += kEpiRows) {
        const int64_t e1 = std::min(m1, e0 + kEpiRows);
        for (int64_t t = tg; t < tg1; ++t) {
          const int64_t n0 = t * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
          __m256 bb0, bb1;
          load_bias(p.bias, n0, nvalid, bb0, bb1);
          for (int64_t m = e0; m < e1; ++m) {
            const float* ta = acc + ((t - tg) * rows + (m - m0)) * kTileN;
            const __m256 s = _mm256_set1_ps(p.A->scale[m]);
            store_cols(p.C + m * p.ldc + n0, _mm256_fmadd_ps(_mm256_loadu_ps(ta), s, bb0),
                       _mm256_fmadd_ps(_mm256_loadu_ps(ta + 8), s, bb1), nvalid);
          }
        }
      }
    }
  }
}

void gemm_int(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W, int64_t tile_begin,
              int64_t tile_end, const float* bias, float* C, int64_t ldc) {
  const IntArgs p{&A, &W, act_bits, bias, C, ldc, nullptr};
  int_driver(p, M, tile_begin, tile_end);
}

void int_block_dots(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W, int64_t tile_begin,
                    int64_t tile_end, int32_t* dots) {
  const IntArgs p{&A, &W, act_bits, nullptr, nullptr, 0, dots};
  int_driver(p, M, tile_begin, tile_end);
}

// ------------------------------------------------------------------------------------------------
// Float activations, few rows: weights stay packed. Lane c of a group's vector holds column c's
// 4 bytes; (v & (0xF << 8j)) is q[k0+j] * 2^(8j) and ((v >> 4) & (0xF << 8j)) is q[k0+4+j] * 2^(8j),
// both exact in float, so activation k is pre-scaled by 2^-(8 (k % 4)). Zero points are removed per
// block with the block's activation sum: sum a (q - zp) = sum a q - zp sum a.
thread_local std::vector<float> t_prescaled;

// Row prescale: a'[k] = a[k] * 2^-(8 (k%4)) * rowfac, asum[b] = sum_{k in b} a[k] * rowfac.
// rowfac = 2^64 for rows so small that the 2^-24 factor could lose bits in subnormals.
float prescale_row(const float* a, int64_t Kp, int64_t bs, float* ap, float* asum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(a + k)));
  const float absmax = hmax8(vmax);
  const float rowfac = (absmax > 0.0f && absmax < 0x1p-90f) ? 0x1p64f : 1.0f;
  const __m256 f = _mm256_set1_ps(rowfac);
  const __m256 pattern = _mm256_setr_ps(1.0f, 0x1p-8f, 0x1p-16f, 0x1p-24f, 1.0f, 0x1p-8f, 0x1p-16f, 0x1p-24f);
  for (int64_t b = 0; b < Kp / bs; ++b) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t k = b * bs; k < (b + 1) * bs; k += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + k), f);
      _mm256_storeu_ps(ap + k, _mm256_mul_ps(x, pattern));
      s = _mm256_add_ps(s, x);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    asum[b] = _mm_cvtss_f32(h);
  }
  return 1.0f / rowfac;
}

template <int R, int CH>
void a16_few_rows(const float* ap, const float* asum, const float* rowinv, int64_t m0, const PackedInt4& W,
                  int64_t t, const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp(), nb = W.n_blocks, gpb = W.block_size / kGroupK;
  const uint8_t* tdata = W.data + t * (Kp / kGroupK) * 64;
  __m256i masks[4];
  for (int j = 0; j < 4; ++j) masks[j] = _mm256_set1_epi32(0xF << (8 * j));
  __m256 facc[R][2];
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 pacc[R][CH][2];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CH; ++c) pacc[r][c][0] = pacc[r][c][1] = _mm256_setzero_ps();
    for (int64_t g = b * gpb; g < (b + 1) * gpb; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(tdata + g * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tdata + g * 64));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tdata + g * 64 + 32));
      const __m256i u0 = _mm256_srli_epi32(v0, 4), u1 = _mm256_srli_epi32(v1, 4);
      for (int j = 0; j < 4; ++j) {
        const __m256 wl0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, masks[j]));
        const __m256 wl1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, masks[j]));
        const __m256 wh0 = _mm256_cvtepi32_ps(_mm256_and_si256(u0, masks[j]));
        const __m256 wh1 = _mm256_cvtepi32_ps(_mm256_and_si256(u1, masks[j]));
        for (int r = 0; r < R; ++r) {
          const float* a = ap + (m0 + r) * Kp + g * kGroupK;
          const __m256 al = _mm256_broadcast_ss(a + j), ah = _mm256_broadcast_ss(a + 4 + j);
          __m256* pc = pacc[r][j % CH];
          pc[0] = _mm256_fmadd_ps(wl0, al, pc[0]);
          pc[1] = _mm256_fmadd_ps(wl1, al, pc[1]);
          pc[0] = _mm256_fmadd_ps(wh0, ah, pc[0]);
          pc[1] = _mm256_fmadd_ps(wh1, ah, pc[1]);
        }
      }
    }
    const int64_t sidx = (t * nb + b) * kTileN;
    const __m256 sw0 = scales8(W.scales + sidx), sw1 = scales8(W.scales + sidx + 8);
    __m256 z0 = _mm256_set1_ps(8.0f), z1 = z0;
    if (W.zero_points) {
      const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W.zero_points + sidx));
      z0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z));
      z1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(z, 8)));
    }
    for (int r = 0; r < R; ++r) {
      __m256 s0 = pacc[r][0][0], s1 = pacc[r][0][1];
      for (int c = 1; c < CH; ++c) {
        s0 = _mm256_add_ps(s0, pacc[r][c][0]);
        s1 = _mm256_add_ps(s1, pacc[r][c][1]);
      }
      const __m256 as = _mm256_set1_ps(asum[(m0 + r) * nb + b]);
      facc[r][0] = _mm256_fmadd_ps(sw0, _mm256_fnmadd_ps(z0, as, s0), facc[r][0]);
      facc[r][1] = _mm256_fmadd_ps(sw1, _mm256_fnmadd_ps(z1, as, s1), facc[r][1]);
    }
  }
  const int64_t n0 = t * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
  __m256 b0, b1;
  load_bias(bias, n0, nvalid, b0, b1);
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(rowinv[m0 + r]);
    store_cols(C + (m0 + r) * ldc + n0, _mm256_fmadd_ps(facc[r][0], s, b0), _mm256_fmadd_ps(facc[r][1], s, b1),
               nvalid);
  }
}

// Float activations, many rows: dequantize a K-chunk of one tile into a float panel [k][16] (in L1)
// and run a 6x16 FMA micro-kernel over all rows; the tile's partial sums live in acc [M][16].
constexpr int64_t kChunkK = 256;
thread_local std::vector<float> t_panel, t_tileacc;

void dequant_chunk(const PackedInt4& W, int64_t t, int64_t k0, int64_t k1, float* panel) {
  const int64_t Kp = W.Kp(), nb = W.n_blocks;
  const uint8_t* tdata = W.data + t * (Kp / kGroupK) * 64;
  const __m256i m4 = _mm256_set1_epi32(0xF);
  for (int64_t g = k0 / kGroupK; g < k1 / kGroupK; ++g) {
    const int64_t b = (g * kGroupK) / W.block_size, sidx = (t * nb + b) * kTileN;
    const __m256 sw0 = scales8(W.scales + sidx), sw1 = scales8(W.scales + sidx + 8);
    __m256 z0 = _mm256_set1_ps(8.0f), z1 = z0;
    if (W.zero_points) {
      const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W.zero_points + sidx));
      z0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z));
      z1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(z, 8)));
    }
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tdata + g * 64));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tdata + g * 64 + 32));
    float* dst = panel + (g * kGroupK - k0) * kTileN;
    for (int j = 0; j < 8; ++j) {
      const int sh = 8 * (j & 3) + 4 * (j >> 2);
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v0, sh), m4));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v1, sh), m4));
      _mm256_storeu_ps(dst + j * kTileN, _mm256_mul_ps(sw0, _mm256_sub_ps(q0, z0)));
      _mm256_storeu_ps(dst + j * kTileN + 8, _mm256_mul_ps(sw1, _mm256_sub_ps(q1, z1)));
    }
  }
}

// Activations of a K chunk packed per strip of R <= 6 rows as [k/8][R][8]: 8 consecutive k of each
// row of the strip, row after row, then the next 8 k. The micro-kernel then broadcasts from one
// stream (R x 32 bytes per 8 k) at constant offsets instead of 6 rows Kp * 4 bytes apart, which for
// K a multiple of 1024 all map to the same L1 sets as each other and the panel; packing is one
// 32-byte load and store per row and 8 k (the ORT glue splits the tiles into several calls even with
// one thread, each packing all rows: the [k][8] layout's 8 x 8 transposes cost 2.5 times as many
// operations; this layout measured 5-12 % faster in total at M=128).
constexpr int64_t kA16Strip = 6;
thread_local std::vector<float> t_apanel;

// Rows [m, m + R) x k [k0, k0 + kn) (kn a multiple of 8) as [kn/8][R][8].
void pack_a16_strip(const float* A, int64_t lda, int64_t m, int64_t R, int64_t k0, int64_t kn, float* d) {
  const float* rows = A + m * lda + k0;
  for (int64_t k = 0; k < kn; k += 8, d += R * 8)
    for (int64_t r = 0; r < R; ++r) _mm256_store_ps(d + r * 8, _mm256_loadu_ps(rows + r * lda + k));
}

// Row strips: 6 rows each, except that a last strip of 1 or 2 rows (a quarter or half of the FMA
// throughput: too few independent accumulators) is merged with the one before into 4 + 3 or 4 + 4.
int64_t a16_strips(int64_t M, int64_t* start, int64_t* rows) {
  int64_t n = 0, m = 0;
  const int64_t full = M / kA16Strip, rest = M % kA16Strip;
  const int64_t six = (rest == 1 || rest == 2) && full > 0 ? full - 1 : full;
  for (int64_t i = 0; i < six; ++i, m += kA16Strip) start[n] = m, rows[n++] = kA16Strip;
  const int64_t left = M - m;
  if (left > kA16Strip) {
    start[n] = m, rows[n++] = 4;
    start[n] = m + 4, rows[n++] = left - 4;
  } else if (left > 0) {
    start[n] = m, rows[n++] = left;
  }
  return n;
}

// Each chunk's sums start from zero and are then added to acc: rounding chains of <= 256 + K / 256
// additions instead of K (same-sign products over long K stay within the 1e-5 bound). The first
// chunk (kFirst) stores its sums: acc is not cleared beforehand.
template <int R, bool kFirst>
void fma_rows(const float* ap, const float* panel, int64_t kn, float* acc) {
  __m256 c[R][2];
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  for (int64_t k8 = 0; k8 < kn; k8 += 8, ap += R * 8, panel += 8 * kTileN) {
#pragma GCC unroll 2
    for (int j = 0; j < 8; ++j) {
      const __m256 w0 = _mm256_load_ps(panel + j * kTileN), w1 = _mm256_load_ps(panel + j * kTileN + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(ap + r * 8 + j);
        c[r][0] = _mm256_fmadd_ps(w0, a, c[r][0]);
        c[r][1] = _mm256_fmadd_ps(w1, a, c[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kTileN, kFirst ? c[r][0] : _mm256_add_ps(_mm256_loadu_ps(acc + r * kTileN), c[r][0]));
    _mm256_storeu_ps(acc + r * kTileN + 8,
                     kFirst ? c[r][1] : _mm256_add_ps(_mm256_loadu_ps(acc + r * kTileN + 8), c[r][1]));
  }
}

template <bool kFirst>
inline void fma_strip(int64_t rows, const float* ap, const float* panel, int64_t kn, float* c) {
  switch (rows) {
    case 6: fma_rows<6, kFirst>(ap, panel, kn, c); break;
    case 5: fma_rows<5, kFirst>(ap, panel, kn, c); break;
    case 4: fma_rows<4, kFirst>(ap, panel, kn, c); break;
    case 3: fma_rows<3, kFirst>(ap, panel, kn, c); break;
    case 2: fma_rows<2, kFirst>(ap, panel, kn, c); break;
    default: fma_rows<1, kFirst>(ap, panel, kn, c); break;
  }
}

// Tiles [tile_begin, tile_end) with K chunks outermost: the packed chunk of every row
// (M x 256 floats) stays in L2 while the tiles pass; partial sums live in acc [tile][M][16].
void a16_tile_group(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin, int64_t tile_end,
                    const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp(), nt = tile_end - tile_begin;
  const int64_t max_strips = M / kA16Strip + 2;
  thread_local std::vector<int64_t> t_strips;
  int64_t* sstart = scratch(t_strips, static_cast<size_t>(2 * max_strips));
  int64_t* srows = sstart + max_strips;
  const int64_t strips = a16_strips(M, sstart, srows);
  float* panel = scratch(t_panel, static_cast<size_t>(kChunkK * kTileN));
  float* acc = scratch(t_tileacc, static_cast<size_t>(nt * M * kTileN));
  float* apk = scratch(t_apanel, static_cast<size_t>(strips * kChunkK * 8));
  for (int64_t k0 = 0; k0 < Kp; k0 += kChunkK) {
    const int64_t k1 = std::min(Kp, k0 + kChunkK), kn = k1 - k0;
    for (int64_t i = 0; i < strips; ++i) pack_a16_strip(A, Kp, sstart[i], srows[i], k0, kn, apk + i * kChunkK * 8);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      float* tacc = acc + (t - tile_begin) * M * kTileN;
      dequant_chunk(W, t, k0, k1, panel);
      for (int64_t i = 0; i < strips; ++i) {
        const float* ap = apk + i * kChunkK * 8;
        float* c = tacc + sstart[i] * kTileN;
        if (k0 == 0) fma_strip<true>(srows[i], ap, panel, kn, c);
        else fma_strip<false>(srows[i], ap, panel, kn, c);
      }
    }
  }
  for (int64_t e0 = 0; e0 < M; e0 += kEpiRows) {  // blocks of rows, tiles inner (see int_driver)
    const int64_t e1 = std::min(M, e0 + kEpiRows);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      const int64_t n0 = t * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
      __m256 b0, b1;
      load_bias(bias, n0, nvalid, b0, b1);
      for (int64_t m = e0; m < e1; ++m) {
        const float* tacc = acc + ((t - tile_begin) * M + m) * kTileN;
        store_cols(C + m * ldc + n0, _mm256_add_ps(_mm256_loadu_ps(tacc), b0),
                   _mm256_add_ps(_mm256_loadu_ps(tacc + 8), b1), nvalid);
      }
    }
  }
}

void a16_many_rows(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin, int64_t tile_end,
                   const float* bias, float* C, int64_t ldc) {
  // Tile groups bound the partial-sum buffer to ~1 MB per thread whatever M and N are.
  const int64_t group = std::max<int64_t>(1, (int64_t{1} << 20) / (M * kTileN * 4));
  for (int64_t t = tile_begin; t < tile_end; t += group)
    a16_tile_group(A, M, W, t, std::min(tile_end, t + group), bias, C, ldc);
}

void gemm_a16(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin, int64_t tile_end,
              const float* bias, float* C, int64_t ldc) {
  if (M >= 3) {
    a16_many_rows(A, M, W, tile_begin, tile_end, bias, C, ldc);
    return;
  }
  const int64_t Kp = W.Kp(), nb = W.n_blocks;
  float* ap = scratch(t_prescaled, static_cast<size_t>(M * (Kp + nb + 1)));
  float* asum = ap + M * Kp;
  float* rowinv = asum + M * nb;
  for (int64_t m = 0; m < M; ++m) rowinv[m] = prescale_row(A + m * Kp, Kp, W.block_size, ap + m * Kp, asum + m * nb);
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    if (M == 1) a16_few_rows<1, 4>(ap, asum, rowinv, 0, W, t, bias, C, ldc);
    else a16_few_rows<2, 2>(ap, asum, rowinv, 0, W, t, bias, C, ldc);
  }
}

// SwiGLU epilogue, 8 lanes (the evaluation and its constants: paths.h, kExpTaylor).
inline __m256 exp_ps(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kExpLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 swiglu8(__m256 g, __m256 u) {
  const __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(kSwigluXMin)),
                                 _mm256_set1_ps(kSwigluXMax));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(x))), u);
}

void swiglu(const float* Z, int64_t ldz, int64_t M, int64_t I, float* Y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* g = Z + m * ldz;
    const float* u = g + I;
    float* y = Y + m * ldy;
    int64_t j = 0;
    for (; j + 8 <= I; j += 8) _mm256_storeu_ps(y + j, swiglu8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j)));
    if (j < I) {  // tail through a padded copy (no read past the row)
      alignas(32) float gt[8] = {}, ut[8] = {}, yt[8];
      std::memcpy(gt, g + j, sizeof(float) * (I - j));
      std::memcpy(ut, u + j, sizeof(float) * (I - j));
      _mm256_store_ps(yt, swiglu8(_mm256_load_ps(gt), _mm256_load_ps(ut)));
      std::memcpy(y + j, yt, sizeof(float) * (I - j));
    }
  }
}

// ---- Float weights (PackedMatMul): a 16-column tile is two YMM halves ------------------------
// One FMA chain per output over k in order, then + bias, as the avx512vnni path (see there): a
// row's result does not depend on the row count or the split. The independent chains come from
// R rows x T tiles of one group: 1-2 rows run two tiles side by side (4-8 chains), 3+ rows one
// tile per strip of up to 6 rows (12 accumulators, per k two weight halves and six broadcasts for
// 12 FMAs; the group's weights stay in L2 across the strips). Tiles t0 .. t0 + T - 1 are in one group.
template <int R, int T>
void f32_strip(const float* A, int64_t lda, const PackedFloat& W, int64_t t0, const float* bias, float* C,
               int64_t ldc) {
  const int64_t K = W.K, kstride = W.group_tiles(t0) * kTileN;
  const float* w = W.line(t0, 0);
  __m256 c[R][T][2];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) c[r][j][0] = c[r][j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 w0[T], w1[T];
    for (int j = 0; j < T; ++j) {
      w0[j] = _mm256_loadu_ps(w + k * kstride + j * kTileN);
      w1[j] = _mm256_loadu_ps(w + k * kstride + j * kTileN + 8);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      for (int j = 0; j < T; ++j) {
        c[r][j][0] = _mm256_fmadd_ps(w0[j], a, c[r][j][0]);
        c[r][j][1] = _mm256_fmadd_ps(w1[j], a, c[r][j][1]);
      }
    }
  }
  for (int j = 0; j < T; ++j) {
    const int64_t n0 = (t0 + j) * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
    __m256 b0, b1;
    load_bias(bias, n0, nvalid, b0, b1);
    for (int r = 0; r < R; ++r)
      store_cols(C + r * ldc + n0, _mm256_add_ps(c[r][j][0], b0), _mm256_add_ps(c[r][j][1], b1), nvalid);
  }
}

template <int R>
void f32_tile_pairs(const float* A, int64_t lda, const PackedFloat& W, int64_t t, int64_t end, const float* bias,
                    float* C, int64_t ldc) {
  for (; t + 2 <= end; t += 2) f32_strip<R, 2>(A, lda, W, t, bias, C, ldc);
  if (t < end) f32_strip<R, 1>(A, lda, W, t, bias, C, ldc);
}

// All M rows of tile t, in strips of 6 and a last strip of the rest.
void f32_tile_rows(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t t, const float* bias,
                   float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) f32_strip<6, 1>(A + m * lda, lda, W, t, bias, C + m * ldc, ldc);
  const float* a = A + m * lda;
  float* o = C + m * ldc;
  switch (M - m) {
    case 5: f32_strip<5, 1>(a, lda, W, t, bias, o, ldc); break;
    case 4: f32_strip<4, 1>(a, lda, W, t, bias, o, ldc); break;
    case 3: f32_strip<3, 1>(a, lda, W, t, bias, o, ldc); break;
    case 2: f32_strip<2, 1>(a, lda, W, t, bias, o, ldc); break;
    case 1: f32_strip<1, 1>(a, lda, W, t, bias, o, ldc); break;
    default: break;
  }
}

void gemm_f32(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t tile_begin, int64_t tile_end,
              const float* bias, float* C, int64_t ldc) {
  for (int64_t t = tile_begin; t < tile_end;) {  // group by group (a range may start or end mid-group)
    const int64_t end = std::min(tile_end, (t / kTileGroup + 1) * kTileGroup);
    if (M == 1) f32_tile_pairs<1>(A, lda, W, t, end, bias, C, ldc);
    else if (M == 2) f32_tile_pairs<2>(A, lda, W, t, end, bias, C, ldc);
    else
      for (int64_t u = t; u < end; ++u) f32_tile_rows(A, lda, M, W, u, bias, C, ldc);
    t = end;
  }
}

}  // namespace
}  // namespace avx2

const KernelTable& avx2_kernels() {
  static const KernelTable t{"avx2", avx2::quantize_rows, avx2::gemm_a16, avx2::gemm_int, avx2::int_block_dots,
                             avx2::swiglu, avx2::gemm_f32};
  return t;
}

}  // namespace llmfold
