// Kernel tests: every path this CPU can run against the reference (ref) on random and edge shapes.
//   quantize_rows and int_block_dots: bit for bit; gemm_a16 and gemm_int: within 1e-5 of the
//   magnitude sum_k |a_k w_k| (and identical non-finite positions for NaN/Inf rows); gemm_f32:
//   within the float summation bound (f32_checks).
// Usage: llmfold_kernel_test [--quick] [--path NAME]
// Exit status 0 when every check passed. Compiled-in paths the CPU cannot run are reported as
// skipped with the missing feature.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "paths.h"
#include "ref/hadamard.h"
#include "ref/token_prune.h"

using namespace llmfold;

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                              \
  do {                                                \
    ++g_checks;                                       \
    if (!(cond)) {                                    \
      ++g_failures;                                   \
      if (g_failures <= 30) {                         \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                     \
        std::printf("\n");                            \
      }                                               \
    }                                                 \
  } while (0)

struct Packed {
  int64_t K, N, bs, nb, nt;
  std::vector<uint8_t> data, zp;
  std::vector<uint16_t> scales;  // fp16 bits
  bool has_zp;
  PackedInt4 view() const {
    return PackedInt4{data.data(), scales.data(), has_zp ? zp.data() : nullptr, K, N, bs, nb, nt};
  }
};

// Test-side packer written from the layout description in kernels.h (independent of ref's reader).
Packed pack(const std::vector<uint8_t>& q, const std::vector<float>& sc, const std::vector<uint8_t>* zp, int64_t K,
            int64_t N, int64_t bs) {
  Packed p;
  p.K = K, p.N = N, p.bs = bs, p.nb = (K + bs - 1) / bs, p.nt = (N + 15) / 16, p.has_zp = zp != nullptr;
  const int64_t Kp = p.nb * bs;
  p.data.assign(static_cast<size_t>(p.nt * Kp / 8 * 64), 0);
  p.scales.assign(static_cast<size_t>(p.nt * p.nb * 16), 0);
  p.zp.assign(static_cast<size_t>(p.nt * p.nb * 16), 8);
  for (int64_t t = 0; t < p.nt; ++t)
    for (int64_t b = 0; b < p.nb; ++b)
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t n = t * 16 + c;
        if (n < N) {
          p.scales[(t * p.nb + b) * 16 + c] = float_to_half(sc[b * N + n]);
          if (zp) p.zp[(t * p.nb + b) * 16 + c] = (*zp)[b * N + n];
        }
      }
  for (int64_t t = 0; t < p.nt; ++t)
    for (int64_t k = 0; k < Kp; ++k)
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t n = t * 16 + c, b = k / bs;
        int v;
        if (n >= N) v = 8;
        else if (k >= K) v = zp ? (*zp)[b * N + n] : 8;
        else v = q[k * N + n];
        const int64_t g = k / 8, j = k % 8;
        uint8_t& byte = p.data[static_cast<size_t>((t * (Kp / 8) + g) * 64 + 4 * c + (j & 3))];
        byte |= static_cast<uint8_t>(j < 4 ? v : v << 4);
      }
  return p;
}

struct Case {
  int64_t M, K, N, bs;
  bool zp, bias, shift;
  int special;  // 0 random, 1 zero blocks, 2 NaN/Inf rows, 3 huge, 4 tiny, 5 extreme zp/q, 6 max sums,
                // 7 scales across the fp16 range (subnormal, smallest and largest normal)
};

bool same_bits(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  return std::memcmp(&a, &b, 4) == 0;
}

