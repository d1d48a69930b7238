"""logits_to_keep: an input with a default 0 (all rows); n keeps lm_head on the last n positions."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from compiler import runtime
from compiler.analyze import analyze
from compiler.errors import UserError
from compiler.testing import compile_recipe_text
from passes.logits import drop_logits_slice, insert_logits_slice

KEEP = '[[pass]]\nname = "logits_to_keep"\n'
INT4 = '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nact_bits = 8\n'
LAYOUT = '[[pass]]\nname = "pack_qkv"\n[[pass]]\nname = "skip_norm"\n[[pass]]\nname = "silu_op"\n'


def _feeds(lm: runtime.LanguageModel, ids: np.ndarray) -> dict:
    ids = ids.reshape(1, -1)
    return lm.feeds(ids, runtime.next_attention_mask(None, ids.shape[1], lm.kv_cache))


PACKED = '[[pass]]\nname = "packed_matmul"\n'


@pytest.mark.parametrize("lm_head", ["QMatMul", "PackedMatMul"])
def test_default_keeps_every_row_and_n_keeps_the_last_n_exactly(tiny_fused_dir, tmp_path, lm_head):
    # PackedMatMul: its kernels compute a row the same way whatever the row count (kernels.h)
    before, after = (INT4 + LAYOUT, "") if lm_head == "QMatMul" else (LAYOUT, PACKED)
    out = compile_recipe_text(tiny_fused_dir, tmp_path, "keep", before + KEEP + after)
    ref = compile_recipe_text(tiny_fused_dir, tmp_path, "ref", before + after)
    passes = json.loads((out / "llmfold.json").read_text())["passes"]
    assert next(p for p in passes if p["name"] == "logits_to_keep")["records"][0]["added"] is True
    assert lm_head in [n.op_type for n in ir.load(out / "model.onnx").graph]
    a, b = runtime.open_session(ref, threads=1), runtime.open_session(out, threads=1)
    assert b.keeps_logits and not a.keeps_logits
    # an input with a default: callers that do not know it (genai, evaluation) are unaffected
    assert "logits_to_keep" not in [i.name for i in b.session.get_inputs()]
    ids = np.arange(5, 45)
    full = a.prefill_logits(ids)
    np.testing.assert_array_equal(b.prefill_logits(ids), full)
    for n, rows in ((1, 1), (3, 3), (0, 40), (1000, 40)):
        got = b.session.run(["logits"], _feeds(b, ids) | {"logits_to_keep": np.array([n], np.int64)})[0][0]
        assert got.shape == (rows, full.shape[1])
        np.testing.assert_array_equal(got, full[-rows:])
    # generation feeds 1: the same tokens and logits as the model without the input
    ga, gb = a.greedy(ids, 6, keep_logits=True), b.greedy(ids, 6, keep_logits=True)
    assert ga["tokens"] == gb["tokens"]
    np.testing.assert_array_equal(ga["logits"], gb["logits"])
    last, _ = b.prefill(ids)
    np.testing.assert_array_equal(last, full[-1])


def test_analysis_sees_through_the_slice_and_passes_remove_it(tiny_fused_dir, tmp_path):
    model = ir.load(tiny_fused_dir / "model.onnx")
    plain = analyze(model)
    assert insert_logits_slice(model.graph) and not insert_logits_slice(model.graph)
    s = analyze(model)
    assert s.unrecognized == [] and s.lm_head.node == plain.lm_head.node and s.lm_head.input != plain.lm_head.input
    assert drop_logits_slice(model.graph) and not drop_logits_slice(model.graph)
    assert [v.name for v in model.graph.inputs] == [v.name for v in ir.load(tiny_fused_dir / "model.onnx").graph.inputs]
    assert not {"logits_to_keep", "/logits_to_keep/ends", "/logits_to_keep/axes"} & set(model.graph.initializers)
    assert analyze(model).lm_head.input == plain.lm_head.input
    # a pass after it works on the plain graph: int4 after logits_to_keep = int4 alone, bit for
    # bit, in one recipe or compiling a compiled directory again
    alone = compile_recipe_text(tiny_fused_dir, tmp_path, "alone", INT4)
    after = compile_recipe_text(tiny_fused_dir, tmp_path, "after", KEEP + INT4)
    again = compile_recipe_text(compile_recipe_text(tiny_fused_dir, tmp_path, "kept", KEEP), tmp_path, "again", INT4)
    for out in (after, again):
        assert (out / "model.onnx.data").read_bytes() == (alone / "model.onnx.data").read_bytes()
        graph = ir.load(out / "model.onnx").graph
        assert "Slice" not in [n.op_type for n in graph] and "logits_to_keep" not in [v.name for v in graph.inputs]


def test_an_input_without_its_slice_is_refused(tiny_fused_dir):
    model = ir.load(tiny_fused_dir / "model.onnx")
    insert_logits_slice(model.graph)
    head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    sl = head.inputs[0].producer()
    head.replace_input_with(0, sl.inputs[0])  # someone rewired lm_head by hand
    with pytest.raises(UserError, match="no logits_to_keep Slice in front of lm_head"):
        drop_logits_slice(model.graph)


def test_logits_not_written_by_a_linear_are_refused(tiny_fused_dir):
    model = ir.load(tiny_fused_dir / "model.onnx")
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    ident = ir.Node("", "Identity", [logits])  # e.g. a Cast to fp16 after lm_head
    model.graph.append(ident)
    idx = model.graph.outputs.index(logits)
    logits.name = "lm_head_out"
    model.graph.outputs[idx] = ident.outputs[0]
    ident.outputs[0].name = "logits"
    with pytest.raises(UserError, match="no `logits` output written by an lm_head MatMul, QMatMul or PackedMatMul"):
        insert_logits_slice(model.graph)
