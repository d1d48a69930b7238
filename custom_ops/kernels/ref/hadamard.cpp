// Online block Hadamard transform (see hadamard.h for the math).
//
// The stages run in the order of the definition (len = 1, 2, 4, ... h/2), each (u, v) -> (u + v,
// u - v), so every path and the numpy reference round identically. Speed without ISA code: the
// first three stages are one unrolled radix-8 step per 8 floats (the same additions in the same
// order), and every later stage pairs two contiguous runs of len >= 8 floats, a loop the compiler
// vectorizes (restrict: the runs never overlap); on x86 it is also compiled for AVX2 and picked at
// load time (target_clones).
#include "hadamard.h"

#include <cstring>

namespace llmfold {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMFOLD_HADAMARD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LLMFOLD_HADAMARD_CLONES
#endif

// (u, v) -> (u + v, u - v) over two disjoint runs of n floats.
inline __attribute__((always_inline)) void butterfly_run(float* __restrict u, float* __restrict v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float s = u[j], d = v[j];
    u[j] = s + d;
    v[j] = s - d;
  }
}

LLMFOLD_HADAMARD_CLONES
void butterfly_stages(float* x, int64_t K, int64_t h, int64_t first_len) {
  for (int64_t b = 0; b < K; b += h)
    for (int64_t len = first_len; len < h; len <<= 1) {
      if (len == 8) {  // a constant run length: one vector pair (AVX2) per run, no loop overhead
        for (int64_t i = b; i < b + h; i += 16) butterfly_run(x + i, x + i + 8, 8);
      } else {
        for (int64_t i = b; i < b + h; i += 2 * len) butterfly_run(x + i, x + i + len, len);
      }
    }
}

}  // namespace

void hadamard_rows(const float* A, int64_t lda, float* dst, int64_t ldd, int64_t K, int64_t h, int64_t m0,
                   int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* x = dst + m * ldd;
    if (x != A + m * lda) std::memcpy(x, A + m * lda, sizeof(float) * static_cast<size_t>(K));
    int64_t first_len = 1;
    if (h >= 8) {  // stages len = 1, 2, 4 within each 8 floats, the same additions in the same order
      for (int64_t k = 0; k < K; k += 8) {
        float* y = x + k;
        float t[8];
        for (int i = 0; i < 8; i += 2) t[i] = y[i] + y[i + 1], t[i + 1] = y[i] - y[i + 1];
        for (int i = 0; i < 8; i += 4)
          for (int j = i; j < i + 2; ++j) {
            const float u = t[j], v = t[j + 2];
            t[j] = u + v;
            t[j + 2] = u - v;
          }
        for (int j = 0; j < 4; ++j) y[j] = t[j] + t[j + 4], y[j + 4] = t[j] - t[j + 4];
      }
      first_len = 8;
    } else if (h == 2) {
      for (int64_t k = 0; k < K; k += 2) {
        const float u = x[k], v = x[k + 1];
        x[k] = u + v;
        x[k + 1] = u - v;
      }
      first_len = 2;
    } else if (h == 4) {
      for (int64_t k = 0; k < K; k += 4) {
        const float s0 = x[k] + x[k + 1], d0 = x[k] - x[k + 1], s1 = x[k + 2] + x[k + 3], d1 = x[k + 2] - x[k + 3];
        x[k] = s0 + s1;
        x[k + 1] = d0 + d1;
        x[k + 2] = s0 - s1;
        x[k + 3] = d0 - d1;
      }
      first_len = 4;
    }
    butterfly_stages(x, K, h, first_len);
  }
}

}  // namespace llmfold
