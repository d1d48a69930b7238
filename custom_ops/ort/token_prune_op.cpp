// llmfold.TokenPrune (Agile-Quant token pruning). Selection rule: kernels/ref/token_prune.h.
// Inputs:  0 hidden [B,T,D] float
//          1 scores: importance [B,T] float, or attention probabilities [B,H,T,S] float (optional
//            when query and key are given; exactly one of the two sources)
//          2 keep_count int64 scalar (optional; else attribute keep_ratio)
//          3..5 companions [B,T,...] float or int64 (optional)
//          6 query [B,T,H*d] float, 7 key [B,T,Hkv*d] float (optional, both or neither): post-RoPE
//            queries and keys of this step's tokens; the op computes causal softmax attention row
//            by row (never [H,T,T]) and scores from it. Attributes num_heads (H, required with
//            query), kv_num_heads (Hkv, default H; query head h reads kv head h / (H/Hkv)), scale
//            (default d^-0.5).
// Attributes: keep_ratio float; score "first_token" (default) | "column_sum" (applies to attention
//            probabilities and to query/key; importance [B,T] is used as given).
// Outputs: 0 pruned hidden [B,keep,D], 1 kept indices int64 [B,keep] (ascending), 2..4 gathered
//          companions [B,keep,...] (same types as the inputs).
// Companion types are fixed per registered kernel, so we register one kernel per combination of
// {float, int64} for the three slots: ORT picks the one matching the node and infers output types.
#include <cmath>
#include <cstring>

#include "common.h"
#include "kernels/ref/token_prune.h"

namespace llmfold {
namespace ortglue {
namespace {

constexpr int kMaxCompanions = 3;

constexpr size_t kQueryInput = 6, kKeyInput = 7;

template <typename R>
bool try_attribute(const Ort::ConstKernelInfo& info, const char* name, R& out) {
  try {
    out = info.GetAttribute<R>(name);
    return true;
  } catch (const Ort::Exception&) {
    return false;
  }
}

struct QkWork {
  const float* q;
  const float* k;
  int64_t T, H, Hkv, d;
  float scale;
  TokenPruneScore mode;
  double* head;  // [H, T]
  double* rows;  // [H, T] scratch, one row per task
};

struct TokenPruneKernel {
  static constexpr const char* kName = "TokenPrune";
  float keep_ratio = -1.0f;  // < 0: not given
  int64_t num_heads = 0, kv_num_heads = 0;  // 0: not given
  float scale = 0.0f;                       // 0: d^-0.5
  TokenPruneScore mode = TokenPruneScore::kFirstToken;

  explicit TokenPruneKernel(const OrtKernelInfo* raw) {
    Ort::ConstKernelInfo info(raw);
    if (!try_attribute(info, "keep_ratio", keep_ratio)) keep_ratio = -1.0f;
    if (keep_ratio != -1.0f && !(keep_ratio > 0.0f && keep_ratio <= 1.0f))
      fail("attribute keep_ratio must be in (0, 1], got ", std::to_string(keep_ratio));
    std::string sc;
    if (try_attribute(info, "score", sc)) {
      if (sc == "first_token") mode = TokenPruneScore::kFirstToken;
      else if (sc == "column_sum") mode = TokenPruneScore::kColumnSum;
      else fail("attribute score must be \"first_token\" or \"column_sum\", got \"", sc, "\"");
    }
    if (try_attribute(info, "num_heads", num_heads) && num_heads < 1)
      fail("attribute num_heads must be >= 1, got ", std::to_string(num_heads));
    if (try_attribute(info, "kv_num_heads", kv_num_heads)) {
      if (kv_num_heads < 1) fail("attribute kv_num_heads must be >= 1, got ", std::to_string(kv_num_heads));
      if (num_heads < 1) fail("attribute kv_num_heads needs num_heads");
      if (num_heads % kv_num_heads)
        fail("num_heads ", std::to_string(num_heads), " is not a multiple of kv_num_heads ", std::to_string(kv_num_heads));
    }
    if (try_attribute(info, "scale", scale) && !(std::isfinite(scale) && scale != 0.0f))
      fail("attribute scale must be finite and nonzero, got ", std::to_string(scale));
  }

