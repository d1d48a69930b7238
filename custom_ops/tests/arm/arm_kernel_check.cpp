// ARM kernel check: every aarch64 path this CPU can run (neon with both A4 multipliers, dotprod,
// i8mm) against ref, plus the dispatch contract. Built statically by build_arm.sh and run under
// qemu-aarch64-static (tests/test_arm_kernels.py). Inputs sit flush against a PROT_NONE page so a
// read past any buffer end faults; outputs are surrounded by canaries.
//   arm_kernel_check --active          print the path dispatch chose (honours LLMFOLD_KERNELS)
//   arm_kernel_check --paths           print the runnable paths, best first
//   arm_kernel_check [--seed N]        run the sweep; prints one line per path and "ALL OK"
//   arm_kernel_check --unsafe-run NAME runs NAME's integer kernel without asking dispatch
//                                      (shows that a dotprod path dies on a core without it)
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/arm/arm_paths.h"
#include "../../kernels/paths.h"

using namespace llmfold;

namespace {

int g_failures = 0;
#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      if (++g_failures <= 30) {                                 \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);        \
        std::printf(__VA_ARGS__);                               \
        std::printf("\n");                                      \
      }                                                         \
    }                                                           \
  } while (0)

// A buffer whose last byte is followed by an inaccessible page.
template <class T>
struct Guarded {
  void* base = nullptr;
  size_t map_len = 0;
  T* p = nullptr;
  size_t n = 0;
  explicit Guarded(size_t count) : n(count) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = count * sizeof(T);
    const size_t data_pages = (bytes + page - 1) / page;
    map_len = (data_pages + 1) * page;
    base = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
      std::perror("mmap");
      std::exit(2);
    }
    char* guard = static_cast<char*>(base) + data_pages * page;
    if (mprotect(guard, page, PROT_NONE) != 0) {
      std::perror("mprotect");
      std::exit(2);
    }
    p = reinterpret_cast<T*>(guard - bytes);
  }
  ~Guarded() { munmap(base, map_len); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
};

struct Weights {
  int64_t K, N, bs, nb, nt, Kp, Np;
  bool has_zp;
  std::vector<int> q;  // logical [Kp][Np]
  Guarded<uint8_t>* data = nullptr;
  Guarded<uint16_t>* scales = nullptr;  // fp16 bits
  Guarded<uint8_t>* zps = nullptr;
  PackedInt4 view() const {
    return PackedInt4{data->p, scales->p, has_zp ? zps->p : nullptr, K, N, bs, nb, nt};
  }
  ~Weights() {
    delete data;
    delete scales;
    delete zps;
  }
};

// Packs per kernels.h. mode: 0 random, 1 all 0, 2 all 15, 3 alternate extremes.
Weights* make_weights(std::mt19937& rng, int64_t K, int64_t N, int64_t bs, bool has_zp, int mode,
                      bool zero_block) {
  auto* w = new Weights;
  w->K = K, w->N = N, w->bs = bs, w->has_zp = has_zp;
  w->nb = (K + bs - 1) / bs, w->nt = (N + 15) / 16, w->Kp = w->nb * bs, w->Np = w->nt * 16;
  std::vector<int> zp(w->nb * w->Np, 8);
  std::vector<float> sc(w->nb * w->Np, 0.f);
  std::uniform_int_distribution<int> q16(0, 15);
  std::uniform_real_distribution<float> u(0.001f, 0.1f);
  for (int64_t b = 0; b < w->nb; ++b)
    for (int64_t n = 0; n < w->Np; ++n) {
      if (n < N) {
        sc[b * w->Np + n] = u(rng);
        if (has_zp) zp[b * w->Np + n] = q16(rng);
      }
    }
  w->q.assign(w->Kp * w->Np, 8);
  for (int64_t k = 0; k < w->Kp; ++k)
    for (int64_t n = 0; n < w->Np; ++n) {
      const int64_t b = k / bs;
      int v;
      if (n >= N) v = 8;                     // padded column: q = 8, scale 0
      else if (k >= K) v = zp[b * w->Np + n];  // padded k row: q = zp
      else if (zero_block && b == 0) v = zp[b * w->Np + n];
      else if (mode == 1) v = 0;
      else if (mode == 2) v = 15;
      else if (mode == 3) v = ((k + n) & 1) ? 15 : 0;
      else v = q16(rng);
      w->q[k * w->Np + n] = v;
    }
  w->data = new Guarded<uint8_t>(w->nt * (w->Kp / 8) * 64);
  for (int64_t t = 0; t < w->nt; ++t)
    for (int64_t g = 0; g < w->Kp / 8; ++g)
      for (int c = 0; c < 16; ++c)
        for (int j = 0; j < 4; ++j) {
          const int64_t n = 16 * t + c, k0 = 8 * g;
          w->data->p[(t * (w->Kp / 8) + g) * 64 + 4 * c + j] = static_cast<uint8_t>(
              w->q[(k0 + j) * w->Np + n] | (w->q[(k0 + 4 + j) * w->Np + n] << 4));
        }
  w->scales = new Guarded<uint16_t>(w->nt * w->nb * 16);
  w->zps = new Guarded<uint8_t>(w->nt * w->nb * 16);
  for (int64_t t = 0; t < w->nt; ++t)
    for (int64_t b = 0; b < w->nb; ++b)
      for (int c = 0; c < 16; ++c) {
        w->scales->p[(t * w->nb + b) * 16 + c] = float_to_half(sc[b * w->Np + 16 * t + c]);
        w->zps->p[(t * w->nb + b) * 16 + c] = static_cast<uint8_t>(zp[b * w->Np + 16 * t + c]);
      }
  return w;
}

