"""skip_norm: residual add + RMSNorm as one SkipSimplifiedLayerNormalization node, and back."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from compiler import runtime
from compiler.analyze import analyze
from compiler.testing import compile_recipe_text
from passes.skip_norm import fuse_skip_norms, unfuse_skip_norms

SKIP = '[[pass]]\nname = "skip_norm"\n'
INT4 = '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nact_bits = 8\n'


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_fused_norms_compute_the_same_and_keep_the_residual_names(tiny_fused_dir, tmp_path):
    plain = ir.load(tiny_fused_dir / "model.onnx")
    fused_dir = compile_recipe_text(tiny_fused_dir, tmp_path, "fused", SKIP)
    fused = ir.load(fused_dir / "model.onnx")
    # 2 blocks: every norm but the first block's input norm follows a residual add
    assert _ops(fused).count("SkipSimplifiedLayerNormalization") == 2 * 2
    assert _ops(fused).count("RMSNormalization") == 1 and _ops(fused).count("Add") == _ops(plain).count("Add") - 2 * 2
    assert json.loads((fused_dir / "llmfold.json").read_text())["passes"][-1]["records"][0]["fused"] == 4
    # the structure is the same decoder: same linears, the residual stream under the Adds' names
    s0, s1 = analyze(plain), analyze(fused)
    assert s1.unrecognized == [] and [lin.node for lin in s1.linears()] == [lin.node for lin in s0.linears()]
    assert [b.residual_in for b in s1.blocks] == [b.residual_in for b in s0.blocks]
    a, b = runtime.open_session(tiny_fused_dir, threads=1), runtime.open_session(fused_dir, threads=1)
    ids = np.arange(5, 45)
    np.testing.assert_allclose(a.prefill_logits(ids), b.prefill_logits(ids), rtol=0, atol=1e-5)
    ga, gb = a.greedy(ids, 8, keep_logits=True), b.greedy(ids, 8, keep_logits=True)
    assert ga["tokens"] == gb["tokens"]
    np.testing.assert_allclose(ga["logits"], gb["logits"], rtol=0, atol=1e-5)


def test_unfuse_restores_the_plain_graph(tiny_fused_dir):
    """Same nodes, names and value names again; only the Add before the final norm, whose sum
    nothing else reads (the fused node does not keep it), comes back under a new name."""
    model = ir.load(tiny_fused_dir / "model.onnx")

    def nodes(m):
        return {(n.op_type, n.name, tuple(o.name for o in n.outputs), tuple(v.name if v else "" for v in n.inputs)) for n in m.graph}

    before = nodes(model)
    assert fuse_skip_norms(model.graph) == 4 and unfuse_skip_norms(model.graph) == 4
    old, new = "/model/layers.1/mlp_residual/Add", "/model/norm/residual/Add"
    after = nodes(model)
    assert after != before and {tuple(tuple(x.replace(new, old) for x in f) if isinstance(f, tuple) else f.replace(new, old) for f in n) for n in after} == before


def test_a_later_pass_sees_the_plain_layout(tiny_fused_dir, tmp_path):
    """int4 after skip_norm runs on Add + RMSNormalization again: the same model, bit for bit, as
    int4 alone."""
    alone = compile_recipe_text(tiny_fused_dir, tmp_path, "alone", INT4)
    after = compile_recipe_text(tiny_fused_dir, tmp_path, "after", SKIP + INT4)
    assert "SkipSimplifiedLayerNormalization" not in _ops(ir.load(after / "model.onnx"))
    a, b = runtime.open_session(alone, threads=1), runtime.open_session(after, threads=1)
    ids = np.arange(5, 45)
    np.testing.assert_array_equal(a.prefill_logits(ids), b.prefill_logits(ids))
