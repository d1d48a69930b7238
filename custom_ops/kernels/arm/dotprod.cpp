// ARMv8.2 dotprod path (sdot, vdotq_laneq_s32); this file alone is compiled with
// -march=armv8.2-a+dotprod and only runs after dispatch saw HWCAP_ASIMDDP.
// quantize_rows, gemm_a16 and swiglu are the v8.0 ones (no dot product involved).
#include "arm_dot.h"
#include "../paths.h"

namespace llmfold {
namespace arm {
namespace {

void dotprod_int_block_dots(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                            int64_t t0, int64_t t1, int32_t* dots) {
  int_block_dots_impl(A, M, act_bits, W, t0, t1, dots, SdotKern4{}, SdotKern2{}, SdotKern1{});
}

void dotprod_gemm_int(const QuantizedRows& A, int64_t M, int act_bits, const PackedInt4& W,
                      int64_t t0, int64_t t1, const float* bias, float* C, int64_t ldc) {
  gemm_int_impl(A, M, act_bits, W, t0, t1, bias, C, ldc, SdotKern4{}, SdotKern2{}, SdotKern1{});
}

}  // namespace
}  // namespace arm

const KernelTable& dotprod_kernels() {
  static const KernelTable t{"dotprod", arm::neon_quantize_rows, arm::neon_gemm_a16,
                             arm::dotprod_gemm_int, arm::dotprod_int_block_dots, arm::neon_swiglu,
                             arm::neon_gemm_f32};
  return t;
}

}  // namespace llmfold
