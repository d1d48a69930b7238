// llmfold_generate: greedy generation with the KV cache from token ids, ONNX Runtime C++ API,
// llmfold custom ops linked statically (no library loaded by path).
//
//   llmfold_generate MODEL [--ids "1 2 3"] [--max-new-tokens N] [--threads N] [--eos ID]...
//                    [--decode-ids "4 5 6"] [--logits OUT.f32] [--quiet]
//
// MODEL: a model directory (model.ort if present, else model.onnx) or an .onnx/.ort file.
// Prompt ids come from --ids or stdin (whitespace separated); the generated ids go to stdout on
// one line. stderr: the kernel path the llmfold ops run with, and prefill/decode tokens/s.
// --decode-ids feeds the given tokens in the decode steps instead of the argmax (teacher forcing,
// so two machines can be compared logit by logit); --logits writes the prefill logits [S, V] and
// each decode step's [V] as raw float32, in order.
//
// Graph I/O (llmfold / onnxruntime-genai names): input_ids [1,S] int64, attention_mask [1,total]
// int64, optional position_ids [1,S], past_key_values.{i}.key/value [1,kv_heads,past_i,head_dim],
// optional logits_to_keep [1] (fed 1 unless --logits) -> logits [1,S,V] (last rows only with
// logits_to_keep), present.{i}.key/value. Each layer's present is fed back as its past, so
// layers may hold caches of different lengths (token-pruned models); the mask grows by one per
// token either way.
//
// Static registration: RegisterLlmfoldOps is linked into this executable (llmfold_ops_static +
// llmfold_kernels) and exported (-rdynamic, see CMakeLists.txt); ORT looks the name up in the
// process: SessionOptions::RegisterCustomOpsUsingFunction("RegisterLlmfoldOps").
#define ORT_API_MANUAL_INIT  // the op glue (linked in) uses manual init too: one Ort::Global
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "kernels.h"  // llmfold::active_kernels(): the path every QMatMul in this process uses

extern "C" OrtStatus* ORT_API_CALL RegisterLlmfoldOps(OrtSessionOptions* options, const OrtApiBase* api_base);

namespace {

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "llmfold_generate: %s\n", msg.c_str());
  std::exit(2);
}

bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::vector<int64_t> parse_ids(const std::string& text, const char* what) {
  std::vector<int64_t> ids;
  std::istringstream in(text);
  std::string tok;
  while (in >> tok) {
    char* end = nullptr;
    long long v = std::strtoll(tok.c_str(), &end, 10);
    if (!end || *end || v < 0) die(std::string("bad token id '") + tok + "' in " + what + ": give non-negative integers");
    ids.push_back(v);
  }
  return ids;
}

struct Args {
  std::string model;
  std::vector<int64_t> ids, decode_ids;
  bool have_ids = false, have_decode_ids = false, quiet = false;
  int max_new = 16, threads = 1;
  std::set<int64_t> eos;
  std::string logits_path;
};

Args parse_args(int argc, char** argv) {
  Args a;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) die(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "--ids") { a.ids = parse_ids(need(i), "--ids"); a.have_ids = true; }
    else if (s == "--decode-ids") { a.decode_ids = parse_ids(need(i), "--decode-ids"); a.have_decode_ids = true; }
    else if (s == "--max-new-tokens") a.max_new = std::atoi(need(i).c_str());
    else if (s == "--threads") a.threads = std::atoi(need(i).c_str());
    else if (s == "--eos") a.eos.insert(std::atoll(need(i).c_str()));
    else if (s == "--logits") a.logits_path = need(i);
    else if (s == "--quiet") a.quiet = true;
    else if (s == "-h" || s == "--help") {
      std::printf("usage: %s MODEL [--ids \"1 2 3\"] [--max-new-tokens N] [--threads N] [--eos ID] "
                  "[--decode-ids \"4 5\"] [--logits OUT.f32] [--quiet]\n", argv[0]);
      std::exit(0);
    } else if (!s.empty() && s[0] == '-') die("unknown option " + s + " (see --help)");
    else if (a.model.empty()) a.model = s;
    else die("more than one MODEL given: " + s);
  }
  if (a.model.empty()) die("no MODEL given: pass a model directory or an .onnx/.ort file (see --help)");
  if (a.max_new < 1) die("--max-new-tokens must be at least 1");
  if (a.threads < 1) die("--threads must be at least 1");
  if (!a.have_ids) {
    std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    a.ids = parse_ids(all, "stdin");
  }
  if (a.ids.empty()) die("no prompt token ids: pass --ids \"1 2 3\" or write them to stdin");
  if (a.have_decode_ids && static_cast<int>(a.decode_ids.size()) < a.max_new - 1)
    die("--decode-ids needs max-new-tokens - 1 ids");
  return a;
}

