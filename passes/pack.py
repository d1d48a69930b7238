"""Pack each block's q/k/v linears into one linear feeding GroupQueryAttention's packed input.

With the fused attention layout, q = X·W_q, k = X·W_k, v = X·W_v read the same X and go only to
one com.microsoft.GroupQueryAttention node. One linear with W = [W_q | W_k | W_v] (columns
concatenated) computes [q | k | v] = X·W, and GroupQueryAttention given that as its `query`
input with `key`/`value` absent splits it back by its definition: columns [0, H·d), [H·d,
(H+KV)·d), [(H+KV)·d, (H+2KV)·d). The pass is exact: every output column is the same dot product
of the same row of X with the same weight column as before (bit-identical logits):

* dense: MatMul weights are concatenated along N;
* int4: llmfold.QMatMul weights are stored per 16-column tile (custom_ops/README.md: data
  [n_tiles][Kp/8][64], scales and zero points [n_tiles][n_blocks][16]), so concatenating the
  three flat arrays is the packed form of the concatenated matrix as long as q's and k's widths
  are whole tiles (N % 16 == 0); the per-token activation quantization (act_bits 8/4) depends on
  X's row only, and TRIP channel shifts must be identical (they are: the int4 pass chooses them
  from the shared input's statistics).

Why: a decode step is many small launches; two fewer per block (and one wider matrix for the
thread pool to split) is what onnxruntime-genai's own models do.

Skipped, with the reason recorded: q/k/v that are low-rank pairs or of different kinds or
quantization settings, a q/k feeding anything but the attention node (e.g. token pruning's
RotaryEmbedding), widths that are not whole tiles. Run it last: the layer map then records
q/k/v as column ranges of one weight, which the other passes do not rewrite.

`unpack_qkv` is the inverse for a dense packed MatMul (the fused export writes q/k/v packed):
W's column ranges become three MatMuls with the export's q/k/v names feeding the attention's
separate inputs — again the same dot products, so exact. Every pass that rewrites linears gets
separate q/k/v this way before it runs (CompilerPass.needs_plain_layout).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.analyze import const_array, is_onnx_op
from compiler.export import packed_qkv_names
from passes._weights import add_weight
from passes.base import CompilerPass, register_pass

TILE_N = 16
QMATMUL_INPUTS = ("qweight", "scales", "zero_points", "bias", "channel_shift")


def _const_inputs(node: ir.Node, first: int = 1) -> list[np.ndarray | None] | None:
    """Constant arrays of inputs first.. (None for absent ones); None when one is not constant."""
    out = []
    for v in list(node.inputs)[first:]:
        if v is None or not v.name:
            out.append(None)
            continue
        arr = const_array(v)
        if arr is None:
            return None
        out.append(arr)
    return out


def padded_const_inputs(node: ir.Node) -> list[np.ndarray | None] | None:
    """A QMatMul's constant inputs after A, one slot per QMATMUL_INPUTS (None: absent)."""
    consts = _const_inputs(node)
    return None if consts is None else consts + [None] * (len(QMATMUL_INPUTS) - len(consts))


def qmatmul_mismatch(nodes: list[ir.Node], what: str) -> str | None:
    """Why QMatMuls with constant inputs cannot become one QMatMul over their columns side by side
    (attributes other than N, which optional inputs are present, TRIP shifts), else None."""
    attrs = [{k: a.value for k, a in n.attributes.items() if k != "N"} for n in nodes]
    if any(a != attrs[0] for a in attrs[1:]):
        return f"{what} have different QMatMul attributes"
    consts = [padded_const_inputs(n) for n in nodes]
    present = [[c is not None for c in cs] for cs in consts]
    if any(p != present[0] for p in present[1:]):
        return f"{what} have different optional inputs"
    shifts = [cs[4] for cs in consts]
    if shifts[0] is not None and any(not np.array_equal(s, shifts[0]) for s in shifts[1:]):
        return f"{what} have different channel shifts"
    return None


def _why_not(nodes: list[ir.Node], attention: ir.Node) -> str | None:
    """None when the three nodes can be packed, else the reason."""
    x = nodes[0].inputs[0]
    kinds = {(n.domain, n.op_type) for n in nodes}
    if len(kinds) != 1 or kinds.pop() not in {("", "MatMul"), ("llmfold", "QMatMul")}:
        return "q/k/v are not all plain MatMuls or all QMatMuls"
    for n in nodes:
        if n.inputs[0] is not x:
            return "q/k/v do not read the same input"
        uses = list(n.outputs[0].uses())
        if len(uses) != 1 or uses[0].node is not attention or n.outputs[0].is_graph_output():
            return f"{n.name}'s output is read by more than the attention node"
        if _const_inputs(n) is None:
            return f"{n.name} has a non-constant weight"
    if nodes[0].op_type == "QMatMul":
        mismatch = qmatmul_mismatch(nodes, "q/k/v")
        if mismatch:
            return mismatch
        for n in nodes[:2]:
            if n.attributes.get_int("N") % TILE_N:
                return f"{n.name}'s width is not a multiple of {TILE_N} columns"
    return None


