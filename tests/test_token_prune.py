"""Token pruning (passes/token_prune.py): exactness at keep ratio 1, a pruned prefill and the decode
after it against an independent torch implementation (true positions, per-layer KV), bad input,
llmfold.json marking, the continuation metric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from compiler.driver import compile_model
from compiler.errors import UserError
from compiler.recipe import load_recipe

# --------------------------------------------------------------------------------------------
# an independent reference: a Llama forward in torch (float64) from the HF weights, with pruning


def _select(scores: np.ndarray, keep: int) -> np.ndarray:
    """Token 0 and T−1, plus the best keep−2 others (ties: lower index), ascending."""
    T = len(scores)
    if keep >= T:
        return np.arange(T)
    rest = sorted(range(1, T - 1), key=lambda t: (-scores[t], t))[: keep - 2]
    return np.array(sorted([0, T - 1] + rest))


class RefLlama:
    """HF LlamaForCausalLM re-implemented layer by layer: one sequence, a per-layer KV cache, and
    pruning after the attention of the layers in `plan` ({layer: keep ratio}) when the step has
    no past. `renumber=True` gives the kept tokens positions 0…n−1 (the paper's code; wrong)."""

    def __init__(self, hf_model):
        import torch

        c = hf_model.config
        self.sd = {k: v.detach().to(torch.float64) for k, v in hf_model.state_dict().items()}
        self.L, self.H, self.KV = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // self.H
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd))
        self.eps = c.rms_norm_eps
        self.lm_head = self.sd.get("lm_head.weight", self.sd["model.embed_tokens.weight"])

    def empty_past(self):
        import torch

        z = torch.zeros(self.KV, 0, self.hd, dtype=torch.float64)
        return [(z, z) for _ in range(self.L)]

    def forward(self, ids, positions, past, plan, score="first_token", renumber=False):
        """Returns logits [rows, V] (numpy), presents [(K, V)] per layer, kept prompt indices."""
        import torch

        def rms(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

        def rot(x):
            h = x.shape[-1] // 2
            return torch.cat([-x[..., h:], x[..., :h]], -1)

        sd = self.sd
        x = sd["model.embed_tokens.weight"][torch.as_tensor(np.asarray(ids))]
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        kept = np.arange(len(ids))
        presents = []
        for i in range(self.L):
            w = lambda n: sd[f"model.layers.{i}.{n}"]  # noqa: E731
            h = rms(x, w("input_layernorm.weight"))
            T = h.shape[0]
            q = (h @ w("self_attn.q_proj.weight").T).view(T, self.H, self.hd).transpose(0, 1)
            k = (h @ w("self_attn.k_proj.weight").T).view(T, self.KV, self.hd).transpose(0, 1)
            v = (h @ w("self_attn.v_proj.weight").T).view(T, self.KV, self.hd).transpose(0, 1)
            f = pos[:, None] * self.inv_freq[None]
            cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            K, V = torch.cat([past[i][0], k], 1), torch.cat([past[i][1], v], 1)
            presents.append((K, V))
            P0 = past[i][0].shape[1]
            rep = self.H // self.KV
            s = q @ K.repeat_interleave(rep, 0).transpose(1, 2) / math.sqrt(self.hd)
            allowed = torch.ones(T, P0 + T, dtype=torch.bool)
            allowed[:, P0:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
            probs = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
            o = (probs @ V.repeat_interleave(rep, 0)).transpose(0, 1).reshape(T, -1)
            x = x + o @ w("self_attn.o_proj.weight").T
            if i in plan and P0 == 0 and T > 2:
                if score == "first_token":
                    sc = probs[:, :, 0].sum(0)
                else:
                    sc = probs.sum((0, 1)) / torch.arange(T, 0, -1, dtype=torch.float64)
                keep = min(max(math.floor(float(np.float32(plan[i])) * T * (1 + 2.0 ** -20)), 2), T)
                sel = _select(sc.numpy(), keep)
                x, pos, kept = x[sel], pos[sel], kept[sel]
                if renumber:
                    pos = torch.arange(len(sel), dtype=torch.float64)
            h = rms(x, w("post_attention_layernorm.weight"))
            g, u = h @ w("mlp.gate_proj.weight").T, h @ w("mlp.up_proj.weight").T
            x = x + (torch.nn.functional.silu(g) * u) @ w("mlp.down_proj.weight").T
        x = rms(x, sd["model.norm.weight"])
        return (x @ self.lm_head.T).numpy(), presents, kept


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A 4-layer tiny Llama: (HF dir, llmfold export, RefLlama)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compiler.export import export
    from compiler.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("tiny4")
    hf = make_tiny_llama(root / "hf", seed=3, layers=4)
    out = export(str(hf), root / "fp32", progress=False, attention="explicit")  # the explicit layout; tiny4f below is the fused one
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    return hf, out, RefLlama(model)


@pytest.fixture(scope="module")
def tiny4f(tiny4):
    """The same tiny Llama as tiny4 exported with attention="fused"."""
    from compiler.export import export

    hf, explicit, ref = tiny4
    return hf, export(str(hf), explicit.parent / "fused", progress=False, attention="fused"), ref


def write_recipe(path, **params) -> str:
    def fmt(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = ['description = "test"', "[[pass]]", 'name = "token_prune"']
    lines += [f"{k} = {fmt(v)}" for k, v in params.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def compile_pruned(src, tmp_path, name, **params):
    recipe = write_recipe(tmp_path / f"{name}.toml", **params)
    return compile_model(src, tmp_path / name, recipe=recipe, progress=False)


def session(model_dir):
    from compiler.runtime import create_session

    meta = json.loads((model_dir / "llmfold.json").read_text())
    return create_session(model_dir / "model.onnx", threads=1, custom_ops=bool(meta.get("custom_ops_library")))


def run(sess, ids, mask, past):
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64), **past}
    return dict(zip(names, sess.run(None, feeds)))


def empty_past(sess, batch=1):
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            out[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return out


def next_past(outs):
    return {k.replace("present.", "past_key_values."): v for k, v in outs.items() if k.startswith("present.")}


def prompt(n, seed=0, vocab=300):
    return np.random.default_rng(seed).integers(3, vocab, n)


def reference_greedy(ref, ids, plan, n):
    """n greedy tokens of the torch reference after a pruned prefill of `ids`."""
    logits, past, _ = ref.forward(ids, np.arange(len(ids)), ref.empty_past(), plan)
    want = []
    for j in range(n):
        tok = int(np.argmax(logits[-1]))
        want.append(tok)
        logits, past, _ = ref.forward([tok], [len(ids) + j], past, plan)
    return want


# --------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("layout", ["explicit", "fused"])
def test_keep_ratio_one_is_exact(tiny4, tiny4f, tmp_path, layout):
    _, src, _ = tiny4 if layout == "explicit" else tiny4f
    out = compile_pruned(src, tmp_path, "r1", start_layer=1, keep_ratios=[1.0, 1.0, 1.0])
    if layout == "fused":
        meta = json.loads((out / "llmfold.json").read_text())
        assert meta["passes"][-1]["records"][0]["attention_layout"] == "fused"
        ops = {n.op_type for n in __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph.node}
        assert {"GroupQueryAttention", "RotaryEmbedding", "TokenPrune"} <= ops and "Softmax" not in ops
    a, b = session(src), session(out)
    ids = prompt(24)[None]
    mask = np.ones((1, 24), np.int64)
    oa, ob = run(a, ids, mask, empty_past(a)), run(b, ids, mask, empty_past(b))
    assert ob["logits"].shape == oa["logits"].shape
    assert np.abs(ob["logits"][0, -1] - oa["logits"][0, -1]).max() <= 1e-5
    assert np.abs(ob["logits"] - oa["logits"]).max() <= 1e-5
    assert ob["kept_token_indices"].tolist() == [list(range(24))]
    for j, tok in enumerate([5, 77, 123]):  # decode steps through both caches
        mask = np.ones((1, 25 + j), np.int64)
        oa = run(a, [[tok]], mask, next_past(oa))
        ob = run(b, [[tok]], mask, next_past(ob))
        assert np.abs(ob["logits"] - oa["logits"]).max() <= 1e-5
        for i in range(4):
            assert ob[f"present.{i}.key"].shape == oa[f"present.{i}.key"].shape


# --------------------------------------------------------------------------------------------
# a pruned prefill and the decode after it, against the torch reference


@pytest.mark.parametrize(
    "params,plan",
    [
        (dict(start_layer=2, keep_ratios=[0.6]), {1: 0.6}),
        (dict(start_layer=1, prune_ratio=0.5, cascade_layers=3), {0: 0.5 ** (1 / 3), 1: 0.5 ** (1 / 3), 2: 0.5 ** (1 / 3)}),
        (dict(start_layer=1, keep_ratios=[0.8, 0.7], score="column_sum"), {0: 0.8, 1: 0.7}),
    ],
    ids=["single", "cascade", "column_sum"],
)
@pytest.mark.parametrize("layout", ["explicit", "fused"])
def test_pruned_prefill_and_decode_match_reference(tiny4, tiny4f, tmp_path, params, plan, layout):
    """Kept tokens, logits and per-layer K/V equal the torch reference (true positions), the decode
    after the pruned prefill too; on the fused layout the explicit-layout pass keeps the same tokens."""
    _, src, ref = tiny4 if layout == "explicit" else tiny4f
    out = compile_pruned(src, tmp_path, "p", **params)
    sess = session(out)
    T = 30
    ids = prompt(T, seed=1)
    o = run(sess, ids[None], np.ones((1, T), np.int64), empty_past(sess))
    score = params.get("score", "first_token")
    r_logits, r_past, r_kept = ref.forward(ids, np.arange(T), ref.empty_past(), plan, score=score)
    kept = o["kept_token_indices"][0]
    assert kept.tolist() == r_kept.tolist()
    assert kept[0] == 0 and kept[-1] == T - 1 and len(kept) < T
    assert o["logits"].shape == (1, len(kept), r_logits.shape[1])
    assert np.abs(o["logits"][0] - r_logits).max() <= 1e-4
    # KV lengths: layers up to the first ranking layer hold every token, later ones the kept ones
    first = min(plan) + 1
    for i in range(4):
        length = o[f"present.{i}.key"].shape[2]
        assert length == r_past[i][0].shape[1]
        assert (length == T) if i < first else (length < T)
        assert np.abs(o[f"present.{i}.key"][0] - r_past[i][0].numpy()).max() <= 1e-4
        assert np.abs(o[f"present.{i}.value"][0] - r_past[i][1].numpy()).max() <= 1e-4
    # the kept tokens keep their original positions: renumbering them would change the logits
    renum, _, _ = ref.forward(ids, np.arange(T), ref.empty_past(), plan, score=score, renumber=True)
    assert np.abs(renum - r_logits).max() > 1e-3
    if layout == "fused":  # the explicit layout's pass keeps the same tokens and gives the same logits
        exp_out = compile_pruned(tiny4[1], tmp_path, "explicit", **params)
        es = session(exp_out)
        oe = run(es, ids[None], np.ones((1, T), np.int64), empty_past(es))
        assert oe["kept_token_indices"].tolist() == o["kept_token_indices"].tolist()
        assert np.abs(oe["logits"] - o["logits"]).max() <= 1e-4
    # decoding after the pruned prefill prunes nothing: per-layer KV lengths grow by one
    past_ref = r_past
    for j, tok in enumerate([7, 42, 201, 9]):
        o = run(sess, [[tok]], np.ones((1, T + j + 1), np.int64), next_past(o))
        r_logits, past_ref, _ = ref.forward([tok], [T + j], past_ref, plan, score=score)
        assert o["logits"].shape[1] == 1 and o["kept_token_indices"].tolist() == [[0]]
        assert np.abs(o["logits"][0] - r_logits).max() <= 1e-4
        for i in range(4):
            assert o[f"present.{i}.key"].shape[2] == past_ref[i][0].shape[1]


@pytest.mark.parametrize("layout", ["explicit", "fused"])
def test_no_pruning_with_padding_or_past(tiny4, tiny4f, tmp_path, layout):
    """A padded batch, or a chunk after a past (T > 2), prunes nothing: logits equal the unpruned model."""
    _, src, _ = tiny4 if layout == "explicit" else tiny4f
    out = compile_pruned(src, tmp_path, "p", start_layer=1, keep_ratios=[0.5])
    a, b = session(src), session(out)
    from compiler.testing import left_padded_batch

    ids, mask = left_padded_batch([prompt(12, 2).tolist(), prompt(9, 3).tolist()], pad_id=0)
    oa, ob = run(a, ids, mask, empty_past(a, 2)), run(b, ids, mask, empty_past(b, 2))
    assert ob["logits"].shape == oa["logits"].shape
    valid = mask.astype(bool)
    assert np.abs(ob["logits"][valid] - oa["logits"][valid]).max() <= 1e-5
    # chunked prefill: first chunk unpadded and pruned; the second chunk (past > 0) is not pruned
    ids = prompt(20, 4)[None]
    ob = run(b, ids[:, :12], np.ones((1, 12), np.int64), empty_past(b))
    assert ob["logits"].shape[1] == 6
    ob2 = run(b, ids[:, 12:], np.ones((1, 20), np.int64), next_past(ob))
    assert ob2["logits"].shape[1] == 8
    assert ob2["present.0.key"].shape[2] == 20 and ob2["present.3.key"].shape[2] == 6 + 8


def test_generate_after_pruned_prefill_equals_reference_greedy(tiny4, tmp_path):
    from compiler import runtime

    _, src, ref = tiny4
    out = compile_pruned(src, tmp_path, "p", start_layer=2, keep_ratios=[0.5])
    lm = runtime.open_session(out, threads=1)
    ids = prompt(26, seed=5)
    g = lm.greedy(ids, 6)
    assert g["tokens"] == reference_greedy(ref, ids, {1: 0.5}, 6)
    r = runtime.generate(out, "the model reads tokens and writes logits", max_new_tokens=5, threads=1, stream=None)
    assert len(r["tokens"]) >= 1


# --------------------------------------------------------------------------------------------
# the fused layout (one com.microsoft GroupQueryAttention per block): TokenPrune scores from the
# pruning layer's post-RoPE q/k, RoPE moved into RotaryEmbedding nodes at original positions,
# per-layer seqlens_k / total_sequence_length


def test_fused_decode_through_runtime(tiny4f, tmp_path):
    """compiler/runtime.py decoding (OrtValue KV feedback) after a pruned fused prefill: per-layer KV
    lengths, greedy tokens equal to the torch reference."""
    from compiler import runtime
    from compiler.continuation import _CachedRunner

    _, src, ref = tiny4f
    out = compile_pruned(src, tmp_path, "p", start_layer=2, keep_ratios=[0.5])
    lm = runtime.open_session(out, threads=1)
    ids = prompt(26, seed=5)
    runner = _CachedRunner(lm)
    _, past, mask = runner.prefill(ids)
    assert runner.kv_lengths(past) == [26, 26, 13, 13]
    _, past = runner._run(np.array([[9]], np.int64), runtime.next_attention_mask(mask, 1, lm.kv_cache), past, 26)
    assert runner.kv_lengths(past) == [27, 27, 14, 14]
    g = lm.greedy(ids, 6)
    assert g["tokens"] == reference_greedy(ref, ids, {1: 0.5}, 6)


# --------------------------------------------------------------------------------------------
# llmfold.json, recipes, bad input


def test_pruned_model_is_flagged_per_layer_kv(tiny4, tmp_path):
    _, src, _ = tiny4
    out = compile_pruned(src, tmp_path, "p", start_layer=2, keep_ratios=[0.7])
    meta = json.loads((out / "llmfold.json").read_text())
    assert meta["kv_cache"] == "per-layer"  # onnxruntime-genai assumes one KV length for all layers
    assert meta["custom_ops_library"] == "libllmfold_ops.so"
    rec = meta["passes"][-1]["records"][0]
    assert rec["layers_with_pruned_kv"] == [2, 3] and rec["prune_after_attention_of"] == [1]
    assert "incompatible" in rec["onnxruntime_genai"]
    assert len(meta["structure"]["blocks"]) == 4  # still a recognizable decoder
    unpruned = json.loads((src / "llmfold.json").read_text())
    assert unpruned.get("kv_cache", "uniform") == "uniform"


def test_recipes_and_cascade_ratio():
    r = load_recipe("prune-30")
    (spec,) = [p for p in r.passes if p.name == "token_prune"]
    assert spec.params.start_layer == 10 and spec.params.prune_points() == [(9, 0.7)]
    r8 = load_recipe("prune-30-w4a8")
    assert [p.name for p in r8.passes] == ["rotate", "token_prune", "int4", "pack_qkv", "skip_norm", "silu_op", "swiglu_qmatmul", "logits_to_keep"] and r8.passes[2].params.act_bits == 8
    from passes.token_prune import TokenPruneParams, keep_count

    p = TokenPruneParams(start_layer=3, prune_ratio=0.3, cascade_layers=4)
    p.validate()
    ratios = p.ratios()
    assert len(ratios) == 4 and math.isclose(np.prod(ratios), 0.7)
    assert [q for q, _ in p.prune_points()] == [2, 3, 4, 5]
    assert keep_count(0.7, 512) == 358 and keep_count(0.7, 10) == 7 and keep_count(0.1, 10) == 2 and keep_count(0.5, 2) == 2


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(start_layer=1, keep_ratios=[0.0]), "outside"),
        (dict(start_layer=1, keep_ratios=[1.5]), "outside"),
        (dict(start_layer=1, keep_ratios=[0.5, -0.1]), "outside"),
        (dict(start_layer=1, prune_ratio=1.0), "outside"),
        (dict(start_layer=1), "either keep_ratios"),
        (dict(start_layer=1, keep_ratios=[0.5], prune_ratio=0.2), "either keep_ratios"),
        (dict(start_layer=0, keep_ratios=[0.5]), "must be ≥ 1"),
        (dict(start_layer=1, keep_ratios=[0.5], score="last_token"), "score"),
    ],
)
def test_bad_parameters_are_refused_before_work(tmp_path, params, match):
    path = write_recipe(tmp_path / "bad.toml", **params)
    with pytest.raises(UserError, match=match):
        load_recipe(path)


