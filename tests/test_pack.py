"""pack_qkv: one q/k/v linear per block feeding GroupQueryAttention's packed input, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler import runtime
from compiler.driver import compile_model
from compiler.testing import compile_recipe_text
from passes.base import REGISTRY, CompilerPass

INT4 = '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nsymmetric = {sym}\nact_bits = {bits}\n'
PACK = '[[pass]]\nname = "pack_qkv"\n'



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
    plain = compile_recipe_text(tiny_fused_dir, tmp_path, "plain", INT4.format(bits=bits, sym=sym))
    packed = compile_recipe_text(tiny_fused_dir, tmp_path, "packed", INT4.format(bits=bits, sym=sym) + PACK)
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


class _ReadsLinears(CompilerPass):
    """Stands for any pass that rewrites linears: changes nothing, so outputs must not move."""

    name = "test-reads-linears"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_export_packs_qkv_and_passes_see_them_split_exactly(tiny_fused_dir, tmp_path):
    """The fused export writes one packed q/k/v MatMul per block; a pass that rewrites linears
    gets three MatMuls with the export's q/k/v names (same outputs), and pack_qkv restores the
    exported weight bit for bit."""
    from compiler.recipe import CalibrationConfig, PassSpec, Recipe

    exported = ir.load(tiny_fused_dir / "model.onnx")
    REGISTRY[_ReadsLinears.name] = _ReadsLinears
    try:
        recipe = Recipe("reads", None, "", CalibrationConfig(windows=2, seq_len=16), [PassSpec(_ReadsLinears.name, _ReadsLinears.Params(), {})])
        split = compile_model(tiny_fused_dir, tmp_path / "split", recipe=recipe, progress=False)
    finally:
        del REGISTRY[_ReadsLinears.name]
    assert _ops(split).count("MatMul") == _ops(tiny_fused_dir).count("MatMul") + 2 * 2
    model = ir.load(split / "model.onnx")
    for i, gqa in enumerate(n for n in model.graph if n.op_type == "GroupQueryAttention"):
        assert [v.producer().name for v in list(gqa.inputs)[:3]] == [f"/model/layers.{i}/attn/{r}_proj/MatMul" for r in "qkv"]
        parts = [model.graph.initializers[f"model.layers.{i}.self_attn.{r}_proj.weight"].const_value.numpy() for r in "qkv"]
        assert np.array_equal(np.concatenate(parts, axis=1), exported.graph.initializers[f"model.layers.{i}.self_attn.qkv_proj.weight"].const_value.numpy())
    assert json.loads((split / "llmfold.json").read_text())["passes"][-1]["modified"] is True
    _same_outputs(tiny_fused_dir, split, atol=1e-5)

    packed = compile_recipe_text(split, tmp_path, "packed", PACK)
    assert _ops(packed) == _ops(tiny_fused_dir)
    repacked = ir.load(packed / "model.onnx").graph.initializers
    for name, init in exported.graph.initializers.items():
        assert np.array_equal(repacked[name].const_value.numpy(), init.const_value.numpy()), name
    _same_outputs(tiny_fused_dir, packed, atol=0.0)


def test_nothing_to_pack_is_recorded_with_the_reason(tiny_explicit_dir, tmp_path):
    out = compile_recipe_text(tiny_explicit_dir, tmp_path, "explicit", PACK)
    rec = json.loads((out / "llmfold.json").read_text())["passes"][-1]
    assert rec["modified"] is False
    assert rec["records"][0]["skipped"] == {"0": "attention is not GroupQueryAttention", "1": "attention is not GroupQueryAttention"}
