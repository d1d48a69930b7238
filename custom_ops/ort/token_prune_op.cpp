// llmfold.TokenPrune (Agile-Quant token pruning). Selection rule: kernels/ref/token_prune.h.
// Inputs:  0 hidden [B,T,D] float
//          1 scores: importance [B,T] float, or attention probabilities [B,H,T,S] float
//          2 keep_count int64 scalar (optional; else attribute keep_ratio)
//          3..5 companions [B,T,...] float or int64 (optional)
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

struct TokenPruneKernel {
  static constexpr const char* kName = "TokenPrune";
  float keep_ratio = -1.0f;  // < 0: not given

  explicit TokenPruneKernel(const OrtKernelInfo* raw) {
    Ort::ConstKernelInfo info(raw);
    try {
      keep_ratio = info.GetAttribute<float>("keep_ratio");
    } catch (const Ort::Exception&) {
      keep_ratio = -1.0f;
    }
    if (keep_ratio != -1.0f && !(keep_ratio > 0.0f && keep_ratio <= 1.0f))
      fail("attribute keep_ratio must be in (0, 1], got ", std::to_string(keep_ratio));
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const In H = get_input(ctx, 0), Sc = get_input(ctx, 1), Kc = get_input(ctx, 2);
    if (!H) fail("input hidden is required");
    if (!Sc) fail("input scores is required");
    expect_type(H, "hidden", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    expect_type(Sc, "scores", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (H.shape.size() != 3) fail("hidden must be [B,T,D], got shape ", shape_str(H.shape));
    const int64_t B = H.shape[0], T = H.shape[1], D = H.shape[2];
    const bool attn = Sc.shape.size() == 4;
    if (attn) {
      if (Sc.shape[0] != B || Sc.shape[2] != T || Sc.shape[1] < 1 || Sc.shape[3] < 1)
        fail("attention scores must be [B,H,T,S] with B=", std::to_string(B), ", T=", std::to_string(T),
             ", H>=1, S>=1; got ", shape_str(Sc.shape));
    } else if (Sc.shape.size() != 2 || Sc.shape[0] != B || Sc.shape[1] != T) {
      fail("scores must be importance [B,T] = [", std::to_string(B), ",", std::to_string(T),
           "] or attention [B,H,T,S]; got ", shape_str(Sc.shape));
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

    // Selection per batch row.
    std::vector<int64_t> idx(static_cast<size_t>(B * keep));
    std::vector<double> score(static_cast<size_t>(T));
    const float* s = Sc.data<float>();
    for (int64_t b = 0; b < B; ++b) {
      if (attn) {
        const int64_t Hn = Sc.shape[1], S = Sc.shape[3];
        for (int64_t t = 0; t < T; ++t) {
          double acc = 0.0;
          for (int64_t h = 0; h < Hn; ++h) acc += s[((b * Hn + h) * T + t) * S];
          score[t] = acc;
        }
      } else {
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
        "TokenPrune", {F, F, I, t0, t1, t2},
        {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL,
         C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL},
        {F, I, t0, t1, t2},
        {C::INPUT_OUTPUT_REQUIRED, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL, C::INPUT_OUTPUT_OPTIONAL,
         C::INPUT_OUTPUT_OPTIONAL}));
  }
  return ops;
}

}  // namespace ortglue
}  // namespace llmfold
