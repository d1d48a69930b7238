// x86 AVX-512 (F, BW, VL) + VNNI kernels. Compiled with the AVX-512 flags for this file only;
// dispatch selects it only when cpuid reports AVX512F/BW/VL/VNNI and XCR0 shows the OS saves
// opmask and ZMM state. One packed 64-byte group is exactly one ZMM: 16 columns x 4 k per nibble
// plane, the operand order of vpdpbusd (u8 x s8 products summed 4 at a time into int32 lanes,
// exact, without intermediate saturation): u8 weights x s8 activations for few rows, s8 centered
// weights x u8 shifted activations for many (see int_gemm_rows).
// Activation quantization is the AVX2 path's (every CPU with this path also has AVX2; it is O(MK)).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "../paths.h"

namespace llmfold {
namespace avx512 {
namespace {

// A tile's 16 fp16 block scales as floats (vcvtph2ps; exact).
inline __m512 scales16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __mmask16 col_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// ---- Integer activations -------------------------------------------------------------------
// Few rows (M <= 3, decode): stream the packed weights once (int_stream). Nibbles are isolated
// with one AND each: the high one stays multiplied by 16 (v & 0xF0), its chains sum 16·Σq·a
// exactly and are shifted right by 4 at the block's end (exact: every term is a multiple of 16;
// |sum| <= 240·127·256 < 2^31).
struct IntArgs {
  const QuantizedRows* A;
  const PackedInt4* W;
  const float* bias;
  float* C;
  int64_t ldc;
  int32_t* dots;
};

inline __m512i zp_epi32(const PackedInt4& W, int64_t sidx) {
  return W.zero_points ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W.zero_points + sidx)))
                       : _mm512_set1_epi32(8);
}

inline void store_row(float* c, const float* bias, __mmask16 mk, __m512 facc, float rs) {
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias) : _mm512_setzero_ps();
  _mm512_mask_storeu_ps(c, mk, _mm512_add_ps(_mm512_mul_ps(facc, _mm512_set1_ps(rs)), bv));
}

// Software prefetch distance. Decode reads every layer from DRAM, where the hardware prefetchers
// alone leave time on the table. `llmfold_kernel_bench 1 576 1536 64 7 1 160` (160 copies of the
// weights called in turn; Zen 5, one thread, medians of three runs, us per call): none 23.6-27.5,
// 1 KB 17.1-19.6, 4 KB 14.2-14.7, 16 KB 11.2-13.6; the same matrix again (L2) 6.6 / 6.4 / 6.4 / 7.4,
// 4096x4096 (L3) 125-130 / 119-124 / 118-126 / 144. 4 KB: no loss in cache, most of the DRAM gain.
constexpr int64_t kStreamAhead = 4096;

// vpdpbusd with the 4 activation bytes broadcast by the instruction itself ({1to16} memory
// operand). GCC 12 does not fold _mm512_set1_epi32(load) into it and issues a vpbroadcastd per
// vpdpbusd. Alone this measured no gain; with the rest of int_stream's loop it is part of the
// 2.0 -> 1.7 us below.
inline __m512i dpbusd_bcst(__m512i acc, __m512i w, const int8_t* a) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(a)));
  return acc;
}