def concatenated_qmatmul_inputs(model: ir.Model, nodes: list[ir.Node], base: str) -> list[ir.Value | None]:
    """Inputs of one QMatMul computing the given QMatMuls' columns side by side (same X, attributes,
    optional inputs and shifts; every width but the last whole tiles): new initializers `base`.*."""
    consts = [padded_const_inputs(n) for n in nodes]
    inputs: list[ir.Value | None] = [nodes[0].inputs[0]]
    for j, suffix in enumerate(QMATMUL_INPUTS):
        arrays = [cs[j] for cs in consts]
        if arrays[0] is None:
            inputs.append(None)
        elif suffix == "channel_shift":
            inputs.append(add_weight(model, f"{base}.{suffix}", arrays[0], arrays[0].dtype))
        else:  # tile-major flat arrays (and bias [N]) concatenate along N
            inputs.append(add_weight(model, f"{base}.{suffix}", np.concatenate([a.reshape(-1) for a in arrays]), arrays[0].dtype))
    while inputs[-1] is None:
        inputs.pop()
    return inputs


def _packed_node(model: ir.Model, nodes: list[ir.Node], index: int) -> ir.Node:
    x = nodes[0].inputs[0]
    weight_name, node_name = packed_qkv_names(index)  # the export's names; QMatMul's derive from them
    base, node_base = weight_name.removesuffix(".weight"), node_name.removesuffix("/MatMul")
    if nodes[0].op_type == "MatMul":
        W = np.concatenate([_const_inputs(n)[0] for n in nodes], axis=1)
        return ir.Node("", "MatMul", [x, add_weight(model, f"{base}.weight", W, W.dtype)], name=f"{node_base}/MatMul")
    inputs = concatenated_qmatmul_inputs(model, nodes, base)
    N = sum(n.attributes.get_int("N") for n in nodes)
    attrs = [ir.AttrInt64("N", N)] + [a for k, a in nodes[0].attributes.items() if k != "N"]
    return ir.Node("llmfold", "QMatMul", inputs, attributes=attrs, name=f"{node_base}/QMatMul")


def unpack_qkv(model: ir.Model, structure) -> int:
    """Split every dense packed q/k/v MatMul feeding GroupQueryAttention into q, k, v (exact).

    Returns how many blocks were unpacked. Packed QMatMuls (a compiled model) are left alone.
    """
    graph = model.graph
    by_name = {n.name: n for n in graph}
    unpacked = 0
    for b in structure.blocks:
        lins = (b.q, b.k, b.v)
        if b.attention_kind != "GroupQueryAttention" or len({lin.node for lin in lins}) != 1 or b.q.columns is None:
            continue
        node, attention = by_name[b.q.node], by_name[b.attention]
        if not is_onnx_op(node, "MatMul") or attention.inputs[0] is not node.outputs[0]:
            continue
        W = const_array(node.inputs[1])
        uses = list(node.outputs[0].uses())
        if W is None or W.ndim != 2 or len(uses) != 1 or node.outputs[0].is_graph_output():
            continue
        for j, (lin, role) in enumerate(zip(lins, ("q", "k", "v"))):
            start, stop = lin.columns
            name = f"/model/layers.{b.index}/attn/{role}_proj/MatMul"
            weight = add_weight(model, f"model.layers.{b.index}.self_attn.{role}_proj.weight", W[:, start:stop], W.dtype)
            part = ir.Node("", "MatMul", [node.inputs[0], weight], name=name)
            part.outputs[0].name = f"{name}/output_0"
            graph.insert_before(node, part)
            attention.replace_input_with(j, part.outputs[0])
        graph.remove(node, safe=True)
        unpacked += 1
    if unpacked:
        RemoveUnusedNodesPass()(model)  # the packed weight
    return unpacked


@register_pass
class PackQKVPass(CompilerPass):
    name = "pack_qkv"
    description = "one q/k/v linear per block feeding GroupQueryAttention's packed input (exact)"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        structure = self.ctx.structure(model)
        graph = model.graph
        by_name = {n.name: n for n in graph}
        packed, skipped = 0, {}
        for b in structure.blocks:
            if b.attention_kind != "GroupQueryAttention":
                skipped[b.index] = "attention is not GroupQueryAttention"
                continue
            attention = by_name[b.attention]
            qkv = [by_name.get(lin.node) for lin in (b.q, b.k, b.v)]
            if any(n is None for n in qkv) or len({id(n) for n in qkv}) != 3:
                skipped[b.index] = "q/k/v are already one node or not single nodes"
                continue
            if any(len(lin.nodes) != 1 for lin in (b.q, b.k, b.v)):
                skipped[b.index] = "q/k/v are low-rank pairs"
                continue
            ins = list(attention.inputs)
            if [ins[j] for j in range(3)] != [n.outputs[0] for n in qkv]:
                skipped[b.index] = "the attention node does not read q/k/v directly"
                continue
            reason = _why_not(qkv, attention)
            if reason:
                skipped[b.index] = reason
                continue
            node = _packed_node(model, qkv, b.index)
            graph.insert_before(qkv[0], node)
            attention.replace_input_with(0, node.outputs[0])
            attention.replace_input_with(1, None)
            attention.replace_input_with(2, None)
            for n in qkv:
                graph.remove(n, safe=True)
            packed += 1
        RemoveUnusedNodesPass()(model)  # the weights the replaced nodes read
        self.report_blocks("packed_blocks", packed, len(structure.blocks), "packed q/k/v", skipped)
        return ir.passes.PassResult(model, packed > 0)
