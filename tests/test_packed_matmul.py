"""packed_matmul: float32 MatMuls → llmfold.PackedMatMul, the same products up to float summation order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from compiler.custom_ops import unpack_float_tiles
from compiler.modeldir import open_model_dir
from compiler.testing import _training_text, compile_recipe_text
from fold_helpers import compile_with_pass, op_types, runtime_outputs
from passes.base import CompilerPass

PACKED = '[[pass]]\nname = "packed_matmul"\n'
SVD = '[calibration]\nwindows = 8\nseq_len = 64\n[[pass]]\nname = "svd"\nratio = 0.3\nupdate = false\n'


def _close(a: Path, b: Path) -> None:
    """Same greedy tokens; logits within float summation error (measured ≤ 2e-6 on the tiny model)."""
    pa, ta, la = runtime_outputs(a)
    pb, tb, lb = runtime_outputs(b)
    assert ta == tb
    np.testing.assert_allclose(pa, pb, rtol=0, atol=2e-5 * np.abs(pa).max())
    np.testing.assert_allclose(la, lb, rtol=0, atol=2e-5 * np.abs(la).max())


def test_every_float_matmul_becomes_packed_with_the_same_products(tiny_model_dir, tmp_path):
    plain = compile_recipe_text(tiny_model_dir, tmp_path, "plain", '[[pass]]\nname = "cleanup"\n')
    packed = compile_recipe_text(tiny_model_dir, tmp_path, "packed", PACKED)
    n_matmul = op_types(plain).count("MatMul")
    assert n_matmul > 0 and op_types(packed).count("PackedMatMul") == n_matmul and "MatMul" not in op_types(packed)
    _close(plain, packed)
    # the packed tensors are the plain weights in tiles, exactly (and nothing else is stored)
    m_plain, m_packed = ir.load(plain / "model.onnx"), ir.load(packed / "model.onnx")
    for node in m_packed.graph:
        if node.op_type == "PackedMatMul":
            K, N = node.attributes.get_int("K"), node.attributes.get_int("N")
            name = node.inputs[1].name.removesuffix(".tiles")
            W = m_plain.graph.initializers[name].const_value.numpy()
            assert np.array_equal(unpack_float_tiles(node.inputs[1].const_value.numpy(), K, N), W), name
            assert name not in m_packed.graph.initializers
    rec = json.loads((packed / "llmfold.json").read_text())
    assert rec["passes"][-1]["records"][0]["packed_matmuls"] == n_matmul
    assert rec["custom_ops_library"] == "libllmfold_ops.so"
    # the structure analysis still sees every linear, dense, lm_head included
    st = open_model_dir(packed).structure()
    assert all(lin.kind == "dense" for lin in st.linears()) and st.lm_head is not None
    assert {lin.name for lin in st.linears()} == {lin.name for lin in open_model_dir(plain).structure().linears()}


def test_low_rank_pairs_stay_pairs(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join([_training_text()] * 3))
    svd = compile_recipe_text(tiny_model_dir, tmp_path, "svd", SVD, calib=calib)
    packed = compile_recipe_text(svd, tmp_path, "svd_packed", PACKED)
    _close(svd, packed)
    before, after = open_model_dir(svd).structure(), open_model_dir(packed).structure()
    assert len(before.linears()) == len(after.linears())
    for a, b in zip(before.linears(), after.linears()):
        assert (b.name, b.kind, b.rank, len(b.nodes)) == (a.name, a.kind, a.rank, len(a.nodes)), b.name
    assert sum(lin.kind == "low-rank" for lin in after.linears()) == 2 * 7
    # inspect reports the layers unchanged in kind, rank and width
    from compiler.inspect import diff_reports, inspect_model

    d = diff_reports(inspect_model(svd), inspect_model(packed))
    assert [c for c in d["changed_layers"] if set(c["changes"]) - {"bytes"}] == []


class _ReadsLinears(CompilerPass):
    """Stands for any pass that rewrites linears: it must see plain MatMuls."""

    name = "test-reads-linears-packed"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        assert not any(n.op_type == "PackedMatMul" for n in model.graph)
        return ir.passes.PassResult(model, False)


def test_passes_after_it_see_plain_matmuls_exactly(tiny_model_dir, tmp_path):
    """A pass that rewrites linears, run after packed_matmul, gets the plain MatMuls back: the same
    graph and the same weights, bit for bit, as when it runs on the unpacked model."""
    plain = compile_recipe_text(tiny_model_dir, tmp_path, "plain", '[[pass]]\nname = "cleanup"\n')
    packed = compile_recipe_text(tiny_model_dir, tmp_path, "packed", PACKED)
    out = compile_with_pass(_ReadsLinears, {"via_plain": plain, "via_packed": packed}, tmp_path)
    via_plain, via_packed = out["via_plain"], out["via_packed"]
    assert "PackedMatMul" not in op_types(via_packed) and sorted(op_types(via_packed)) == sorted(op_types(via_plain))
    a, b = ir.load(via_plain / "model.onnx").graph.initializers, ir.load(via_packed / "model.onnx").graph.initializers
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name].const_value.numpy(), b[name].const_value.numpy()), name


def test_shared_weights_are_packed_once_and_graph_inputs_are_left_alone():
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    from passes.packed_matmul import pack_matmuls, unpack_packed_matmuls

    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((8, 20)).astype(np.float32), "W")
    V = numpy_helper.from_array(rng.standard_normal((20, 5)).astype(np.float32), "V")
    D = numpy_helper.from_array(rng.standard_normal((8, 20)).astype(np.float32), "D")  # also a graph input
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["a"], name="/a/MatMul"),
         helper.make_node("MatMul", ["y", "W"], ["b"], name="/b/MatMul"),
         helper.make_node("MatMul", ["a", "V"], ["c"], name="/c/MatMul"),
         helper.make_node("MatMul", ["x", "D"], ["d"], name="/d/MatMul")],
        "g", [helper.make_tensor_value_info(n, TP.FLOAT, [3, 8]) for n in ("x", "y")]
        + [helper.make_tensor_value_info("D", TP.FLOAT, [8, 20])],
        [helper.make_tensor_value_info(n, TP.FLOAT, s) for n, s in (("b", [3, 20]), ("c", [3, 5]), ("d", [3, 20]))],
        [W, V, D])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert pack_matmuls(model) == (3, 8 * 20 + 20 * 5)
    ops = {n.name: n.op_type for n in model.graph}
    assert ops == {"/a/PackedMatMul": "PackedMatMul", "/b/PackedMatMul": "PackedMatMul",
                   "/c/PackedMatMul": "PackedMatMul", "/d/MatMul": "MatMul"}
    assert sorted(model.graph.initializers) == ["D", "V.tiles", "W.tiles"]
    assert [v.name for v in model.graph.outputs] == ["b", "c", "d"]
    onnx.checker.check_model(ir.serde.serialize_model(model))
    # the inverse gives the shared weight back once, bit for bit
    assert unpack_packed_matmuls(model) == 3
    assert {n.name: n.op_type for n in model.graph} == {"/a/MatMul": "MatMul", "/b/MatMul": "MatMul",
                                                         "/c/MatMul": "MatMul", "/d/MatMul": "MatMul"}
    assert sorted(model.graph.initializers) == ["D", "V", "W"]
    assert np.array_equal(model.graph.initializers["W"].const_value.numpy(), numpy_helper.to_array(W))
    # nothing to pack: the graph is left as it is, unrelated dead nodes included
    g2 = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="live"),
                            helper.make_node("Relu", ["x"], ["unused"], name="dead")], "g2",
                           [helper.make_tensor_value_info("x", TP.FLOAT, [3, 8])],
                           [helper.make_tensor_value_info("y", TP.FLOAT, [3, 8])])
    other = ir.serde.deserialize_model(helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)]))
    assert pack_matmuls(other) == (0, 0) and [n.name for n in other.graph] == ["live", "dead"]