// Few rows (decode): tile after tile, which is the weights' memory order, so the read is one
// sequential stream (two tiles side by side: 5 % slower in L2, 40 % from DRAM). Per block and row
// two chains, low and high nibbles (four were no faster). The zero-point term -zp·Σ_block a
// starts the low chain (-8·Σa without zero points), so a block ends in a shift, an add, a convert
// and one FMA. Block 32 has its 4 groups unrolled: with the loop bookkeeping of a run-time block
// size, 576x576 at M = 1 took 2.0 us instead of 1.7 (in L2, `llmfold_kernel_bench 1 576 576`).
// The prefetches cost 6 % in L2 and save a quarter from DRAM; one per 128 bytes lost 20 % there.
// kDots: the raw Σ a·q (test hook), no epilogue.
template <int R, bool kDots, bool kZeroPoints, int kGpb>
void int_stream(const IntArgs& p, int64_t tb, int64_t te) {
  const QuantizedRows& A = *p.A;
  const PackedInt4& W = *p.W;
  const int64_t Kp = W.Kp(), nb = W.n_blocks, tstride = (Kp / kGroupK) * 64;
  const int64_t gpb = kGpb ? kGpb : W.block_size / kGroupK;
  const __m512i m_lo = _mm512_set1_epi8(0x0F), m_hi = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t t = tb; t < te; ++t) {
    const uint8_t* w = W.data + t * tstride;  // the next line to read
    const uint16_t* sc = W.scales + t * nb * kTileN;
    __m512 facc[R];
    for (int r = 0; r < R; ++r) facc[r] = _mm512_setzero_ps();
    // two blocks per iteration: 576x576 at M = 1 in 1.4 us instead of 1.7 (in L2; the same from DRAM)
#pragma GCC unroll 2
    for (int64_t b = 0; b < nb; ++b, sc += kTileN) {
      const int8_t* a = A.q + b * gpb * kGroupK;
      __m512i lo[R], hi[R];  // Σ a·q of the low nibbles (minus zp·Σa), 16·Σ a·q of the high ones
      __m512i z = _mm512_setzero_si512();  // the block's zero points (per column, shared by the rows)
      if constexpr (kZeroPoints) z = zp_epi32(W, (t * nb + b) * kTileN);
      for (int r = 0; r < R; ++r) {
        const int32_t bsum = A.block_sum[r * nb + b];
        if constexpr (kDots)
          lo[r] = _mm512_setzero_si512();
        else if constexpr (kZeroPoints)
          lo[r] = _mm512_mullo_epi32(z, _mm512_set1_epi32(-bsum));
        else
          lo[r] = _mm512_set1_epi32(-8 * bsum);
        hi[r] = _mm512_setzero_si512();
      }
      for (int64_t g = 0; g < gpb; g += 2, w += 128, a += 2 * kGroupK) {  // gpb >= 2 (block >= 16)
        _mm_prefetch(reinterpret_cast<const char*>(w + kStreamAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + 64 + kStreamAhead), _MM_HINT_T0);
        const __m512i v0 = _mm512_loadu_si512(w), v1 = _mm512_loadu_si512(w + 64);
        const __m512i lo0 = _mm512_and_si512(v0, m_lo), hi0 = _mm512_and_si512(v0, m_hi);
        const __m512i lo1 = _mm512_and_si512(v1, m_lo), hi1 = _mm512_and_si512(v1, m_hi);
        for (int r = 0; r < R; ++r) {
          const int8_t* ar = a + r * Kp;
          lo[r] = dpbusd_bcst(dpbusd_bcst(lo[r], lo0, ar), lo1, ar + 8);
          hi[r] = dpbusd_bcst(dpbusd_bcst(hi[r], hi0, ar + 4), hi1, ar + 12);
        }
      }
      _mm_prefetch(reinterpret_cast<const char*>(sc + kStreamAhead / 8), _MM_HINT_T0);
      const __m512 sw = scales16(sc);
      for (int r = 0; r < R; ++r) {
        const __m512i d = _mm512_add_epi32(lo[r], _mm512_srai_epi32(hi[r], 4));
        if constexpr (kDots)
          _mm512_storeu_si512(p.dots + (r * nb + b) * W.n_tiles * kTileN + t * kTileN, d);
        else
          facc[r] = _mm512_fmadd_ps(sw, _mm512_cvtepi32_ps(d), facc[r]);
      }
    }
    if constexpr (kDots) continue;
    const int64_t n0 = t * kTileN;
    for (int r = 0; r < R; ++r)
      store_row(p.C + r * p.ldc + n0, p.bias ? p.bias + n0 : nullptr, col_mask(W.N - n0), facc[r], A.scale[r]);
  }
}

template <int R>
void int_stream_rows(const IntArgs& p, int64_t tb, int64_t te) {
  if (p.dots)
    int_stream<R, true, false, 0>(p, tb, te);
  else if (p.W->zero_points)
    int_stream<R, false, true, 0>(p, tb, te);
  else if (p.W->block_size == 32)  // the usual block: its 4 groups unrolled
    int_stream<R, false, false, 4>(p, tb, te);
  else
    int_stream<R, false, false, 0>(p, tb, te);
}