std::string resolve_model(const std::string& p) {
  if (is_dir(p)) {
    if (is_file(p + "/model.ort")) return p + "/model.ort";
    if (is_file(p + "/model.onnx")) return p + "/model.onnx";
    die(p + " has neither model.ort nor model.onnx: give a model directory from llmfold export/compile/export-mobile");
  }
  if (!is_file(p)) die(p + " does not exist: give a model directory or an .onnx/.ort file");
  return p;
}

struct KV {
  std::string past_k, past_v, present_k, present_v;
  int64_t heads = 0, dim = 0;
};

}  // namespace

int main(int argc, char** argv) {
  Args args = parse_args(argc, argv);
  const std::string model_path = resolve_model(args.model);

  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api) die("this ONNX Runtime is older than the headers the sample was built with");
  Ort::InitApi(api);

  try {
    // ORT 1.31's tiled CPU GroupQueryAttention prefill is slower than the path it replaced on the
    // machines measured (compiler/runtime.py, GQA_FLASH_ENV); a value the user set is kept
    setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "1", 0);
    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "llmfold_generate");
    Ort::SessionOptions so;
    so.SetIntraOpNumThreads(args.threads);
    so.SetInterOpNumThreads(1);
    so.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
    // static registration: the function is in this executable; ORT finds it by name
    // (CMakeLists.txt keeps the symbol with -Wl,--undefined=RegisterLlmfoldOps and exports it)
    so.RegisterCustomOpsUsingFunction("RegisterLlmfoldOps");

    Ort::Session session(env, model_path.c_str(), so);
    Ort::AllocatorWithDefaultOptions alloc;

    std::set<std::string> inputs, outputs;
    std::map<std::string, std::vector<int64_t>> in_shapes;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      std::string n = session.GetInputNameAllocated(i, alloc).get();
      inputs.insert(n);
      in_shapes[n] = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();
    }
    for (size_t i = 0; i < session.GetOutputCount(); ++i) outputs.insert(session.GetOutputNameAllocated(i, alloc).get());
    if (!inputs.count("input_ids") || !outputs.count("logits"))
      die(model_path + " has no input_ids input / logits output: export it with llmfold");
    std::vector<KV> kv;
    for (int l = 0;; ++l) {
      KV e;
      e.past_k = "past_key_values." + std::to_string(l) + ".key";
      e.past_v = "past_key_values." + std::to_string(l) + ".value";
      e.present_k = "present." + std::to_string(l) + ".key";
      e.present_v = "present." + std::to_string(l) + ".value";
      if (!inputs.count(e.past_k)) break;
      if (!inputs.count(e.past_v) || !outputs.count(e.present_k) || !outputs.count(e.present_v))
        die("layer " + std::to_string(l) + " lacks its past/present key/value: export it with llmfold");
      const auto& s = in_shapes[e.past_k];
      if (s.size() != 4 || s[1] <= 0 || s[3] <= 0) die(e.past_k + " has no fixed [B, kv_heads, past, head_dim] shape");
      e.heads = s[1];
      e.dim = s[3];
      kv.push_back(e);
    }
    const bool has_mask = inputs.count("attention_mask") > 0, has_pos = inputs.count("position_ids") > 0;
    // logits_to_keep (an input with a default, passes/logits.py): 1 = lm_head on the last position
    // only, which is all generation reads; --logits wants every prefill row
    bool keep_last = false;
    for (size_t i = 0; i < session.GetOverridableInitializerCount(); ++i)
      if (std::string(session.GetOverridableInitializerNameAllocated(i, alloc).get()) == "logits_to_keep")
        keep_last = args.logits_path.empty();
    int64_t keep_one = 1, keep_shape[1] = {1};

    std::vector<std::string> out_names{"logits"};
    for (const auto& e : kv) { out_names.push_back(e.present_k); out_names.push_back(e.present_v); }
    std::vector<const char*> out_c;
    for (auto& n : out_names) out_c.push_back(n.c_str());

    Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> past;  // 2 per layer, the previous step's presents
    const float empty = 0.0f;
    for (const auto& e : kv) {
      int64_t shape[4] = {1, e.heads, 0, e.dim};
      for (int j = 0; j < 2; ++j)
        past.push_back(Ort::Value::CreateTensor<float>(mem, const_cast<float*>(&empty), 0, shape, 4));
    }

    std::FILE* logits_out = nullptr;
    if (!args.logits_path.empty()) {
      logits_out = std::fopen(args.logits_path.c_str(), "wb");
      if (!logits_out) die("cannot write " + args.logits_path);
    }

    std::vector<int64_t> step_ids = args.ids, mask, generated;
    int64_t seen = 0;
    double prefill_s = 0, decode_s = 0;
    int decode_steps = 0;
    for (int step = 0; step < args.max_new; ++step) {
      const int64_t S = static_cast<int64_t>(step_ids.size());
      mask.assign(static_cast<size_t>(seen + S), 1);
      std::vector<int64_t> pos(static_cast<size_t>(S));
      for (int64_t j = 0; j < S; ++j) pos[j] = seen + j;
      int64_t ids_shape[2] = {1, S}, mask_shape[2] = {1, seen + S};
      std::vector<const char*> in_names;
      std::vector<Ort::Value> in_vals;
      in_names.push_back("input_ids");
      in_vals.push_back(Ort::Value::CreateTensor<int64_t>(mem, step_ids.data(), step_ids.size(), ids_shape, 2));
      if (has_mask) {
        in_names.push_back("attention_mask");
        in_vals.push_back(Ort::Value::CreateTensor<int64_t>(mem, mask.data(), mask.size(), mask_shape, 2));
      }
      if (has_pos) {
        in_names.push_back("position_ids");
        in_vals.push_back(Ort::Value::CreateTensor<int64_t>(mem, pos.data(), pos.size(), ids_shape, 2));
      }
      if (keep_last) {
        in_names.push_back("logits_to_keep");
        in_vals.push_back(Ort::Value::CreateTensor<int64_t>(mem, &keep_one, 1, keep_shape, 1));
      }
      for (size_t l = 0; l < kv.size(); ++l) {
        in_names.push_back(kv[l].past_k.c_str());
        in_vals.push_back(std::move(past[2 * l]));
        in_names.push_back(kv[l].past_v.c_str());
        in_vals.push_back(std::move(past[2 * l + 1]));
      }
      auto t0 = std::chrono::steady_clock::now();
      auto outs = session.Run(Ort::RunOptions{nullptr}, in_names.data(), in_vals.data(), in_vals.size(),
                              out_c.data(), out_c.size());
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (step == 0) prefill_s = dt; else { decode_s += dt; ++decode_steps; }

      auto info = outs[0].GetTensorTypeAndShapeInfo();
      auto shape = info.GetShape();
      // a token-pruned prefill returns logits for the kept rows only; the last row is always the
      // last token, so it is the one that predicts the next token
      if (shape.size() != 3 || shape[1] < 1 || shape[1] > S) die("unexpected logits shape");
      const int64_t rows = shape[1];
      const int64_t V = shape[2];
      const float* logits = outs[0].GetTensorData<float>();
      if (logits_out) {
        const float* from = step == 0 ? logits : logits + (rows - 1) * V;
        const size_t n = static_cast<size_t>(step == 0 ? rows * V : V);
        if (std::fwrite(from, sizeof(float), n, logits_out) != n) die("cannot write " + args.logits_path);
      }
      const float* last = logits + (rows - 1) * V;
      const int64_t tok = std::max_element(last, last + V) - last;  // first maximum, like numpy argmax
      generated.push_back(tok);
      seen += S;
      for (size_t l = 0; l < kv.size(); ++l) {
        past[2 * l] = std::move(outs[1 + 2 * l]);
        past[2 * l + 1] = std::move(outs[2 + 2 * l]);
      }
      if (args.eos.count(tok)) break;
      step_ids.assign(1, args.have_decode_ids ? args.decode_ids[static_cast<size_t>(step)] : tok);
    }
    if (logits_out) std::fclose(logits_out);

    for (size_t i = 0; i < generated.size(); ++i) std::printf("%s%lld", i ? " " : "", static_cast<long long>(generated[i]));
    std::printf("\n");
    std::fflush(stdout);
    if (!args.quiet) {
      std::fprintf(stderr, "model: %s (%zu layers)\n", model_path.c_str(), kv.size());
      std::fprintf(stderr, "kernel path: QMatMul=%s (every QMatMul node in this process); TokenPrune=scalar selection\n",
                   llmfold::active_kernels().name);
      std::fprintf(stderr, "prefill: %zu tokens in %.3f s (%.1f tok/s)%s\n", args.ids.size(), prefill_s,
                   prefill_s > 0 ? args.ids.size() / prefill_s : 0.0, keep_last ? ", logits of the last position only" : "");
      if (decode_steps)
        std::fprintf(stderr, "decode: %d tokens in %.3f s (%.1f tok/s)\n", decode_steps, decode_s, decode_steps / decode_s);
    }
  } catch (const Ort::Exception& e) {
    die(std::string("ONNX Runtime: ") + e.what());
  }
  return 0;
}
