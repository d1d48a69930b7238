"""pack_qkv: one q/k/v linear per block feeding GroupQueryAttention's packed input, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler import runtime
from compiler.driver import compile_model

INT4 = '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nsymmetric = {sym}\nact_bits = {bits}\n'
PACK = '[[pass]]\nname = "pack_qkv"\n'


def _compile(src: Path, tmp: Path, name: str, text: str) -> Path:
    recipe = tmp / f"{name}.toml"
    recipe.write_text(text)
    return compile_model(src, tmp / name, recipe=str(recipe), progress=False)


def _ops(d: Path) -> list[str]:
    return [n.op_type for n in ir.load(d / "model.onnx").graph]


def _same_outputs(a: Path, b: Path, atol: float) -> None:
    la, lb = runtime.open_session(a, threads=1), runtime.open_session(b, threads=1)
    ids = np.arange(5, 45)
    np.testing.assert_allclose(la.prefill_logits(ids), lb.prefill_logits(ids), rtol=0, atol=atol)
    ga, gb = la.greedy(ids, 8, keep_logits=True), lb.greedy(ids, 8, keep_logits=True)
    assert ga["tokens"] == gb["tokens"]
    np.testing.assert_allclose(ga["logits"], gb["logits"], rtol=0, atol=atol)


@pytest.mark.parametrize("bits,sym", [(8, "false"), (16, "true"), (4, "false")])
def test_packed_qmatmul_is_bit_identical(tiny_fused_dir, tmp_path, bits, sym):
    """Tile-major QMatMul weights concatenate along N: same logits, bit for bit, two QMatMuls
    fewer per block, and the layer map records q/k/v as column ranges of one node."""
    plain = _compile(tiny_fused_dir, tmp_path, "plain", INT4.format(bits=bits, sym=sym))
    packed = _compile(tiny_fused_dir, tmp_path, "packed", INT4.format(bits=bits, sym=sym) + PACK)
    _same_outputs(plain, packed, atol=0.0)
    assert _ops(packed).count("QMatMul") == _ops(plain).count("QMatMul") - 2 * 2
    meta = json.loads((packed / "llmfold.json").read_text())
    assert meta["passes"][-1]["records"][0]["packed_blocks"] == 2
    for b in meta["structure"]["blocks"]:
        q, k, v = b["q"], b["k"], b["v"]
        assert q["node"] == k["node"] == v["node"] == f"/model/layers.{b['index']}/attn/qkv_proj/QMatMul"
        assert (q["columns"], k["columns"], v["columns"]) == ([0, 64], [64, 96], [96, 128])
        assert q["kind"] == "int4" and q["act_bits"] == bits
    # inspect --diff names what each layer became
    from compiler.inspect import diff_reports, inspect_model

    d = diff_reports(inspect_model(plain), inspect_model(packed))
    changed = {c["name"]: c["changes"] for c in d["changed_layers"]}
    assert changed["layers.0.k"] == {"packed_columns": [None, [64, 96]]} and len(changed) == 2 * 3


def test_packed_dense_matmul(tiny_fused_dir, tmp_path):
    plain = _compile(tiny_fused_dir, tmp_path, "plain", '[[pass]]\nname = "cleanup"\n')
    packed = _compile(tiny_fused_dir, tmp_path, "packed", PACK)
    _same_outputs(plain, packed, atol=1e-5)
    assert _ops(packed).count("MatMul") == _ops(plain).count("MatMul") - 2 * 2
    gqa = [n for n in ir.load(packed / "model.onnx").graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)


def test_nothing_to_pack_is_recorded_with_the_reason(tiny_explicit_dir, tmp_path):
    out = _compile(tiny_explicit_dir, tmp_path, "explicit", PACK)
    rec = json.loads((out / "llmfold.json").read_text())["passes"][-1]
    assert rec["modified"] is False
    assert rec["records"][0]["skipped"] == {"0": "attention is not GroupQueryAttention", "1": "attention is not GroupQueryAttention"}