// Many rows (M >= 4): a blocked GEMM. Per pair of tiles and K chunk (whole blocks, <= 512 k) the
// weights are unpacked once to signed q - zp (in L1) and every strip of R rows reuses them. The
// activations are made unsigned (a + 128, one XOR per call) because vpdpbusd multiplies u8 by s8:
//   Σ_k (a_k + 128)·(q_k - zp) = Σ_k a_k·(q_k - zp) + 128·Σ_k (q_k - zp),
// so each block's accumulators start at -128·Σ_{k in block}(q_k - zp) per column (computed while
// unpacking, shared by all rows) and end at the exact integer Σ a·(q - zp) of the reference:
// no per-row zero-point work in the inner loop, one convert and one FMA per block.
// 6 rows x 2 tiles: 12 int32 + 12 float accumulators; 4x3, 5x3 and 3x4 measured slower.
// Measured alternatives, not kept (4096x4096, M = 128, `llmfold_kernel_bench 128 4096 4096`):
// chunks of 256 or 384 k (no faster); raw u8 nibbles times int8 activations broadcast by each
// vpdpbusd itself, without the unpack to q - zp (7.5 ms against 6.2); strips of even height.
// Skipping the unpack's weight reads altogether saved 12 %: that is memory latency at each chunk's
// start, which the prefetch of the next chunk in unpack_centered hides in part (-5 %).
constexpr int64_t kIntChunkK = 512;
constexpr int kIntTiles = 2;
constexpr int kIntRows = 6;

struct IntChunk {
  int8_t* w;            // [group][tile][2][64]: q - zp of the low / high nibble planes
  int32_t* neg;         // [block][tile][16]: -128 * Σ (q - zp) over the block
  int64_t b0, nblk, gpb;
};

template <int T>
void unpack_centered(const PackedInt4& W, int64_t t0, int64_t b0, int64_t b1, int8_t* w, int32_t* neg) {
  const int64_t nb = W.n_blocks, gpb = W.block_size / kGroupK, tstride = (W.Kp() / kGroupK) * 64;
  // The chunk that comes next (the same tiles' next blocks, else the next tiles' first) is
  // prefetched into L2 line by line as this one is read, a whole chunk of strips ahead: line g of
  // tile t0 + j is followed by the line at byte offset next[j] + 64 g (only offsets inside the
  // weights are prefetched)
  int64_t next[T];
  const int64_t end = W.n_tiles * tstride;
  for (int j = 0; j < T; ++j)
    next[j] = b1 < nb ? (t0 + j) * tstride + (b1 - b0) * gpb * 64 : (t0 + T + j) * tstride - b0 * gpb * 64;
  const __m512i m4 = _mm512_set1_epi8(0x0F), c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = b0; b < b1; ++b) {
    for (int j = 0; j < T; ++j) {
      // zero point of each column repeated in its 4 bytes
      const __m512i z = _mm512_mullo_epi32(zp_epi32(W, ((t0 + j) * nb + b) * kTileN), _mm512_set1_epi32(0x01010101));
      __m512i cs = _mm512_setzero_si512();
      for (int64_t g = b * gpb; g < (b + 1) * gpb; ++g) {
        if (next[j] + g * 64 < end) _mm_prefetch(reinterpret_cast<const char*>(W.data + next[j] + g * 64), _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(W.data + (t0 + j) * tstride + g * 64);
        const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, m4), z);
        const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), z);
        int8_t* dst = w + (((g - b0 * gpb) * T + j) * 2) * 64;
        _mm512_storeu_si512(dst, lo);
        _mm512_storeu_si512(dst + 64, hi);
        cs = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(cs, c128, lo), c128, hi);
      }
      _mm512_storeu_si512(neg + ((b - b0) * T + j) * kTileN, _mm512_sub_epi32(_mm512_setzero_si512(), cs));
    }
  }
}

