// x86 AVX2 + FMA kernels. Compiled with -mavx2 -mfma for this file only; dispatch calls them only
// when cpuid/xgetbv report AVX2, FMA and OS support for YMM state.
//
// Integer path: a 64-byte packed group is two YMM vectors (columns 0-7 and 8-15), each a
// column x 4-k byte matrix whose low nibbles are k0..k0+3 and high nibbles k0+4..k0+7.
// vpmaddubsw(u8 weight nibbles, s8 activations broadcast per 4 k) gives exact int16 pair sums
// (|.| <= 2*15*127 = 3810); up to 8 of them are summed in int16 (<= 30480, A8) before vpmaddwd
// widens to int32, so the integer dots are exact and equal ref's.
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

template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
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

void unpack_tile(const uint8_t* tdata, int64_t groups, uint8_t* dst) {
  for (int64_t g = 0; g < groups; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(tdata + g * 64 + 2048), _MM_HINT_T0);  // weights come from DRAM
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

// Exact integer dots of rows m0..m0+R over groups [g0, g1) for both column halves of a tile:
// int16 lanes (caller bounds g1 - g0 so they cannot overflow), widened to int32 pair sums.
template <int R, bool kUnpacked>
inline void int_dots(const int8_t* aq, int64_t rs, int64_t gs, const uint8_t* tdata, const uint8_t* unp, int64_t g0, int64_t g1,
                     __m256i (*out32)[2]) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t g = g0; g < g1; ++g) {
    __m256i l0, h0, l1, h1;
    if (kUnpacked) {
      const __m256i* u = reinterpret_cast<const __m256i*>(unp + g * 128);
      l0 = _mm256_loadu_si256(u);
      h0 = _mm256_loadu_si256(u + 1);
      l1 = _mm256_loadu_si256(u + 2);
      h1 = _mm256_loadu_si256(u + 3);
    } else {
      // Streaming the weights once: fetch well ahead of the hardware prefetcher's reach.
      _mm_prefetch(reinterpret_cast<const char*>(tdata + g * 64 + kPrefetchBytes), _MM_HINT_T0);
      unpack_group(tdata + g * 64, l0, h0, l1, h1);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* ar = aq + r * rs + g * gs;
      const __m256i alo = _mm256_set1_epi32(load_i32(ar)), ahi = _mm256_set1_epi32(load_i32(ar + 4));
      acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(l0, alo), _mm256_maddubs_epi16(h0, ahi)));
      acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(l1, alo), _mm256_maddubs_epi16(h1, ahi)));
    }
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) {
    out32[r][0] = _mm256_madd_epi16(acc[r][0], ones16);
    out32[r][1] = _mm256_madd_epi16(acc[r][1], ones16);
  }
}

