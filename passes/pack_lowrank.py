"""Low-rank pairs that read the same input share one first factor and one block-diagonal second factor.

The SVD pass turns each of a block's q, k, v (and gate, up) into X·W₁ⁱ·W₂ⁱ with its own factors,
W₁ⁱ [K, rᵢ] and W₂ⁱ [rᵢ, Nᵢ], and all of them read the same X (the block's normed residual stream).

* First factors: one linear with W₁ = [W₁ᵠ | W₁ᵏ | W₁ᵛ] ([K, Σrᵢ], columns side by side) computes
  T = X·W₁, whose column range i is exactly what pair i computed: every column is the same dot
  product of the same row of X with the same weight column as before.
* Second factors, when they are llmfold.PackedMatMuls (run packed_matmul first): one PackedMatMul
  in its block-diagonal form (group_k = rᵢ, group_n = Nᵢ, custom_ops/README.md) reads T and writes
  one output per layer, Yᵢ = T[:, range i]·W₂ⁱ, to the readers of the old outputs. Otherwise
  (plain MatMuls) a Split(axis = -1, sizes rᵢ) hands every second factor its columns of T.

With PackedMatMul the result is bit-identical: its kernels sum every output in k order whatever
the column's tile or group. With ONNX Runtime's MatMul first factors it is the same up to float
summation order.

Why: a decode step streams every weight once, and a narrow matrix streams slower than a wide one
(each node pays the thread pool's start and finish, and the memory prefetchers ramp up again).
SmolLM2-135M at 20 %: the six per-block nodes of q/k/v become two and gate/up's four two — k/v's
first factors were [576, 115] and their second [115, 192] (88 KB, the slowest nodes of a step) — 180
fewer PackedMatMul nodes per step (README "SVD-LLM" has the decode figures).

Skipped, with the reason recorded: fewer than two low-rank pairs in a group, first factors that are
int4 (QMatMul: their ranks are rarely whole 16-column tiles, which concatenating packed int4 weights
needs), of different kinds, with a bias or a non-constant weight. The structure analysis sees each
layer as before — a low-rank pair whose first node is the shared one, its columns recorded in
Linear.rank_columns (compiler/analyze.py `match_linears`) — and `unpack_first_factors` is the
inverse (exact), run before any pass that needs the plain layout (CompilerPass.needs_plain_layout).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.analyze import SHARED_FIRST_FACTOR, const_array, is_onnx_op, shared_first_factor
from compiler.custom_ops import DOMAIN, pack_float_groups, pack_float_tiles, unpack_float_groups, unpack_float_tiles
from passes._weights import add_weight
from passes.base import CompilerPass, register_pass

LAYER_TAG = "llmfold.layer"  # the SVD pass's tag on both factors of a pair
PACKED = "PackedMatMul"


def _is_packed(node: ir.Node) -> bool:
    return node.op_type == PACKED and node.domain == DOMAIN


def _float_weight(node: ir.Node) -> np.ndarray | None:
    """W [K, N] float32 of a MatMul, or of a single-group PackedMatMul without bias, with a constant weight."""
    if is_onnx_op(node, "MatMul") and len(node.inputs) == 2:
        W = const_array(node.inputs[1])
        return W if W is not None and W.ndim == 2 and W.dtype == np.float32 else None
    if _is_packed(node) and len(node.inputs) == 2 and len(node.outputs) == 1 and "group_k" not in node.attributes:
        B = const_array(node.inputs[1])
        if B is None or B.dtype != np.float32:
            return None
        return unpack_float_tiles(B, node.attributes.get_int("K"), node.attributes.get_int("N"))
    return None


def _why_not(firsts: list[ir.Node]) -> str | None:
    """None when these first factors can become one node, else the reason."""
    if any(n.op_type == "QMatMul" for n in firsts):
        return "the first factors are int4 (QMatMul); only float32 ones are packed"
    if len({(n.domain, n.op_type) for n in firsts}) != 1:
        return "the first factors are of different kinds"
    if any(n.inputs[0] is not firsts[0].inputs[0] for n in firsts):
        return "the pairs do not read the same input"
    for n in firsts:
        if _float_weight(n) is None:
            return f"{n.name} is not a MatMul or PackedMatMul with a constant float32 weight and no bias"
    return None


def _linear(model: ir.Model, x: ir.Value, W: np.ndarray, packed: bool, name: str, weight: str, meta: dict,
            groups: list[np.ndarray] | None = None) -> ir.Node:
    """A MatMul or PackedMatMul of x by W [K, N] (or, given `groups`, the block-diagonal PackedMatMul
    of the W_g: one output per group), its weight a new initializer `weight`."""
    if not packed:
        return ir.Node("", "MatMul", [x, add_weight(model, weight, W, np.float32)], name=name, metadata_props=meta)
    if groups is None:
        w = add_weight(model, weight, pack_float_tiles(W), np.float32)
        attrs = [ir.AttrInt64("K", W.shape[0]), ir.AttrInt64("N", W.shape[1])]
        return ir.Node(DOMAIN, PACKED, [x, w], attributes=attrs, name=name, metadata_props=meta)
    gk, gn = [int(g.shape[0]) for g in groups], [int(g.shape[1]) for g in groups]
    w = add_weight(model, weight, pack_float_groups(groups), np.float32)
    attrs = [ir.AttrInt64("K", sum(gk)), ir.AttrInt64("N", sum(gn)), ir.AttrInt64s("group_k", gk), ir.AttrInt64s("group_n", gn)]
    return ir.Node(DOMAIN, PACKED, [x, w], attributes=attrs, num_outputs=len(groups), name=name, metadata_props=meta)


def _take_over(graph: ir.Graph, olds: list[ir.Value], news: list[ir.Value], gone: list[ir.Node]) -> None:
    """`news` take the place of `olds` (uses, type, shape, then names); the nodes `gone` are removed."""
    names = [o.name for o in olds]
    for old, new in zip(olds, news):
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(gone, safe=True)
    for name, new in zip(names, news):
        new.name = name


def pack_first_factors(model: ir.Model, groups: list[tuple[list[ir.Node], list[ir.Node], list[str], str, str]]) -> int:
    """Each group (first factors, second factors, layer tags, node name base, weight name base) →
    one shared first factor, then either one block-diagonal PackedMatMul of the second factors
    (when they are PackedMatMuls) or a Split feeding them; returns the number of nodes removed."""
    graph = model.graph
    removed = 0
    for firsts, seconds, tags, base, weight_base in groups:
        packed = _is_packed(firsts[0])
        grouped = all(_is_packed(n) and _float_weight(n) is not None for n in seconds)
        rec = {"layers": tags, "nodes": [n.name for n in firsts], "weights": [n.inputs[1].name for n in firsts]}
        if grouped:
            rec |= {"second_nodes": [n.name for n in seconds], "second_weights": [n.inputs[1].name for n in seconds]}
        W1 = np.concatenate([_float_weight(n) for n in firsts], axis=1)
        suffix = f"/{PACKED}" if packed else ""
        shared = _linear(model, firsts[0].inputs[0], W1, packed, f"{base}/MatMul_lowrank_1{suffix}",
                         f"{weight_base}.lowrank_1" + (".tiles" if packed else ""), {SHARED_FIRST_FACTOR: json.dumps(rec)})
        shared.outputs[0].name = f"{base}/MatMul_lowrank_1/output_0"
        shared.outputs[0].type = firsts[0].outputs[0].type
        if grouped:
            second = _linear(model, shared.outputs[0], None, True, f"{base}/MatMul_lowrank_2/{PACKED}",
                             f"{weight_base}.lowrank_2.tiles", {}, groups=[_float_weight(n) for n in seconds])
            graph.insert_before(firsts[0], [shared, second])
            _take_over(graph, [n.outputs[0] for n in seconds], list(second.outputs), firsts + seconds)
            removed += 2 * len(firsts) - 2
        else:
            widths = [int(_float_weight(n).shape[1]) for n in firsts]
            sizes = add_weight(model, f"{weight_base}.lowrank_1.split", np.array(widths, np.int64), np.int64)
            split = ir.Node("", "Split", [shared.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                            num_outputs=len(firsts), name=f"{base}/Split_lowrank_1")
            graph.insert_before(firsts[0], [shared, split])
            _take_over(graph, [n.outputs[0] for n in firsts], list(split.outputs), firsts)
            removed += len(firsts) - 1
    if groups:
        RemoveUnusedNodesPass()(model)  # the separate weights
    return removed


def _shared_consumer(node: ir.Node, rec: dict) -> tuple[ir.Node, list[int]] | None:
    """(the Split or block-diagonal PackedMatMul reading a shared first factor's output, the ranks)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].idx != 0 or node.outputs[0].is_graph_output():
        return None
    reader, n = uses[0].node, len(rec["layers"])
    if is_onnx_op(reader, "Split") and "second_nodes" not in rec and len(reader.outputs) == n:
        sizes = const_array(reader.inputs[1]) if len(reader.inputs) > 1 else None
        if sizes is not None and sizes.ndim == 1 and reader.attributes.get_int("axis", 0) == -1:
            return reader, [int(v) for v in sizes]
    if _is_packed(reader) and "second_nodes" in rec and len(reader.outputs) == n and len(reader.inputs) == 2:
        gk = reader.attributes.get("group_k")
        if gk is not None and len(gk.value) == n:
            return reader, [int(v) for v in gk.value]
    return None


def _plain(name: str, suffix: str) -> str:
    return name.removesuffix(suffix)


def unpack_first_factors(model: ir.Model) -> int:
    """The inverse, to the plain layout: every shared first factor → one MatMul per layer with its
    columns of W₁, and a block-diagonal second factor → one MatMul per block, with the replaced
    nodes' tags and names (a PackedMatMul's without its suffixes, as `unpack_packed_matmuls` names
    weights), bit for bit; how many were unpacked. Run before `unpack_packed_matmuls`
    (passes/packed_matmul.py), which leaves block-diagonal PackedMatMuls alone."""
    graph = model.graph
    count = 0
    for node in list(graph):
        rec = shared_first_factor(node) if is_onnx_op(node, "MatMul") or _is_packed(node) else None
        W1 = _float_weight(node) if rec is not None else None
        found = _shared_consumer(node, rec) if W1 is not None else None
        if found is None or sum(found[1]) != W1.shape[1]:
            continue
        reader, ranks = found
        starts = np.cumsum([0] + ranks)
        firsts = [_linear(model, node.inputs[0], W1[:, a:b], False, _plain(name, f"/{PACKED}"), _plain(weight, ".tiles"),
                          {LAYER_TAG: tag})
                  for tag, name, weight, a, b in zip(rec["layers"], rec["nodes"], rec["weights"], starts[:-1], starts[1:])]
        if "second_nodes" in rec:
            a = reader.attributes
            W2s = unpack_float_groups(const_array(reader.inputs[1]), list(a["group_k"].value), list(a["group_n"].value))
            seconds = [_linear(model, f.outputs[0], W2, False, _plain(name, f"/{PACKED}"), _plain(weight, ".tiles"),
                               {LAYER_TAG: tag})
                       for f, W2, tag, name, weight in zip(firsts, W2s, rec["layers"], rec["second_nodes"], rec["second_weights"])]
            for f, old in zip(firsts, rec["nodes"]):
                f.outputs[0].name = f"{_plain(old, f'/{PACKED}')}/output_0"
            graph.insert_before(node, firsts + seconds)
            _take_over(graph, list(reader.outputs), [s.outputs[0] for s in seconds], [reader, node])
        else:
            graph.insert_before(node, firsts)
            _take_over(graph, list(reader.outputs), [f.outputs[0] for f in firsts], [reader, node])
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)  # the shared weights and split sizes
    return count