// Float partial sums of row m0 + r, tile j at facc[r * fstride + j * 16]: set (first chunk) or
// incremented by the chunk's blocks.
template <int R, int T>
void int_strip(const IntArgs& p, const uint8_t* au, int64_t m0, int64_t t0, const IntChunk& ch, float* facc,
               int64_t fstride, bool first) {
  const QuantizedRows& A = *p.A;
  const PackedInt4& W = *p.W;
  const int64_t Kp = W.Kp(), nb = W.n_blocks;
  __m512 f[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) f[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(facc + r * fstride + j * kTileN);
  const uint8_t* arow = au + m0 * Kp;
  for (int64_t bi = 0; bi < ch.nblk; ++bi) {
    const int64_t b = ch.b0 + bi;
    __m512i acc[R][T];
    for (int j = 0; j < T; ++j) {
      const __m512i n = _mm512_loadu_si512(ch.neg + (bi * T + j) * kTileN);
      for (int r = 0; r < R; ++r) acc[r][j] = n;
    }
    const int8_t* wg = ch.w + bi * ch.gpb * T * 128;
    for (int64_t g = b * ch.gpb; g < (b + 1) * ch.gpb; ++g, wg += T * 128) {
      for (int h = 0; h < 2; ++h) {
        __m512i wv[T];
        for (int j = 0; j < T; ++j) wv[j] = _mm512_loadu_si512(wg + j * 128 + h * 64);
        for (int r = 0; r < R; ++r) {
          const __m512i x = _mm512_set1_epi32(load_i32(arow + r * Kp + g * kGroupK + 4 * h));
          for (int j = 0; j < T; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], x, wv[j]);
        }
      }
    }
    if (p.dots) {
      const int64_t Np = W.n_tiles * kTileN;
      for (int j = 0; j < T; ++j) {
        const __m512i z = zp_epi32(W, ((t0 + j) * nb + b) * kTileN);
        for (int r = 0; r < R; ++r)  // back to the reference's Σ a·q
          _mm512_storeu_si512(p.dots + ((m0 + r) * nb + b) * Np + (t0 + j) * kTileN,
                              _mm512_add_epi32(acc[r][j], _mm512_mullo_epi32(z, _mm512_set1_epi32(A.block_sum[(m0 + r) * nb + b]))));
      }
      continue;
    }
    for (int j = 0; j < T; ++j) {
      const __m512 sw = scales16(W.scales + ((t0 + j) * nb + b) * kTileN);
      for (int r = 0; r < R; ++r) f[r][j] = _mm512_fmadd_ps(sw, _mm512_cvtepi32_ps(acc[r][j]), f[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) _mm512_storeu_ps(facc + r * fstride + j * kTileN, f[r][j]);
}

template <int T>
void int_strips(const IntArgs& p, const uint8_t* au, int64_t M, int64_t t0, const IntChunk& ch, float* facc,
                int64_t fstride, bool first) {
  int64_t m = 0;
  for (; m + kIntRows <= M; m += kIntRows) int_strip<kIntRows, T>(p, au, m, t0, ch, facc + m * fstride, fstride, first);
  float* f = facc + m * fstride;
  switch (M - m) {
    case 5: int_strip<5, T>(p, au, m, t0, ch, f, fstride, first); break;
    case 4: int_strip<4, T>(p, au, m, t0, ch, f, fstride, first); break;
    case 3: int_strip<3, T>(p, au, m, t0, ch, f, fstride, first); break;
    case 2: int_strip<2, T>(p, au, m, t0, ch, f, fstride, first); break;
    case 1: int_strip<1, T>(p, au, m, t0, ch, f, fstride, first); break;
    default: break;
  }
}

thread_local std::vector<int8_t> t_wchunk;
thread_local std::vector<int32_t> t_neg;
thread_local std::vector<uint8_t> t_au8;
thread_local std::vector<float> t_facc;

// T tiles from t0: K chunk by K chunk, unpack then every strip of rows, into the task's partial
// sums (facc: row m, tile t0 + j at facc[m * fstride + j * 16]).
template <int T>
void int_tile_group(const IntArgs& p, const uint8_t* au, int64_t M, int64_t t0, IntChunk ch, float* facc,
                    int64_t fstride) {
  const PackedInt4& W = *p.W;
  const int64_t nb = W.n_blocks, Kp = W.Kp();
  const int64_t n_chunks = (Kp + kIntChunkK - 1) / kIntChunkK, bpc = (nb + n_chunks - 1) / n_chunks;
  for (int64_t b0 = 0; b0 < nb; b0 += bpc) {
    const int64_t b1 = std::min(nb, b0 + bpc);
    ch.b0 = b0;
    ch.nblk = b1 - b0;
    unpack_centered<T>(W, t0, b0, b1, ch.w, ch.neg);
    int_strips<T>(p, au, M, t0, ch, facc, fstride, b0 == 0);
  }
}

void int_gemm_rows(const IntArgs& p, int64_t M, int64_t tile_begin, int64_t tile_end) {
  const QuantizedRows& A = *p.A;
  const PackedInt4& W = *p.W;
  const int64_t Kp = W.Kp(), nb = W.n_blocks, gpb = W.block_size / kGroupK;
  // u8 activations a + 128 for the whole call
  uint8_t* au = scratch(t_au8, static_cast<size_t>(M * Kp));
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < M * Kp; i += 64) {
    const __mmask64 mk = M * Kp - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (M * Kp - i)) - 1;
    _mm512_mask_storeu_epi8(au + i, mk, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, A.q + i), flip));
  }
  // K chunks of whole blocks, <= kIntChunkK k each, split evenly
  const int64_t n_chunks = (Kp + kIntChunkK - 1) / kIntChunkK;
  const int64_t bpc = (nb + n_chunks - 1) / n_chunks;
  int8_t* wbuf = scratch(t_wchunk, static_cast<size_t>(bpc * gpb * kIntTiles * 128));
  int32_t* neg = scratch(t_neg, static_cast<size_t>(bpc * kIntTiles * kTileN));
  // Partial sums of a group of G tiles, row-major: the epilogue then writes each row of C as one run
  // of G * 64 bytes. G = all the call's tiles for K < 2048: per tile pair it wrote 128 bytes of M
  // rows N * 4 bytes apart, a third of a 512 x 576 x 3072 call (3.2 -> 2.1 ms without those
  // stores; 2.4-2.6 ms this way). G = one tile pair for larger K, where the stores are a small part
  // and the partial sums stay in L1 (4096 x 11008 at M = 128: 2.44x MatMulNBits acc4 this way,
  // 2.36-2.38x with one group).
  const int64_t nt = tile_end - tile_begin, G = Kp >= 2048 ? kIntTiles : nt, fstride = G * kTileN;
  float* facc = scratch(t_facc, static_cast<size_t>(M * fstride));
  const IntChunk ch{wbuf, neg, 0, 0, gpb};
  for (int64_t g0 = tile_begin; g0 < tile_end; g0 += G) {
    const int64_t g1 = std::min(tile_end, g0 + G);
    int64_t t = g0;
    for (; t + kIntTiles <= g1; t += kIntTiles) int_tile_group<kIntTiles>(p, au, M, t, ch, facc + (t - g0) * kTileN, fstride);
    for (; t < g1; ++t) int_tile_group<1>(p, au, M, t, ch, facc + (t - g0) * kTileN, fstride);
    if (p.dots) continue;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < g1 - g0; ++j) {
        const int64_t n0 = (g0 + j) * kTileN;
        store_row(p.C + m * p.ldc + n0, p.bias ? p.bias + n0 : nullptr, col_mask(W.N - n0),
                  _mm512_loadu_ps(facc + m * fstride + j * kTileN), A.scale[m]);
      }
  }
}

