// Instruction counting driver: calls one integer kernel variant `reps` times on one shape.
// count_insns.sh runs it under qemu with -d in_asm,exec,nochain for reps = 1 and 2; the difference
// is the dynamic instruction count of exactly one call (setup cancels out).
//   arm_insn_count VARIANT ACT_BITS M K N BLOCK REPS    VARIANT: vmull | agile | dotprod | i8mm
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/arm/arm_paths.h"
#include "../../kernels/paths.h"

using namespace llmfold;

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s vmull|agile|dotprod|i8mm ACT_BITS M K N BLOCK REPS\n", argv[0]);
    return 2;
  }
  const std::string v = argv[1];
  const int act_bits = std::atoi(argv[2]);
  const int64_t M = std::atoll(argv[3]), K = std::atoll(argv[4]), N = std::atoll(argv[5]),
                bs = std::atoll(argv[6]);
  const int reps = std::atoi(argv[7]);
  const int64_t nb = (K + bs - 1) / bs, Kp = nb * bs, nt = (N + 15) / 16, Np = nt * 16;
  std::mt19937 rng(7);
  std::vector<uint8_t> data(nt * (Kp / 8) * 64);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::vector<uint16_t> scales(nt * nb * 16, float_to_half(0.01f));
  std::vector<int8_t> q(M * Kp);
  const int qmax = act_bits == 4 ? 7 : 127;
  for (auto& x : q) x = static_cast<int8_t>(static_cast<int>(rng() % (2 * qmax + 1)) - qmax);
  std::vector<float> sc(M, 1.f);
  std::vector<int32_t> bsum(M * nb, 0), dots(M * nb * Np);
  const PackedInt4 W{data.data(), scales.data(), nullptr, K, N, bs, nb, nt};
  const QuantizedRows A{q.data(), sc.data(), bsum.data(), Kp, nb};
  void (*fn)(const QuantizedRows&, int64_t, int, const PackedInt4&, int64_t, int64_t, int32_t*) =
      v == "vmull"   ? arm::neon_int_block_dots_vmull
      : v == "agile" ? arm::neon_int_block_dots_agile
      : v == "dotprod" ? dotprod_kernels().int_block_dots
      : v == "i8mm"  ? i8mm_kernels().int_block_dots
                     : nullptr;
  if (!fn) return 2;
  for (int r = 0; r < reps; ++r) fn(A, M, act_bits, W, 0, nt, dots.data());
  long long s = 0;
  for (int32_t d : dots) s += d;
  std::printf("%s a%d M%lld K%lld N%lld bs%lld macs %lld checksum %lld\n", v.c_str(), act_bits,
              (long long)M, (long long)Kp, (long long)Np, (long long)bs, (long long)(M * Kp * Np), s);
  return 0;
}