@register_pass
class PackLowRankPass(CompilerPass):
    name = "pack_lowrank"
    description = ("low-rank pairs reading the same input (q/k/v, gate/up): one shared first factor, one block-diagonal "
                   "PackedMatMul of the second factors (or a Split); exact")
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        structure = self.ctx.structure(model)
        by_name = {n.name: n for n in model.graph}
        groups, skipped = [], {}
        for b in structure.blocks:
            reasons = []
            for what, lins, base, weight_base in (
                ("q/k/v", (b.q, b.k, b.v), f"/model/layers.{b.index}/attn/qkv_proj", f"model.layers.{b.index}.self_attn.qkv_proj.weight"),
                ("gate/up", (b.gate, b.up), f"/model/layers.{b.index}/mlp/gate_up_proj", f"model.layers.{b.index}.mlp.gate_up_proj.weight"),
            ):
                if any(lin.rank_columns for lin in lins):
                    reasons.append(f"{what}: already share a first factor")
                    continue
                pairs = [lin for lin in lins if lin.kind == "low-rank" and len(lin.nodes) == 2]
                if len(pairs) < 2:
                    reasons.append(f"{what}: fewer than two low-rank pairs")
                    continue
                firsts, seconds = [by_name[lin.nodes[0]] for lin in pairs], [by_name[lin.nodes[1]] for lin in pairs]
                tags = [n.metadata_props.get(LAYER_TAG, lin.name) for n, lin in zip(seconds, pairs)]
                reason = _why_not(firsts)
                if reason:
                    reasons.append(f"{what}: {reason}")
                    continue
                groups.append((firsts, seconds, tags, base, weight_base))
            if reasons:
                skipped[b.index] = "; ".join(reasons)
        removed = pack_first_factors(model, groups)
        self.ctx.invalidate_structure()
        self.ctx.record(shared_first_factors=len(groups), nodes_removed=removed,
                        skipped={str(k): v for k, v in sorted(skipped.items())})
        self.ctx.log(f"{len(groups)} groups of low-rank pairs share their first factor ({removed} fewer linear nodes)"
                     + (f"; {len(skipped)} blocks with a group skipped ({next(iter(skipped.values()))})" if skipped else ""))
        return ir.passes.PassResult(model, bool(groups))