void int_driver(const IntArgs& p, int64_t M, int64_t tile_begin, int64_t tile_end) {
  switch (M) {
    case 1: int_stream_rows<1>(p, tile_begin, tile_end); return;
    case 2: int_stream_rows<2>(p, tile_begin, tile_end); return;
    case 3: int_stream_rows<3>(p, tile_begin, tile_end); return;
    default: int_gemm_rows(p, M, tile_begin, tile_end); return;
  }
}

void gemm_int(const QuantizedRows& A, int64_t M, int /*act_bits*/, const PackedInt4& W, int64_t tile_begin,
              int64_t tile_end, const float* bias, float* C, int64_t ldc) {
  const IntArgs p{&A, &W, bias, C, ldc, nullptr};
  int_driver(p, M, tile_begin, tile_end);
}

void int_block_dots(const QuantizedRows& A, int64_t M, int /*act_bits*/, const PackedInt4& W, int64_t tile_begin,
                    int64_t tile_end, int32_t* dots) {
  const IntArgs p{&A, &W, nullptr, nullptr, 0, dots};
  int_driver(p, M, tile_begin, tile_end);
}

// Float activations: same schemes as the AVX2 path with one ZMM per 16-column tile.
thread_local std::vector<float> t_prescaled, t_panel, t_tileacc;

float prescale_row(const float* a, int64_t Kp, int64_t bs, float* ap, float* asum) {
  float absmax = 0.0f;
  for (int64_t k = 0; k < Kp; ++k) absmax = std::max(absmax, std::fabs(a[k]));
  const float rowfac = (absmax > 0.0f && absmax < 0x1p-90f) ? 0x1p64f : 1.0f;
  static const float kf[4] = {1.0f, 0x1p-8f, 0x1p-16f, 0x1p-24f};
  for (int64_t b = 0; b < Kp / bs; ++b) {
    float s = 0.0f;
    for (int64_t k = b * bs; k < (b + 1) * bs; ++k) {
      const float x = a[k] * rowfac;
      ap[k] = x * kf[k & 3];
      s += x;
    }
    asum[b] = s;
  }
  return 1.0f / rowfac;
}