void run_case(const KernelTable& kt, const Case& cs, std::mt19937_64& rng) {
  const KernelTable& R = ref_kernels();
  const int64_t M = cs.M, K = cs.K, N = cs.N, bs = cs.bs;
  const int64_t nb = (K + bs - 1) / bs, Kp = nb * bs, nt = (N + 15) / 16, Np = nt * 16;
  std::uniform_real_distribution<float> U(-1.0f, 1.0f);
  std::uniform_int_distribution<int> Q(0, 15);
  std::vector<uint8_t> q(static_cast<size_t>(K * N)), zp(static_cast<size_t>(nb * N));
  std::vector<float> sc(static_cast<size_t>(nb * N)), bias(static_cast<size_t>(N));
  for (auto& v : q) v = static_cast<uint8_t>(Q(rng));
  for (auto& v : zp) v = static_cast<uint8_t>(Q(rng));
  for (auto& v : sc) v = half_to_float(float_to_half(0.01f + 0.05f * std::fabs(U(rng))));  // fp16 values
  for (auto& v : bias) v = U(rng);
  if (cs.special == 1) {  // all-zero blocks: a zero-scale block and a block with q == zp
    for (int64_t n = 0; n < N; ++n) sc[0 * N + n] = 0.0f;
    if (nb > 1)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = bs; k < std::min(K, 2 * bs); ++k) q[k * N + n] = cs.zp ? zp[N + n] : 8;
  }
  if (cs.special == 5) {  // extreme codes: q in {0, 15}, zp in {0, 15}
    for (auto& v : q) v = (rng() & 1) ? 15 : 0;
    for (auto& v : zp) v = (rng() & 1) ? 15 : 0;
  }
  if (cs.special == 6) {  // largest integer sums: q = 15 everywhere, constant-sign full-scale rows
    for (auto& v : q) v = 15;
    for (auto& v : zp) v = 0;
  }
  if (cs.special == 7) {  // every conversion case of the fp16 scales (subnormals are FCVTL/vcvtph2ps too)
    const uint16_t kinds[] = {0x0001, 0x0203, 0x03FF, 0x0400, 0x0401, 0x3C00, 0x7BFF, 0x8000, 0x2E66};
    for (size_t i = 0; i < sc.size(); ++i) sc[i] = half_to_float(kinds[(i * 7 + i / 5) % 9]);
  }
  const Packed P = pack(q, sc, cs.zp ? &zp : nullptr, K, N, bs);
  const PackedInt4 W = P.view();

  std::vector<float> A(static_cast<size_t>(M * Kp), 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      float v = U(rng);
      if (cs.special == 3) v *= 1e30f;
      if (cs.special == 4) v *= 1e-33f;
      if (cs.special == 1 && m == 0) v = 0.0f;  // an all-zero activation row
      if (cs.special == 6) v = (m % 2) ? -1.0f : 1.0f;
      A[m * Kp + k] = v;
    }
  if (cs.special == 2) {
    A[0 * Kp + K / 2] = std::numeric_limits<float>::quiet_NaN();
    if (M > 1) A[1 * Kp + 0] = std::numeric_limits<float>::infinity();
    if (M > 2) A[2 * Kp + K - 1] = -std::numeric_limits<float>::infinity();
  }
  std::vector<uint8_t> shift(static_cast<size_t>(K));
  for (auto& s : shift) s = static_cast<uint8_t>(rng() % 16);
  const uint8_t* sh = cs.shift ? shift.data() : nullptr;
  const float* bp = cs.bias ? bias.data() : nullptr;
  char tag[160];
  std::snprintf(tag, sizeof tag, "%s M=%lld K=%lld N=%lld bs=%lld zp=%d bias=%d shift=%d special=%d", kt.name,
                (long long)M, (long long)K, (long long)N, (long long)bs, cs.zp, cs.bias, cs.shift, cs.special);

  // Magnitude bound for the float comparisons: sum_k |a_k| |w_kn|.
  std::vector<double> mag(static_cast<size_t>(M * N), 0.0);
  std::vector<bool> bad_row(static_cast<size_t>(M), false);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * Kp + k];
      if (!std::isfinite(a)) bad_row[m] = true;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t b = k / bs;
        const float w = sc[b * N + n] * static_cast<float>(q[k * N + n] - (cs.zp ? zp[b * N + n] : 8));
        mag[m * N + n] += std::fabs(static_cast<double>(a) * w);
      }
    }

  // ---- gemm_a16 (tile range split in two to exercise partial ranges) ----
  {
    std::vector<float> Cr(static_cast<size_t>(M * N), -7.0f), Cp(static_cast<size_t>(M * N), -7.0f);
    R.gemm_a16(A.data(), M, W, 0, nt, bp, Cr.data(), N);
    const int64_t mid = nt / 2;
    kt.gemm_a16(A.data(), M, W, 0, mid, bp, Cp.data(), N);
    kt.gemm_a16(A.data(), M, W, mid, nt, bp, Cp.data(), N);
    int bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float r = Cr[m * N + n], p = Cp[m * N + n];
        bool ok;
        if (bad_row[m]) ok = !std::isfinite(p) && !std::isfinite(r);
        else ok = std::fabs(static_cast<double>(r) - p) <= 1e-5 * mag[m * N + n] + 1e-6 * std::fabs(r) + 1e-37;
        if (!ok && bad++ < 3) CHECK(false, "%s gemm_a16 [%lld,%lld] ref=%g path=%g mag=%g", tag, (long long)m,
                                    (long long)n, r, p, mag[m * N + n]);
        else ++g_checks;
      }
  }

  // ---- quantize_rows + integer paths, both activation widths ----
  for (int act_bits : {8, 4}) {
    std::vector<int8_t> qr(static_cast<size_t>(M * Kp), 99), qp(static_cast<size_t>(M * Kp), 99);
    std::vector<float> sr(static_cast<size_t>(M)), sp(static_cast<size_t>(M));
    std::vector<int32_t> br(static_cast<size_t>(M * nb)), bq(static_cast<size_t>(M * nb));
    const QuantizedRows QR{qr.data(), sr.data(), br.data(), Kp, nb};
    const QuantizedRows QP{qp.data(), sp.data(), bq.data(), Kp, nb};
    R.quantize_rows(A.data(), Kp, K, 0, M, sh, act_bits, QR);
    kt.quantize_rows(A.data(), Kp, K, 0, 1, sh, act_bits, QP);  // row ranges in two calls
    kt.quantize_rows(A.data(), Kp, K, 1, M, sh, act_bits, QP);
    CHECK(qr == qp, "%s a%d quantize_rows q differs", tag, act_bits);
    CHECK(br == bq, "%s a%d quantize_rows block sums differ", tag, act_bits);
    bool sok = true;
    for (int64_t m = 0; m < M; ++m) sok = sok && same_bits(sr[m], sp[m]);
    CHECK(sok, "%s a%d quantize_rows scales differ", tag, act_bits);

    std::vector<int32_t> dr(static_cast<size_t>(M * nb * Np), -1), dp(static_cast<size_t>(M * nb * Np), -2);
    R.int_block_dots(QR, M, act_bits, W, 0, nt, dr.data());
    kt.int_block_dots(QR, M, act_bits, W, 0, nt, dp.data());
    CHECK(dr == dp, "%s a%d int_block_dots differ", tag, act_bits);

    std::vector<float> Cr(static_cast<size_t>(M * N), -7.0f), Cp(static_cast<size_t>(M * N), -7.0f);
    R.gemm_int(QR, M, act_bits, W, 0, nt, bp, Cr.data(), N);
    const int64_t mid = (nt + 1) / 2;
    kt.gemm_int(QR, M, act_bits, W, 0, mid, bp, Cp.data(), N);
    kt.gemm_int(QR, M, act_bits, W, mid, nt, bp, Cp.data(), N);
    int bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double bound = 0.0;  // sa * sum_b |sw (dot - zp bsum)|
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t d = dr[(m * nb + b) * Np + n] - int64_t{cs.zp ? zp[b * N + n] : 8} * br[m * nb + b];
          bound += std::fabs(static_cast<double>(sc[b * N + n]) * static_cast<double>(d));
        }
        bound *= std::fabs(sr[m]);
        const float r = Cr[m * N + n], p = Cp[m * N + n];
        bool ok;
        if (std::isnan(sr[m])) ok = std::isnan(r) && std::isnan(p);
        else ok = std::fabs(static_cast<double>(r) - p) <= 1e-5 * bound + 1e-6 * std::fabs(r) + 1e-37;
        if (!ok && bad++ < 3) CHECK(false, "%s a%d gemm_int [%lld,%lld] ref=%g path=%g bound=%g", tag, act_bits,
                                    (long long)m, (long long)n, r, p, bound);
        else ++g_checks;
      }
  }
}