struct QRows {
  Guarded<int8_t> q;
  Guarded<float> scale;
  Guarded<int32_t> bsum;
  int64_t Kp, nb;
  QRows(int64_t M, int64_t Kp_, int64_t nb_) : q(M * Kp_), scale(M), bsum(M * nb_), Kp(Kp_), nb(nb_) {}
  QuantizedRows view() { return QuantizedRows{q.p, scale.p, bsum.p, Kp, nb}; }
};

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::memcmp(&a, &b, sizeof a) == 0;
}

bool close(float got, float want, double tol) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::fabs(static_cast<double>(got) - want) <= tol;
}

struct Case {
  int64_t M, K, N, bs;
  bool zp, shift;
  int wmode;       // make_weights mode
  int amode;       // 0 random, 1 zero row 0, 2 NaN in row 0, 3 Inf in row 0, 4 huge, 5 tiny, 6 mixed scales, 7 ties
  bool zero_block;
};

std::vector<float> make_acts(std::mt19937& rng, const Case& c) {
  std::vector<float> a(c.M * c.K);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t k = 0; k < c.K; ++k) {
      float v = nd(rng);
      if (c.amode == 4) v *= 1e30f;
      if (c.amode == 5) v *= 1e-29f;
      if (c.amode == 6) v *= (m % 3 == 0) ? 1e-3f : (m % 3 == 1 ? 1.f : 1e3f);
      a[m * c.K + k] = v;
    }
  if (c.amode == 7) {  // exact .5 ties after scaling: row m%2==0 has absmax 127 (A8 inv = 1),
    // odd rows absmax 7 (A4 inv = 1); round-half-even vs half-away differ on them.
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t k = 0; k < c.K; ++k) {
        const float top = (m % 2 == 0) ? 127.f : 7.f;
        a[m * c.K + k] = k == 0 ? top : static_cast<float>(static_cast<int>((k * 7 + m) % 13) - 6) + 0.5f;
      }
  }
  if (c.M > 0 && c.K > 0) {
    if (c.amode == 1) std::fill(a.begin(), a.begin() + c.K, 0.f);
    if (c.amode == 2) a[c.K / 2] = std::numeric_limits<float>::quiet_NaN();
    if (c.amode == 3) a[c.K - 1] = -std::numeric_limits<float>::infinity();
  }
  return a;
}