template <int R, int CH>
void a16_few_rows(const float* ap, const float* asum, const float* rowinv, const PackedInt4& W, int64_t t,
                  const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp(), nb = W.n_blocks, gpb = W.block_size / kGroupK;
  const uint8_t* tdata = W.data + t * (Kp / kGroupK) * 64;
  __m512 facc[R];
  for (int r = 0; r < R; ++r) facc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 pacc[R][CH];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CH; ++c) pacc[r][c] = _mm512_setzero_ps();
    for (int64_t g = b * gpb; g < (b + 1) * gpb; ++g) {
      const __m512i v = _mm512_loadu_si512(tdata + g * 64);
      const __m512i u = _mm512_srli_epi32(v, 4);
      for (int j = 0; j < 4; ++j) {
        const __m512i mj = _mm512_set1_epi32(0xF << (8 * j));
        const __m512 wl = _mm512_cvtepi32_ps(_mm512_and_si512(v, mj));
        const __m512 wh = _mm512_cvtepi32_ps(_mm512_and_si512(u, mj));
        for (int r = 0; r < R; ++r) {
          const float* a = ap + r * Kp + g * kGroupK;
          pacc[r][j % CH] = _mm512_fmadd_ps(wl, _mm512_set1_ps(a[j]), pacc[r][j % CH]);
          pacc[r][j % CH] = _mm512_fmadd_ps(wh, _mm512_set1_ps(a[4 + j]), pacc[r][j % CH]);
        }
      }
    }
    const int64_t sidx = (t * nb + b) * kTileN;
    const __m512 sw = scales16(W.scales + sidx);
    const __m512 z = W.zero_points ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(W.zero_points + sidx))))
                                   : _mm512_set1_ps(8.0f);
    for (int r = 0; r < R; ++r) {
      __m512 s = pacc[r][0];
      for (int c = 1; c < CH; ++c) s = _mm512_add_ps(s, pacc[r][c]);
      facc[r] = _mm512_fmadd_ps(sw, _mm512_fnmadd_ps(z, _mm512_set1_ps(asum[r * nb + b]), s), facc[r]);
    }
  }
  const int64_t n0 = t * kTileN;
  const __mmask16 mk = col_mask(W.N - n0);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(C + r * ldc + n0, mk, _mm512_fmadd_ps(facc[r], _mm512_set1_ps(rowinv[r]), bv));
}

// Many rows (M >= 3): per group of up to 4 tiles (64 columns) and 128-k chunk, the weights are
// dequantized once into a float panel [k][T][16] (32 KB, in L1) and a 6-row x 64-column FMA
// micro-kernel (24 accumulators; per k 4 panel loads and 6 broadcasts for 24 FMAs) runs over it
// for every strip of rows. Each chunk is summed from zero and then added to the partial sums:
// one running sum over all of K (4096 same-sign products) drifts past the 1e-5 bound the tests
// hold every path to, chunked sums stay within it.
constexpr int64_t kChunkK = 128;
constexpr int kA16Tiles = 4;
constexpr int kA16Rows = 6;

template <int T>
void dequant_panel(const PackedInt4& W, int64_t t0, int64_t k0, int64_t k1, float* panel) {
  const int64_t Kp = W.Kp(), nb = W.n_blocks;
  const __m512i m4 = _mm512_set1_epi32(0xF);
  for (int j = 0; j < T; ++j) {
    const int64_t t = t0 + j;
    const uint8_t* tdata = W.data + t * (Kp / kGroupK) * 64;
    for (int64_t g = k0 / kGroupK; g < k1 / kGroupK; ++g) {
      const int64_t b = (g * kGroupK) / W.block_size, sidx = (t * nb + b) * kTileN;
      const __m512 sw = scales16(W.scales + sidx);
      const __m512 z = _mm512_cvtepi32_ps(zp_epi32(W, sidx));
      const __m512i v = _mm512_loadu_si512(tdata + g * 64);
      float* dst = panel + ((g * kGroupK - k0) * T + j) * kTileN;
      for (int i = 0; i < 8; ++i) {
        const unsigned sh = 8 * (i & 3) + 4 * (i >> 2);
        const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, sh), m4));
        _mm512_storeu_ps(dst + i * T * kTileN, _mm512_mul_ps(sw, _mm512_sub_ps(q, z)));
      }
    }
  }
}

