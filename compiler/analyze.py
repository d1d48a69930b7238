"""Structure analysis: find the Llama decoder in an ONNX graph, from the graph alone.

The analysis follows the residual stream from the embedding Gather. At each step the stream is
a value r, possibly with a pending sublayer output s not yet added (r + s):

    norm      an RMSNorm applied to the stream: a fused node (SimplifiedLayerNormalization,
              RMSNormalization, or SkipSimplifiedLayerNormalization which also performs the
              pending add), or the standard-op pattern  Mul(x / sqrt(ReduceMean(x²) + eps), w)
              (x·Reciprocal(sqrt(...)) accepted too); w must be a 1-D initializer
    attention the linear layers reading the norm output, then either
              * a Softmax: the MatMul with two activation inputs upstream of it is Q·Kᵀ, whose
                first input leads back to q and second to k; the MatMul downstream of the
                Softmax is P·V, whose other input leads back to v; the first linear after P·V is o
              * a fused attention op (GroupQueryAttention, MultiHeadAttention, Attention): q/k/v
                are its inputs 0/1/2 (llmfold's `--attention fused` export: three MatMuls, the
                rope tables are GroupQueryAttention's cos/sin_cache inputs 7/8); with packed QKV (inputs 1, 2 empty) one MatMul feeds it and
                its columns are [0, H·d), [H·d, (H+KV)·d), [(H+KV)·d, (H+2KV)·d) by the op's
                definition (recorded in Linear.columns)
    MLP       the two linears reading the post-attention norm: gate is the one entering a SiLU
              (Sigmoid, or exp(−z) of z / (1 + exp(−z))), up the other; down is the first linear after their product;
              or one QMatMul with swiglu = 1 (passes/swiglu.py): gate and up are its column ranges [0, N/2), [N/2, N)
    head      the norm not followed by attention is the final norm; the linear reading it whose
              output is a graph output is lm_head

A linear layer is recognized by what it computes, not by its name: a MatMul whose second input
is a 2-D initializer [K, N] (dense), a MatMul [K, r] whose only consumer is a MatMul [r, N] with
r < min(K, N) (low-rank; pairs reading one X may share their first factor X·[W₁ᵃ | W₁ᵇ | …], followed
by a Split or one block-diagonal PackedMatMul of the second factors, passes/pack_lowrank.py:
`match_linears`), a `llmfold.PackedMatMul` (dense, float weights in tiles; attributes K, N),
a `llmfold.QMatMul` (int4; attributes K, N, block_size, act_bits), or
a `com.microsoft.MatMulNBits` (attributes K, N, bits, block_size). Every linear-like node that
could not be placed, and every step that failed, is listed in `unrecognized`; nothing is guessed.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from compiler.structure import Block, Linear, ModelStructure, Norm

FUSED_NORMS = ("SimplifiedLayerNormalization", "RMSNormalization")
SKIP_NORM = "SkipSimplifiedLayerNormalization"
FUSED_ATTENTION = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedMultiHeadAttention")
# ops that only move or rescale data between the attention matmuls / around heads
PASS_THROUGH = {
    "Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Mul", "Div",
    "Add", "Where", "Expand", "Concat", "Slice", "Split", "Neg", "Sub", "Gather",
    "RotaryEmbedding", "TokenPrune",
}


def is_onnx_op(node: ir.Node, op_type: str) -> bool:
    """`node` is the standard ONNX operator `op_type` (domain "" or its alias "ai.onnx")."""
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant-node output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and is_onnx_op(node, "Constant"):
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.value.numpy()
    return None


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """Shape of a constant without reading its data (initializers may be external)."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    arr = const_array(value)
    return None if arr is None else tuple(arr.shape)


def is_const(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or (
        value.producer() is not None and value.producer().op_type == "Constant"))


@dataclass
class _LinearMatch:
    node: ir.Node
    nodes: list[ir.Node]
    input: ir.Value
    output: ir.Value
    K: int
    N: int
    kind: str
    weight: str | None = None
    rank: int | None = None
    bits: int | None = None
    block_size: int | None = None
    act_bits: int | None = None
    hadamard: int | None = None
    rank_columns: tuple[int, int] | None = None

    def to_linear(self, name: str, block: int | None, role: str, columns=None) -> Linear:
        lin = Linear(
            name=name, block=block, role=role, node=self.node.name, input=self.input.name,
            output=self.output.name, K=self.K, N=self.N, kind=self.kind, weight=self.weight,
            nodes=[n.name for n in self.nodes], rank=self.rank, bits=self.bits,
            block_size=self.block_size, act_bits=self.act_bits, hadamard=self.hadamard,
            rank_columns=list(self.rank_columns) if self.rank_columns else None,
        )
        if columns is not None:
            lin.columns = list(columns)
            lin.N = columns[1] - columns[0]
        return lin