def test_start_layer_past_the_last_layer(tiny4, tmp_path):
    _, src, _ = tiny4
    with pytest.raises(UserError, match="past the last layer"):
        compile_pruned(src, tmp_path, "a", start_layer=4, keep_ratios=[0.5])
    with pytest.raises(UserError, match="need layers up to"):
        compile_pruned(src, tmp_path, "b", start_layer=2, keep_ratios=[0.5, 0.5, 0.5, 0.5])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_model_without_recognizable_attention(tiny4, tmp_path):
    from compiler.driver import CompileContext
    from compiler.modeldir import open_model_dir
    from compiler.recipe import CalibrationConfig
    from passes.token_prune import TokenPrunePass, TokenPruneParams

    _, src, _ = tiny4
    d = open_model_dir(src)
    model = d.load_model()
    for node in model.graph:
        if node.op_type == "Softmax":  # no attention probabilities: not a decoder block any more
            node.op_type = "LogSoftmax"
    n_before = len(model.graph)
    ctx = CompileContext(d, CalibrationConfig(), progress=False)
    params = TokenPruneParams(start_layer=1, keep_ratios=[0.5])
    with pytest.raises(UserError, match="decoder block|attention"):
        TokenPrunePass(ctx, params)(model)
    assert len(model.graph) == n_before  # nothing was changed

    # a fused attention op other than GroupQueryAttention: no probabilities, no q/k convention
    model = d.load_model()
    ctx = CompileContext(d, CalibrationConfig(), progress=False)
    structure = ctx.structure(model)
    structure.blocks[0].attention_kind = "MultiHeadAttention"
    with pytest.raises(UserError, match="fused MultiHeadAttention"):
        TokenPrunePass(ctx, params)(model)
    assert len(model.graph) == n_before


