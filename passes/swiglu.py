"""One QMatMul per block for the MLP's silu(gate)·up: gate and up packed side by side, SwiGLU in the op.

A Llama MLP computes gate = X·W_g and up = X·W_u from the same X, then silu(gate)·up, then down.
After the int4 and silu_op passes that is QMatMul, QMatMul, QuickGelu(alpha = 1), Mul. One
QMatMul with W = [W_g | W_u] (N = 2I columns) and the attribute swiglu = 1 computes the same
product [gate | up] — every column the same dot product of the same row as before, bit for bit,
including the per-token activation quantization (act_bits 8/4: a row's scale depends on X only;
TRIP shifts must be identical, as the int4 pass chooses them from the shared input) — and writes
silu(g)·u = g / (1 + exp(−g))·u from it (custom_ops/README.md). That epilogue is not bit-exact
against QuickGelu + Mul: the kernels evaluate exp with a polynomial (within 1e-6 relative of the
formula), where ORT's QuickGelu has a ~1e-7 absolute error on σ (passes/silu.py); both are far
below the quantization error, which is why the pass is for quantized recipes, after silu_op.

Packed layout: data, scales and zero points are stored per 16-column tile, so concatenating the
two flat arrays is the packed form of [W_g | W_u] when gate's width is whole tiles (I % 16 == 0;
SmolLM2: I = 1536). Why: a decode step pays per node; this removes three nodes per block
(QuickGelu, Mul and one QMatMul), one activation quantization, and streams the two weights as one.

Skipped, with the reason recorded: gate/up that are not single QMatMuls (dense, low-rank pairs),
with different attributes, optional inputs or shifts, a gate width that is not whole tiles, a
SiLU that is not QuickGelu(alpha = 1) (run silu_op first), intermediates read elsewhere.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from passes.base import CompilerPass, register_pass
from passes.pack import TILE_N, concatenated_qmatmul_inputs, padded_const_inputs, qmatmul_mismatch


def _only_use(value: ir.Value) -> ir.Node | None:
    """The single node reading `value` (None when it has several readers or is a graph output)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _match(gate: ir.Node, up: ir.Node) -> tuple[ir.Node, ir.Node] | str:
    """(QuickGelu, Mul) of silu(gate)·up, or the reason the pair cannot be fused."""
    for n in (gate, up):
        if n.op_type != "QMatMul" or n.domain != "llmfold":
            return "gate/up are not QMatMuls (run int4 first; low-rank pairs are not fused)"
    if gate.inputs[0] is not up.inputs[0]:
        return "gate and up do not read the same input"
    silu = _only_use(gate.outputs[0])
    if silu is None or silu.op_type != "QuickGelu" or silu.domain != "com.microsoft":
        return "gate's only reader is not a QuickGelu (run silu_op first)"
    alpha = silu.attributes.get("alpha")
    if alpha is None or float(alpha.value) != 1.0:
        return "the QuickGelu's alpha is not 1 (not a SiLU)"
    mul = _only_use(silu.outputs[0])
    if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or _only_use(up.outputs[0]) is not mul:
        return "silu(gate) and up are not multiplied by one Mul reading only them"
    if gate.attributes.get_int("swiglu", 0) or up.attributes.get_int("swiglu", 0):
        return "already fused"
    if any(padded_const_inputs(n) is None for n in (gate, up)):
        return "a gate/up weight is not constant"
    mismatch = qmatmul_mismatch([gate, up], "gate and up")
    if mismatch:
        return mismatch
    if gate.attributes.get_int("N") % TILE_N:
        return f"gate's width is not a multiple of {TILE_N} columns"
    if gate.attributes.get_int("N") != up.attributes.get_int("N"):
        return "gate and up have different widths"
    return silu, mul


def _fused_node(model: ir.Model, gate: ir.Node, up: ir.Node, index: int) -> ir.Node:
    inputs = concatenated_qmatmul_inputs(model, [gate, up], f"model.layers.{index}.mlp.gate_up_proj")
    N = 2 * gate.attributes.get_int("N")
    attrs = [ir.AttrInt64("N", N), ir.AttrInt64("swiglu", 1)] + [a for k, a in gate.attributes.items() if k != "N"]
    node = ir.Node("llmfold", "QMatMul", inputs, attributes=attrs, name=f"/model/layers.{index}/mlp/gate_up_proj/QMatMul")
    node.outputs[0].name = f"/model/layers.{index}/mlp/gate_up_proj/QMatMul/output_0"
    return node


@register_pass
class SwigluQMatMulPass(CompilerPass):
    name = "swiglu_qmatmul"
    description = "gate/up QMatMuls + QuickGelu + Mul → one QMatMul with the SwiGLU epilogue (≈1e-6 relative)"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        structure = self.ctx.structure(model)
        graph = model.graph
        by_name = {n.name: n for n in graph}
        fused, skipped = 0, {}
        for b in structure.blocks:
            if b.gate.columns is not None:
                skipped[b.index] = "already fused"
                continue
            gate, up = by_name.get(b.gate.node), by_name.get(b.up.node)
            if gate is None or up is None or len(b.gate.nodes or [b.gate.node]) != 1 or len(b.up.nodes or [b.up.node]) != 1:
                skipped[b.index] = "gate/up are not single nodes (low-rank pairs are not fused)"
                continue
            m = _match(gate, up)
            if isinstance(m, str):
                skipped[b.index] = m
                continue
            silu, mul = m
            node = _fused_node(model, gate, up, b.index)
            graph.insert_before(gate, node)
            ir.convenience.replace_all_uses_with(mul.outputs[0], node.outputs[0])
            graph.remove([mul, silu, up, gate], safe=True)
            fused += 1
        RemoveUnusedNodesPass()(model)  # the separate gate/up weights
        self.report_blocks("fused_blocks", fused, len(structure.blocks), "fused gate/up/SwiGLU", skipped)
        return ir.passes.PassResult(model, fused > 0)
