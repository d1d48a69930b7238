"""Low-rank pairs that read the same input share one first-factor linear, its output split.

The SVD pass turns each of a block's q, k, v (and gate, up) into X·W₁·W₂ with its own first factor
W₁ⁱ [K, rᵢ], and all of them read the same X (the block's normed residual stream). One linear with
the first factors side by side, W₁ = [W₁ᵠ | W₁ᵏ | W₁ᵛ] ([K, Σrᵢ]), followed by
Split(axis = -1, sizes rᵢ), hands every second factor exactly the input it had: each column of
X·W₁ is the same dot product of the same row of X with the same weight column as before. With
llmfold.PackedMatMul the result is bit-identical (its kernels sum every output in k order whatever
the column's tile); with ONNX Runtime's MatMul it is the same up to float summation order.

Why: a decode step streams every weight once, and a narrow matrix streams slower than a wide one
(each node pays the thread pool's start and finish, and the memory prefetchers ramp up again).
SmolLM2-135M at 20 %: k/v's first factors are [576, 115] each; with q's [576, 230] they become one
[576, 460], and gate/up's two [576, 335] one [576, 670] — 90 fewer PackedMatMul nodes per step
(README "SVD-LLM" has the decode figures).

Run it after the SVD pass (and tune_lowrank), before packed_matmul; it also accepts first factors
that are already PackedMatMuls. Skipped, with the reason recorded: fewer than two low-rank pairs
in a group, first factors that are int4 (QMatMul: their ranks are rarely whole 16-column tiles,
which concatenating packed int4 weights needs), of different kinds, with a bias or a non-constant
weight. The structure analysis sees each layer as before — a low-rank pair whose first node is the
shared one, its columns recorded in Linear.rank_columns (compiler/analyze.py) — and
`unpack_first_factors` is the inverse (exact), run before any pass that needs the plain layout
(CompilerPass.needs_plain_layout).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.analyze import const_array, is_onnx_op
from compiler.custom_ops import DOMAIN, pack_float_tiles, unpack_float_tiles
from passes._weights import add_weight
from passes.base import CompilerPass, register_pass

LAYER_TAG = "llmfold.layer"  # the SVD pass's tag on both factors of a pair
# On a shared first factor: JSON {"layers": tags, "nodes": names, "weights": names}, one entry per
# layer in column order — the plain-layout names of the first factors it replaced (for the inverse).
SHARED_TAG = "llmfold.shared_first_factor"
PACKED = "PackedMatMul"


def _first_factor_weight(node: ir.Node) -> np.ndarray | None:
    """W₁ [K, r] float32 of a MatMul or PackedMatMul (no bias) with a constant weight, else None."""
    if is_onnx_op(node, "MatMul") and len(node.inputs) == 2:
        W = const_array(node.inputs[1])
        return W if W is not None and W.ndim == 2 and W.dtype == np.float32 else None
    if node.op_type == PACKED and node.domain == DOMAIN and len(node.inputs) == 2:
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
        if _first_factor_weight(n) is None:
            return f"{n.name} is not a MatMul or PackedMatMul with a constant float32 weight and no bias"
    return None


def shared_first_factor(node: ir.Node) -> dict | None:
    """The record of a shared first factor written by this pass ({"layers", "nodes", "weights"}), else None."""
    raw = node.metadata_props.get(SHARED_TAG)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(rec, dict) and all(isinstance(rec.get(k), list) for k in ("layers", "nodes", "weights"))
    return rec if ok and len(rec["layers"]) == len(rec["nodes"]) == len(rec["weights"]) >= 2 else None


def _plain_name(name: str, suffix: str) -> str:
    return name.removesuffix(suffix)


def _shared_node(model: ir.Model, firsts: list[ir.Node], tags: list[str], base: str, weight_base: str) -> ir.Node:
    """One node computing the first factors' columns side by side (same kind as theirs)."""
    W = np.concatenate([_first_factor_weight(n) for n in firsts], axis=1)
    packed = firsts[0].op_type == PACKED
    meta = {SHARED_TAG: json.dumps({
        "layers": tags,
        "nodes": [_plain_name(n.name, f"/{PACKED}") if packed else n.name for n in firsts],
        "weights": [_plain_name(n.inputs[1].name, ".tiles") if packed else n.inputs[1].name for n in firsts],
    })}
    if packed:
        w = add_weight(model, f"{weight_base}.lowrank_1.tiles", pack_float_tiles(W), np.float32)
        attrs = [ir.AttrInt64("K", W.shape[0]), ir.AttrInt64("N", W.shape[1])]
        return ir.Node(DOMAIN, PACKED, [firsts[0].inputs[0], w], attributes=attrs,
                       name=f"{base}/MatMul_lowrank_1/{PACKED}", metadata_props=meta)
    w = add_weight(model, f"{weight_base}.lowrank_1", W, np.float32)
    return ir.Node("", "MatMul", [firsts[0].inputs[0], w], name=f"{base}/MatMul_lowrank_1", metadata_props=meta)