def test_fused_unsupported_gqa_is_refused(tiny4f, tmp_path):
    from compiler.driver import CompileContext
    from compiler.modeldir import open_model_dir
    from compiler.recipe import CalibrationConfig
    from passes.token_prune import TokenPrunePass, TokenPruneParams

    _, src, _ = tiny4f
    d = open_model_dir(src)
    model = d.load_model()
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    import onnx_ir as ir

    from passes.base import to_plain_layout

    gqa[2].attributes["local_window_size"] = ir.AttrInt64("local_window_size", 8)
    ctx = CompileContext(d, CalibrationConfig(), progress=False)
    to_plain_layout(model, ctx)  # what every pass sees first (exact); the refusal changes nothing more
    n_before = len(model.graph)
    with pytest.raises(UserError, match="layer 2 .*sliding window"):
        TokenPrunePass(ctx, TokenPruneParams(start_layer=1, keep_ratios=[0.5]))(model)
    assert len(model.graph) == n_before


@pytest.mark.parametrize("layout", ["explicit", "fused"])
def test_token_prune_then_int4_w4a8(tiny4, tiny4f, tmp_path, layout):
    """Pruning composes with the INT4 pass (calibrated on the pruned graph) and still decodes."""
    from compiler import runtime

    _, src, _ = tiny4 if layout == "explicit" else tiny4f
    path = tmp_path / "w4a8.toml"
    path.write_text(
        'description = "t"\n[calibration]\nwindows = 2\nseq_len = 64\n'
        '[[pass]]\nname = "token_prune"\nstart_layer = 2\nkeep_ratios = [0.5]\n'
        '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nact_bits = 8\n'
    )
    out = compile_model(src, tmp_path / "o", recipe=str(path), progress=False)
    meta = json.loads((out / "llmfold.json").read_text())
    assert meta["kv_cache"] == "per-layer"
    assert {lin["kind"] for b in meta["structure"]["blocks"] for lin in (b["q"], b["down"])} == {"int4"}
    sess = session(out)
    o = run(sess, prompt(30)[None], np.ones((1, 30), np.int64), empty_past(sess))
    assert [o[f"present.{i}.key"].shape[2] for i in range(4)] == [30, 30, 15, 15]
    g = runtime.open_session(out, threads=1).greedy(prompt(30), 3)
    assert len(g["tokens"]) == 3