// Rows m0..m0+R of tile t. kUnpacked: weights from unp (this tile's unpacked buffer).
// Per block: exact int32 dots, zero-point correction in integers, one FMA with the weight scales
// into float accumulators.
template <int R, bool kUnpacked>
void int_rows(const IntArgs& p, int64_t m0, int64_t t, const uint8_t* unp) {
  const QuantizedRows& A = *p.A;
  const PackedInt4& W = *p.W;
  // Locals, so the stores below cannot force reloads through p.
  const float* const scales = W.scales;
  const uint8_t* const zps = W.zero_points;
  const int32_t* const bsum = A.block_sum + m0 * W.n_blocks;
  int32_t* const dots = p.dots;
  const int64_t Kp = W.Kp(), nb = W.n_blocks, gpb = W.block_size / kGroupK;
  // int16 bound: A8 lanes grow by <= 2 * 3810 per group, so at most 4 groups; A4 never overflows.
  const int64_t flush = p.act_bits == 4 ? gpb : std::min<int64_t>(gpb, 4);
  const uint8_t* tdata = W.data + t * (Kp / kGroupK) * 64;
  // Activations: row-major rows (few rows), or a strip packed as [group][R][8] (see int_driver)
  // so the broadcasts read one line instead of R rows 4 KB apart (which alias in L1).
  const int8_t* aq = p.apack ? p.apack : A.q + m0 * Kp;
  const int64_t rs = p.apack ? kGroupK : Kp, gs = p.apack ? R * kGroupK : kGroupK;
  __m256 facc[R][2];  // registers for few rows; the compiler spills them for 4-row strips
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i d[R][2];
    int_dots<R, kUnpacked>(aq, rs, gs, tdata, unp, b * gpb, b * gpb + flush, d);
    for (int64_t g0 = b * gpb + flush; g0 < (b + 1) * gpb; g0 += flush) {
      __m256i e[R][2];
      int_dots<R, kUnpacked>(aq, rs, gs, tdata, unp, g0, g0 + flush, e);
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
    const __m256 sw0 = _mm256_loadu_ps(scales + sidx), sw1 = _mm256_loadu_ps(scales + sidx + 8);
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
    for (int r = 0; r < R; ++r) {
      facc[r][0] = _mm256_fmadd_ps(sw0, _mm256_cvtepi32_ps(d[r][0]), facc[r][0]);
      facc[r][1] = _mm256_fmadd_ps(sw1, _mm256_cvtepi32_ps(d[r][1]), facc[r][1]);
    }
  }
  if (p.dots) return;
  const int64_t n0 = t * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
  __m256 b0, b1;
  load_bias(p.bias, n0, nvalid, b0, b1);
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(A.scale[m0 + r]);
    store_cols(p.C + (m0 + r) * p.ldc + n0, _mm256_add_ps(_mm256_mul_ps(facc[r][0], s), b0),
               _mm256_add_ps(_mm256_mul_ps(facc[r][1], s), b1), nvalid);
  }
}

thread_local std::vector<uint8_t> t_unpacked;

thread_local std::vector<int8_t> t_apack;

// Rows [m0, m0 + R) of the quantized activations as [group][R][8].
void pack_strip(const QuantizedRows& A, int64_t m0, int R, int8_t* dst) {
  const int64_t groups = A.Kp / kGroupK;
  for (int r = 0; r < R; ++r) {
    const int8_t* src = A.q + (m0 + r) * A.Kp;
    for (int64_t g = 0; g < groups; ++g) std::memcpy(dst + (g * R + r) * kGroupK, src + g * kGroupK, kGroupK);
  }
}