def _single_linear(node: ir.Node) -> _LinearMatch | None:
    """One node computing X·W: a MatMul with a constant 2-D weight, a PackedMatMul, a QMatMul or a
    MatMulNBits."""
    if is_onnx_op(node, "MatMul") and len(node.inputs) == 2:
        x, w = node.inputs
        shape = const_shape(w)
        if x is None or is_const(x) or shape is None or len(shape) != 2:
            return None
        return _LinearMatch(node, [node], x, node.outputs[0], shape[0], shape[1], "dense", weight=w.name)
    if node.op_type == "PackedMatMul" and node.domain == "llmfold" and len(node.inputs) >= 2 and len(node.outputs) == 1:
        a = node.attributes  # float weights in 16-column tiles (passes/packed_matmul.py): dense
        # (the block-diagonal form, one output per group, is only the second factor of pairs sharing
        # a first factor: `match_linears`)
        return _LinearMatch(node, [node], node.inputs[0], node.outputs[0], a.get_int("K"), a.get_int("N"), "dense")
    if node.op_type == "QMatMul" and node.domain == "llmfold":
        a = node.attributes
        return _LinearMatch(node, [node], node.inputs[0], node.outputs[0], a.get_int("K"), a.get_int("N"),
                            "int4", bits=a.get_int("bits", 4), block_size=a.get_int("block_size"),
                            act_bits=a.get_int("act_bits", 16), hadamard=a.get_int("hadamard", 0) or None)
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        a = node.attributes
        bits = a.get_int("bits", 4)
        return _LinearMatch(node, [node], node.inputs[0], node.outputs[0], a.get_int("K"), a.get_int("N"),
                            "int4" if bits == 4 else f"int{bits}", bits=bits,
                            block_size=a.get_int("block_size"))
    return None


def _layer_tag(node: ir.Node) -> str | None:
    return node.metadata_props.get("llmfold.layer")


def match_linear(node: ir.Node) -> _LinearMatch | None:
    """Recognize a linear layer starting at `node` (its first node), else None.

    A low-rank pair X·W₁·W₂ is two linear nodes in a row (MatMul or, after the INT4 pass, QMatMul)
    whose factors the SVD pass tagged with the same metadata_props["llmfold.layer"]; untagged plain
    MatMul pairs count when the inner size is below both outer sizes (a pair saving parameters)."""
    first = _single_linear(node)
    if first is None:
        return None
    out = first.output
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output() and uses[0].idx == 0:
        second = _single_linear(uses[0].node)
        if second is not None and second.K == first.N:
            tag1, tag2 = _layer_tag(node), _layer_tag(second.node)
            tagged = tag1 is not None and tag1 == tag2
            untagged = (tag1 is None and tag2 is None and first.kind == second.kind == "dense"
                        and first.N < min(first.K, second.N))
            if tagged or untagged:
                quantized = second if second.kind != "dense" else (first if first.kind != "dense" else None)
                return _LinearMatch(node, [node, second.node], first.input, second.output, first.K, second.N,
                                    "low-rank", rank=first.N,
                                    bits=quantized.bits if quantized else None,
                                    block_size=quantized.block_size if quantized else None,
                                    act_bits=quantized.act_bits if quantized else None)
    return first


# On a first factor low-rank pairs share (passes/pack_lowrank.py): JSON {"layers", "nodes", "weights"
# [, "second_nodes", "second_weights"]}, one entry per layer in column order: the layers' tags and the
# names of the nodes and weights the shared ones replaced (for the pass's inverse).
SHARED_FIRST_FACTOR = "llmfold.shared_first_factor"


def shared_first_factor(node: ir.Node) -> dict | None:
    """The record of a shared first factor (SHARED_FIRST_FACTOR), else None."""
    raw = node.metadata_props.get(SHARED_FIRST_FACTOR)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    keys = ("layers", "nodes", "weights") + (("second_nodes", "second_weights") if isinstance(rec, dict) and "second_nodes" in rec else ())
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), list) for k in keys):
        return None
    return rec if len({len(rec[k]) for k in keys}) == 1 and len(rec["layers"]) >= 2 else None