// acc[r][j·16..] (stride T·16) += A[r][0..kn) · panel
template <int R, int T>
void fma_strip(const float* A, int64_t lda, const float* panel, int64_t kn, float* acc) {
  __m512 c[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kn; ++k) {
    __m512 w[T];
    for (int j = 0; j < T; ++j) w[j] = _mm512_loadu_ps(panel + (k * T + j) * kTileN);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int j = 0; j < T; ++j) c[r][j] = _mm512_fmadd_ps(w[j], a, c[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) {
      float* o = acc + (r * T + j) * kTileN;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), c[r][j]));
    }
}

template <int T>
void fma_strips(const float* A, int64_t lda, int64_t M, const float* panel, int64_t kn, float* acc) {
  int64_t m = 0;
  for (; m + kA16Rows <= M; m += kA16Rows) fma_strip<kA16Rows, T>(A + m * lda, lda, panel, kn, acc + m * T * kTileN);
  const float* a = A + m * lda;
  float* o = acc + m * T * kTileN;
  switch (M - m) {
    case 5: fma_strip<5, T>(a, lda, panel, kn, o); break;
    case 4: fma_strip<4, T>(a, lda, panel, kn, o); break;
    case 3: fma_strip<3, T>(a, lda, panel, kn, o); break;
    case 2: fma_strip<2, T>(a, lda, panel, kn, o); break;
    case 1: fma_strip<1, T>(a, lda, panel, kn, o); break;
    default: break;
  }
}

template <int T>
void a16_tile_group(const float* A, int64_t M, const PackedInt4& W, int64_t t0, const float* bias, float* C,
                    int64_t ldc, float* panel, float* acc) {
  const int64_t Kp = W.Kp();
  std::fill(acc, acc + M * T * kTileN, 0.0f);
  for (int64_t k0 = 0; k0 < Kp; k0 += kChunkK) {
    const int64_t k1 = std::min(Kp, k0 + kChunkK);
    dequant_panel<T>(W, t0, k0, k1, panel);
    fma_strips<T>(A + k0, Kp, M, panel, k1 - k0, acc);
  }
  for (int j = 0; j < T; ++j) {
    const int64_t n0 = (t0 + j) * kTileN;
    const __mmask16 mk = col_mask(W.N - n0);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m)
      _mm512_mask_storeu_ps(C + m * ldc + n0, mk, _mm512_add_ps(_mm512_loadu_ps(acc + (m * T + j) * kTileN), bv));
  }
}

void gemm_a16(const float* A, int64_t M, const PackedInt4& W, int64_t tile_begin, int64_t tile_end,
              const float* bias, float* C, int64_t ldc) {
  const int64_t Kp = W.Kp(), nb = W.n_blocks;
  if (M <= 2) {
    float* ap = scratch(t_prescaled, static_cast<size_t>(M * (Kp + nb + 1)));
    float* asum = ap + M * Kp;
    float* rowinv = asum + M * nb;
    for (int64_t m = 0; m < M; ++m) rowinv[m] = prescale_row(A + m * Kp, Kp, W.block_size, ap + m * Kp, asum + m * nb);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      if (M == 1) a16_few_rows<1, 4>(ap, asum, rowinv, W, t, bias, C, ldc);
      else a16_few_rows<2, 2>(ap, asum, rowinv, W, t, bias, C, ldc);
    }
    return;
  }
  float* panel = scratch(t_panel, static_cast<size_t>(kChunkK * kA16Tiles * kTileN));
  float* acc = scratch(t_tileacc, static_cast<size_t>(M * kA16Tiles * kTileN));
  int64_t t = tile_begin;
  for (; t + kA16Tiles <= tile_end; t += kA16Tiles) a16_tile_group<kA16Tiles>(A, M, W, t, bias, C, ldc, panel, acc);
  switch (tile_end - t) {
    case 3: a16_tile_group<3>(A, M, W, t, bias, C, ldc, panel, acc); break;
    case 2: a16_tile_group<2>(A, M, W, t, bias, C, ldc, panel, acc); break;
    case 1: a16_tile_group<1>(A, M, W, t, bias, C, ldc, panel, acc); break;
    default: break;
  }
}

// SwiGLU epilogue, 16 lanes (the evaluation and its constants: paths.h, kExpTaylor).
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kExpLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

