// Picks the kernel path once per process from CPU features. LLMFOLD_KERNELS=<name> forces a path
// (tests); an unknown name or one this CPU cannot run falls back to the best path with a warning.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "paths.h"
#if defined(__aarch64__) && defined(LLMFOLD_HAVE_ARM_KERNELS)
#include "arm/arm_paths.h"
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace llmfold {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

struct X86Features {
  bool avx2_fma_f16c = false, avx512vnni = false;
};

X86Features detect_x86() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;             // SSE + AVX state saved by the OS
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;           // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31), vnni = c & (1u << 11);
  f.avx2_fma_f16c = os_ymm && avx2 && fma && f16c;  // f16c: the fp16 block scales
  f.avx512vnni = f.avx2_fma_f16c && os_zmm && avx512f && avx512bw && avx512vl && vnni;
  return f;
}
#endif

// Fills out with the paths this CPU can run, best first. Returns the count.
int runnable_paths(const KernelTable** out, int max_out) {
  const KernelTable* list[8];
  int n = 0;
#if defined(__x86_64__) || defined(_M_X64)
  const X86Features f = detect_x86();
  if (f.avx512vnni) list[n++] = &avx512vnni_kernels();
  if (f.avx2_fma_f16c) list[n++] = &avx2_kernels();
#endif
#if defined(__aarch64__)
  // ARM slot (owned with kernels/arm/): ASIMD is baseline on aarch64; dotprod and i8mm only when
  // the kernel reports them (HWCAP_ASIMDDP, HWCAP2_I8MM), so one binary is safe on a Cortex-A72.
#if defined(LLMFOLD_HAVE_ARM_KERNELS)
  unsigned long hw = 0, hw2 = 0;
#if defined(__linux__)
  hw = getauxval(AT_HWCAP);
  hw2 = getauxval(AT_HWCAP2);
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1ul << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1ul << 13)
#endif
  const bool dotprod = hw & HWCAP_ASIMDDP;
  const bool i8mm = hw2 & HWCAP2_I8MM;
  if (dotprod && i8mm) list[n++] = &i8mm_kernels();  // i8mm's M=1 rows use sdot
  if (dotprod) list[n++] = &dotprod_kernels();
  list[n++] = &neon_kernels();
  list[n++] = &neon_alt_a4_kernels();  // the other A4 multiplier (tests sweep both)
#endif
#endif
  list[n++] = &ref_kernels();
  int m = 0;
  for (int i = 0; i < n && m < max_out; ++i) out[m++] = list[i];
  return m;
}

const KernelTable& choose() {
  const KernelTable* paths[8] = {};
  const int n = runnable_paths(paths, 8);
  const char* want = std::getenv("LLMFOLD_KERNELS");
  if (want && *want) {
    for (int i = 0; i < n; ++i)
      if (std::strcmp(paths[i]->name, want) == 0) return *paths[i];
    std::fprintf(stderr, "llmfold: LLMFOLD_KERNELS=%s is unknown or unsupported on this CPU; using %s\n",
                 want, paths[0]->name);
  }
  return *paths[0];
}

}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable& t = choose();
  return t;
}

int available_kernels(const KernelTable** out, int max_out) { return runnable_paths(out, max_out); }

}  // namespace llmfold