// Runs one case through every path; ref is paths[last].
void run_case(std::mt19937& rng, const Case& c, const std::vector<const KernelTable*>& paths,
              std::vector<int>& per_path_checks) {
  const KernelTable& ref = ref_kernels();
  Weights* w = make_weights(rng, c.K, c.N, c.bs, c.zp, c.wmode, c.zero_block);
  const PackedInt4 W = w->view();
  const int64_t Kp = w->Kp, nb = w->nb, nt = w->nt, Np = w->Np;
  const std::vector<float> a = make_acts(rng, c);
  Guarded<float> A(c.M * c.K);  // unpadded rows for quantize_rows (lda = K)
  std::memcpy(A.p, a.data(), sizeof(float) * a.size());
  Guarded<float> Ap(c.M * Kp);  // padded rows for gemm_a16
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t k = 0; k < Kp; ++k) Ap.p[m * Kp + k] = k < c.K ? a[m * c.K + k] : 0.f;
  Guarded<uint8_t> shift(c.K > 0 ? c.K : 1);
  std::uniform_int_distribution<int> sh(0, 15);
  for (int64_t k = 0; k < c.K; ++k) shift.p[k] = static_cast<uint8_t>(sh(rng));
  const uint8_t* shp = c.shift ? shift.p : nullptr;
  std::vector<float> bias(c.N);
  for (auto& b : bias) b = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  const int64_t ldc = c.N + 3;
  const float kCanary = 12345.f;

  // Tile ranges: everything, and a sub-range when there are >= 3 tiles.
  std::vector<std::pair<int64_t, int64_t>> ranges = {{0, nt}};
  if (nt >= 3) ranges.push_back({1, nt - 1});

  for (int act_bits : {8, 4}) {
    QRows rq(c.M, Kp, nb);
    ref.quantize_rows(A.p, c.K, c.K, 0, c.M, shp, act_bits, rq.view());
    for (size_t pi = 0; pi + 1 < paths.size(); ++pi) {
      const KernelTable& P = *paths[pi];
      QRows pq(c.M, Kp, nb);
      std::memset(pq.q.p, 0x5a, Kp * c.M);
      // quantize in two row ranges to exercise m_begin
      const int64_t split = c.M / 2;
      P.quantize_rows(A.p, c.K, c.K, 0, split, shp, act_bits, pq.view());
      P.quantize_rows(A.p, c.K, c.K, split, c.M, shp, act_bits, pq.view());
      CHECK(std::memcmp(pq.q.p, rq.q.p, c.M * Kp) == 0, "%s quantize q a%d M%ld K%ld amode%d",
            P.name, act_bits, (long)c.M, (long)c.K, c.amode);
      CHECK(std::memcmp(pq.bsum.p, rq.bsum.p, sizeof(int32_t) * c.M * nb) == 0,
            "%s quantize block_sum a%d", P.name, act_bits);
      for (int64_t m = 0; m < c.M; ++m)
        CHECK(same_float(pq.scale.p[m], rq.scale.p[m]), "%s quantize scale m%ld %g vs %g", P.name,
              (long)m, pq.scale.p[m], rq.scale.p[m]);
      per_path_checks[pi]++;

      for (auto [t0, t1] : ranges) {
        // integer block dots: bit-exact
        std::vector<int32_t> rd(c.M * nb * Np, -7), pd(c.M * nb * Np, -7);
        ref.int_block_dots(rq.view(), c.M, act_bits, W, t0, t1, rd.data());
        P.int_block_dots(rq.view(), c.M, act_bits, W, t0, t1, pd.data());
        CHECK(rd == pd, "%s int_block_dots a%d M%ld K%ld N%ld bs%ld tiles[%ld,%ld)", P.name,
              act_bits, (long)c.M, (long)c.K, (long)c.N, (long)c.bs, (long)t0, (long)t1);

        // gemm_int: within float rounding of the double ref epilogue
        for (const float* bp : {static_cast<const float*>(nullptr), static_cast<const float*>(bias.data())}) {
          std::vector<float> rc(c.M * ldc, kCanary), pc(c.M * ldc + 8, kCanary);
          ref.gemm_int(rq.view(), c.M, act_bits, W, t0, t1, bp, rc.data(), ldc);
          P.gemm_int(rq.view(), c.M, act_bits, W, t0, t1, bp, pc.data(), ldc);
          for (int64_t m = 0; m < c.M; ++m)
            for (int64_t n = 0; n < ldc; ++n) {
              const bool inside = n < c.N && n >= t0 * 16 && n < t1 * 16;
              const float got = pc[m * ldc + n], want = rc[m * ldc + n];
              if (!inside) {
                CHECK(got == kCanary, "%s gemm_int wrote outside m%ld n%ld", P.name, (long)m, (long)n);
                continue;
              }
              double mag = 0;
              for (int64_t b = 0; b < nb; ++b) {
                const int64_t dd = rd[(m * nb + b) * Np + n] -
                                   (c.zp ? w->zps->p[((n / 16) * nb + b) * 16 + n % 16] : 8) *
                                       rq.bsum.p[m * nb + b];
                mag += std::fabs(static_cast<double>(half_to_float(w->scales->p[((n / 16) * nb + b) * 16 + n % 16])) * dd);
              }
              mag *= std::fabs(rq.scale.p[m]);
              const double tol = 2e-6 * mag + (bp ? 1e-6 * std::fabs(bp[n]) : 0.0) + 1e-30;
              CHECK(close(got, want, tol), "%s gemm_int a%d m%ld n%ld got %.9g want %.9g", P.name,
                    act_bits, (long)m, (long)n, got, want);
            }
          for (int i = 0; i < 8; ++i) CHECK(pc[c.M * ldc + i] == kCanary, "%s gemm_int overran C", P.name);
        }
      }
    }
  }

  // A16: within 1e-5 of the absolute sum (the ref sums in double).
  for (size_t pi = 0; pi + 1 < paths.size(); ++pi) {
    const KernelTable& P = *paths[pi];
    for (auto [t0, t1] : ranges) {
      std::vector<float> rc(c.M * ldc, kCanary), pc(c.M * ldc + 8, kCanary);
      ref.gemm_a16(Ap.p, c.M, W, t0, t1, bias.data(), rc.data(), ldc);
      P.gemm_a16(Ap.p, c.M, W, t0, t1, bias.data(), pc.data(), ldc);
      for (int64_t m = 0; m < c.M; ++m)
        for (int64_t n = 0; n < ldc; ++n) {
          const bool inside = n < c.N && n >= t0 * 16 && n < t1 * 16;
          const float got = pc[m * ldc + n], want = rc[m * ldc + n];
          if (!inside) {
            CHECK(got == kCanary, "%s gemm_a16 wrote outside m%ld n%ld", P.name, (long)m, (long)n);
            continue;
          }
          double mag = std::fabs(bias[n]);
          for (int64_t k = 0; k < Kp; ++k) {
            const int64_t b = k / c.bs;
            const int zp = c.zp ? w->zps->p[((n / 16) * nb + b) * 16 + n % 16] : 8;
            mag += std::fabs(static_cast<double>(Ap.p[m * Kp + k]) *
                             half_to_float(w->scales->p[((n / 16) * nb + b) * 16 + n % 16]) * (w->q[k * Np + n] - zp));
          }
          CHECK(close(got, want, 1e-5 * mag + 1e-30), "%s gemm_a16 m%ld n%ld got %.9g want %.9g",
                P.name, (long)m, (long)n, got, want);
        }
      for (int i = 0; i < 8; ++i) CHECK(pc[c.M * ldc + i] == kCanary, "%s gemm_a16 overran C", P.name);
      per_path_checks[pi]++;
    }
  }
  delete w;
}

