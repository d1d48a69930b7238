"""pack_lowrank: low-rank pairs reading one input share one first factor + Split, bit-identical with PackedMatMul."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler.modeldir import open_model_dir
from compiler.testing import _training_text, compile_recipe_text
from fold_helpers import compile_with_pass, op_types, runtime_outputs
from passes.base import CompilerPass

SVD = '[calibration]\nwindows = 8\nseq_len = 64\n[[pass]]\nname = "svd"\nratio = 0.3\nupdate = false\n'
PACK = '[[pass]]\nname = "pack_lowrank"\n'
PACKED = '[[pass]]\nname = "packed_matmul"\n'


@pytest.fixture
def svd_dir(tiny_layout_dir, tmp_path) -> Path:
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join([_training_text()] * 3))
    return compile_recipe_text(tiny_layout_dir, tmp_path, "svd", SVD, calib=calib)


@pytest.mark.parametrize("grouped", [True, False])
def test_shared_first_factors_give_the_same_logits_bit_for_bit(svd_dir, tmp_path, grouped):
    """On PackedMatMul every output is one k-order sum whatever its column or block, so packing the
    first factors side by side, and the second factors block-diagonally (when packed_matmul ran
    first) or behind a Split (when it runs after), changes no bit; the layers keep their names,
    kinds and ranks."""
    packed = compile_recipe_text(svd_dir, tmp_path, "packed", PACKED)
    shared = compile_recipe_text(svd_dir, tmp_path, "shared", PACKED + PACK if grouped else PACK + PACKED)
    blocks = len(open_model_dir(svd_dir).structure().blocks)
    # per block: first factors q/k/v 3→1 and gate/up 2→1; grouped also the second factors
    fewer = 6 * blocks if grouped else 3 * blocks
    assert op_types(shared).count("PackedMatMul") == op_types(packed).count("PackedMatMul") - fewer
    assert op_types(shared).count("Split") - op_types(packed).count("Split") == (0 if grouped else 2 * blocks)
    for a, b in zip(runtime_outputs(packed), runtime_outputs(shared)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    rec = json.loads((shared / "llmfold.json").read_text())["passes"][-1 if grouped else -2]
    assert rec["name"] == "pack_lowrank" and rec["records"][0]["shared_first_factors"] == 2 * blocks
    assert rec["records"][0]["nodes_removed"] == fewer and rec["records"][0]["skipped"] == {}
    before, after = open_model_dir(packed).structure(), open_model_dir(shared).structure()
    for a, b in zip(before.linears(), after.linears()):
        assert (b.name, b.kind, b.K, b.N, b.rank) == (a.name, a.kind, a.K, a.N, a.rank), b.name
        assert a.rank_columns is None
    for blk in after.blocks:
        for group in ((blk.q, blk.k, blk.v), (blk.gate, blk.up)):
            assert len({lin.nodes[0] for lin in group}) == 1  # one shared first node
            ends = [lin.rank_columns for lin in group]
            assert ends[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ends, ends[1:]))
            assert all(c[1] - c[0] == lin.rank for c, lin in zip(ends, group))
        assert blk.o.rank_columns is None and blk.down.rank_columns is None
    # the analysis finds the same thing from the graph alone (not only from llmfold.json)
    from compiler.analyze import analyze

    fresh = analyze(ir.load(shared / "model.onnx"))
    assert [(lin.name, lin.rank, lin.rank_columns) for lin in fresh.linears()] == [
        (lin.name, lin.rank, lin.rank_columns) for lin in after.linears()]


def test_dense_first_factors_and_inspect(svd_dir, tmp_path):
    """With plain MatMul first factors (ONNX Runtime's MatMul) the products are the same up to float
    summation order; inspect splits the shared weight's bytes by rank and shows the columns."""
    shared = compile_recipe_text(svd_dir, tmp_path, "shared_dense", PACK)
    (pa, ta, la), (pb, tb, lb) = runtime_outputs(svd_dir), runtime_outputs(shared)
    assert ta == tb
    np.testing.assert_allclose(pb, pa, rtol=0, atol=2e-5 * np.abs(pa).max())
    np.testing.assert_allclose(lb, la, rtol=0, atol=2e-5 * np.abs(la).max())
    from compiler.inspect import diff_reports, inspect_model

    a, b = inspect_model(svd_dir), inspect_model(shared)
    assert a["linear_bytes"] == b["linear_bytes"]  # float32, no padding: the same bytes, split by rank
    d = diff_reports(a, b)
    changed = {c["name"]: c["changes"] for c in d["changed_layers"]}
    assert set(changed) == {f"layers.{i}.{r}" for i in range(2) for r in ("q", "k", "v", "gate", "up")}
    assert all(set(ch) <= {"shared_rank_columns", "bytes"} for ch in changed.values())
    rows = {r["name"]: r for r in b["linear_layers"]}
    assert rows["layers.0.k"]["shared_rank_columns"] == [rows["layers.0.q"]["rank"], rows["layers.0.q"]["rank"] + rows["layers.0.k"]["rank"]]


class _ReadsLinears(CompilerPass):
    """Stands for any pass that rewrites linears: it must see each pair with its own first factor."""

    name = "test-reads-linears-lowrank"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        assert not any(n.op_type == "Split" and "lowrank" in n.name for n in model.graph)
        assert all(lin.rank_columns is None for lin in self.ctx.structure(model).linears())
        return ir.passes.PassResult(model, False)


@pytest.mark.parametrize("recipe", [PACKED + PACK, PACK + PACKED, PACK])
def test_passes_after_it_see_the_pairs_exactly(svd_dir, tmp_path, recipe):
    """A pass run after pack_lowrank (with packed_matmul before or after it, or not at all) gets the
    graph and weights it would get from the unpacked model, bit for bit."""
    shared = compile_recipe_text(svd_dir, tmp_path, "shared", recipe)
    out = compile_with_pass(_ReadsLinears, {"via_plain": svd_dir, "via_shared": shared}, tmp_path)
    ga, gb = (ir.load(out[k] / "model.onnx").graph for k in ("via_plain", "via_shared"))
    def nodes(g):  # (node names are not compared: packed_matmul's round trip renames a pair's nodes)
        return sorted((n.op_type, json.dumps(dict(n.metadata_props)), tuple(v.name if v else "" for v in n.inputs[1:])) for n in g)

    assert nodes(gb) == nodes(ga)
    assert ga.initializers.keys() == gb.initializers.keys()
    for name in ga.initializers:
        assert np.array_equal(ga.initializers[name].const_value.numpy(), gb.initializers[name].const_value.numpy()), name


def test_what_cannot_be_shared_is_recorded_with_the_reason(tiny_model_dir, svd_dir, tmp_path):
    dense = compile_recipe_text(tiny_model_dir, tmp_path, "dense", PACK)
    rec = json.loads((dense / "llmfold.json").read_text())["passes"][-1]
    assert rec["modified"] is False and rec["records"][0]["shared_first_factors"] == 0
    assert rec["records"][0]["skipped"]["0"] == "q/k/v: fewer than two low-rank pairs; gate/up: fewer than two low-rank pairs"
    calib = tmp_path / "calib.txt"  # (svd_dir's own calibration text, for int4's statistics)
    int4 = compile_recipe_text(svd_dir, tmp_path, "int4", '[calibration]\nwindows = 4\nseq_len = 64\n'
                               '[[pass]]\nname = "int4"\nblock_size = 16\n' + PACK, calib=calib)
    rec = json.loads((int4 / "llmfold.json").read_text())["passes"][-1]
    assert rec["records"][0]["shared_first_factors"] == 0
    assert "the first factors are int4 (QMatMul)" in rec["records"][0]["skipped"]["1"]


def test_decode_breakdown_stacks_block_diagonal_nodes(svd_dir, tmp_path):
    """samples/decode_breakdown.py times every linear node alone: a block-diagonal PackedMatMul goes in
    with one output per group and runs."""
    import sys

    import onnxruntime as ort

    from compiler import custom_ops as co

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
    try:
        from decode_breakdown import linear_stack
    finally:
        sys.path.pop(0)
    shared = compile_recipe_text(svd_dir, tmp_path, "shared", PACKED + PACK)
    stack, feeds, nbytes, kinds = linear_stack(shared)
    grouped = [n for n in stack.graph.node if any(a.name == "group_n" for a in n.attribute)]
    assert len(grouped) == 4 and kinds == {"PackedMatMul": op_types(shared).count("PackedMatMul")}
    outs = ort.InferenceSession(stack.SerializeToString(), co.make_session_options(1)).run(None, feeds)
    assert len(outs) == len(stack.graph.output) == sum(len(n.output) for n in stack.graph.node)
    assert nbytes == sum(i.const_value.nbytes for i in ir.load(shared / "model.onnx").graph.initializers.values()
                         if i.name.endswith(".tiles"))