void int_driver(const IntArgs& p, int64_t M, int64_t tile_begin, int64_t tile_end) {
  const PackedInt4& W = *p.W;
  const int64_t groups = W.Kp() / kGroupK;
  if (M < 4) {
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      if (M == 1) int_rows<1, false>(p, 0, t, nullptr);
      else if (M == 2) int_rows<2, false>(p, 0, t, nullptr);
      else if (M == 3) int_rows<3, false>(p, 0, t, nullptr);
    }
    return;
  }
  // Each tile is unpacked once per row block and reused by all its strips of kStrip rows
  // (4 rows x 16 columns: 8 int16 accumulators, 4 weight and 2 activation registers; measured a
  // little faster than 3-row strips without spills, as each weight load feeds more rows).
  // Row blocks of up to 1 MB of activations: usually one block, so the packed weights stream from
  // memory once (re-reading them per block costs more than activations spilling from L2 to L3).
  constexpr int64_t kStrip = 4;
  const int64_t Kp = W.Kp();
  const int64_t rb = std::max<int64_t>(kStrip, std::min<int64_t>(M, (int64_t{1} << 20) / Kp / kStrip * kStrip));
  uint8_t* unp = scratch(t_unpacked, static_cast<size_t>(groups * 128));
  int8_t* apack = scratch(t_apack, static_cast<size_t>(rb * Kp));
  for (int64_t m0 = 0; m0 < M; m0 += rb) {
    const int64_t m1 = std::min(M, m0 + rb);
    for (int64_t m = m0; m < m1; m += kStrip)
      pack_strip(*p.A, m, static_cast<int>(std::min<int64_t>(kStrip, m1 - m)), apack + (m - m0) * Kp);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      unpack_tile(W.data + t * groups * 64, groups, unp);
      IntArgs q = p;
      int64_t m = m0;
      for (; m + kStrip <= m1; m += kStrip) {
        q.apack = apack + (m - m0) * Kp;
        int_rows<kStrip, true>(q, m, t, unp);
      }
      q.apack = apack + (m - m0) * Kp;
      const int64_t rest = m1 - m;
      if (rest == 1) int_rows<1, true>(q, m, t, unp);
      else if (rest == 2) int_rows<2, true>(q, m, t, unp);
      else if (rest == 3) int_rows<3, true>(q, m, t, unp);
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
    const __m256 sw0 = _mm256_loadu_ps(W.scales + sidx), sw1 = _mm256_loadu_ps(W.scales + sidx + 8);
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
    const __m256 sw0 = _mm256_loadu_ps(W.scales + sidx), sw1 = _mm256_loadu_ps(W.scales + sidx + 8);
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

template <int R>
void fma_rows(const float* A, int64_t lda, const float* panel, int64_t kn, float* acc) {
  __m256 c[R][2];
  for (int r = 0; r < R; ++r) {
    c[r][0] = _mm256_loadu_ps(acc + r * kTileN);
    c[r][1] = _mm256_loadu_ps(acc + r * kTileN + 8);
  }
  for (int64_t k = 0; k < kn; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kTileN), w1 = _mm256_loadu_ps(panel + k * kTileN + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      c[r][0] = _mm256_fmadd_ps(w0, a, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(w1, a, c[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kTileN, c[r][0]);
    _mm256_storeu_ps(acc + r * kTileN + 8, c[r][1]);
  }
}

// Tiles [tile_begin, tile_end) with K chunks outermost: the chunk of every row (M x 256 floats)
// stays in L2 while the tiles pass; partial sums live in acc [tile][M][16].
void a16_tile_group(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin, int64_t tile_end,
                    const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp(), nt = tile_end - tile_begin;
  float* panel = scratch(t_panel, static_cast<size_t>(kChunkK * kTileN));
  float* acc = scratch(t_tileacc, static_cast<size_t>(nt * M * kTileN));
  std::fill(acc, acc + nt * M * kTileN, 0.0f);
  for (int64_t k0 = 0; k0 < Kp; k0 += kChunkK) {
    const int64_t k1 = std::min(Kp, k0 + kChunkK), kn = k1 - k0;
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      float* tacc = acc + (t - tile_begin) * M * kTileN;
      dequant_chunk(W, t, k0, k1, panel);
      int64_t m = 0;
      for (; m + 6 <= M; m += 6) fma_rows<6>(A + m * Kp + k0, Kp, panel, kn, tacc + m * kTileN);
      switch (M - m) {
        case 5: fma_rows<5>(A + m * Kp + k0, Kp, panel, kn, tacc + m * kTileN); break;
        case 4: fma_rows<4>(A + m * Kp + k0, Kp, panel, kn, tacc + m * kTileN); break;
        case 3: fma_rows<3>(A + m * Kp + k0, Kp, panel, kn, tacc + m * kTileN); break;
        case 2: fma_rows<2>(A + m * Kp + k0, Kp, panel, kn, tacc + m * kTileN); break;
        case 1: fma_rows<1>(A + m * Kp + k0, Kp, panel, kn, tacc + m * kTileN); break;
        default: break;
      }
    }
  }
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const float* tacc = acc + (t - tile_begin) * M * kTileN;
    const int64_t n0 = t * kTileN, nvalid = std::min<int64_t>(kTileN, W.N - n0);
    __m256 b0, b1;
    load_bias(bias, n0, nvalid, b0, b1);
    for (int64_t m = 0; m < M; ++m)
      store_cols(C + m * ldc + n0, _mm256_add_ps(_mm256_loadu_ps(tacc + m * kTileN), b0),
                 _mm256_add_ps(_mm256_loadu_ps(tacc + m * kTileN + 8), b1), nvalid);
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

}  // namespace
}  // namespace avx2

const KernelTable& avx2_kernels() {
  static const KernelTable t{"avx2", avx2::quantize_rows, avx2::gemm_a16, avx2::gemm_int, avx2::int_block_dots};
  return t;
}

}  // namespace llmfold