# --------------------------------------------------------------------------------------------
# the continuation metric


def test_continuation_metric(tiny4, tmp_path):
    from compiler.continuation import evaluate_continuation
    from compiler.textdata import default_eval_text

    _, src, _ = tiny4
    text = tmp_path / "t.txt"
    text.write_text(default_eval_text().read_text(encoding="utf-8")[:8000], encoding="utf-8")
    same = compile_pruned(src, tmp_path, "one", start_layer=1, keep_ratios=[1.0])
    r = evaluate_continuation(same, src, text, context_len=40, continuation_len=8, windows=2, threads=1, speed_runs=1)
    assert r["scored_tokens"] == 16 and r["windows"] == 2
    assert abs(r["continuation_perplexity"] - r["reference_continuation_perplexity"]) <= 1e-6 * r["reference_continuation_perplexity"]
    assert r["top1_agreement"] == 1.0 and r["kv_bytes_saved_fraction"] == 0.0
    pruned = compile_pruned(src, tmp_path, "half", start_layer=2, keep_ratios=[0.5])
    r = evaluate_continuation(pruned, src, text, context_len=40, continuation_len=8, windows=2, threads=1, speed_runs=1)
    for key in ("continuation_perplexity", "reference_continuation_perplexity", "top1_agreement",
                "prefill_speedup", "kv_bytes_saved_fraction"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert r["kv_lengths"] == [40, 40, 20, 20] and r["reference_kv_lengths"] == [40] * 4
    assert r["kv_bytes_saved_fraction"] == pytest.approx(0.25)
    assert r["kv_bytes_saved_fraction_pruned_layers"] == pytest.approx(0.5)
    assert 0.0 <= r["top1_agreement"] <= 1.0 and r["prefill_speedup"] > 0
    assert r["continuation_perplexity"] != r["reference_continuation_perplexity"]
    short = tmp_path / "short.txt"
    short.write_text("a short text", encoding="utf-8")
    with pytest.raises(UserError, match="fewer than one window"):
        evaluate_continuation(pruned, src, short, context_len=40, continuation_len=8, windows=1)


@pytest.mark.slow
def test_smollm2_prune_30(smollm2_dir, tmp_path):
    """The prune-30 recipe on SmolLM2: layers ≥ 10 hold 358 of 512 prompt tokens; decoding runs."""
    from compiler import runtime

    out = compile_model(smollm2_dir, tmp_path / "p30", recipe="prune-30", progress=False)
    lm = runtime.open_session(out, threads=2)
    from compiler.textdata import default_eval_text

    ids = lm.encode(default_eval_text().read_text(encoding="utf-8")[:20000])[:512]
    o = run(lm.session, ids[None], np.ones((1, 512), np.int64), empty_past(lm.session))
    assert [o[f"present.{i}.key"].shape[2] for i in range(30)] == [512] * 10 + [358] * 20
    kept = o["kept_token_indices"][0]
    assert kept[0] == 0 and kept[-1] == 511 and o["logits"].shape == (1, 358, 49152)
    g = lm.greedy(ids, 4)
    assert len(g["tokens"]) == 4
