"""`llmfold inspect`: report sections, per-layer rows, diff, svg, plain ONNX files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import UserError
from compiler.inspect import inspect_model, inspect_path


def _json(capsys, *args, **kw) -> dict:
    assert inspect_path(*args, as_json=True, **kw) == 0
    return json.loads(capsys.readouterr().out)


def _hf_config(model_dir) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def test_json_report_of_a_model_dir(tiny_model_dir, capsys):
    rep = _json(capsys, tiny_model_dir)
    cfg = _hf_config(tiny_model_dir)
    L = cfg["num_hidden_layers"]
    rows = rep["linear_layers"]
    assert len(rows) == 7 * L + 1
    assert [r["role"] for r in rows[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert rows[-1]["role"] == "lm_head" and rows[-1]["block"] is None
    for r in rows:
        assert r["macs_per_token"] == r["K"] * r["N"]
        assert r["kind"] == "dense" and r["bits"] == 32
        assert r["bytes"] == 4 * r["K"] * r["N"]  # fp32 dense; fused q/k/v is split in proportion to N
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (H // cfg["num_attention_heads"])
    assert [(r["K"], r["N"]) for r in rows[:7]] == [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]
    assert (rows[-1]["K"], rows[-1]["N"]) == (H, V)
    assert rep["llmfold_dir"] and rep["structure_source"] == "llmfold.json"
    names = [v["name"] for v in rep["inputs"]]
    assert names[:2] == ["input_ids", "attention_mask"] and "past_key_values.0.key" in names
    assert rep["inputs"][0]["dtype"] == "int64" and len(rep["inputs"][0]["shape"]) == 2
    assert "logits" in [v["name"] for v in rep["outputs"]]
    assert rep["ops"]["MatMul"] == 5 * L + 1 and rep["nodes"] == sum(rep["ops"].values())  # q/k/v packed
    assert [r["packed_columns"] for r in rows[:3]] == [[0, H], [H, H + kv], [H + kv, H + 2 * kv]]
    assert rep["opsets"].get("", rep["opsets"].get("ai.onnx")) is not None
    fp32 = rep["initializers_by_dtype"]["float32"]
    assert fp32["bytes"] == 4 * fp32["parameters"]
    assert rep["parameters"] >= sum(r["K"] * r["N"] for r in rows)
    assert rep["custom_ops"] == []
    assert rep["file_bytes"] >= rep["initializer_bytes"]


def test_text_report(tiny_model_dir, capsys):
    assert inspect_path(tiny_model_dir) == 0
    out = capsys.readouterr().out
    for part in ("graph I/O", "ops", "initializers by dtype", "linear layers", "lm_head", "MatMul"):
        assert part in out


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory):
    """Same shape as the tiny fixture except intermediate 96: gate/up/down change."""
    from compiler.export import export
    from compiler.testing import make_tiny_llama

    base = tmp_path_factory.mktemp("wider")
    hf = make_tiny_llama(base / "hf", intermediate=96)
    return export(str(hf), base / "model", progress=False)


def test_diff(tiny_model_dir, wider_model_dir, capsys):
    same = _json(capsys, tiny_model_dir, diff=tiny_model_dir)["diff"]
    assert same["changed_layers"] == [] and same["only_in_from"] == [] and same["only_in_to"] == []
    rep = _json(capsys, tiny_model_dir, diff=wider_model_dir)
    d = rep["diff"]
    changed = {c["name"]: c["changes"] for c in d["changed_layers"]}
    L = _hf_config(tiny_model_dir)["num_hidden_layers"]
    I = _hf_config(tiny_model_dir)["intermediate_size"]
    assert set(changed) == {f"layers.{b}.{r}" for b in range(L) for r in ("gate", "up", "down")}
    assert changed["layers.0.gate"]["N"] == [I, 96] and changed["layers.0.down"]["K"] == [I, 96]
    assert changed["layers.0.up"]["bytes"][1] == 4 * 96 * _hf_config(tiny_model_dir)["hidden_size"]
    assert d["unchanged_layers"] == 4 * L + 1
    assert d["totals"]["linear_bytes"][0] > d["totals"]["linear_bytes"][1]
    assert inspect_path(tiny_model_dir, diff=wider_model_dir) == 0
    assert "layers.0.gate" in capsys.readouterr().out


def test_svg(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plots" / "bytes.svg"
    assert inspect_path(tiny_model_dir, svg=out) == 0
    data = out.read_text()
    assert out.stat().st_size > 1000 and "<svg" in data and "lm_head" in data
    assert str(out) in capsys.readouterr().out


def test_plain_onnx_file_without_llmfold_json(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "plain"
    d.mkdir()
    shutil.copy(Path(tiny_model_dir) / "model.onnx", d / "graph.onnx")
    data = Path(tiny_model_dir) / "model.onnx.data"
    if data.exists():
        shutil.copy(data, d / data.name)  # external data keeps its recorded file name
    rep = _json(capsys, d / "graph.onnx")
    assert not rep["llmfold_dir"] and rep["structure_source"] == "analysis"
    assert len(rep["linear_layers"]) == 7 * _hf_config(tiny_model_dir)["num_hidden_layers"] + 1
    rep_dir = _json(capsys, d)  # a directory with exactly one .onnx file
    assert rep_dir["linear_layers"] == rep["linear_layers"]


def test_non_llm_graph_and_custom_domains(tmp_path, capsys):
    """A plain graph with an llmfold-domain op and an unknown-domain op: reported, flagged."""
    W = numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("QMatMul", ["y", "W"], ["z"], domain="llmfold"),
        helper.make_node("Frob", ["z"], ["out"], domain="acme.ops"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8])], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [W])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("llmfold", 1), helper.make_opsetid("acme.ops", 1)])
    m.ir_version = 10
    p = tmp_path / "odd.onnx"
    onnx.save(m, p)
    rep = _json(capsys, p)
    assert rep["linear_layers"] == [] and rep["ops"] == {"MatMul": 1, "llmfold::QMatMul": 1, "acme.ops::Frob": 1}
    assert rep["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["T", 8]}]
    assert rep["initializers_by_dtype"] == {"float32": {"tensors": 1, "parameters": 32, "bytes": 128}}
    custom = {c["domain"]: c for c in rep["custom_ops"]}
    assert set(custom) == {"llmfold", "acme.ops"}
    assert custom["acme.ops"]["loads"] is False and "no library" in custom["acme.ops"]["error"]
    assert isinstance(custom["llmfold"]["loads"], bool)
    assert custom["llmfold"]["loads"] or custom["llmfold"]["error"]
    assert rep["structure_error"]  # analysis found no decoder: reported, not guessed
    with pytest.raises(UserError, match="no linear layers"):
        inspect_path(p, svg=tmp_path / "x.svg")
    assert not (tmp_path / "x.svg").exists()


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        inspect_model(tmp_path / "missing")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all \xff\xfe")
    with pytest.raises(UserError, match="cannot read"):
        inspect_model(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .onnx files"):
        inspect_model(tmp_path / "empty")


@pytest.fixture(scope="module")
def genai_model(tiny_hf_dir, tmp_path_factory):
    """onnxruntime-genai's model builder, fp32, on the tiny HF checkpoint (a plain ONNX dir)."""
    out = tmp_path_factory.mktemp("genai")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(tiny_hf_dir), "-i", str(tiny_hf_dir),
           "-o", str(out / "m"), "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "m"


