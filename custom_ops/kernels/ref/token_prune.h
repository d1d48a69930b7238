// TokenPrune selection rule (Agile-Quant token pruning). The ORT op and the numpy reference
// (compiler/custom_ops.py: token_prune_reference) follow exactly this.
//
//   score[t]  = importance[b][t], or sum over h = 0..H-1 (in that order, in double) of
//               P[b][h][t][0] (attention of query t to the first key).
//   keep      = keep_count input, else max(2, ceil(double(keep_ratio) * T)); then clamped to [2, T]
//               (T <= 2 keeps every token).
//   selection = token 0 and token T-1, plus the keep-2 best of tokens 1..T-2 ranked by score
//               descending, NaN ranked below every number, ties (equal scores, or both NaN) broken
//               by lower index. Output indices in ascending original order.
#pragma once
#include <cstdint>

namespace llmfold {

int64_t token_prune_keep_from_ratio(float keep_ratio, int64_t T);
int64_t token_prune_clamp_keep(int64_t keep, int64_t T);
// scores: T values; out: keep indices (keep already clamped), ascending.
void token_prune_select(const double* scores, int64_t T, int64_t keep, int64_t* out);

}  // namespace llmfold
