// ARM-only kernel tables beyond the ones paths.h declares (neon, dotprod, i8mm).
#pragma once
#include "../kernels.h"

namespace llmfold {

// The non-default A4 variant of the v8.0 path ("neon-agile" while vmull_s8 is the default);
// identical to neon_kernels() for A16 and A8. Tests sweep it; LLMFOLD_KERNELS can force it.
const KernelTable& neon_alt_a4_kernels();

namespace arm {
// Out-of-line variants of the v8.0 integer block dots (instruction counting, tests).
void neon_int_block_dots_vmull(const QuantizedRows& A, int64_t M, int act_bits,
                               const PackedInt4& W, int64_t t0, int64_t t1, int32_t* dots);
void neon_int_block_dots_agile(const QuantizedRows& A, int64_t M, int act_bits,
                               const PackedInt4& W, int64_t t0, int64_t t1, int32_t* dots);
}  // namespace arm

}  // namespace llmfold