def test_onnxruntime_genai_model(genai_model, tiny_hf_dir, capsys):
    rep = _json(capsys, genai_model)
    cfg = _hf_config(tiny_hf_dir)
    assert not rep["llmfold_dir"]
    assert any(op.endswith("GroupQueryAttention") for op in rep["ops"])
    rows = rep["linear_layers"]
    assert len(rows) == 7 * cfg["num_hidden_layers"] + 1
    assert all(r["macs_per_token"] == r["K"] * r["N"] for r in rows)
    # the builder fuses q/k/v into one weight: its bytes are split by N, so the sum is exact
    assert sum(r["bytes"] for r in rows if r["block"] == 0 and r["role"] in ("q", "k", "v")) == 4 * sum(
        r["K"] * r["N"] for r in rows if r["block"] == 0 and r["role"] in ("q", "k", "v")
    )


def test_runtime_runs_the_genai_folder_like_our_export(genai_model, tiny_model_dir, tmp_path):
    """The same checkpoint through onnxruntime-genai's graph (GroupQueryAttention, symbolic KV
    dims read from genai_config.json) and through llmfold's export: same perplexity and tokens."""
    from compiler import runtime
    from compiler.textdata import default_eval_text

    text = tmp_path / "t.txt"
    text.write_text(default_eval_text().read_text(encoding="utf-8")[:6000])
    a = runtime.evaluate(genai_model, text=text, seq_len=48, windows=2, threads=1, progress=False)
    b = runtime.evaluate(tiny_model_dir, text=text, seq_len=48, windows=2, threads=1, progress=False)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    prompt = runtime.open_session(tiny_model_dir).encode("Sparse is better than dense.")
    ga = runtime.open_session(genai_model, threads=1).greedy(prompt, 10)["tokens"]
    gb = runtime.open_session(tiny_model_dir, threads=1).greedy(prompt, 10)["tokens"]
    assert ga == gb