// Reference-level checks of the quantization rule and TokenPrune selection (path independent).
// swiglu against ref: random rows (odd widths: vector tails), large |g| on both sides of exp's
// overflow, zeros, NaN/Inf in either half. Within 1e-6 relative where ref is finite (plus an
// absolute 1e-35·|g·u| for g near -88, where ref's exp is finite but the paths' may reach inf),
// non-finite exactly where ref is.
void swiglu_checks(const KernelTable& kt, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 4.0f);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 30.0f, -30.0f, 87.0f, -87.0f, 88.5f, -88.5f, 89.0f,
                            -89.0f, 100.0f, -100.0f, 1e20f, -1e20f, 3e38f, -3e38f, inf, -inf, nan};
  for (int64_t I : {1, 7, 8, 9, 33, 1536}) {
    const int64_t M = 3, ldz = 2 * I + 5, ldy = I + 3;
    std::vector<float> Z(static_cast<size_t>(M * ldz)), Yr(static_cast<size_t>(M * ldy), -7.0f), Yp = Yr;
    for (auto& v : Z) v = nd(rng);
    for (size_t i = 0; i < Z.size(); i += 5) Z[i] = specials[(i / 5) % (sizeof(specials) / sizeof(float))];
    ref_kernels().swiglu(Z.data(), ldz, M, I, Yr.data(), ldy);
    kt.swiglu(Z.data(), ldz, M, I, Yp.data(), ldy);
    int bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < ldy; ++j) {
        const float r = Yr[m * ldy + j], q = Yp[m * ldy + j];
        bool ok;
        if (j >= I) ok = q == -7.0f;  // nothing written past the row's I outputs
        else if (!std::isfinite(r)) ok = !std::isfinite(q);
        else {
          const double gu = std::fabs(double(Z[m * ldz + j]) * Z[m * ldz + I + j]);
          ok = std::isfinite(q) && std::fabs(double(q) - r) <= 1e-6 * std::fabs(r) + 1e-35 * gu + 1e-37;
        }
        if (!ok && bad++ < 3)
          CHECK(false, "%s swiglu I=%lld [%lld,%lld] g=%g u=%g ref=%g path=%g", kt.name, (long long)I, (long long)m,
                (long long)j, Z[m * ldz + j], j < I ? Z[m * ldz + I + j] : 0.0f, r, q);
      }
    CHECK(bad == 0, "%s swiglu I=%lld: %d mismatches", kt.name, (long long)I, bad);
  }
}