void swiglu(const float* Z, int64_t ldz, int64_t M, int64_t I, float* Y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* g = Z + m * ldz;
    const float* u = g + I;
    float* y = Y + m * ldy;
    for (int64_t j = 0; j < I; j += 16) {  // the tail through masked loads and stores
      const __mmask16 mk = col_mask(I - j);
      const __m512 gv = _mm512_maskz_loadu_ps(mk, g + j), uv = _mm512_maskz_loadu_ps(mk, u + j);
      const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(kSwigluXMin)),
                                     _mm512_set1_ps(kSwigluXMax));
      _mm512_mask_storeu_ps(y + j, mk, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(x))), uv));
    }
  }
}

// ---- Float weights (PackedMatMul) -----------------------------------------------------------
// Every output is one FMA chain over k in order (acc = fma(w_k, a_k, acc), then + bias), whatever
// the row count, the tile split or the path (avx2 and NEON do the same): a row's result does not
// depend on how many rows the call has, so logits_to_keep's last row equals the full prefill's,
// as with ONNX Runtime's MatMul. The independent chains come from R rows x T tiles of one group
// side by side, whose lines are consecutive (kernels.h): 1-3 rows (decode) read the group as one
// sequential stream with 4-12 chains; 4+ rows reuse each weight line for 6 rows (6 x 4: 24
// accumulators, per k four weight lines and six broadcasts for 24 FMAs), the group's weights
// staying in L2 across the strips. Tiles t0 .. t0 + T - 1 are in one group.
template <int R, int T>
void f32_strip(const float* A, int64_t lda, const PackedFloat& W, int64_t t0, const float* bias, float* C,
               int64_t ldc) {
  const int64_t K = W.K, kstride = W.group_tiles(t0) * kTileN;
  const float* w = W.line(t0, 0);
  __m512 c[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[T];
    for (int j = 0; j < T; ++j) wv[j] = _mm512_loadu_ps(w + k * kstride + j * kTileN);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int j = 0; j < T; ++j) c[r][j] = _mm512_fmadd_ps(wv[j], a, c[r][j]);
    }
  }
  for (int j = 0; j < T; ++j) {
    const int64_t n0 = (t0 + j) * kTileN;
    for (int r = 0; r < R; ++r)
      store_row(C + r * ldc + n0, bias ? bias + n0 : nullptr, col_mask(W.N - n0), c[r][j], 1.0f);
  }
}

template <int T>
void f32_strips(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t t0, const float* bias,
                float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) f32_strip<6, T>(A + m * lda, lda, W, t0, bias, C + m * ldc, ldc);
  const float* a = A + m * lda;
  float* o = C + m * ldc;
  switch (M - m) {
    case 5: f32_strip<5, T>(a, lda, W, t0, bias, o, ldc); break;
    case 4: f32_strip<4, T>(a, lda, W, t0, bias, o, ldc); break;
    case 3: f32_strip<3, T>(a, lda, W, t0, bias, o, ldc); break;
    case 2: f32_strip<2, T>(a, lda, W, t0, bias, o, ldc); break;
    case 1: f32_strip<1, T>(a, lda, W, t0, bias, o, ldc); break;
    default: break;
  }
}

void gemm_f32(const float* A, int64_t lda, int64_t M, const PackedFloat& W, int64_t tile_begin, int64_t tile_end,
              const float* bias, float* C, int64_t ldc) {
  for (int64_t t = tile_begin; t < tile_end;) {  // group by group (a range may start or end mid-group)
    const int64_t end = std::min(tile_end, (t / kTileGroup + 1) * kTileGroup);
    switch (end - t) {
      case 4: f32_strips<4>(A, lda, M, W, t, bias, C, ldc); break;
      case 3: f32_strips<3>(A, lda, M, W, t, bias, C, ldc); break;
      case 2: f32_strips<2>(A, lda, M, W, t, bias, C, ldc); break;
      default: f32_strips<1>(A, lda, M, W, t, bias, C, ldc); break;
    }
    t = end;
  }
}

}  // namespace
}  // namespace avx512

const KernelTable& avx512vnni_kernels() {
  static const KernelTable t{"avx512vnni", avx2_kernels().quantize_rows, avx512::gemm_a16, avx512::gemm_int,
                             avx512::int_block_dots, avx512::swiglu, avx512::gemm_f32};
  return t;
}

}  // namespace llmfold
