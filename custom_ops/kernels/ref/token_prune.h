// TokenPrune selection rule (Agile-Quant token pruning). The ORT op and the numpy reference
// (compiler/custom_ops.py: token_prune_reference) follow exactly this.
//
//   score[t]  = importance[b][t] as given, or from attention probabilities P [B,H,T,S] (the last T
//               key columns are this step's tokens), or computed here from post-RoPE queries and keys
//               of this step's tokens (causal softmax attention, see token_prune_head_scores), as
//                 first_token: sum over h = 0..H-1 (in that order, in double) of P[b][h][t][0]
//                              (attention of query t to the first key), the paper's score;
//                 column_sum:  sum_h sum_q P[b][h][q][S-T+t] / (T - t) (attention key t receives,
//                              normalized by the number of causal queries that can see it).
//   keep      = keep_count input, else floor(double(keep_ratio) * T * (1 + 2^-20)); then clamped to
//               [2, T] (T <= 2 keeps every token). The factor (1 + 2^-20) only keeps a product that
//               is mathematically an integer (0.7 * 10) from being floored one below because the
//               float32 ratio is a hair under the decimal one; floor guarantees at most ratio*T kept.
//   selection = token 0 and token T-1, plus the keep-2 best of tokens 1..T-2 ranked by score
//               descending, NaN ranked below every number, ties (equal scores, or both NaN) broken
//               by lower index. Output indices in ascending original order.
#pragma once
#include <cstdint>

namespace llmfold {

enum class TokenPruneScore : int { kFirstToken = 0, kColumnSum = 1 };

int64_t token_prune_keep_from_ratio(float keep_ratio, int64_t T);
int64_t token_prune_clamp_keep(int64_t keep, int64_t T);
// scores: T values; out: keep indices (keep already clamped), ascending.
void token_prune_select(const double* scores, int64_t T, int64_t keep, int64_t* out);

// Scores of one batch row from attention probabilities P [H][T][S] (row-major, S >= T).
void token_prune_scores_from_probs(const float* P, int64_t H, int64_t T, int64_t S, TokenPruneScore mode,
                                   double* score);

// One head's contribution from queries and keys (no past: query t attends keys 0..t):
//   q: T rows of d floats, row t at q + t * q_stride (this head's slice of [T, H*d]);
//   k: T rows of d floats, row j at k + j * k_stride (the slice of kv head h / (H/Hkv) of [T, Hkv*d]);
//   P[t][j] = exp(l_j - m) / sum_{i<=t} exp(l_i - m), l_j = scale * (q_t . k_j) (in double), j <= t.
//   out[t] = P[t][0] (first_token) or sum_q P[q][t] (column_sum, not yet normalized).
// Rows are computed one at a time (row: T doubles of scratch, plus this head's keys transposed, T*d
// floats); the [T,T] matrix never exists.
void token_prune_head_scores(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t T,
                             int64_t d, float scale, TokenPruneScore mode, double* row, double* out);
// score[t] = sum over h (in order) of head[h*T + t]; column_sum then divides by T - t.
void token_prune_combine_heads(const double* head, int64_t H, int64_t T, TokenPruneScore mode, double* score);
// The whole batch row from queries [T, H*d] and keys [T, Hkv*d] (H % Hkv == 0), single-threaded:
// head h reads kv head h / (H / Hkv). scratch: (H + 1) * T doubles.
void token_prune_scores_from_qk(const float* q, const float* k, int64_t T, int64_t H, int64_t Hkv, int64_t d,
                                float scale, TokenPruneScore mode, double* scratch, double* score);

}  // namespace llmfold
