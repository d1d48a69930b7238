"""Structure analysis on our export, on an onnxruntime-genai builder export, and on rewritten
graphs (low-rank pair, QMatMul) — plus honest reporting of what it cannot place."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler.analyze import analyze
from compiler.errors import UserError
from compiler.structure import LINEAR_ROLES, ModelStructure


def _load(model_dir) -> ir.Model:
    return ir.load(Path(model_dir) / "model.onnx")


def test_our_export(tiny_layout_dir):
    model = _load(tiny_layout_dir)
    fused = "com.microsoft" in model.opset_imports
    s = analyze(model)
    assert s.unrecognized == []
    assert len(s.blocks) == 2
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size, s.intermediate_size) == (4, 2, 16, 64, 128)
    assert s.vocab_size == 384 and s.rope_theta == 10000.0 and abs(s.rms_norm_eps - 1e-5) < 1e-9
    assert s.embedding == "model.embed_tokens.weight" and s.tied_embeddings is False
    shapes = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128), "down": (128, 64)}
    hf_names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    inits = model.graph.initializers
    for b in s.blocks:
        if fused:
            assert b.attention_kind == "GroupQueryAttention"
            assert b.attention == f"/model/layers.{b.index}/attn/GroupQueryAttention"
            assert b.o.input == f"{b.attention}/output_0"
        else:
            assert b.attention_kind == "softmax" and b.attention == f"/model/layers.{b.index}/attn/Softmax"
        assert b.input_norm.weight == f"model.layers.{b.index}.input_layernorm.weight"
        assert b.post_attention_norm.weight == f"model.layers.{b.index}.post_attention_layernorm.weight"
        assert b.attention_residual_add == f"/model/layers.{b.index}/attn_residual/Add"
        assert b.mlp_residual_add == f"/model/layers.{b.index}/mlp_residual/Add"
        packed_columns = {"q": [0, 64], "k": [64, 96], "v": [96, 128]} if fused else {}
        for role in LINEAR_ROLES:
            lin = getattr(b, role)
            assert lin.role == role and lin.block == b.index and lin.name == f"layers.{b.index}.{role}"
            assert lin.kind == "dense" and lin.nodes == [lin.node] and lin.columns == packed_columns.get(role)
            assert (lin.K, lin.N) == shapes[role]
            if role in packed_columns:  # the fused export packs q/k/v into one MatMul
                assert lin.weight == f"model.layers.{b.index}.self_attn.qkv_proj.weight"
                assert lin.node == f"/model/layers.{b.index}/attn/qkv_proj/MatMul"
                assert inits[lin.weight].const_value.shape == (64, 128)
            else:
                assert lin.weight == f"model.layers.{b.index}.{hf_names[role]}.weight"
                assert shapes[role] == inits[lin.weight].const_value.shape
        # linear inputs are the values calibration must tap
        assert b.q.input == b.k.input == b.v.input == b.input_norm.output
        assert b.gate.input == b.up.input == b.post_attention_norm.output
    assert s.blocks[0].residual_in == "/model/embed_tokens/Gather/output_0"
    assert s.blocks[1].residual_in == "/model/layers.0/mlp_residual/Add/output_0"
    assert s.final_norm.weight == "model.norm.weight"
    assert s.lm_head.output == "logits" and (s.lm_head.K, s.lm_head.N) == (64, 384)
    assert [lin.name for lin in s.linears()][-1] == "lm_head" and len(s.linears()) == 15
    assert ModelStructure.from_json(s.to_json()) == s


def _genai_export(hf_dir, out: Path) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "cache")]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_onnxruntime_genai_builder_export(tiny_hf_dir, tmp_path):
    """genai fuses q/k/v into one MatMul feeding GroupQueryAttention and fuses norms + residual
    adds (SkipSimplifiedLayerNormalization): every linear is still found, q/k/v by columns."""
    out = _genai_export(tiny_hf_dir, tmp_path / "genai")
    model = _load(out)
    s = analyze(model)
    assert s.unrecognized == []
    assert len(s.blocks) == 2
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.rope_theta) == (4, 2, 16, 10000.0)
    for b in s.blocks:
        assert b.attention_kind == "GroupQueryAttention"
        qkv = b.q.node
        assert b.k.node == b.v.node == qkv and qkv.endswith("qkv_proj/MatMul")
        assert (b.q.columns, b.k.columns, b.v.columns) == ([0, 64], [64, 96], [96, 128])
        assert (b.q.N, b.k.N, b.v.N) == (64, 32, 32)
        assert b.o.node.endswith("o_proj/MatMul")
        assert b.gate.node.endswith("gate_proj/MatMul") and b.up.node.endswith("up_proj/MatMul")
        assert b.down.node.endswith("down_proj/MatMul")
        assert b.input_norm.weight == f"model.layers.{b.index}.input_layernorm.weight"
        assert b.post_attention_norm.weight == f"model.layers.{b.index}.post_attention_layernorm.weight"
        # residual adds are fused into the skip norms
        assert b.attention_residual_add == b.post_attention_norm.node
    assert s.blocks[1].input_norm.node == s.blocks[0].mlp_residual_add
    assert s.lm_head.output == "logits" and s.final_norm is not None
    # the genai weights are the HF weights, transposed: q columns of the packed matrix
    from safetensors.numpy import load_file

    hf = load_file(str(Path(tiny_hf_dir) / "model.safetensors"))
    packed = model.graph.initializers[model.graph.node(s.blocks[0].q.node).inputs[1].name].const_value.numpy()
    for role, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        lo, hi = getattr(s.blocks[0], role).columns
        np.testing.assert_array_equal(packed[:, lo:hi], hf[f"model.layers.0.self_attn.{proj}.weight"].T)


def _replace_with_low_rank(model: ir.Model, node_name: str, rank: int) -> None:
    node = model.graph.node(node_name)
    w = node.inputs[1].const_value.numpy()
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    a = (u[:, :rank] * sv[:rank]).astype(np.float32)
    b = vt[:rank].astype(np.float32)
    va = ir.Value(name=node_name + ".A", shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(a))
    vb = ir.Value(name=node_name + ".B", shape=ir.Shape(b.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(b))
    model.graph.register_initializer(va)
    model.graph.register_initializer(vb)
    first = ir.node("MatMul", [node.inputs[0], va], name=node_name + "/lowrank_A")
    second = ir.node("MatMul", [first.outputs[0], vb], name=node_name + "/lowrank_B")
    model.graph.insert_before(node, [first, second])
    node.outputs[0].replace_all_uses_with(second.outputs[0])
    model.graph.remove(node, safe=True)


def _replace_with_qmatmul(model: ir.Model, node_name: str) -> None:
    node = model.graph.node(node_name)
    K, N = node.inputs[1].const_value.shape
    packed = ir.Value(name=node_name + ".packed", shape=ir.Shape([N * K // 2]), type=ir.TensorType(ir.DataType.UINT8),
                      const_value=ir.tensor(np.zeros(N * K // 2, np.uint8)))
    model.graph.register_initializer(packed)
    q = ir.node("QMatMul", [node.inputs[0], packed], attributes={"K": K, "N": N, "block_size": 32, "act_bits": 8},
                domain="llmfold", name=node_name + "/QMatMul")
    model.graph.insert_before(node, [q])
    node.outputs[0].replace_all_uses_with(q.outputs[0])
    model.graph.remove(node, safe=True)


def test_low_rank_and_int4_linears_are_recognized(tiny_model_dir):
    from passes.pack import unpack_qkv

    model = _load(tiny_model_dir)
    unpack_qkv(model, analyze(model))  # separate q/k/v, as every linear-rewriting pass sees them
    _replace_with_low_rank(model, "/model/layers.0/mlp/down_proj/MatMul", rank=16)
    _replace_with_low_rank(model, "/model/layers.1/attn/k_proj/MatMul", rank=8)
    _replace_with_qmatmul(model, "/model/layers.1/attn/q_proj/MatMul")
    _replace_with_qmatmul(model, "/model/layers.0/mlp/gate_proj/MatMul")
    s = analyze(model)
    assert s.unrecognized == []
    down = s.linear("layers.0.down")
    assert down.kind == "low-rank" and down.rank == 16 and (down.K, down.N) == (128, 64)
    assert down.nodes == ["/model/layers.0/mlp/down_proj/MatMul/lowrank_A", "/model/layers.0/mlp/down_proj/MatMul/lowrank_B"]
    assert down.weight is None and down.output == model.graph.node(down.nodes[1]).outputs[0].name
    assert down.input == "/model/layers.0/mlp/gate_up/Mul/output_0"
    k = s.linear("layers.1.k")
    assert k.kind == "low-rank" and k.rank == 8 and (k.K, k.N) == (64, 32)
    q = s.linear("layers.1.q")
    assert q.kind == "int4" and (q.K, q.N, q.block_size, q.act_bits, q.bits) == (64, 64, 32, 8, 4)
    gate = s.linear("layers.0.gate")
    assert gate.kind == "int4" and gate.role == "gate"
    assert s.linear("layers.0.up").kind == "dense"


def test_unplaced_linear_is_reported_not_guessed(tiny_model_dir):
    model = _load(tiny_model_dir)
    # an extra projection of the final norm output, exposed as a second head
    s0 = analyze(model)
    h = next(o for n in model.graph for o in n.outputs if o.name == s0.final_norm.output)
    w = ir.Value(name="extra.weight", shape=ir.Shape([64, 8]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.ones((64, 8), np.float32)))
    model.graph.register_initializer(w)
    extra = ir.node("MatMul", [h, w], name="/extra/MatMul")
    extra.outputs[0].name = "extra_out"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    s = analyze(model)
    assert s.lm_head is None and s.final_norm is None
    assert any("lm_head" in u for u in s.unrecognized)
    assert any("/extra/MatMul" in u for u in s.unrecognized) and any("/lm_head/MatMul" in u for u in s.unrecognized)
    assert len(s.blocks) == 2  # the blocks are still found


def test_mlp_without_silu_is_reported(tiny_model_dir):
    model = _load(tiny_model_dir)
    exp = model.graph.node("/model/layers.1/mlp/act/Exp")
    exp.op_type = "Tanh"  # no longer a SiLU: gate and up cannot be told apart
    s = analyze(model)
    assert len(s.blocks) == 1
    assert any("layers.1" in u and "gate" in u for u in s.unrecognized)
    assert any("layers.1/mlp/gate_proj" in u for u in s.unrecognized)


def test_graph_without_decoder_is_a_user_error():
    x = ir.Value(name="input_ids", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.INT64))
    table = ir.Value(name="table", shape=ir.Shape([10, 8]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.zeros((10, 8), np.float32)))
    gather = ir.node("Gather", [table, x], name="g")
    graph = ir.Graph([x], [gather.outputs[0]], nodes=[gather], initializers=[table], opset_imports={"": 21})
    with pytest.raises(UserError, match="no Llama decoder block"):
        analyze(ir.Model(graph, ir_version=10))
    y = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.node("Relu", [y], name="r")
    graph = ir.Graph([y], [relu.outputs[0]], nodes=[relu], opset_imports={"": 21})
    with pytest.raises(UserError, match="no token embedding"):
        analyze(ir.Model(graph, ir_version=10))