// gemm_f32 (PackedMatMul) against ref on random and edge shapes: every M up to the strip sizes
// and beyond, K not a multiple of the unrolling (1, 3, 5, 577), odd N, partial tile ranges, bias,
// NaN/Inf rows, large and subnormal magnitudes, long same-sign sums. Within (K + 3)·2^-24 of
// sum_k |a_k w_k| + |bias| (any summation order stays inside it), non-finite where ref is, and
// nothing written outside columns [0, N) of each row; bit for bit the same when each row is
// computed alone and the tiles are split differently.
void f32_checks(const KernelTable& kt, std::mt19937_64& rng, bool quick) {
  struct F32Case {
    int64_t M, K, N;
    bool bias;
    int special;  // 0 random, 1 NaN/Inf rows, 2 large, 3 subnormal products, 4 same sign
  };
  std::vector<F32Case> cases = {
      {1, 64, 16, false, 0},   {1, 576, 230, true, 0},  {2, 5, 17, true, 0},    {3, 3, 33, false, 0},
      {4, 1, 1, true, 0},      {5, 577, 70, true, 0},   {6, 64, 64, false, 0},  {7, 100, 65, true, 0},
      {13, 130, 47, false, 0}, {12, 33, 96, true, 0},   {3, 70, 18, true, 1},   {9, 64, 16, false, 1},
      {1, 128, 20, true, 2},   {8, 64, 19, false, 2},   {2, 64, 16, false, 3},  {6, 96, 33, true, 3},
      {1, 4096, 16, false, 4}, {6, 4096, 40, true, 4},  {1, 1536, 576, false, 0}};
  if (!quick) {
    cases.push_back({128, 576, 100, true, 0});
    cases.push_back({37, 1536, 64, false, 0});
    cases.push_back({600, 64, 130, true, 4});
  }
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const F32Case& cs : cases) {
    const int64_t M = cs.M, K = cs.K, N = cs.N, nt = (N + 15) / 16, lda = K + 3, ldc = N + 5;
    float amp = 1.0f;
    if (cs.special == 2) amp = 1e15f;
    if (cs.special == 3) amp = 1e-20f;
    std::vector<float> A(static_cast<size_t>(M * lda)), Wl(static_cast<size_t>(K * N)), bias(static_cast<size_t>(N));
    for (auto& v : A) v = cs.special == 4 ? 1.0f : amp * nd(rng);
    for (auto& v : Wl) v = cs.special == 4 ? 0.75f + 0.25f * std::fabs(nd(rng)) : amp * nd(rng);
    for (auto& v : bias) v = nd(rng);
    std::vector<bool> bad_row(static_cast<size_t>(M), false);
    if (cs.special == 1)
      for (int64_t m = 0; m < M; m += 2) {
        A[m * lda + (m * 7) % K] = (m / 2) % 3 == 0 ? nan : ((m / 2) % 3 == 1 ? inf : -inf);
        bad_row[m] = true;
      }
    // test-side packing from the layout description in kernels.h (groups of 4 tiles, [K][gt][16])
    std::vector<float> packed(static_cast<size_t>(nt * K * 16), 0.0f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t t = n / 16, g = t / 4, gt = std::min<int64_t>(4, nt - 4 * g);
        packed[4 * g * K * 16 + (k * gt + t % 4) * 16 + n % 16] = Wl[k * N + n];
      }
    const PackedFloat W{packed.data(), K, N, nt};
    const float* bp = cs.bias ? bias.data() : nullptr;
    std::vector<float> Cr(static_cast<size_t>(M * ldc), -7.0f), Cp = Cr;
    ref_kernels().gemm_f32(A.data(), lda, M, W, 0, nt, bp, Cr.data(), ldc);
    const int64_t mid = nt / 2;
    kt.gemm_f32(A.data(), lda, M, W, 0, mid, bp, Cp.data(), ldc);
    kt.gemm_f32(A.data(), lda, M, W, mid, nt, bp, Cp.data(), ldc);
    // Each output is the same float computation whatever the row count and the tile split (the
    // paths' contract, kernels.h): row by row, with tile ranges [0, 1), [1, nt - 1), [nt - 1, nt).
    std::vector<float> Cs(Cp.size(), -7.0f);
    const int64_t cuts[4] = {0, std::min<int64_t>(1, nt), std::max<int64_t>(std::min<int64_t>(1, nt), nt - 1), nt};
    for (int64_t m = 0; m < M; ++m)
      for (int c = 0; c < 3; ++c)
        if (cuts[c] < cuts[c + 1])
          kt.gemm_f32(A.data() + m * lda, lda, 1, W, cuts[c], cuts[c + 1], bp, Cs.data() + m * ldc, ldc);
    bool same = true;
    for (size_t i = 0; i < Cp.size(); ++i) same = same && same_bits(Cp[i], Cs[i]);
    CHECK(same, "%s gemm_f32 M=%lld K=%lld N=%lld: a row computed alone or with other tile splits differs", kt.name,
          (long long)M, (long long)K, (long long)N);
    int bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < ldc; ++n) {
        const float r = Cr[m * ldc + n], q = Cp[m * ldc + n];
        bool ok;
        double mag = 0.0;
        if (n >= N) {
          ok = q == -7.0f;
        } else if (bad_row[m]) {
          ok = !std::isfinite(r) && !std::isfinite(q);
        } else {
          for (int64_t k = 0; k < K; ++k) mag += std::fabs(static_cast<double>(A[m * lda + k]) * Wl[k * N + n]);
          if (bp) mag += std::fabs(bp[n]);
          ok = std::isfinite(q) && std::fabs(static_cast<double>(q) - r) <= (K + 3) * 0x1p-24 * mag + K * 1.5e-45;
        }
        if (!ok && bad++ < 3)
          CHECK(false, "%s gemm_f32 M=%lld K=%lld N=%lld [%lld,%lld] ref=%g path=%g mag=%g", kt.name, (long long)M,
                (long long)K, (long long)N, (long long)m, (long long)n, r, q, mag);
        else ++g_checks;
      }
  }
}