def _shared_seconds(first: _LinearMatch, n: int) -> list[tuple[ir.Node, ir.Value, int, int, str | None]] | None:
    """(second-factor node, its output, rank, N, its tag) per layer after a shared first factor: a
    Split(axis -1) whose pieces each feed one linear, or one block-diagonal PackedMatMul (one output
    per group); None when neither follows."""
    uses = list(first.output.uses())
    if len(uses) != 1 or uses[0].idx != 0 or first.output.is_graph_output():
        return None
    reader = uses[0].node
    if reader.op_type == "PackedMatMul" and reader.domain == "llmfold" and len(reader.outputs) == n:
        gk, gn = reader.attributes.get("group_k"), reader.attributes.get("group_n")
        if gk is None or gn is None or len(gk.value) != n or len(gn.value) != n:
            return None
        return [(reader, out, int(k), int(m), None) for out, k, m in zip(reader.outputs, gk.value, gn.value)]
    sizes = const_array(reader.inputs[1]) if is_onnx_op(reader, "Split") and len(reader.inputs) > 1 else None
    if sizes is None or sizes.ndim != 1 or len(sizes) != n or len(reader.outputs) != n or reader.attributes.get_int("axis", 0) != -1:
        return None
    out = []
    for size, piece in zip(sizes.tolist(), reader.outputs):
        piece_uses = list(piece.uses())
        second = _single_linear(piece_uses[0].node) if len(piece_uses) == 1 and piece_uses[0].idx == 0 else None
        if second is None or second.K != size or piece.is_graph_output():
            return None
        out.append((second.node, second.output, int(size), second.N, _layer_tag(second.node)))
    return out


def match_linears(node: ir.Node) -> list[_LinearMatch]:
    """The linear layers starting at `node`: several when it is the first factor that low-rank
    pairs share (passes/pack_lowrank.py: X·[W₁ᵃ | W₁ᵇ | …], its record naming the layers, then a
    block-diagonal PackedMatMul of their second factors with one output per layer, or a Split whose
    pieces feed the second factors, tagged with those layers), else [match_linear(node)] (or [])."""
    first = _single_linear(node)
    rec = shared_first_factor(node) if first is not None else None
    tags = rec["layers"] if rec else None
    seconds = _shared_seconds(first, len(tags)) if tags else None
    if seconds is not None and sum(s[2] for s in seconds) == first.N and all(t in (None, tag) for tag, (*_, t) in zip(tags, seconds)):
        out, start = [], 0
        for second, output, rank, n, _ in seconds:
            q = _single_linear(second) if len(second.outputs) == 1 else None
            quantized = q if q is not None and q.kind != "dense" else None
            out.append(_LinearMatch(node, [node, second], first.input, output, first.K, n, "low-rank", rank=rank,
                                    bits=quantized.bits if quantized else None,
                                    block_size=quantized.block_size if quantized else None,
                                    act_bits=quantized.act_bits if quantized else None,
                                    rank_columns=(start, start + rank)))
            start += rank
        return out
    m = match_linear(node)
    return [m] if m is not None else []


LOGITS_TO_KEEP = "logits_to_keep"  # graph input of passes/logits.py


def logits_slice_of(value: ir.Value) -> ir.Node | None:
    """The logits_to_keep Slice reading `value`, if there is one."""
    for use in value.uses():
        node = use.node
        if is_onnx_op(node, "Slice") and use.idx == 0 and len(node.inputs) >= 2 and node.inputs[1] is not None:
            neg = node.inputs[1].producer()
            if neg is not None and is_onnx_op(neg, "Neg") and neg.inputs[0] is not None and neg.inputs[0].name == LOGITS_TO_KEEP:
                return node
    return None


def linears_reading(value: ir.Value) -> list[_LinearMatch]:
    out = []
    for use in value.uses():
        if use.idx == 0:
            out.extend(match_linears(use.node))
    return sorted(out, key=lambda m: m.node.name)  # (stable: shared first factors keep column order)


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    ins = [v for v in node.inputs if v is not value]
    return ins[0] if len(ins) == 1 else None


def _skip_casts(value: ir.Value | None) -> ir.Value | None:
    while value is not None and value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
        value = value.producer().inputs[0]
    return value


