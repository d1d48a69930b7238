"""Runtime: perplexity and greedy generation against transformers on the tiny fixtures."""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler import runtime
from compiler.errors import UserError


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few thousand tokens of English (the tiny tokenizer was trained on other text)."""
    from compiler.textdata import default_eval_text

    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(default_eval_text().read_text(encoding="utf-8")[:12000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()


def hf_perplexity(hf_model, tokenizer, text: str, seq_len: int, windows: int) -> tuple[float, int]:
    """The same windows scored by transformers: mean over windows of HF's per-window mean loss,
    weighted by its T−1 predicted tokens (all windows have the same length)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(windows, len(ids) // seq_len)
    total = 0.0
    for w in range(n):
        x = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
        with torch.no_grad():
            loss = hf_model(input_ids=x, labels=x).loss.item()
        total += loss * (seq_len - 1)
    return math.exp(total / (n * (seq_len - 1))), n


def test_perplexity_equals_transformers(tiny_model_dir, tiny_hf_dir, hf_model, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    r = runtime.evaluate(tiny_model_dir, text=text_file, seq_len=64, windows=3, threads=1, progress=False)
    ref, n = hf_perplexity(hf_model, tok, text_file.read_text(), 64, 3)
    assert n == 3 and r["windows"] == 3
    assert r["tokens"] == 3 * 64 and r["predicted_tokens"] == 3 * 63 and r["seq_len"] == 64
    assert abs(r["perplexity"] - ref) / ref <= 1e-3, (r["perplexity"], ref)
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))


def test_windows_are_limited_by_the_text(tiny_model_dir, tmp_path, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    short = tmp_path / "short.txt"
    short.write_text(tok.decode(ids[:150]))
    n_tokens = len(tok(short.read_text(), add_special_tokens=False)["input_ids"])
    r = runtime.evaluate(tiny_model_dir, text=short, seq_len=64, windows=8, threads=1, progress=False)
    assert r["windows"] == n_tokens // 64 == 2
    assert r["text_tokens"] == n_tokens


def test_window_nll_is_log_softmax_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=7)
    nll, n = runtime.window_nll(logits, ids, chunk=3)
    z = logits.astype(np.float64)
    ref = -sum(z[j - 1, ids[j]] - np.log(np.exp(z[j - 1]).sum()) for j in range(1, 7))
    assert n == 6 and nll == pytest.approx(ref, rel=1e-12)