// A4 activations at the extremes of [-7, 7] against weights at 0 / 15: the worst case for the
// Agile-Quant byte fields (|sum| = 112 per field) and for int16 accumulation in the vmull path.
void adversarial_a4(const std::vector<const KernelTable*>& paths, std::mt19937& rng,
                    std::vector<int>& per_path_checks) {
  const KernelTable& ref = ref_kernels();
  for (int wmode : {1, 2, 3}) {
    for (int64_t M : {1, 2, 3}) {
      for (int64_t bs : {16, 256}) {
        const int64_t K = 2 * bs, N = 32;
        Weights* w = make_weights(rng, K, N, bs, false, wmode, false);
        QRows q(M, w->Kp, w->nb);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < w->Kp; ++k) {
            int v = (m % 2 == 0) ? -7 : 7;
            if (wmode == 3 && (k & 2)) v = -v;
            q.q.p[m * w->Kp + k] = static_cast<int8_t>(v);
          }
        for (int64_t m = 0; m < M; ++m) {
          q.scale.p[m] = 1.f;
          for (int64_t b = 0; b < w->nb; ++b) {
            int32_t s = 0;
            for (int64_t k = b * bs; k < (b + 1) * bs; ++k) s += q.q.p[m * w->Kp + k];
            q.bsum.p[m * w->nb + b] = s;
          }
        }
        std::vector<int32_t> rd(M * w->nb * w->Np), pd(M * w->nb * w->Np);
        ref.int_block_dots(q.view(), M, 4, w->view(), 0, w->nt, rd.data());
        for (size_t pi = 0; pi + 1 < paths.size(); ++pi) {
          std::fill(pd.begin(), pd.end(), 0);
          paths[pi]->int_block_dots(q.view(), M, 4, w->view(), 0, w->nt, pd.data());
          CHECK(rd == pd, "%s adversarial A4 wmode%d M%ld bs%ld", paths[pi]->name, wmode, (long)M, (long)bs);
          // A8 extremes: +-127 x 15 over a 256 block stress the vmull int16 chunking.
          per_path_checks[pi]++;
        }
        for (int64_t i = 0; i < M * w->Kp; ++i) q.q.p[i] = q.q.p[i] > 0 ? 127 : -127;
        ref.int_block_dots(q.view(), M, 8, w->view(), 0, w->nt, rd.data());
        for (size_t pi = 0; pi + 1 < paths.size(); ++pi) {
          std::fill(pd.begin(), pd.end(), 0);
          paths[pi]->int_block_dots(q.view(), M, 8, w->view(), 0, w->nt, pd.data());
          CHECK(rd == pd, "%s adversarial A8 wmode%d M%ld bs%ld", paths[pi]->name, wmode, (long)M, (long)bs);
        }
        delete w;
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  unsigned seed = 1234;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--active")) {
      std::printf("active: %s\n", active_kernels().name);
      return 0;
    }
    if (!std::strcmp(argv[i], "--paths")) {
      const KernelTable* p[16];
      const int n = available_kernels(p, 16);
      std::printf("paths:");
      for (int j = 0; j < n; ++j) std::printf(" %s", p[j]->name);
      std::printf("\n");
      return 0;
    }
    if (!std::strcmp(argv[i], "--unsafe-run") && i + 1 < argc) {
      const std::string name = argv[++i];
      const KernelTable* t = name == "dotprod" ? &dotprod_kernels()
                             : name == "i8mm"  ? &i8mm_kernels()
                             : name == "neon"  ? &neon_kernels()
                                               : nullptr;
      if (!t) return 2;
      std::mt19937 rng(1);
      Weights* w = make_weights(rng, 64, 16, 32, false, 0, false);
      QRows q(2, w->Kp, w->nb);
      for (int64_t k = 0; k < 2 * w->Kp; ++k) q.q.p[k] = static_cast<int8_t>(k % 7);
      std::vector<int32_t> d(2 * w->nb * w->Np);
      t->int_block_dots(q.view(), 2, 8, w->view(), 0, w->nt, d.data());
      std::printf("ran %s: dot[0] = %d\n", t->name, d[0]);
      delete w;
      return 0;
    }
    if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = static_cast<unsigned>(std::atoi(argv[++i]));
  }
  const KernelTable* p[16];
  const int n = available_kernels(p, 16);
  std::vector<const KernelTable*> paths(p, p + n);
  if (paths.empty() || std::strcmp(paths.back()->name, "ref") != 0) {
    std::printf("FAIL: ref is not the last path\n");
    return 1;
  }
  std::printf("active: %s\npaths:", active_kernels().name);
  for (auto* t : paths) std::printf(" %s", t->name);
  std::printf("\n");
  std::vector<int> checks(paths.size(), 0);
  std::mt19937 rng(seed);

  std::vector<Case> cases;
  for (int64_t bs : {16, 32, 64, 128, 256})
    for (int64_t M : {1, 2, 3, 5})
      for (int64_t N : {1, 17, 48})
        for (int64_t K : {bs, 3 * bs - 5, 2 * bs + 8})
          cases.push_back({M, K, N, bs, (M + N) % 2 == 0, (K + M) % 3 == 0, 0, 0, false});
  for (int amode = 1; amode <= 7; ++amode)
    for (int64_t M : {1, 4})
      cases.push_back({M, 100, 33, 32, amode % 2 == 1, amode == 6, 0, amode, false});
  for (int wmode = 1; wmode <= 3; ++wmode) cases.push_back({3, 96, 40, 32, true, false, wmode, 0, true});
  cases.push_back({7, 1, 16, 16, false, false, 0, 0, false});  // K = 1
  cases.push_back({2, 576, 70, 32, false, true, 0, 0, false});
  cases.push_back({70, 80, 20, 16, true, false, 0, 6, false});  // > 64 rows: A16 accumulator chunks
  cases.push_back({1, 600, 20, 256, true, false, 0, 0, true});
  for (const Case& c : cases) run_case(rng, c, paths, checks);
  adversarial_a4(paths, rng, checks);

  for (size_t i = 0; i + 1 < paths.size(); ++i)
    std::printf("path %-11s %d checks\n", paths[i]->name, checks[i]);
  if (g_failures) {
    std::printf("FAILED: %d failures\n", g_failures);
    return 1;
  }
  std::printf("ALL OK (%zu cases)\n", cases.size());
  return 0;
}
