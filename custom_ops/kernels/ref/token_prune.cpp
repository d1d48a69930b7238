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
  double x = static_cast<double>(keep_ratio) * static_cast<double>(T);
  x = x * (1.0 + std::ldexp(1.0, -20));
  const double k = std::floor(x);
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

void token_prune_scores_from_probs(const float* P, int64_t H, int64_t T, int64_t S, TokenPruneScore mode,
                                   double* score) {
  for (int64_t t = 0; t < T; ++t) score[t] = 0.0;
  for (int64_t h = 0; h < H; ++h) {
    const float* Ph = P + h * T * S;
    if (mode == TokenPruneScore::kFirstToken) {
      for (int64_t t = 0; t < T; ++t) score[t] += Ph[t * S];
    } else {
      for (int64_t q = 0; q < T; ++q)
        for (int64_t t = 0; t < T; ++t) score[t] += Ph[q * S + (S - T) + t];
    }
  }
  if (mode == TokenPruneScore::kColumnSum)
    for (int64_t t = 0; t < T; ++t) score[t] /= static_cast<double>(T - t);
}

void token_prune_head_scores(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t T,
                             int64_t d, float scale, TokenPruneScore mode, double* row, double* out) {
  // K transposed (kt[c][j] = k_j[c]) so that the logits of one query row are d passes of an axpy over
  // the keys j <= t (contiguous, vectorizable); each logit still sums c = 0..d-1 in order, in double.
  std::vector<float> kt(static_cast<size_t>(d * T));
  for (int64_t j = 0; j < T; ++j)
    for (int64_t c = 0; c < d; ++c) kt[static_cast<size_t>(c * T + j)] = k[j * k_stride + c];
  for (int64_t t = 0; t < T; ++t) out[t] = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const float* qt = q + t * q_stride;
    // logits of query t against keys 0..t
    for (int64_t j = 0; j <= t; ++j) row[j] = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      const double qc = static_cast<double>(qt[c]);
      const float* kc = kt.data() + c * T;
      for (int64_t j = 0; j <= t; ++j) row[j] += qc * static_cast<double>(kc[j]);
    }
    double m = -INFINITY;
    for (int64_t j = 0; j <= t; ++j) {
      row[j] = static_cast<double>(scale) * row[j];
      m = std::max(m, row[j]);  // (a NaN logit propagates through the sum below)
    }
    double z = 0.0;
    for (int64_t j = 0; j <= t; ++j) {
      row[j] = std::exp(row[j] - m);
      z += row[j];
    }
    if (mode == TokenPruneScore::kFirstToken) {
      out[t] = row[0] / z;
    } else {
      for (int64_t j = 0; j <= t; ++j) out[j] += row[j] / z;
    }
  }
}

void token_prune_combine_heads(const double* head, int64_t H, int64_t T, TokenPruneScore mode, double* score) {
  for (int64_t t = 0; t < T; ++t) score[t] = 0.0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t) score[t] += head[h * T + t];
  if (mode == TokenPruneScore::kColumnSum)
    for (int64_t t = 0; t < T; ++t) score[t] /= static_cast<double>(T - t);
}

void token_prune_scores_from_qk(const float* q, const float* k, int64_t T, int64_t H, int64_t Hkv, int64_t d,
                                float scale, TokenPruneScore mode, double* scratch, double* score) {
  const int64_t group = H / Hkv;
  double* row = scratch;
  double* head = scratch + T;
  for (int64_t h = 0; h < H; ++h)
    token_prune_head_scores(q + h * d, H * d, k + (h / group) * d, Hkv * d, T, d, scale, mode, row, head + h * T);
  token_prune_combine_heads(head, H, T, mode, score);
}

}  // namespace llmfold
