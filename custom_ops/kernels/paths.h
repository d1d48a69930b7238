// Internal: the kernel tables each ISA file defines, and small helpers shared by the paths.
// dispatch.cpp references only the tables compiled for the target architecture:
//   x86-64:  ref_kernels(), avx2_kernels(), avx512vnni_kernels()
//   aarch64: ref_kernels(), neon_kernels(), dotprod_kernels(), i8mm_kernels()
// A path's file must only be executed after dispatch checked the CPU features; its table accessor
// is plain C++ (no ISA instructions) so calling it is always safe.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace llmfold {

const KernelTable& ref_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& avx2_kernels();
const KernelTable& avx512vnni_kernels();
#endif
#if defined(__aarch64__)
const KernelTable& neon_kernels();
const KernelTable& dotprod_kernels();
const KernelTable& i8mm_kernels();
#endif

// Row quantization rule shared by every path (the ref implementation is the specification):
//   x'_k = x_k * 2^-shift_k (float multiply), absmax = max |x'_k| over k < K.
//   Non-finite row (any NaN/Inf): q = 0, block sums 0, scale = NaN (the row's outputs become NaN).
//   absmax < kTinyAbsmax (incl. all-zero rows): q = 0, scale = 0.
//   Otherwise inv = qmax / absmax (float division), q_k = rne(clamp(x'_k * inv, -qmax, qmax)),
//   scale = absmax / qmax (float division).
constexpr float kTinyAbsmax = 1e-30f;

// The SIMD paths' SwiGLU epilogue (KernelTable::swiglu; the ref uses std::exp): silu(g)·u =
// g / (1 + exp(x)) · u in the ref's order, x = -g clamped to [kSwigluXMin, kSwigluXMax], and
// exp(x) = 2^n · e^r with n = round(x · log2 e), r = x - n·ln2 (ln2 in two parts so that n·ln2 is
// exact), e^r by its degree-6 Taylor polynomial (relative error < 2e-7 for |r| <= ln2/2), 2^n built
// in the exponent bits. Clamp: below -80, 1 + e^x is 1 anyway, and near -87 the product p·2^n would
// be subnormal, which x86 computes in microcode (SmolLM2's massive-activation gates reach there;
// at -87 a 512-token MLP took 3x as long); above 88.72, n = 128 gives the +inf bit pattern, so
// exp overflows as the ref's does (g < -88.72 gives -0 as there). NaN in g reaches the quotient.
constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpLn2Hi = 0.693145751953125f, kExpLn2Lo = 1.428606765330187045e-06f;
constexpr float kExpTaylor[7] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};  // r^6 first
constexpr float kSwigluXMin = -80.0f, kSwigluXMax = 89.0f;

// IEEE binary16 bits to float (exact: every half is a float). The SIMD paths convert with
// vcvtph2ps / FCVTL; this is the scalar specification they match.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 0x1F ? 0x7F800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Float to binary16, round to nearest even (as numpy's astype(float16), which the Python packer
// uses): beyond the largest half (65504) to inf, NaN stays NaN. The kernels never convert this
// way; the C++ tests and benchmarks build their fp16 scales with it.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | 0x7C00u | (x > 0x7F800000u ? 0x200u : 0u);
  if (x >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                        // below 2^-14: a subnormal half, units of 2^-24
    float a;
    std::memcpy(&a, &x, sizeof a);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));  // exact product; RNE
  }
  const uint32_t r = x - (112u << 23);  // rebias 127 -> 15, then round 23 -> 10 mantissa bits
  return sign | static_cast<uint16_t>((r + 0xFFFu + ((r >> 13) & 1u)) >> 13);
}

// n elements of v (grown as needed) from a 64-byte boundary: a load that straddles two cache
// lines costs two. The x86 paths keep per-thread scratch this way; the benchmarks place the packed
// weights this way, as ONNX Runtime places initializers.
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  const size_t pad = 64 / sizeof(T);
  if (v.size() < n + pad) v.resize(n + pad);
  const uintptr_t a = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((a + 63) & ~uintptr_t{63});
}

inline float shift_factor(uint8_t s) {  // exact 2^-s for s in [0, 15]
  return 1.0f / static_cast<float>(1u << (s & 15));
}

}  // namespace llmfold