def _is_scalar_const(value, expected: float | None = None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    v = float(arr.reshape(-1)[0])
    if expected is not None and not math.isclose(v, expected):
        return None
    return v


def _rms_epsilon(std_or_inv: ir.Value, x: ir.Value, reciprocal: bool) -> float | None:
    """Check `std_or_inv` = sqrt(mean(x²)+eps) (or its reciprocal); return eps."""
    v = _skip_casts(std_or_inv)
    node = v.producer() if v is not None else None
    if node is None:
        return None
    if reciprocal:
        if node.op_type == "Reciprocal":
            v = node.inputs[0]
        elif node.op_type == "Div" and _is_scalar_const(node.inputs[0], 1.0) is not None:
            v = node.inputs[1]
        elif node.op_type == "Sqrt":  # rsqrt written as Sqrt(1/var) is not handled
            return None
        else:
            return None
        node = _skip_casts(v).producer()
        if node is None:
            return None
    if node.op_type != "Sqrt":
        return None
    add = _skip_casts(node.inputs[0]).producer()
    if add is None or add.op_type != "Add":
        return None
    eps = None
    mean_value = None
    for a, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        e = _is_scalar_const(a)
        if e is not None:
            eps, mean_value = e, b
    if mean_value is None:
        return None
    mean = _skip_casts(mean_value).producer()
    if mean is None or mean.op_type != "ReduceMean":
        return None
    sq = _skip_casts(mean.inputs[0]).producer()
    if sq is None:
        return None
    if sq.op_type == "Pow" and _skip_casts(sq.inputs[0]) is _skip_casts(x) and _is_scalar_const(sq.inputs[1], 2.0) is not None:
        return eps
    if sq.op_type == "Mul" and _skip_casts(sq.inputs[0]) is _skip_casts(x) and _skip_casts(sq.inputs[1]) is _skip_casts(x):
        return eps
    return None


def match_norm_on(x: ir.Value) -> Norm | None:
    """An RMSNorm applied to `x` (fused op or standard ops), else None."""
    for use in x.uses():
        node = use.node
        if node.op_type in FUSED_NORMS and use.idx == 0 and is_const(node.inputs[1]):
            return Norm(node=node.name, weight=node.inputs[1].name, input=x.name, output=node.outputs[0].name,
                        epsilon=node.attributes.get_float("epsilon", 1e-5))
    # standard ops: normed = x / std  (Div) or x * inv_std (Mul); then Mul(normed, w)
    candidates = [u.node for u in x.uses() if u.node.op_type in ("Div", "Mul")]
    for c in candidates:
        x_in = [v for v in c.inputs if _skip_casts(v) is _skip_casts(x) or v is x]
        if not x_in:
            continue
        if c.op_type == "Div":
            if c.inputs[0] is not x:
                continue
            eps = _rms_epsilon(c.inputs[1], x, reciprocal=False)
        else:
            other = _other_input(c, x)
            if other is None:
                continue
            eps = _rms_epsilon(other, x, reciprocal=True)
        if eps is None:
            continue
        normed = c.outputs[0]
        for u2 in normed.uses():
            m = u2.node
            if m.op_type != "Mul":
                continue
            w = _other_input(m, normed)
            shape = const_shape(w)
            if shape is not None and len(shape) == 1:
                return Norm(node=m.name, weight=w.name, input=x.name, output=m.outputs[0].name, epsilon=eps)
    return None


def _trace_back_to(value: ir.Value, targets: dict[int, object], stop: set[int], limit: int = 200) -> list:
    """Which `targets` (id(value) → tag) does `value` depend on, walking producers?"""
    found = []
    seen = set()
    queue = deque([value])
    steps = 0
    while queue and steps < limit:
        v = queue.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        steps += 1
        if id(v) in targets:
            if targets[id(v)] not in found:
                found.append(targets[id(v)])
            continue
        if id(v) in stop:
            continue
        node = v.producer()
        if node is None:
            continue
        queue.extend(node.inputs)
    return found


def _feeds_silu(value: ir.Value) -> bool:
    """`value` enters a SiLU: Sigmoid / Silu, or exp(−z) (z / (1 + exp(−z)) form)."""
    for use in value.uses():
        node = use.node
        if node.op_type in ("Sigmoid", "Silu", "QuickGelu"):
            return True
        negated = node.op_type == "Neg" or (node.op_type == "Mul" and _is_scalar_const(_other_input(node, value), -1.0) is not None)
        if negated and any(u.node.op_type == "Exp" for u in node.outputs[0].uses()):
            return True
    return False


def _forward_nodes(value: ir.Value, limit: int = 200):
    """Nodes reachable from `value`, breadth first, not crossing linear layers."""
    seen = set()
    queue = deque(value.uses())
    count = 0
    while queue and count < limit:
        node = queue.popleft().node
        if id(node) in seen:
            continue
        seen.add(id(node))
        count += 1
        yield node
        if match_linear(node) is not None:
            continue
        for out in node.outputs:
            queue.extend(out.uses())


def _first_linear_after(value: ir.Value, limit: int = 40) -> _LinearMatch | None:
    for node in _forward_nodes(value, limit):
        m = match_linear(node)
        if m is not None:
            return m
    return None


def _through_token_prune(value: ir.Value) -> ir.Value:
    """The residual stream after a `llmfold.TokenPrune` that reads `value` (token pruning keeps the
    stream's meaning, only fewer rows), else `value` itself."""
    for use in value.uses():
        if use.node.op_type == "TokenPrune" and use.node.domain == "llmfold" and use.idx == 0:
            return use.node.outputs[0]
    return value


class _Analysis:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.unrecognized: list[str] = []
        self.head_dims: list[int] = []
        self.heads: list[tuple[int, int]] = []
        self.rope_tables: list[ir.Value] = []

    # ---- embedding ------------------------------------------------------------------------
    def find_embedding(self) -> tuple[ir.Value | None, ir.Value | None]:
        ids = next((v for v in self.graph.inputs if v.name == "input_ids"), None)
        candidates = [ids] if ids is not None else [
            v for v in self.graph.inputs if v.type is not None and v.dtype in (ir.DataType.INT64, ir.DataType.INT32)]
        for v in candidates:
            for use in v.uses():
                node = use.node
                if node.op_type == "Gather" and use.idx == 1 and is_const(node.inputs[0]):
                    shape = const_shape(node.inputs[0])
                    if shape is not None and len(shape) == 2:
                        return node.inputs[0], node.outputs[0]
        return None, None

    # ---- residual stream --------------------------------------------------------------------
    def norm_of_stream(self, r: ir.Value, pending: ir.Value | None):
        """(norm, residual value after the pending add, add node name) or (None, ...)."""
        if pending is None:
            return match_norm_on(r), r, None
        common = [u.node for u in r.uses() if any(u2.node is u.node for u2 in pending.uses())]
        for node in common:
            if node.op_type == "Add":
                out = _through_token_prune(node.outputs[0])
                return match_norm_on(out), out, node.name
            if node.op_type == SKIP_NORM and node.domain == "com.microsoft":
                outs = node.outputs
                summed = outs[3] if len(outs) > 3 and outs[3].name else None
                norm = Norm(node=node.name, weight=node.inputs[2].name,
                            input=summed.name if summed is not None else node.inputs[0].name,
                            output=outs[0].name, epsilon=node.attributes.get_float("epsilon", 1e-5))
                return norm, summed, node.name
        return None, None, None

    # ---- attention ------------------------------------------------------------------------------
    def attention(self, index: int, h: ir.Value):
        """(q, k, v, o, attention node name, kind) for the attention reading norm output h."""
        lins = linears_reading(h)
        if not lins:
            return None
        by_output = {id(m.output): m for m in lins}
        stop = {id(h)}
        softmax = None
        fused = None
        for m in lins:
            for node in _forward_nodes(m.output, limit=120):
                if node.op_type == "Softmax" and softmax is None:
                    softmax = node
                if node.op_type in FUSED_ATTENTION and fused is None:
                    fused = node
            if softmax is not None or fused is not None:
                break
        p = f"layers.{index}"
        if fused is not None and (softmax is None):
            return self._fused_attention(index, h, lins, fused)
        if softmax is None:
            return None
        scores_mm = self._upstream_matmul(softmax.inputs[0])
        pv_mm, probs_side = self._downstream_matmul(softmax.outputs[0])
        if scores_mm is None or pv_mm is None:
            self.unrecognized.append(f"{p}: Softmax {softmax.name} is not between two MatMuls (Q·Kᵀ, P·V)")
            return None
        q_src = _trace_back_to(scores_mm.inputs[0], by_output, stop)
        k_src = _trace_back_to(scores_mm.inputs[1], by_output, stop)
        v_src = _trace_back_to(pv_mm.inputs[1 - probs_side], by_output, stop)
        if len(q_src) != 1 or len(k_src) != 1 or len(v_src) != 1 or len({id(q_src[0]), id(k_src[0]), id(v_src[0])}) != 3:
            self.unrecognized.append(
                f"{p}: could not tell q/k/v apart around {softmax.name} (q←{[m.node.name for m in q_src]}, "
                f"k←{[m.node.name for m in k_src]}, v←{[m.node.name for m in v_src]})")
            return None
        q, k, v = q_src[0], k_src[0], v_src[0]
        o = _first_linear_after(pv_mm.outputs[0])
        if o is None:
            self.unrecognized.append(f"{p}: no output projection after {pv_mm.name}")
            return None
        hd = self._head_dim(q)
        if hd is None or q.N % hd or k.N % hd:
            self.unrecognized.append(f"{p}: head_dim not found in the reshapes after {q.node.name}")
        else:
            self.head_dims.append(hd)
            self.heads.append((q.N // hd, k.N // hd))
        self._collect_rope_tables(scores_mm.inputs[0], q.output)
        return (q.to_linear(f"{p}.q", index, "q"), k.to_linear(f"{p}.k", index, "k"),
                v.to_linear(f"{p}.v", index, "v"), o.to_linear(f"{p}.o", index, "o"),
                softmax.name, "softmax", o)

    def _fused_attention(self, index, h, lins, node):
        p = f"layers.{index}"
        by_output = {id(m.output): m for m in lins}
        a = node.attributes
        num_heads = a.get_int("num_heads")
        kv_heads = a.get_int("kv_num_heads", num_heads)
        inputs = list(node.inputs) + [None] * 3
        packed = inputs[1] is None or not inputs[1].name
        o = _first_linear_after(node.outputs[0])
        if o is None:
            self.unrecognized.append(f"{p}: no output projection after {node.name}")
            return None
        if packed:
            src = _trace_back_to(inputs[0], by_output, {id(h)})
            if len(src) != 1 or src[0].kind == "low-rank" or num_heads is None:
                self.unrecognized.append(f"{p}: packed QKV input of {node.name} does not come from one linear layer")
                return None
            qkv = src[0]
            total_heads = num_heads + 2 * kv_heads
            if qkv.N % total_heads:
                self.unrecognized.append(f"{p}: packed QKV width {qkv.N} is not a multiple of {total_heads} heads")
                return None
            hd = qkv.N // total_heads
            qn, kn = num_heads * hd, kv_heads * hd
            q = qkv.to_linear(f"{p}.q", index, "q", columns=(0, qn))
            k = qkv.to_linear(f"{p}.k", index, "k", columns=(qn, qn + kn))
            v = qkv.to_linear(f"{p}.v", index, "v", columns=(qn + kn, qn + 2 * kn))
        else:
            srcs = [_trace_back_to(inputs[j], by_output, {id(h)}) for j in range(3)]
            if any(len(s) != 1 for s in srcs):
                self.unrecognized.append(f"{p}: q/k/v inputs of {node.name} do not each come from one linear")
                return None
            qm, km, vm = (s[0] for s in srcs)
            hd = qm.N // num_heads if num_heads else None
            q, k, v = qm.to_linear(f"{p}.q", index, "q"), km.to_linear(f"{p}.k", index, "k"), vm.to_linear(f"{p}.v", index, "v")
        if num_heads and hd:
            self.head_dims.append(hd)
            self.heads.append((num_heads, kv_heads))
        for j in (7, 8):  # GroupQueryAttention cos_cache, sin_cache
            if node.op_type == "GroupQueryAttention" and j < len(node.inputs) and is_const(node.inputs[j]):
                self.rope_tables.append(node.inputs[j])
        self._collect_rope_tables(inputs[0], None)
        return q, k, v, o.to_linear(f"{p}.o", index, "o"), node.name, node.op_type, o

    def _upstream_matmul(self, value: ir.Value, limit: int = 12) -> ir.Node | None:
        """The activation×activation MatMul feeding `value` through rescale/mask/reshape ops."""
        for _ in range(limit):
            node = value.producer() if value is not None else None
            if node is None:
                return None
            if node.op_type == "MatMul" and not is_const(node.inputs[1]):
                return node
            if node.op_type not in PASS_THROUGH:
                return None
            value = next((v for v in node.inputs if v is not None and not is_const(v)), None)
        return None

    def _downstream_matmul(self, value: ir.Value, limit: int = 12):
        """The MatMul consuming the softmax output (through reshapes); (node, input index)."""
        for _ in range(limit):
            uses = list(value.uses())
            mm = next((u for u in uses if u.node.op_type == "MatMul" and not is_const(u.node.inputs[1])), None)
            if mm is not None:
                return mm.node, mm.idx
            nxt = next((u.node for u in uses if u.node.op_type in PASS_THROUGH), None)
            if nxt is None:
                return None, 0
            value = nxt.outputs[0]
        return None, 0

    def _head_dim(self, q: _LinearMatch) -> int | None:
        for node in _forward_nodes(q.output, limit=8):
            if node.op_type == "Reshape":
                shape = const_array(node.inputs[1])
                if shape is not None and shape.ndim == 1 and len(shape) == 4 and shape[-1] > 0:
                    return int(shape[-1])
        return None

    def _collect_rope_tables(self, q_value: ir.Value, q_linear_out: ir.Value | None) -> None:
        """Constant 2-D tables gathered by position on the q path (cos/sin caches)."""
        seen = set()
        queue = deque([q_value])
        steps = 0
        while queue and steps < 80:
            v = queue.popleft()
            steps += 1
            if v is None or id(v) in seen or v is q_linear_out:
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None:
                continue
            if node.op_type == "Gather" and is_const(node.inputs[0]):
                shape = const_shape(node.inputs[0])
                if shape is not None and len(shape) == 2:
                    self.rope_tables.append(node.inputs[0])
                    continue
            if node.op_type == "RotaryEmbedding":
                for j in (2, 3):
                    if j < len(node.inputs) and is_const(node.inputs[j]):
                        self.rope_tables.append(node.inputs[j])
            if match_linear(node) is None:
                queue.extend(node.inputs)

    # ---- MLP -----------------------------------------------------------------------------------
    def mlp(self, index: int, h: ir.Value):
        p = f"layers.{index}"
        lins = linears_reading(h)
        if len(lins) == 1 and lins[0].kind == "int4" and lins[0].node.attributes.get_int("swiglu", 0) == 1:
            # passes/swiglu.py: one QMatMul over [gate | up] computing silu(gate)·up itself
            fused, width = lins[0], lins[0].N // 2
            down = _first_linear_after(fused.output, limit=4)
            if down is None:
                self.unrecognized.append(f"{p}: no down projection after {fused.node.name}")
                return None
            return (fused.to_linear(f"{p}.gate", index, "gate", columns=(0, width)),
                    fused.to_linear(f"{p}.up", index, "up", columns=(width, 2 * width)),
                    down.to_linear(f"{p}.down", index, "down"), down)
        if len(lins) != 2:
            self.unrecognized.append(
                f"{p}: expected gate and up projections reading {h.name}, found {[m.node.name for m in lins]}")
            return None
        gate = [m for m in lins if _feeds_silu(m.output)]
        if len(gate) != 1:
            self.unrecognized.append(f"{p}: cannot tell gate from up among {[m.node.name for m in lins]} (no single SiLU)")
            return None
        gate = gate[0]
        up = lins[0] if lins[1] is gate else lins[1]
        product = None
        for node in _forward_nodes(up.output, limit=4):
            if node.op_type == "Mul" and _trace_back_to(node.outputs[0], {id(gate.output): gate}, {id(h)}, limit=10):
                product = node
                break
        if product is None:
            self.unrecognized.append(f"{p}: no product of silu(gate) and up after {up.node.name}")
            return None
        down = _first_linear_after(product.outputs[0], limit=4)
        if down is None:
            self.unrecognized.append(f"{p}: no down projection after {product.name}")
            return None
        return (gate.to_linear(f"{p}.gate", index, "gate"), up.to_linear(f"{p}.up", index, "up"),
                down.to_linear(f"{p}.down", index, "down"), down)

    # ---- rope -------------------------------------------------------------------------------------
    def rope_theta(self, head_dim: int | None) -> float | None:
        """θ from a sin table: row 1 holds sin(θ^(−2j/d)) for j < d/2 (HF / genai layout)."""
        if head_dim is None or head_dim < 4:
            return None
        half = head_dim // 2
        for table in self.rope_tables:
            shape = const_shape(table)
            if shape is None or len(shape) != 2 or shape[0] < 2 or shape[1] not in (half, head_dim):
                continue
            arr = const_array(table).astype(np.float64)
            if np.abs(arr[0]).max() > 1e-6:  # cos table (row 0 = 1) or something else
                continue
            row = arr[1, :half]
            if abs(row[0] - math.sin(1.0)) > 1e-5 or np.any(row <= 0) or np.any(row > 1):
                continue
            freqs = np.arcsin(row)  # frequency j at position 1, all in (0, 1]
            j = np.arange(1, half)
            thetas = np.exp(-np.log(freqs[1:]) * head_dim / (2.0 * j))
            theta = float(thetas[-1])  # smallest frequency: best conditioned
            if not np.allclose(thetas, theta, rtol=1e-3):
                self.unrecognized.append(
                    "rope: frequencies are not θ^(−2j/d) (scaled RoPE); rope_theta is read from the "
                    "highest (unscaled) frequency")
                theta = float(thetas[0])
            return float(f"{theta:.6g}")
        return None


def analyze(model: ir.Model) -> ModelStructure:
    """The decoder structure of `model` (see the module docstring). UserError if no block."""
    an = _Analysis(model)
    values = _values_by_name(model)
    embedding, r = an.find_embedding()
    if r is None:
        raise UserError("no token embedding (Gather of a [vocab, hidden] initializer by input_ids) in the graph: "
                        "it is not a Llama-family decoder exported by llmfold or onnxruntime-genai.")
    pending = None
    blocks: list[Block] = []
    final_norm = None
    lm_head = None
    placed: set[str] = set()
    attn_residual_for_prev = None
    while True:
        index = len(blocks)
        norm, stream, add_node = an.norm_of_stream(r, pending)
        if norm is None:
            an.unrecognized.append(f"no RMSNorm found on the residual stream {r.name} (block {index})")
            break
        if blocks and pending is not None:
            blocks[-1].mlp_residual_add = add_node
        h = values[norm.output]
        att = an.attention(index, h)
        if att is None:
            # final norm → lm_head
            sl = logits_slice_of(h)  # passes/logits.py: lm_head may read the last rows only
            head = [m for m in linears_reading(sl.outputs[0] if sl is not None else h) if m.output.is_graph_output()]
            if len(head) == 1:
                final_norm = norm
                lm_head = head[0].to_linear("lm_head", None, "lm_head")
                placed.update(lm_head.nodes)
            else:
                an.unrecognized.append(f"norm {norm.node}: followed neither by attention nor by an lm_head MatMul")
            break
        if stream is None:
            an.unrecognized.append(f"layers.{index}: the residual sum of {norm.node} is not an output")
            break
        q, k, v, o, attention, kind, o_match = att
        residual_in = stream.name
        norm2, stream2, add2 = an.norm_of_stream(stream, o_match.output)
        if norm2 is None or stream2 is None:
            an.unrecognized.append(f"layers.{index}: no post-attention residual add + RMSNorm after {o.node}")
            break
        h2 = values[norm2.output]
        mlp = an.mlp(index, h2)
        if mlp is None:
            break
        gate, up, down, down_match = mlp
        blocks.append(Block(
            index=index, input_norm=norm, post_attention_norm=norm2, q=q, k=k, v=v, o=o,
            gate=gate, up=up, down=down, attention=attention, attention_kind=kind,
            attention_residual_add=add2, mlp_residual_add=None, residual_in=residual_in,
        ))
        for lin in blocks[-1].linears():
            placed.update(lin.nodes)
        r, pending = stream2, down_match.output

    if not blocks:
        raise UserError("no Llama decoder block (RMSNorm → q/k/v → attention → o → RMSNorm → gate/up/down) "
                        "found in the graph: " + ("; ".join(an.unrecognized) or "unknown structure"))
    # every linear-like node must be placed
    for node in model.graph:
        m = match_linear(node)
        if m is not None and node.name not in placed:
            if m.kind == "low-rank" and m.nodes[1].name in placed:
                continue
            an.unrecognized.append(f"linear {node.name} ({node.op_type} [{m.K}, {m.N}]) is not placed in any block")
        elif node.op_type == "Gemm":
            an.unrecognized.append(f"Gemm {node.name} is not analyzed (only MatMul-based linears are)")

    emb_shape = const_shape(embedding)
    tied = False
    if lm_head is not None and lm_head.weight is not None and emb_shape is not None:
        w_value = values[lm_head.weight]
        if w_value is embedding:
            tied = True
        elif const_shape(w_value) == (emb_shape[1], emb_shape[0]):
            tied = bool(np.array_equal(const_array(w_value), const_array(embedding).T))
    hd = an.head_dims[0] if an.head_dims and len(set(an.head_dims)) == 1 else None
    if an.head_dims and len(set(an.head_dims)) != 1:
        an.unrecognized.append(f"head_dim differs between blocks: {sorted(set(an.head_dims))}")
    heads = an.heads[0] if an.heads and len(set(an.heads)) == 1 else (None, None)
    if an.heads and len(set(an.heads)) != 1:
        an.unrecognized.append(f"head counts differ between blocks: {sorted(set(an.heads))}")
    theta = an.rope_theta(hd)
    if theta is None:
        an.unrecognized.append("rope: no sin/cos table found (rope_theta unknown)")
    b0 = blocks[0]
    return ModelStructure(
        blocks=blocks,
        final_norm=final_norm,
        lm_head=lm_head,
        embedding=embedding.name,
        tied_embeddings=tied,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=hd,
        hidden_size=emb_shape[1],
        intermediate_size=b0.gate.N,
        vocab_size=lm_head.N if lm_head is not None else emb_shape[0],
        rope_theta=theta,
        rms_norm_eps=b0.input_norm.epsilon,
        unrecognized=an.unrecognized,
    )


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


__all__ = ["analyze", "match_linear", "match_linears", "match_norm_on", "const_array"]
