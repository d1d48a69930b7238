"""silu_op: SiLU z/(1+exp(−z)) → one com.microsoft.QuickGelu(alpha=1) node."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from compiler import runtime
from compiler.testing import compile_recipe_text



def test_silu_becomes_quickgelu_with_close_logits(tiny_layout_dir, tmp_path):
    plain = compile_recipe_text(tiny_layout_dir, tmp_path, "plain", '[[pass]]\nname = "cleanup"\n')
    fused = compile_recipe_text(tiny_layout_dir, tmp_path, "fused", '[[pass]]\nname = "silu_op"\n')
    ops = [n.op_type for n in ir.load(fused / "model.onnx").graph]
    before = [n.op_type for n in ir.load(plain / "model.onnx").graph]
    assert ops.count("QuickGelu") == 2 and ops.count("Exp") == 0 and len(ops) == len(before) - 2 * 3
    rec = json.loads((fused / "llmfold.json").read_text())["passes"][-1]["records"][0]
    assert rec["silu_nodes"] == 2
    ids = np.arange(5, 45)
    a = runtime.open_session(plain, threads=1).prefill_logits(ids)
    b = runtime.open_session(fused, threads=1).prefill_logits(ids)
    # σ's polynomial: ~1e-7 absolute, O(1) logits of the random tiny model
    assert float(np.abs(a - b).max()) <= 1e-5
