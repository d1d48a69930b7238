"""swiglu_qmatmul: gate/up QMatMuls + QuickGelu + Mul → one QMatMul with the SwiGLU epilogue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler import runtime
from compiler.errors import UserError
from compiler.testing import compile_recipe_text

INT4 = '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nsymmetric = {sym}\nact_bits = {bits}\n'
SILU = '[[pass]]\nname = "silu_op"\n'
FUSE = '[[pass]]\nname = "swiglu_qmatmul"\n'


def _ops(d: Path) -> list[str]:
    return [n.op_type for n in ir.load(d / "model.onnx").graph]


def _record(d: Path) -> dict:
    return json.loads((d / "llmfold.json").read_text())["passes"][-1]["records"][-1]


@pytest.mark.parametrize("bits,sym,atol", [(16, "true", 1e-5), (8, "false", 1e-3), (4, "false", 1e-3)])
def test_fused_gate_up_matches_separate_nodes(tiny_layout_dir, tmp_path, bits, sym, atol):
    """Three nodes fewer per block; logits within the epilogue's exp accuracy of QuickGelu + Mul
    (float activations: 1e-5 on the tiny model's O(1) logits; int8/int4 activations round down's
    input per token, where a ~1e-7 change can move one rounding step); the layer map records
    gate/up as column ranges of the fused node; greedy tokens agree."""
    plain = compile_recipe_text(tiny_layout_dir, tmp_path, "plain", INT4.format(bits=bits, sym=sym) + SILU)
    fused = compile_recipe_text(tiny_layout_dir, tmp_path, "fused", INT4.format(bits=bits, sym=sym) + SILU + FUSE)
    before, after = _ops(plain), _ops(fused)
    assert len(after) == len(before) - 2 * 3
    assert after.count("QMatMul") == before.count("QMatMul") - 2 and "QuickGelu" not in after
    assert _record(fused)["fused_blocks"] == 2 and _record(fused)["skipped"] == {}
    meta = json.loads((fused / "llmfold.json").read_text())
    for b in meta["structure"]["blocks"]:
        gate, up = b["gate"], b["up"]
        assert gate["node"] == up["node"] == f"/model/layers.{b['index']}/mlp/gate_up_proj/QMatMul"
        width = gate["N"]
        assert (gate["columns"], up["columns"]) == ([0, width], [width, 2 * width]) and width % 16 == 0
    node = next(n for n in ir.load(fused / "model.onnx").graph if n.op_type == "QMatMul" and n.attributes.get_int("swiglu", 0))
    assert node.attributes.get_int("N") == 2 * width
    la, lb = runtime.open_session(plain, threads=1), runtime.open_session(fused, threads=1)
    ids = np.arange(5, 45)
    a, b = la.prefill_logits(ids), lb.prefill_logits(ids)
    assert float(np.abs(a - b).max()) <= atol
    assert la.greedy(ids, 8)["tokens"] == lb.greedy(ids, 8)["tokens"]


def test_skips_with_reasons(tiny_model_dir, tmp_path):
    """Nothing fused without QMatMuls or without silu_op; the reasons are recorded."""
    dense = compile_recipe_text(tiny_model_dir, tmp_path, "dense", SILU + FUSE)
    assert set(_record(dense)["skipped"].values()) == {"gate/up are not QMatMuls (run int4 first; low-rank pairs are not fused)"}
    assert _record(dense)["fused_blocks"] == 0
    no_silu = compile_recipe_text(tiny_model_dir, tmp_path, "nosilu", INT4.format(bits=8, sym="true") + FUSE)
    assert set(_record(no_silu)["skipped"].values()) == {"gate's only reader is not a QuickGelu (run silu_op first)"}
    again = compile_recipe_text(tiny_model_dir, tmp_path, "twice", INT4.format(bits=8, sym="true") + SILU + FUSE + FUSE)
    assert set(_record(again)["skipped"].values()) == {"already fused"}


def test_tune_scales_refuses_fused_node(tiny_model_dir, tmp_path):
    """Passes that train per-layer weights need gate and up apart: a clear refusal, no output."""
    fused = compile_recipe_text(tiny_model_dir, tmp_path, "fused", INT4.format(bits=8, sym="true") + SILU + FUSE)
    with pytest.raises(UserError, match="fused column slice"):
        compile_recipe_text(fused, tmp_path, "tuned", '[[pass]]\nname = "tune_scales"\nwindows = 2\nval_windows = 1\nseq_len = 32\n')
    assert not (tmp_path / "tuned").exists()
