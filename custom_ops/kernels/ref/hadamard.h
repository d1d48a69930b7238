// Online block Hadamard transform of activation rows (QMatMul attribute `hadamard`).
//
//   x'[k] = sum_j x[j] * H_h[j mod h][k mod h]  over the j of k's block (blocks of h consecutive k),
//
// H_h the Sylvester Hadamard matrix of order h (a power of two): H_1 = [1],
// H_2n = [[H_n, H_n], [H_n, -H_n]], entries +-1, symmetric, H_h * H_h = h * I. Unnormalized: the
// compiler folds H_h / h into the weight rows (X W = (X H)(H W / h)), so the op only adds and
// subtracts. The butterfly below (log2 h stages of x[j], x[j+len] -> x[j]+x[j+len], x[j]-x[j+len])
// computes exactly this product; its float rounding differs from a dense product by a few ulps.
// Portable C++ used by every ISA path: O(K log h) per row against the K*N of the matmul.
#pragma once
#include <cstdint>

namespace llmfold {

// Rows [m0, m1) of A (row stride lda) transformed into dst (row stride ldd), K a multiple of h.
void hadamard_rows(const float* A, int64_t lda, float* dst, int64_t ldd, int64_t K, int64_t h, int64_t m0,
                   int64_t m1);

}  // namespace llmfold