void spec_checks() {
  // fp16 scales: every half converts to the float it denotes and back (NaN stays NaN); rounding
  // to half is to nearest even with overflow to inf.
  {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
      const float f = half_to_float(static_cast<uint16_t>(h));
      const bool nan = (h & 0x7C00u) == 0x7C00u && (h & 0x3FFu);
      if (nan ? !std::isnan(f) : float_to_half(f) != h) ++bad;
    }
    CHECK(bad == 0, "half round trip: %d of 65536 halves differ", bad);
    CHECK(half_to_float(0x3C00) == 1.0f && half_to_float(0x0001) == std::ldexp(1.0f, -24) &&
              half_to_float(0x7BFF) == 65504.0f && half_to_float(0xFC00) == -std::numeric_limits<float>::infinity(),
          "half_to_float special values");
    CHECK(float_to_half(65519.0f) == 0x7BFF && float_to_half(65520.0f) == 0x7C00 &&
              float_to_half(std::ldexp(1.0f, -25)) == 0 && float_to_half(std::ldexp(3.0f, -25)) == 2 &&
              float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00 &&
              float_to_half(1.0f + std::ldexp(3.0f, -11)) == 0x3C02 && float_to_half(-0.0f) == 0x8000,
          "float_to_half rounding");
  }
  // Quantization rule: max maps to +-qmax, rounding half to even, NaN rows, tiny rows.
  {
    const int64_t K = 16, bs = 16;
    std::vector<float> a(K, 0.0f);
    a[0] = 127.0f, a[1] = -63.5f, a[2] = 0.5f, a[3] = 1.5f, a[4] = 2.5f;
    std::vector<int8_t> q(K);
    float s;
    int32_t bsum;
    ref_kernels().quantize_rows(a.data(), K, K, 0, 1, nullptr, 8, QuantizedRows{q.data(), &s, &bsum, K, 1});
    CHECK(q[0] == 127 && q[1] == -64 && q[2] == 0 && q[3] == 2 && q[4] == 2 && s == 1.0f && bsum == 67,
          "quantization rule: q=%d %d %d %d %d s=%g bsum=%d", q[0], q[1], q[2], q[3], q[4], s, bsum);
    a[5] = std::numeric_limits<float>::quiet_NaN();
    ref_kernels().quantize_rows(a.data(), K, K, 0, 1, nullptr, 8, QuantizedRows{q.data(), &s, &bsum, K, 1});
    CHECK(std::isnan(s) && q[0] == 0 && bsum == 0, "NaN row must give scale NaN, q 0");
    std::vector<float> tiny(K, 1e-31f);
    ref_kernels().quantize_rows(tiny.data(), K, K, 0, 1, nullptr, 4, QuantizedRows{q.data(), &s, &bsum, K, 1});
    CHECK(s == 0.0f && q[3] == 0, "tiny row must quantize to zero");
    (void)bs;
  }
  // TokenPrune selection.
  {
    const double sc[8] = {0.0, 5.0, 1.0, 5.0, std::nan(""), 3.0, 9.0, -1.0};
    int64_t out[8];
    token_prune_select(sc, 8, 4, out);  // 0, 7 + best two of 1..6: 6 (9.0), then 1 (5.0, lower idx than 3)
    CHECK(out[0] == 0 && out[1] == 1 && out[2] == 6 && out[3] == 7, "token_prune_select: %lld %lld %lld %lld",
          (long long)out[0], (long long)out[1], (long long)out[2], (long long)out[3]);
    token_prune_select(sc, 8, 7, out);  // drops only the NaN token 4
    CHECK(out[3] == 3 && out[4] == 5, "token_prune_select NaN ranks last");
    CHECK(token_prune_keep_from_ratio(0.5f, 9) == 4, "keep ratio floor");
    CHECK(token_prune_keep_from_ratio(0.7f, 512) == 358 && token_prune_keep_from_ratio(0.7f, 10) == 7 &&
              token_prune_keep_from_ratio(0.29f, 100) == 29,
          "keep ratio floor of an integral product");
    CHECK(token_prune_keep_from_ratio(0.01f, 9) == 2, "keep ratio min 2");
    CHECK(token_prune_keep_from_ratio(1.0f, 2) == 2 && token_prune_clamp_keep(1, 1) == 1, "T <= 2 keeps all");
    CHECK(token_prune_clamp_keep(100, 10) == 10 && token_prune_clamp_keep(0, 10) == 2, "clamp keep");
  }
  // TokenPrune scores from query/key == scores from the probabilities they give (naive [H,T,T]
  // softmax here, written independently), both score modes, grouped heads.
  {
    std::mt19937_64 rng(77);
    std::normal_distribution<float> nd(0.0f, 1.5f);
    const int64_t T = 23, H = 6, Hkv = 2, d = 8, group = H / Hkv;
    std::vector<float> q(T * H * d), k(T * Hkv * d), P(H * T * T, 0.0f);
    for (float& v : q) v = nd(rng);
    for (float& v : k) v = nd(rng);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> l(t + 1);
        double m = -1e300, z = 0.0;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0.0;
          for (int64_t c = 0; c < d; ++c) dot += double(q[t * H * d + h * d + c]) * k[j * Hkv * d + (h / group) * d + c];
          l[j] = scale * dot;
          m = std::max(m, l[j]);
        }
        for (int64_t j = 0; j <= t; ++j) z += std::exp(l[j] - m);
        for (int64_t j = 0; j <= t; ++j) P[(h * T + t) * T + j] = static_cast<float>(std::exp(l[j] - m) / z);
      }
    for (TokenPruneScore mode : {TokenPruneScore::kFirstToken, TokenPruneScore::kColumnSum}) {
      std::vector<double> a(T), b(T), scratch((H + 1) * T);
      token_prune_scores_from_probs(P.data(), H, T, T, mode, a.data());
      token_prune_scores_from_qk(q.data(), k.data(), T, H, Hkv, d, scale, mode, scratch.data(), b.data());
      double worst = 0.0;
      for (int64_t t = 0; t < T; ++t) worst = std::max(worst, std::fabs(a[t] - b[t]));
      CHECK(worst < 1e-5, "token_prune_scores_from_qk vs probabilities (mode %d): max diff %g", int(mode), worst);
      int64_t ia[T], ib[T];
      token_prune_select(a.data(), T, 9, ia);
      token_prune_select(b.data(), T, 9, ib);
      CHECK(std::equal(ia, ia + 9, ib), "token_prune kept indices from query/key differ (mode %d)", int(mode));
    }
    CHECK(std::fabs(P[0] - 1.0f) < 1e-7, "first query attends only to itself");
  }
  {  // hadamard_rows: the butterfly equals the dense product with Sylvester's H_h (H_{2n} =
     // [[H, H], [H, -H]], so H[i][j] = (-1)^popcount(i & j)), per block, and applying it twice
     // gives h * x (H * H = h * I); the source rows stay untouched; integers stay exact
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int> small(-50, 50);
    for (const int64_t h : {2, 4, 8, 64, 512}) {
      const int64_t K = 3 * h, M = 3, lda = K + 5;
      std::vector<float> A(static_cast<size_t>(M * lda)), out(static_cast<size_t>(M * K)), twice(out.size());
      for (auto& v : A) v = static_cast<float>(small(rng));
      const std::vector<float> A0 = A;
      hadamard_rows(A.data(), lda, out.data(), K, K, h, 0, M);
      hadamard_rows(out.data(), K, twice.data(), K, K, h, 0, M);
      bool dense_ok = true, inv_ok = true;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t b = k / h * h;
          double ref = 0;
          for (int64_t j = 0; j < h; ++j)
            ref += A[m * lda + b + j] * ((__builtin_popcountll(static_cast<unsigned long long>(j & (k - b))) & 1) ? -1.0 : 1.0);
          dense_ok = dense_ok && out[m * K + k] == static_cast<float>(ref);
          inv_ok = inv_ok && twice[m * K + k] == static_cast<float>(h) * A[m * lda + k];
        }
      CHECK(dense_ok, "hadamard_rows h=%lld differs from the dense Sylvester product", (long long)h);
      CHECK(inv_ok, "hadamard_rows h=%lld applied twice is not h * x", (long long)h);
      CHECK(A == A0, "hadamard_rows h=%lld wrote to its source", (long long)h);
      const std::vector<float> before = out;
      hadamard_rows(out.data(), K, out.data(), K, K, h, 1, 2);  // in place, one row of a range
      CHECK(std::equal(out.begin() + K, out.begin() + 2 * K, twice.begin() + K) &&
                std::equal(out.begin(), out.begin() + K, before.begin()) &&
                std::equal(out.begin() + 2 * K, out.end(), before.begin() + 2 * K),
            "hadamard_rows in place over rows [1, 2) must change exactly that row");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--path") && i + 1 < argc) only = argv[++i];
  }
  spec_checks();

  const KernelTable* paths[8];
  const int n = available_kernels(paths, 8);
  std::printf("active kernels: %s\n", active_kernels().name);
