#include "token_prune.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace llmfold {

int64_t token_prune_clamp_keep(int64_t keep, int64_t T) {
  if (T <= 2) return T;
  return std::min<int64_t>(std::max<int64_t>(keep, 2), T);
}

int64_t token_prune_keep_from_ratio(float keep_ratio, int64_t T) {
  const double k = std::ceil(static_cast<double>(keep_ratio) * static_cast<double>(T));
  if (!(k < static_cast<double>(T))) return token_prune_clamp_keep(T, T);  // also NaN
  return token_prune_clamp_keep(k > 0 ? static_cast<int64_t>(k) : 0, T);
}

void token_prune_select(const double* scores, int64_t T, int64_t keep, int64_t* out) {
  if (keep >= T) {
    for (int64_t t = 0; t < T; ++t) out[t] = t;
    return;
  }
  // Candidates 1..T-2; "a before b" when a's score is higher (NaN lowest), then lower index.
  std::vector<int64_t> cand(static_cast<size_t>(T - 2));
  std::iota(cand.begin(), cand.end(), int64_t{1});
  auto better = [scores](int64_t a, int64_t b) {
    const double sa = scores[a], sb = scores[b];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return nb;           // a number beats NaN
    if (!na && sa != sb) return sa > sb;
    return a < b;
  };
  const int64_t extra = keep - 2;
  std::partial_sort(cand.begin(), cand.begin() + extra, cand.end(), better);
  cand.resize(static_cast<size_t>(extra));
  cand.push_back(0);
  cand.push_back(T - 1);
  std::sort(cand.begin(), cand.end());
  std::copy(cand.begin(), cand.end(), out);
}

}  // namespace llmfold
