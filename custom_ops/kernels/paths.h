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

inline float shift_factor(uint8_t s) {  // exact 2^-s for s in [0, 15]
  return 1.0f / static_cast<float>(1u << (s & 15));
}

}  // namespace llmfold