#if defined(__x86_64__)
  const char* compiled[] = {"avx512vnni", "avx2"};
  const char* need[] = {"AVX512-VNNI", "AVX2+FMA+F16C"};
#elif defined(__aarch64__) && defined(LLMFOLD_HAVE_ARM_KERNELS)
  const char* compiled[] = {"i8mm", "dotprod", "neon"};
  const char* need[] = {"i8mm", "dotprod", "NEON"};
#else
  const char* compiled[] = {"ref"};
  const char* need[] = {"nothing"};
#endif
  for (size_t c = 0; c < sizeof(compiled) / sizeof(compiled[0]); ++c) {
    bool avail = false;
    for (int i = 0; i < n; ++i) avail = avail || !std::strcmp(paths[i]->name, compiled[c]);
    if (!avail) std::printf("path %s: skipped: CPU lacks %s\n", compiled[c], need[c]);
  }

  std::vector<Case> cases = {
      {1, 64, 16, 32, false, false, false, 0},   {1, 576, 1536, 32, false, true, false, 0},
      {1, 100, 17, 32, true, true, true, 0},     {2, 77, 33, 16, true, false, false, 0},
      {3, 130, 31, 64, false, true, true, 0},    {4, 256, 48, 128, true, true, false, 0},
      {5, 300, 1, 256, true, false, true, 0},    {7, 96, 40, 32, false, true, false, 0},
      {13, 200, 50, 32, true, true, true, 0},    {1, 40, 20, 16, true, true, false, 1},
      {6, 96, 24, 32, false, false, false, 1},   {3, 70, 18, 32, true, true, false, 2},
      {9, 64, 16, 16, false, true, true, 2},     {2, 128, 32, 64, true, false, false, 3},
      {8, 64, 19, 32, false, true, false, 3},    {1, 64, 16, 32, true, false, false, 4},
      {6, 128, 16, 32, false, false, false, 4},  {4, 512, 32, 256, true, true, false, 5},
      {1, 512, 16, 256, true, false, false, 5},  {1, 1024, 64, 128, false, false, false, 5},
      {2, 512, 16, 256, true, false, false, 6},  {5, 256, 32, 64, false, false, true, 6},
      {4, 64, 16, 32, true, false, false, 6},    {1, 48, 16, 16, false, false, false, 6},
      // M > 1 strip paths (x86: 4-row integer strips with zero points folded into int16 lanes,
      // several phases per block for A8 with blocks > 32, one phase for A4; A16 6-row packed
      // strips): every M mod 4 / mod 6, odd N, K not a block multiple, zp on/off, TRIP shifts,
      // largest sums.
      {2, 100, 33, 32, true, true, true, 0},     {3, 90, 17, 16, false, true, false, 0},
      {5, 200, 31, 64, true, false, true, 0},    {7, 300, 47, 128, false, true, true, 0},
      {4, 520, 16, 256, true, true, false, 0},   {9, 129, 35, 16, true, false, true, 0},
      {11, 700, 18, 32, false, false, false, 0}, {8, 512, 32, 256, true, false, false, 6},
      {12, 1024, 20, 64, false, false, false, 6}, {8, 256, 17, 128, true, true, false, 5},
      {1, 256, 33, 32, true, true, false, 7},    {6, 192, 40, 64, false, false, true, 7},
      // x86 decode kernel with block 32 unrolled (no zero points) for 2 and 3 rows
      {2, 96, 33, 32, false, true, false, 2},    {3, 160, 40, 32, false, false, false, 6},
      // A16 same-sign products over long K (special 6: q = 15, rows of +-1; chunked float sums):
      // x86 1-row / 2-row / 6+4+3 strips, ARM 4-row and 1-row kernels, within the 1e-5 bound.
      {1, 1024, 16, 32, false, false, false, 6}, {2, 1024, 24, 128, true, true, false, 6},
      {1, 4096, 16, 16, true, false, false, 6},  {2, 4096, 17, 256, false, true, false, 6},
      {13, 4096, 20, 32, true, false, false, 6},
      // x86 two-pass strips (strip4_onephase): block 16 with the most blocks per 512-k chunk (32),
      // several chunks, zero points, a 1-row tail; max sums over several chunks, 8-row epilogue tail.
      {21, 1100, 40, 16, true, true, false, 0},  {12, 2048, 33, 32, true, false, false, 6},
  };
  if (!quick) {
    cases.push_back({64, 576, 96, 32, false, true, false, 0});
    cases.push_back({33, 1000, 70, 64, true, true, true, 0});
    cases.push_back({128, 256, 64, 32, true, false, false, 5});
    cases.push_back({600, 64, 600, 32, true, true, false, 0});    // A16: several tile groups
    cases.push_back({42, 4096, 24, 64, false, true, true, 0});    // int: several row blocks
    cases.push_back({128, 600, 37, 32, true, true, true, 0});     // prefill: odd N, K % 32 != 0
    cases.push_back({128, 1100, 48, 256, false, false, false, 5});
    cases.push_back({130, 2048, 40, 32, true, false, false, 5});  // several K chunks, tail strip
  }
  std::mt19937_64 rng(1234);
  int tested = 0;
  for (int i = 0; i < n; ++i) {
    const KernelTable& kt = *paths[i];
    if (!std::strcmp(kt.name, "ref")) continue;
    if (!only.empty() && only != kt.name) continue;
    const int before = g_failures;
    for (const Case& c : cases) run_case(kt, c, rng);
    swiglu_checks(kt, rng);
    f32_checks(kt, rng, quick);
    std::printf("path %s: %s (%zu cases)\n", kt.name, g_failures == before ? "ok" : "FAILED", cases.size());
    ++tested;
  }
  // The ref table against itself still exercises the harness (and is all a plain build has).
  if (tested == 0) {
    for (const Case& c : cases) run_case(ref_kernels(), c, rng);
    f32_checks(ref_kernels(), rng, quick);
    std::printf("path ref: %s\n", g_failures ? "FAILED" : "ok");
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