  static void qk_task(void* p, size_t i) {
    const QkWork& w = *static_cast<const QkWork*>(p);
    const int64_t h = static_cast<int64_t>(i), group = w.H / w.Hkv;
    token_prune_head_scores(w.q + h * w.d, w.H * w.d, w.k + (h / group) * w.d, w.Hkv * w.d, w.T, w.d, w.scale, w.mode,
                            w.rows + h * w.T, w.head + h * w.T);
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const In H = get_input(ctx, 0), Sc = get_input(ctx, 1), Kc = get_input(ctx, 2);
    const In Q = get_input(ctx, kQueryInput), K = get_input(ctx, kKeyInput);
    if (!H) fail("input hidden is required");
    if (bool(Q) != bool(K)) fail("inputs query and key go together: give both or neither");
    if (!Sc && !Q) fail("needs the scores input or the query and key inputs");
    if (Sc && Q) fail("give either the scores input or the query and key inputs, not both");
    expect_type(H, "hidden", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (H.shape.size() != 3) fail("hidden must be [B,T,D], got shape ", shape_str(H.shape));
    const int64_t B = H.shape[0], T = H.shape[1], D = H.shape[2];
    bool attn = false;
    int64_t Hq = 0, Hkv = 0, hd = 0;
    float qk_scale = 0.0f;
    if (Sc) {
      expect_type(Sc, "scores", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      attn = Sc.shape.size() == 4;
      if (attn) {
        if (Sc.shape[0] != B || Sc.shape[2] != T || Sc.shape[1] < 1 || Sc.shape[3] < 1)
          fail("attention scores must be [B,H,T,S] with B=", std::to_string(B), ", T=", std::to_string(T),
               ", H>=1, S>=1; got ", shape_str(Sc.shape));
        if (mode == TokenPruneScore::kColumnSum && Sc.shape[3] < T)
          fail("score column_sum needs attention scores [B,H,T,S] with S >= T=", std::to_string(T), "; got ",
               shape_str(Sc.shape));
      } else if (Sc.shape.size() != 2 || Sc.shape[0] != B || Sc.shape[1] != T) {
        fail("scores must be importance [B,T] = [", std::to_string(B), ",", std::to_string(T),
             "] or attention [B,H,T,S]; got ", shape_str(Sc.shape));
      }
    } else {
      expect_type(Q, "query", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      expect_type(K, "key", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (num_heads < 1) fail("the query and key inputs need the attribute num_heads");
      Hq = num_heads;
      Hkv = kv_num_heads > 0 ? kv_num_heads : num_heads;
      if (Q.shape.size() != 3 || Q.shape[0] != B || Q.shape[1] != T)
        fail("query must be [B,T,num_heads*head_dim] with B=", std::to_string(B), ", T=", std::to_string(T),
             "; got ", shape_str(Q.shape));
      if (Q.shape[2] < 1 || Q.shape[2] % Hq)
        fail("query's last dimension ", std::to_string(Q.shape[2]), " is not a positive multiple of num_heads ",
             std::to_string(Hq));
      hd = Q.shape[2] / Hq;
      if (K.shape.size() != 3 || K.shape[0] != B || K.shape[1] != T || K.shape[2] != Hkv * hd)
        fail("key must be [B,T,kv_num_heads*head_dim] = [", std::to_string(B), ",", std::to_string(T), ",",
             std::to_string(Hkv * hd), "] (head_dim ", std::to_string(hd), " from query); got ", shape_str(K.shape));
      qk_scale = scale != 0.0f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    }
    int64_t keep;
    if (Kc) {
      expect_type(Kc, "keep_count", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
      if (Kc.count != 1) fail("keep_count must hold one value, got shape ", shape_str(Kc.shape));
      keep = token_prune_clamp_keep(*Kc.data<int64_t>(), T);
    } else if (keep_ratio > 0.0f) {
      keep = token_prune_keep_from_ratio(keep_ratio, T);
    } else {
      fail("needs the keep_count input or the keep_ratio attribute");
    }

    In comp[kMaxCompanions];
    int64_t row_bytes[kMaxCompanions] = {};
    for (int c = 0; c < kMaxCompanions; ++c) {
      comp[c] = get_input(ctx, 3 + c);
      if (!comp[c]) continue;
      const std::string nm = "companion " + std::to_string(c);
      if (comp[c].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && comp[c].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
        fail(nm, " must be float or int64, got ", type_name(comp[c].type));
      if (comp[c].shape.size() < 2 || comp[c].shape[0] != B || comp[c].shape[1] != T)
        fail(nm, " must be [B,T,...] with B=", std::to_string(B), ", T=", std::to_string(T), "; got ",
             shape_str(comp[c].shape));
      int64_t inner = 1;
      for (size_t d = 2; d < comp[c].shape.size(); ++d) inner *= comp[c].shape[d];
      row_bytes[c] = inner * (comp[c].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 8);
    }
    const size_t nout = ctx.GetOutputCount();
    for (size_t o = 2; o < nout; ++o)
      if (o - 2 >= kMaxCompanions || !comp[o - 2]) fail("output ", std::to_string(o), " has no companion input ", std::to_string(o + 1));

    // Selection per batch row. keep >= T (decode steps, no pruning) needs no scores.
    std::vector<int64_t> idx(static_cast<size_t>(B * keep));
    std::vector<double> score(static_cast<size_t>(T)), head, rows;
    if (Q && keep < T) {
      head.resize(static_cast<size_t>(Hq * T));
      rows.resize(static_cast<size_t>(Hq * T));
    }
    for (int64_t b = 0; b < B; ++b) {
      if (keep >= T) {
        token_prune_select(score.data(), T, keep, idx.data() + b * keep);
        continue;
      }
      if (Q) {
        // one task per query head (ORT's pool), heads summed in order afterwards: thread-count independent
        QkWork w{Q.data<float>() + b * T * Hq * hd, K.data<float>() + b * T * Hkv * hd, T, Hq, Hkv, hd, qk_scale, mode,
                 head.data(), rows.data()};
        if (Hq == 1) qk_task(&w, 0);
        else ctx.ParallelFor(&TokenPruneKernel::qk_task, static_cast<size_t>(Hq), 0, &w);
        token_prune_combine_heads(head.data(), Hq, T, mode, score.data());
      } else if (attn) {
        const int64_t Hn = Sc.shape[1], S = Sc.shape[3];
        token_prune_scores_from_probs(Sc.data<float>() + b * Hn * T * S, Hn, T, S, mode, score.data());
      } else {
        const float* s = Sc.data<float>();
        for (int64_t t = 0; t < T; ++t) score[t] = s[b * T + t];
      }
      token_prune_select(score.data(), T, keep, idx.data() + b * keep);
    }

    Ort::UnownedValue out_h = ctx.GetOutput(0, std::vector<int64_t>{B, keep, D});
    gather(H.data<float>(), out_h.GetTensorMutableData<float>(), B, T, keep, D * 4, idx);
    if (nout > 1) {
      Ort::UnownedValue out_i = ctx.GetOutput(1, std::vector<int64_t>{B, keep});
      if (static_cast<OrtValue*>(out_i)) std::memcpy(out_i.GetTensorMutableData<int64_t>(), idx.data(), idx.size() * 8);
    }
    for (size_t o = 2; o < nout; ++o) {
      const In& c = comp[o - 2];
      std::vector<int64_t> oshape = c.shape;
      oshape[1] = keep;
      Ort::UnownedValue ov = ctx.GetOutput(o, oshape);
      if (!static_cast<OrtValue*>(ov)) continue;
      gather(Ort::ConstValue(c.value).GetTensorRawData(), ov.GetTensorMutableRawData(), B, T, keep, row_bytes[o - 2], idx);
    }
  }

  static void gather(const void* src, void* dst, int64_t B, int64_t T, int64_t keep, int64_t row_bytes,
                     const std::vector<int64_t>& idx) {
    if (row_bytes == 0) return;
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < keep; ++j)
        std::memcpy(d + (b * keep + j) * row_bytes, s + (b * T + idx[b * keep + j]) * row_bytes,
                    static_cast<size_t>(row_bytes));
  }
};

}  // namespace

std::vector<Ort::Custom::OrtLiteCustomOp*> make_token_prune_ops() {
  using C = OrtCustomOpInputOutputCharacteristic;
  const ONNXTensorElementDataType F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, I = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;
  for (int combo = 0; combo < (1 << kMaxCompanions); ++combo) {
    const ONNXTensorElementDataType t0 = (combo & 1) ? I : F, t1 = (combo & 2) ? I : F, t2 = (combo & 4) ? I : F;
    ops.push_back(new Op<TokenPruneKernel>(
        "TokenPrune", {F, F, I, t0, t1, t2, F, F},
        {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL,
         C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL},
        {F, I, t0, t1, t2},
        {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL,
         C::INPUT_OUTPUT_OPTIONAL}));
  }
  return ops;
}

}  // namespace ortglue
}  // namespace llmfold