def test_text_shorter_than_one_window_is_a_user_error(tiny_model_dir, tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("Just a few words.")
    with pytest.raises(UserError, match=r"has \d+ tokens, fewer than one window of --seq-len 64"):
        runtime.evaluate(tiny_model_dir, text=p, seq_len=64, progress=False)


def test_missing_inputs_are_user_errors(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        runtime.evaluate(tmp_path / "nope", text=None, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        runtime.evaluate(tiny_model_dir, text=tmp_path / "missing.txt", progress=False)
    with pytest.raises(UserError, match="exceeds the model's"):
        runtime.generate(tiny_model_dir, "hello", max_new_tokens=10_000, stream=None)
    with pytest.raises(UserError, match="prompt is empty"):
        runtime.generate(tiny_model_dir, "", stream=None)


def test_generate_equals_transformers_greedy(tiny_model_dir, tiny_hf_dir, hf_model):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    prompt = "Once upon a time a small language model"
    out = io.StringIO()
    g = runtime.generate(tiny_model_dir, prompt, max_new_tokens=24, threads=1, stream=out)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    ref_new = ref[0, enc["input_ids"].shape[1] :].tolist()
    assert g["prompt_tokens"] == enc["input_ids"][0].tolist()
    assert g["tokens"] == ref_new
    assert g["text"] == tok.decode(g["tokens"], skip_special_tokens=True)
    streamed = out.getvalue()[:-1]  # generate ends the stream with a newline
    assert g["text"].startswith(streamed) and len(streamed) > 0
    assert g["decode_tok_s"] > 0 and g["prefill_tok_s"] > 0


def test_cached_decoding_equals_full_recompute(tiny_model_dir):
    """Each greedy token from the KV-cached loop is the argmax of a cache-free prefill of the
    whole sequence so far (checks cache feedback, mask growth and positions)."""
    lm = runtime.open_session(tiny_model_dir, threads=1)
    prompt = lm.encode("The cache keeps keys and values")
    g = lm.greedy(prompt, 12)
    seq = list(prompt)
    for t in g["tokens"]:
        assert int(np.argmax(lm.prefill_logits(np.array(seq))[-1])) == t
        seq.append(t)
    assert len(g["step_s"]) == len(g["tokens"]) - 1


def test_shared_kv_buffer_decoding_equals_growing_cache(tiny_layout_dir):
    """GroupQueryAttention models decode with one in-place KV buffer per layer (present bound to
    past); the logits of every step equal those of the loop that feeds each present back as the
    next past. The explicit-attention layout keeps the growing cache."""
    lm = runtime.open_session(tiny_layout_dir, threads=1)
    fused = json.loads((tiny_layout_dir / "llmfold.json").read_text())["attention"] == "fused"
    assert lm.shared_kv is fused
    prompt = lm.encode("The cache keeps keys and values")
    a = lm.greedy(prompt, 10, keep_logits=True)
    lm.shared_kv = False
    b = lm.greedy(prompt, 10, keep_logits=True)
    assert a["tokens"] == b["tokens"] and a["logits"].shape == (10, lm.config["vocab_size"])
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-6)


def test_generate_stops_at_eos(tiny_model_dir, monkeypatch):
    lm = runtime.open_session(tiny_model_dir, threads=1)
    prompt = lm.encode("Readability counts.")
    free = lm.greedy(prompt, 8)["tokens"]
    stop = free[2]  # pretend the third generated token is eos
    g = lm.greedy(prompt, 8, eos_ids={stop})
    first = free.index(stop)
    assert g["tokens"] == free[: first + 1] and g["stopped_at_eos"]


def test_attention_mask_rule():
    m = runtime.next_attention_mask(None, 3)
    assert m.dtype == np.int64 and m.shape == (1, 3) and m.all()
    m2 = runtime.next_attention_mask(m, 1, "per-layer")
    assert m2.shape == (1, 4) and m2.all()
    with pytest.raises(UserError, match="kv_cache"):
        runtime.next_attention_mask(m, 1, "paged")


def test_eval_main_json_with_speed(tiny_model_dir, text_file, capsys):
    args = argparse.Namespace(
        model_dir=str(tiny_model_dir), text=str(text_file), seq_len=32, windows=2, speed=True, threads=1, json=True
    )
    assert runtime.eval_main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "prefill_tok_s", "decode_tok_s"} <= set(r)
    assert r["tokens"] == 64 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["perplexity"] > 1


def test_eval_main_table_and_generate_main(tiny_model_dir, text_file, capsys):
    args = argparse.Namespace(model_dir=str(tiny_model_dir), text=str(text_file), seq_len=32, windows=1, speed=False, threads=1, json=False)
    assert runtime.eval_main(args) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "1 × 32" in out
    args = argparse.Namespace(model_dir=str(tiny_model_dir), prompt="Simple is better", max_new_tokens=5, threads=1, chat=False)
    assert runtime.generate_main(args) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err


def test_custom_op_library_is_loaded_when_named(tiny_model_dir, tmp_path, monkeypatch):
    """llmfold.json naming a library makes the runtime build its session options through
    compiler.custom_ops.make_session_options (which registers the library)."""
    import onnxruntime as ort

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    meta = json.loads((d / "llmfold.json").read_text())
    meta["custom_ops_library"] = "libllmfold_ops.so"
    (d / "llmfold.json").write_text(json.dumps(meta))
    calls = []

    import compiler.custom_ops as cops

    def fake(threads=None):
        calls.append(threads)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        return so

    monkeypatch.setattr(cops, "make_session_options", fake)
    lm = runtime.open_session(d, threads=1)
    assert calls == [1] and lm.custom_ops
    assert Path(lm.dir.path) == d


def _per_layer_kv_model(path: Path, V: int = 64) -> None:
    """A 2-layer toy decoder whose layer 1 caches two rows per token (layer 0: one), and whose
    logits are one-hot at (Σ attention_mask + past length of layer 1) mod V — so greedy tokens
    reveal whether the loop feeds each layer's own present back and grows the mask by 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F = numpy_helper.from_array(np.arange(2 * V, dtype=np.float32).reshape(V, 2), "F")
    eye = numpy_helper.from_array(np.eye(V, dtype=np.float32), "eye")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("two", 2), ("V", V), ("one_axis", [1]), ("zero", 0))]
    nodes = [
        helper.make_node("Gather", ["F", "input_ids"], ["f"]),  # [1,S,2]
        helper.make_node("Unsqueeze", ["f", "one_axis"], ["new"]),  # [1,1,S,2]
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "new"], ["present.0.value"], axis=2),
        helper.make_node("Concat", ["past_key_values.1.key", "new", "new"], ["present.1.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.1.value", "new", "new"], ["present.1.value"], axis=2),
        helper.make_node("ReduceSum", ["attention_mask"], ["total"], keepdims=0),
        helper.make_node("Shape", ["past_key_values.1.key"], ["pshape"]),
        helper.make_node("Gather", ["pshape", "two"], ["plen"], axis=0),
        helper.make_node("Add", ["total", "plen"], ["s"]),
        helper.make_node("Mod", ["s", "V"], ["idx"]),
        helper.make_node("Gather", ["eye", "idx"], ["row"]),  # [V]
        helper.make_node("Shape", ["input_ids"], ["ishape"]),
        helper.make_node("Concat", ["ishape", "Vvec"], ["lshape"], axis=0),
        helper.make_node("Expand", ["row", "lshape"], ["logits"]),
    ]
    consts.append(numpy_helper.from_array(np.array([V], np.int64), "Vvec"))
    kv = lambda n, t: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, t, 2])  # noqa: E731
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "T"])]  # fmt: skip
    inputs += [kv(f"past_key_values.{i}.{x}", f"P{i}") for i in range(2) for x in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", V])]
    outputs += [kv(f"present.{i}.{x}", f"Q{i}") for i in range(2) for x in ("key", "value")]
    g = helper.make_graph(nodes, "toy", inputs, outputs, [F, eye, *consts])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(m, path / "model.onnx")
    meta = {"format": "llmfold", "version": 1, "config": {"num_layers": 2}, "kv_cache": "per-layer", "custom_ops_library": None, "passes": []}
    (path / "llmfold.json").write_text(json.dumps(meta))


def test_decode_loop_with_per_layer_cache_lengths(tmp_path):
    _per_layer_kv_model(tmp_path / "toy")
    lm = runtime.open_session(tmp_path / "toy", threads=1)
    assert lm.kv_cache == "per-layer" and lm.layout.layers == 2
    g = lm.greedy(np.array([5, 6, 7]), 6)
    # step 0: mask 3, layer-1 past 0 → 3; step n ≥ 1: mask 3+n, layer-1 past 2·(2+n) → 7 + 3n
    assert g["tokens"] == [3] + [7 + 3 * n for n in range(1, 6)]


@pytest.mark.slow
def test_smollm2_perplexity_and_generation_match_transformers(smollm2_dir):
    """The real model: held-out perplexity (2 windows × 128 tokens) within 1e-3 relative of
    transformers, and the greedy chat continuation token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiler.sources import alias_path
    from compiler.textdata import default_eval_text

    gguf = alias_path("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = default_eval_text()
    r = runtime.evaluate(smollm2_dir, text=text, seq_len=128, windows=2, progress=False)
    ref, _ = hf_perplexity(hf, tok, text.read_text(encoding="utf-8")[:20000], 128, 2)
    assert abs(r["perplexity"] - ref) / ref <= 1e-3, (r["perplexity"], ref)

    g = runtime.generate(smollm2_dir, "What is the capital of France?", max_new_tokens=16, chat=True, stream=None)
    ids = torch.tensor([g["prompt_tokens"]])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert g["tokens"] == out[0, ids.shape[1] :].tolist()
    assert "Paris" in g["text"]
