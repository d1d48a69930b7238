// Microbenchmark of the active kernel path without ONNX Runtime (single thread), for tuning: QMatMul's
// A8/A4/A16 kernels and PackedMatMul's float32 one on the same shape.
// Usage: llmfold_kernel_bench M K N [block_size] [reps] [col_tasks] [copies] [zero_points]   -> min / median thread-CPU
// microseconds per call. col_tasks > 1 splits the column tiles into that many calls, one after the other, as
// the ORT glue's task grid does with one thread (each call repeats its per-call setup: activation packing).
// copies > 1 keeps that many copies of the weights and calls them in turn (a call's weights then come from
// DRAM when the copies exceed the last-level cache, as in a decode step); times are per call.
// zero_points = 1 gives the int4 weights random zero points (the recipes' asymmetric blocks).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <time.h>
#include <vector>

#include "kernels.h"
#include "paths.h"

using namespace llmfold;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s M K N [block_size] [reps] [col_tasks] [copies] [zero_points]\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[1]), K = std::atoll(argv[2]), N = std::atoll(argv[3]);
  const int64_t bs = argc > 4 ? std::atoll(argv[4]) : 32;
  const int reps = argc > 5 ? std::atoi(argv[5]) : 20;
  const int64_t col_tasks = argc > 6 ? std::max<int64_t>(1, std::atoll(argv[6])) : 1;
  const int64_t copies = argc > 7 ? std::max<int64_t>(1, std::atoll(argv[7])) : 1;
  const bool with_zp = argc > 8 && std::atoi(argv[8]) != 0;
  const int64_t nb = (K + bs - 1) / bs, Kp = nb * bs, nt = (N + 15) / 16;
  std::mt19937 rng(1);
  // 64-byte aligned, as ONNX Runtime places initializers: a large std::vector comes from mmap at a
  // page + 16 bytes, where every 64-byte weight load straddles two cache lines (which made the
  // M = 1 loop look load-bound here and not in ORT).
  std::vector<uint8_t> data_store;
  uint8_t* const data = scratch(data_store, static_cast<size_t>(copies * nt * Kp / 8 * 64));
  for (int64_t i = 0; i < copies * nt * Kp / 8 * 64; ++i) data[i] = static_cast<uint8_t>(rng());
  std::vector<uint16_t> scales(static_cast<size_t>(copies * nt * nb * 16), float_to_half(0.01f));
  std::vector<uint8_t> zps(with_zp ? static_cast<size_t>(copies * nt * nb * 16) : 0);
  for (auto& z : zps) z = static_cast<uint8_t>(rng() & 15);
  std::vector<float> A(static_cast<size_t>(M * Kp)), C(static_cast<size_t>(M * N));
  std::uniform_real_distribution<float> U(-1, 1);
  for (auto& v : A) v = U(rng);
  int64_t copy = 0;  // the copy the next call reads
  auto weights = [&] {
    const int64_t c = copy;
    copy = (copy + 1) % copies;
    return PackedInt4{data + c * nt * Kp / 8 * 64, scales.data() + c * nt * nb * 16,
                      with_zp ? zps.data() + c * nt * nb * 16 : nullptr, K, N, bs, nb, nt};
  };
  std::vector<int8_t> q(static_cast<size_t>(M * Kp));
  std::vector<float> qs(static_cast<size_t>(M));
  std::vector<int32_t> bsum(static_cast<size_t>(M * nb));
  const QuantizedRows Q{q.data(), qs.data(), bsum.data(), Kp, nb};
  const KernelTable& kt = active_kernels();
  auto time_it = [&](auto&& fn) {
    // Thread CPU time: robust when other processes share the cores. Reading it is a system call
    // (≈ 1.2 us in a VM), so one sample is `inner` rounds of one call of each copy in turn, sized
    // to >= 100 us, and the timer's own cost stays out of the per-call figure.
    auto cpu_us = [] {
      timespec t;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
      return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
    };
    int64_t inner = 1;
    for (;;) {
      const double a = cpu_us();
      for (int64_t i = 0; i < inner; ++i)
        for (int64_t c = 0; c < copies; ++c) fn();
      if (cpu_us() - a >= 100.0 || inner >= (int64_t(1) << 20)) break;
      inner *= 2;
    }
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
      const double a = cpu_us();
      for (int64_t i = 0; i < inner; ++i)
        for (int64_t c = 0; c < copies; ++c) fn();
      t.push_back((cpu_us() - a) / double(inner * copies));
    }
    std::sort(t.begin(), t.end());
    return std::make_pair(t.front(), t[t.size() / 2]);
  };
  const double wbytes = static_cast<double>(K) * N / 2;
  for (int bits : {8, 4}) {
    auto r = time_it([&] {
      kt.quantize_rows(A.data(), Kp, K, 0, M, nullptr, bits, Q);
      const PackedInt4 W = weights();
      for (int64_t t0 = 0; t0 < nt; t0 += (nt + col_tasks - 1) / col_tasks)
        kt.gemm_int(Q, M, bits, W, t0, std::min(nt, t0 + (nt + col_tasks - 1) / col_tasks), nullptr, C.data(), N);
    });
    std::printf("%s a%d  M=%lld K=%lld N=%lld: min %.1f us  median %.1f us  (%.2f GB/s int4, %.1f GMAC/s)\n", kt.name,
                bits, (long long)M, (long long)K, (long long)N, r.first, r.second, wbytes / r.first / 1e3,
                double(M) * K * N / r.first / 1e3);
  }
  {
    auto q8 = time_it([&] { kt.quantize_rows(A.data(), Kp, K, 0, M, nullptr, 8, Q); });
    std::printf("%s quantize_rows M=%lld K=%lld: min %.1f us\n", kt.name, (long long)M, (long long)K, q8.first);
  }
  auto r = time_it([&] {
    const PackedInt4 W = weights();
    for (int64_t t0 = 0; t0 < nt; t0 += (nt + col_tasks - 1) / col_tasks)
      kt.gemm_a16(A.data(), M, W, t0, std::min(nt, t0 + (nt + col_tasks - 1) / col_tasks), nullptr, C.data(), N);
  });
  std::printf("%s a16 M=%lld K=%lld N=%lld: min %.1f us  median %.1f us  (%.2f GB/s int4, %.1f GMAC/s)\n", kt.name,
              (long long)M, (long long)K, (long long)N, r.first, r.second, wbytes / r.first / 1e3,
              double(M) * K * N / r.first / 1e3);
  // PackedMatMul's float32 tiles: copies of K x N floats (the same rotation as above)
  std::vector<float> fstore;
  const int64_t fsize = nt * K * kTileN;
  float* const fdata = scratch(fstore, static_cast<size_t>(copies * fsize));
  for (int64_t i = 0; i < copies * fsize; ++i) fdata[i] = U(rng);
  int64_t fcopy = 0;
  auto f = time_it([&] {
    const PackedFloat W{fdata + fcopy * fsize, K, N, nt};
    fcopy = (fcopy + 1) % copies;
    for (int64_t t0 = 0; t0 < nt; t0 += (nt + col_tasks - 1) / col_tasks)
      kt.gemm_f32(A.data(), K, M, W, t0, std::min(nt, t0 + (nt + col_tasks - 1) / col_tasks), nullptr, C.data(), N);
  });
  std::printf("%s f32 M=%lld K=%lld N=%lld: min %.1f us  median %.1f us  (%.2f GB/s float32, %.1f GMAC/s)\n", kt.name,
              (long long)M, (long long)K, (long long)N, f.first, f.second, 4.0 * K * N / f.first / 1e3,
              double(M) * K * N / f.first / 1e3);
  return 0;
}
