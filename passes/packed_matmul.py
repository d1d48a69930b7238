"""Float32 linears → llmfold.PackedMatMul: the same products, weights in the order decode reads them.

A MatMul Y = X·W with a constant float32 weight W [K, N] becomes PackedMatMul(X, B) with
B = W's columns in 16-column tiles, 4 tiles to a group whose k rows are stored side by side
(custom_ops/kernels/kernels.h; the padded columns of the last tile are zero and never written
out). Every output is still the dot product of a row of X with a column of W; only the order of
the float additions differs (ONNX Runtime's MLAS blocks its sums one way, the PackedMatMul kernels
sum each output in k order; both stay within K·2⁻²⁴·Σ|x·w| of the exact sum, and neither depends
on how many rows a call has). So the pass is exact up to float summation order: the tests compare
a compiled tiny model's logits with the input model's.

Why: a decode step multiplies one row by every weight matrix, so its speed is how fast the weights
stream from memory. The PackedMatMul kernels read each matrix once, front to back, at any width
(at M = 1 a group of four tiles is one contiguous run of K × 256 bytes); ONNX Runtime's MatMul reached
less of the memory bandwidth on the same weights, most visibly on the many small matrices of
SVD-LLM's low-rank pairs (custom_ops/README.md, "PackedMatMul").

Low-rank pairs stay pairs: both factors are converted and keep the SVD pass's layer tag, so the
structure analysis still sees one low-rank linear. `unpack_packed_matmuls` is the inverse (exact),
run before any pass that needs plain MatMuls (CompilerPass.needs_plain_layout). Run this pass last:
it is a runtime layout, like pack_qkv and logits_to_keep.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.analyze import const_array, is_onnx_op
from compiler.custom_ops import DOMAIN, OPSET_VERSION, pack_float_tiles, unpack_float_tiles
from passes._weights import add_weight
from passes.base import CompilerPass, register_pass

OP = "PackedMatMul"


def _packable_weight(node: ir.Node) -> np.ndarray | None:
    """W [K, N] float32 when `node` is a MatMul of a non-constant X by a constant 2-D float32 W."""
    if not is_onnx_op(node, "MatMul") or len(node.inputs) != 2:
        return None
    x, w = node.inputs
    if x is None or w is None or const_array(x) is not None or w.is_graph_input():
        return None  # (a graph input's initializer is only a default the caller may replace)
    W = const_array(w)
    if W is None or W.ndim != 2 or W.dtype != np.float32 or min(W.shape) < 1:
        return None
    return W


def _weight_name(value: ir.Value, suffix: str) -> str:
    return (value.name or "weight") + suffix


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """`new` computes what `old` did: it takes over the output (name, type, shape, uses, graph
    output) and the layer tag (the SVD pass's metadata_props); `old` goes."""
    new.metadata_props.update(old.metadata_props)
    ir.convenience.replace_nodes_and_values(graph, insertion_point=old, old_nodes=[old], new_nodes=[new],
                                            old_values=list(old.outputs), new_values=list(new.outputs))


def pack_matmuls(model: ir.Model) -> tuple[int, int]:
    """Every packable MatMul → PackedMatMul; (nodes converted, parameters of the weights packed)."""
    graph = model.graph
    count = params = 0
    tiles: dict[int, ir.Value] = {}  # one packed copy per weight, however many MatMuls read it
    for node in [n for n in graph if is_onnx_op(n, "MatMul")]:
        W = _packable_weight(node)
        if W is None:
            continue
        K, N = W.shape
        w = node.inputs[1]
        if id(w) not in tiles:
            tiles[id(w)] = add_weight(model, _weight_name(w, ".tiles"), pack_float_tiles(W), np.float32)
            params += K * N
        packed = tiles[id(w)]
        name = node.name[: -len("/MatMul")] + f"/{OP}" if node.name.endswith("/MatMul") else f"{node.name}/{OP}"
        new = ir.Node(DOMAIN, OP, [node.inputs[0], packed], attributes=[ir.AttrInt64("K", K), ir.AttrInt64("N", N)],
                      name=name)
        _replace(graph, node, new)
        count += 1
    if count:
        model.opset_imports.setdefault(DOMAIN, OPSET_VERSION)
        RemoveUnusedNodesPass()(model)  # the plain weights nothing reads any more
    return count, params


def unpack_packed_matmuls(model: ir.Model) -> int:
    """The inverse: every PackedMatMul with a constant weight (and no bias) → MatMul; how many."""
    graph = model.graph
    count = 0
    plain: dict[int, ir.Value] = {}  # one plain weight per packed one, however many nodes read it
    for node in [n for n in graph if n.op_type == OP and n.domain == DOMAIN]:
        B = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if B is None or (len(node.inputs) > 2 and node.inputs[2] is not None) or len(node.outputs) != 1 or "group_k" in node.attributes:
            continue  # (block-diagonal ones: passes/pack_lowrank.py splits them)
        K, N = node.attributes.get_int("K"), node.attributes.get_int("N")
        b = node.inputs[1]
        if id(b) not in plain:
            plain[id(b)] = add_weight(model, _weight_name(b, "").removesuffix(".tiles"), unpack_float_tiles(B, K, N))
        W = plain[id(b)]
        name = node.name[: -len(f"/{OP}")] + "/MatMul" if node.name.endswith(f"/{OP}") else f"{node.name}/MatMul"
        _replace(graph, node, ir.Node("", "MatMul", [node.inputs[0], W], name=name))
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count


@register_pass
class PackedMatMulPass(CompilerPass):
    name = "packed_matmul"
    description = "float32 MatMuls → llmfold.PackedMatMul (weights in 16-column tiles; exact up to float summation order)"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count, params = pack_matmuls(model)
        self.ctx.invalidate_structure()
        self.ctx.record(packed_matmuls=count, packed_params=params)
        self.ctx.log(f"{count} float32 MatMuls ({params / 1e6:.1f} M parameters) became PackedMatMul nodes")
        return ir.passes.PassResult(model, count > 0)