def _take_over(graph: ir.Graph, olds: list[ir.Value], news: list[ir.Value], gone: list[ir.Node]) -> None:
    """`news` take the place of `olds` (uses, type, shape, then names); the nodes `gone` are removed."""
    names = [o.name for o in olds]
    for old, new in zip(olds, news):
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new)
    graph.remove(gone, safe=True)
    for name, new in zip(names, news):
        new.name = name


def pack_first_factors(model: ir.Model, groups: list[tuple[list[ir.Node], list[str], str, str]]) -> int:
    """Each group (first-factor nodes, their layer tags, node name base, weight name base) → one
    shared first factor + Split; returns the number of nodes removed."""
    graph = model.graph
    removed = 0
    for firsts, tags, base, weight_base in groups:
        shared = _shared_node(model, firsts, tags, base, weight_base)
        widths = [int(_first_factor_weight(n).shape[1]) for n in firsts]
        sizes = add_weight(model, f"{weight_base}.lowrank_1.split", np.array(widths, np.int64), np.int64)
        split = ir.Node("", "Split", [shared.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                        num_outputs=len(firsts), name=f"{base}/Split_lowrank_1")
        shared.outputs[0].name = f"{base}/MatMul_lowrank_1/output_0"
        shared.outputs[0].type = firsts[0].outputs[0].type
        graph.insert_before(firsts[0], [shared, split])
        _take_over(graph, [n.outputs[0] for n in firsts], list(split.outputs), firsts)
        removed += len(firsts) - 1
    if groups:
        RemoveUnusedNodesPass()(model)  # the separate first-factor weights
    return removed


def unpack_first_factors(model: ir.Model) -> int:
    """The inverse: every shared first factor (a MatMul with this pass's record whose output only a
    Split reads) → the MatMuls it replaced, with their names, tags and columns of W₁ (exact); how many.

    Run after `unpack_packed_matmuls` (passes/packed_matmul.py), which turns a shared
    PackedMatMul into a MatMul and keeps the record."""
    graph = model.graph
    count = 0
    for node in [n for n in graph if is_onnx_op(n, "MatMul")]:
        rec = shared_first_factor(node)
        uses = list(node.outputs[0].uses())
        split = uses[0].node if len(uses) == 1 and not node.outputs[0].is_graph_output() else None
        W = _first_factor_weight(node)
        if rec is None or split is None or not is_onnx_op(split, "Split") or W is None or len(split.outputs) != len(rec["layers"]):
            continue
        sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None or sizes.ndim != 1 or int(np.sum(sizes)) != W.shape[1] or split.attributes.get_int("axis", 0) != -1:
            continue
        parts, start = [], 0
        for tag, name, weight, size in zip(rec["layers"], rec["nodes"], rec["weights"], sizes.tolist()):
            w = add_weight(model, weight, W[:, start : start + size], np.float32)
            parts.append(ir.Node("", "MatMul", [node.inputs[0], w], name=name, metadata_props={LAYER_TAG: tag}))
            start += size
        graph.insert_before(node, parts)
        _take_over(graph, list(split.outputs), [p.outputs[0] for p in parts], [split, node])
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)  # the shared weights and split sizes
    return count


@register_pass
class PackLowRankPass(CompilerPass):
    name = "pack_lowrank"
    description = "low-rank pairs reading the same input (q/k/v, gate/up) share one first-factor linear, its output split (exact)"
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
                pairs = [lin for lin in lins if lin.kind == "low-rank" and len(lin.nodes) == 2 and lin.rank_columns is None]
                if len(pairs) < 2:
                    reasons.append(f"{what}: fewer than two low-rank pairs")
                    continue
                firsts = [by_name[lin.nodes[0]] for lin in pairs]
                tags = [by_name[lin.nodes[1]].metadata_props.get(LAYER_TAG, lin.name) for lin in pairs]
                reason = _why_not(firsts)
                if reason:
                    reasons.append(f"{what}: {reason}")
                    continue
                groups.append((firsts, tags, base, weight_base))
            if reasons:
                skipped[b.index] = "; ".join(reasons)
        removed = pack_first_factors(model, groups)
        self.ctx.invalidate_structure()
        self.ctx.record(shared_first_factors=len(groups), nodes_removed=removed,
                        skipped={str(k): v for k, v in sorted(skipped.items())})
        self.ctx.log(f"{len(groups)} shared first factors ({removed} fewer linear nodes)"
                     + (f"; {len(skipped)} blocks with a group skipped ({next(iter(skipped.values()))})" if skipped else ""))
        return ir.passes.PassResult(model, bool(groups))
