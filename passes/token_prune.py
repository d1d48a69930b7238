"""Agile-Quant token pruning (Shen et al., AAAI 2024) in the prefill, deployable: a `llmfold.TokenPrune`
node after the attention of chosen layers, with true positions and a per-layer KV cache.

Method
------
Agile-Quant observes that in the prefill most tokens matter little to later layers, and ranks a token
by the attention it pays to the first token (the "attention sink"), summed over heads:

    score[t] = Σ_h P[b, h, t, 0]                                  (score = "first_token", the paper's)

(option score = "column_sum": how much attention key t *receives*, normalized by how many causal
queries can see it, score[t] = Σ_h Σ_q P[b, h, q, t] / (T − t)). After the attention of layer p the
residual stream x [B, T, D] is cut to the `keep` best rows; token 0 and token T−1 are always kept and
the kept rows stay in their original order (TokenPrune's rule, see custom_ops/kernels/ref/
token_prune.h). Everything after that point runs on the kept rows only: the MLP of layer p and all
later layers, and the lm_head.

Parameters (recipe): `start_layer` s = the first layer whose attention, KV cache and MLP see only
kept tokens. The ranking uses the attention of layer s − 1, and the TokenPrune node sits right after
that layer's attention residual add (so layer s − 1's MLP already runs on the kept rows; its own KV
cache is complete). Then either
  * `keep_ratios = [r_0, r_1, …]`: one TokenPrune after the attention of each layer s−1+j, keeping
    keep_j = floor(r_j · T_j) of the T_j rows that reach it (at least 2; see keep_count() for the exact
    float rule, shared with the op), so that at least a fraction 1 − r_j is removed, or
  * `prune_ratio = β`, `cascade_layers = m`: the paper's cascade, r_j = 1 − γ for j < m with
    γ = 1 − (1 − β)^(1/m), so that a fraction β of the prompt is gone after m layers.
So `start_layer = 10, keep_ratios = [0.7]` removes 30 % of the prompt tokens from layers 10…L−1.

Consistency downstream (what makes it deployable):
  * hidden states: the residual stream is gathered by TokenPrune.
  * positions: every per-token tensor a later layer reads from outside the residual stream (found
    by analysis, see below: rotary cos/sin, the additive causal/padding mask) is gathered with the
    ORIGINAL indices of the kept tokens (a TokenPrune companion carries them through a cascade), so
    kept tokens keep their true RoPE positions — never renumbered 0…n−1 as the paper's code does —
    and the causal mask between kept tokens is the original one.
  * KV cache: K/V of a later layer are computed from kept rows, so `present.{i}.key/value` of layers
    ≥ s hold only kept tokens; earlier layers hold all. In a later decode step the mask's columns for
    the past of such a layer are the last `past_i` columns of the logical past (the layer's own past
    length, read from its past input), which is exact because the cache then holds only real tokens.
  * logits: the lm_head sees the kept rows, so a pruned prefill returns logits [B, kept, V] whose last
    row is the last prompt token (always kept): next-token decoding (`llmfold generate`) is
    unchanged. A new graph output `kept_token_indices` [B, kept] (int64) gives the prompt index of
    every logits row. Per-token perplexity over the prompt is not defined on a pruned model; use
    `compiler.continuation.evaluate_continuation` (eval --continuation).
  * when nothing is pruned: keep = T (no pruning) whenever the step has a past (decode steps and
    chunked prefill after the first chunk), T ≤ 2, or the attention_mask has a padded slot (so a kept
    pad could never be mis-masked by a later step). Decoding after a pruned prefill therefore works
    with per-layer KV lengths.

Which tensors need gathering is not hard-coded: the pass takes every value read by a node downstream
of the first prune point that is neither downstream itself, nor a constant, nor a past KV input, and
runs those values once in ONNX Runtime at two shapes (batch 2 / past 0 / 7 new tokens, and batch 3 /
past 6 / 5 new tokens) to find which axis is the batch, which follows the new tokens (T: gathered)
and which the total length (S: past columns sliced, new columns gathered). Anything else is a
UserError naming the value.

onnxruntime-genai cannot run a pruned model: it keeps one KV length for all layers. The pass records
kv_cache = "per-layer" in llmfold.json; llmfold's runtime feeds each layer's present back as its past.

Exactness
---------
With every keep ratio 1.0 (or whenever keep = T), TokenPrune returns its input rows unchanged and
in order, the companion indices are 0…T−1, every gather is the identity and the mask's past slice is
the whole past (all layers then hold equal caches): every original node receives bit-identical
inputs, so logits and presents equal the unpruned graph's (tests/test_token_prune.py: ≤ 1e-5). For a
pruned prefill the result is, row for row, exactly the unpruned computation of a model in which the
dropped tokens never reached the later layers: RMSNorm, the linears and the MLP act on rows
independently, and attention of a kept query over the kept keys uses their true positions and the
original causal order — checked against an independent torch implementation in the tests.

Fused attention (`llmfold export --attention fused`: one com.microsoft GroupQueryAttention per block)
-------------------------------------------------------------------------------------------------
GroupQueryAttention exposes no probabilities, so TokenPrune computes the score itself from the pruning
layer's post-RoPE queries and keys (its `query`/`key` inputs, attributes num_heads, kv_num_heads,
scale copied from the GQA node, `score` = first_token | column_sum): the same causal softmax row by
row, hence the same scores as the explicit layout's Softmax output up to float rounding, and the same
kept tokens (tests/test_token_prune.py compares both layouts). The rest of the layout is rewritten so
the guarantees above hold:
  * RoPE at original positions: GroupQueryAttention would rotate the kept rows by their row index
    (0…n−1). For the first ranking layer and every later layer the pass sets do_rotary = 0, drops the
    cos/sin cache inputs, and rotates q and k with com.microsoft.RotaryEmbedding nodes fed with
    position ids = logical past + the original indices of the rows reaching that layer (TokenPrune's
    companion; 0…T−1 at the ranking layer itself). RotaryEmbedding is the kernel GQA calls
    internally: at keep ratio 1 the logits are bit-identical. The ranking layer's rotated q/k feed
    TokenPrune.
  * KV lengths: each later layer gets its own seqlens_k = past_i + rows − 1 (int32 [B]) and
    total_sequence_length = past_i + rows, past_i read from its own past input, so its present K/V
    hold only kept tokens and a decode step attends exactly its own cache. The attention_bias (the
    additive causal/padding mask) is gathered like any other per-token value (see above).
  * padded batches and steps with a past keep every row (as in the explicit layout); TokenPrune then
    skips the score computation entirely.
Only the GQA form the exporter writes is accepted (separate q/k/v, do_rotary = 1, non-interleaved,
constant caches, no position_ids input, no sliding window/softcap/smooth softmax); anything else is
a UserError before any work. Other fused attention ops (MultiHeadAttention, Attention) are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from compiler.custom_ops import KEEP_RATIO_SLACK
from compiler.errors import UserError
from passes.base import CompilerPass, register_pass

DOMAIN = "llmfold"
INT64_MAX = int(np.iinfo(np.int64).max)
PREFIX = "/model/token_prune"
KEPT_OUTPUT = "kept_token_indices"
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")

# the two probe runs: (batch, past, new tokens); the total is past + new
_PROBES = ((2, 0, 7), (3, 6, 5))


@dataclasses.dataclass
class TokenPruneParams:
    start_layer: int = 10
    keep_ratios: list[float] | None = None
    prune_ratio: float | None = None
    cascade_layers: int = 1
    score: Literal["first_token", "column_sum"] = "first_token"

    def validate(self) -> None:
        if self.start_layer < 1:
            raise UserError(
                f"token_prune: start_layer {self.start_layer} must be ≥ 1 (the first pruned layer is "
                "ranked by the attention of the layer before it)"
            )
        if (self.keep_ratios is None) == (self.prune_ratio is None):
            raise UserError("token_prune: give either keep_ratios = [...] or prune_ratio (with cascade_layers), not both or neither")
        if self.keep_ratios is not None:
            if not self.keep_ratios:
                raise UserError("token_prune: keep_ratios is empty; give one ratio per pruning layer, e.g. [0.7]")
            for r in self.keep_ratios:
                if not (isinstance(r, (int, float)) and 0.0 < float(r) <= 1.0):
                    raise UserError(f"token_prune: keep ratio {r!r} is outside (0, 1]; a ratio is the fraction of tokens kept")
            if any(not isinstance(r, (int, float)) or isinstance(r, bool) for r in self.keep_ratios):
                raise UserError("token_prune: keep_ratios must be numbers")
        else:
            if not (0.0 <= float(self.prune_ratio) < 1.0):
                raise UserError(
                    f"token_prune: prune_ratio {self.prune_ratio!r} is outside [0, 1); it is the fraction of "
                    "prompt tokens removed after the cascade (keep ratio 1 − prune_ratio must be in (0, 1])"
                )
            if self.cascade_layers < 1:
                raise UserError(f"token_prune: cascade_layers {self.cascade_layers} must be ≥ 1")

    def ratios(self) -> list[float]:
        """Per pruning point j (after the attention of layer start_layer − 1 + j): fraction kept."""
        if self.keep_ratios is not None:
            return [float(r) for r in self.keep_ratios]
        gamma = 1.0 - (1.0 - float(self.prune_ratio)) ** (1.0 / self.cascade_layers)
        return [1.0 - gamma] * self.cascade_layers

    def prune_points(self) -> list[tuple[int, float]]:
        """[(layer whose attention ranks the tokens, keep ratio)], in model order."""
        return [(self.start_layer - 1 + j, r) for j, r in enumerate(self.ratios())]


def keep_count(ratio: float, T: int) -> int:
    """The rows a TokenPrune point keeps in a prefill of T rows: floor(fl32(ratio)·T·(1 + 2⁻²⁰)) in
    float64 (as the graph computes it; the factor only stops a mathematically integral product such as
    0.7·10 from being floored one below by the float32 ratio), clamped to [2, T]; T ≤ 2 keeps all.
    Floor: a point never keeps more than ratio·T rows (prune-30 on 512 tokens keeps 358, −30.08 %).
    The same rule as TokenPrune's keep_ratio attribute (compiler.custom_ops.token_prune_keep)."""
    from compiler.custom_ops import token_prune_keep

    return token_prune_keep(T, keep_ratio=ratio)


# ------------------------------------------------------------------------------------------------
# graph building helpers
# ------------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self._consts: dict[tuple, ir.Value] = {}
        self._names: set[str] = set()

    def const(self, values, dtype=np.int64) -> ir.Value:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            flat = "_".join(str(v) for v in arr.reshape(-1).tolist())
            name = f"token_prune.const_{arr.dtype.name}_{'x'.join(map(str, arr.shape)) or 'scalar'}_{flat}"
            name = name.replace("-", "m").replace(".", "p").replace("token_prunep", "token_prune.")
            if name in self.graph.initializers:
                self._consts[key] = self.graph.initializers[name]
            else:
                v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                             shape=ir.Shape(arr.shape), const_value=ir.tensor(arr, name=name))
                self.graph.register_initializer(v)
                self._consts[key] = v
        return self._consts[key]

    def op(self, op_type, inputs, name, attrs=None, num_outputs=1, domain=""):
        if name in self._names:
            raise AssertionError(f"duplicate node name {name}")
        self._names.add(name)
        node = ir.node(op_type, list(inputs), attributes=attrs or {}, num_outputs=num_outputs, name=name, domain=domain)
        for k, out in enumerate(node.outputs):
            out.name = f"{name}/output_{k}"
        self.graph.append(node)
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def dim(self, value, axis, name):
        """Shape(value)[axis:axis+1] as a [1] int64 tensor."""
        return self.op("Shape", [value], name, attrs={"start": axis, "end": axis + 1})


def _forward_closure(values: list[ir.Value]) -> list[ir.Node]:
    """Nodes reachable from `values` (their consumers, transitively)."""
    seen: dict[int, ir.Node] = {}
    stack = [u.node for v in values for u in v.uses()]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        for out in node.outputs:
            stack.extend(u.node for u in out.uses())
    return list(seen.values())


def _is_const(value: ir.Value) -> bool:
    if value.const_value is not None or value.is_initializer():
        return True
    node = value.producer()
    return node is not None and node.op_type == "Constant" and not node.inputs


def _graph_input_ancestors(values: list[ir.Value], graph: ir.Graph) -> list[ir.Value]:
    inputs = {id(v) for v in graph.inputs}
    found: dict[int, ir.Value] = {}
    seen: set[int] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in inputs:
            found[id(v)] = v
            continue
        node = v.producer()
        if node is not None:
            stack.extend(node.inputs)
    return [v for v in graph.inputs if id(v) in found]


# ------------------------------------------------------------------------------------------------
# the pass
# ------------------------------------------------------------------------------------------------
@register_pass
class TokenPrunePass(CompilerPass):
    name = "token_prune"
    Params = TokenPruneParams
    description = "Agile-Quant token pruning in the prefill (true positions, per-layer KV cache)"

    def __call__(self, model_or_result):
        # onnx_ir wraps exceptions of requires() in PreconditionError; a UserError must reach the CLI
        try:
            return super().__call__(model_or_result)
        except ir.passes.PreconditionError as e:
            if isinstance(e.__cause__, UserError):
                raise e.__cause__ from None
            raise

    # -- checks before any work ----------------------------------------------------------------
    def requires(self, model: ir.Model) -> None:
        structure = self.ctx.structure(model)  # UserError when no decoder block is recognized
        L = len(structure.blocks)
        points = self.params.prune_points()
        s = self.params.start_layer
        if s > L - 1:
            raise UserError(
                f"token_prune: start_layer {s} is past the last layer that can be pruned: the model has {L} "
                f"layers (0…{L - 1}); choose start_layer in 1…{L - 1}"
            )
        last = points[-1][0]
        if last > L - 1:
            raise UserError(
                f"token_prune: {len(points)} pruning steps from start_layer {s} need layers up to {last + 1}, but "
                f"the model has {L} layers; use fewer keep_ratios/cascade_layers or an earlier start_layer"
            )
        nodes_by_name = {n.name: n for n in model.graph}
        for p, _ in points:
            b = structure.blocks[p]
            if b.attention_kind not in ("softmax", "GroupQueryAttention"):
                raise UserError(
                    f"token_prune: the attention of layer {p} is a fused {b.attention_kind} op; token pruning supports "
                    "an explicit Softmax or com.microsoft GroupQueryAttention (`llmfold export`, either layout)"
                )
            if not b.attention_residual_add:
                raise UserError(f"token_prune: no attention residual add recognized in layer {p}; re-export the model")
        kinds = {structure.blocks[i].attention_kind for i in range(points[0][0], L)}
        if len(kinds) > 1:
            raise UserError(f"token_prune: layers {points[0][0]}…{L - 1} mix attention layouts ({', '.join(sorted(kinds))}); "
                            "re-export the model with one layout")
        if kinds == {"GroupQueryAttention"}:
            for i in range(points[0][0], L):
                self._check_gqa(nodes_by_name[structure.blocks[i].attention], i)
        names = {v.name for v in model.graph.inputs}
        outs = {v.name for v in model.graph.outputs}
        for need in ("input_ids", "attention_mask"):
            if need not in names:
                raise UserError(f"token_prune: the model has no `{need}` input; export it with `llmfold export`")
        if "logits" not in outs:
            raise UserError("token_prune: the model has no `logits` output; export it with `llmfold export`")
        need_past = range(points[0][0] + 1, L) if kinds == {"GroupQueryAttention"} else [p + 1 for p, _ in points]
        for p in need_past:
            if p < L and f"past_key_values.{p}.key" not in names:
                raise UserError(f"token_prune: layer {p} has no past_key_values input; export the model with a KV cache")
        if any(n.op_type == "TokenPrune" and n.domain == DOMAIN for n in model.graph):
            raise UserError("token_prune: the model is already token-pruned; compile from the unpruned model")
        if KEPT_OUTPUT in outs:
            raise UserError(f"token_prune: the model already has an output named {KEPT_OUTPUT}")

    @staticmethod
    def _check_gqa(node: ir.Node, layer: int) -> None:
        """The GroupQueryAttention forms the fused rewrite handles (what `llmfold export --attention
        fused` writes): separate q/k/v, rotate_half RoPE done by the op from constant caches, no
        position_ids input, plain causal softmax."""
        a = node.attributes
        ins = list(node.inputs) + [None] * 12
        why = None
        if node.domain != "com.microsoft":
            why = f"domain {node.domain!r}"
        elif ins[1] is None or ins[2] is None:
            why = "packed QKV (k and v inputs absent)"
        elif a.get_int("do_rotary", 0) != 1 or a.get_int("rotary_interleaved", 0) != 0:
            why = "RoPE not done by the op (do_rotary=1, rotary_interleaved=0 expected)"
        elif ins[7] is None or ins[8] is None or not (_is_const(ins[7]) and _is_const(ins[8])):
            why = "cos_cache/sin_cache are not constants"
        elif ins[9] is not None:
            why = "it has a position_ids input"
        elif a.get_int("local_window_size", -1) != -1 or a.get_float("softcap", 0.0) != 0.0 or a.get_int("smooth_softmax", 0):
            why = "sliding window, softcap or smooth softmax"
        elif ins[5] is None or ins[6] is None:
            why = "seqlens_k/total_sequence_length absent"
        if why:
            raise UserError(f"token_prune: the GroupQueryAttention of layer {layer} ({node.name}) is not supported: {why}; "
                            "export the model with `llmfold export`")

    @staticmethod
    def _gqa_rope(b: "_Builder", node: ir.Node, positions: ir.Value, tag: str) -> tuple[ir.Value, ir.Value]:
        """Moves the RoPE of a GroupQueryAttention out of the op: com.microsoft.RotaryEmbedding on q and k
        with explicit position ids [B, T] (the original positions of the rows), do_rotary = 0. Same
        kernel math as the op's internal rotation (bit-identical for positions 0…T−1). Returns the
        rotated q, k."""
        H = node.attributes.get_int("num_heads")
        KV = node.attributes.get_int("kv_num_heads", H)
        q, k, cos, sin = node.inputs[0], node.inputs[1], node.inputs[7], node.inputs[8]
        q_rot = b.op("RotaryEmbedding", [q, positions, cos, sin], f"{tag}/q_rotary", domain="com.microsoft",
                     attrs={"num_heads": H, "interleaved": 0})
        k_rot = b.op("RotaryEmbedding", [k, positions, cos, sin], f"{tag}/k_rotary", domain="com.microsoft",
                     attrs={"num_heads": KV, "interleaved": 0})
        node.replace_input_with(0, q_rot)
        node.replace_input_with(1, k_rot)
        node.replace_input_with(7, None)
        node.replace_input_with(8, None)
        node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 0)
        return q_rot, k_rot

    # -- the rewrite ----------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        structure = self.ctx.structure(model)
        L = len(structure.blocks)
        points = self.params.prune_points()
        nodes_by_name = {n.name: n for n in graph}
        inputs = {v.name: v for v in graph.inputs}
        residuals = [nodes_by_name[structure.blocks[p].attention_residual_add].outputs[0] for p, _ in points]
        attn_nodes = [nodes_by_name[structure.blocks[p].attention] for p, _ in points]  # Softmax or GQA
        fused = structure.blocks[points[0][0]].attention_kind == "GroupQueryAttention"
        gqa = {i: nodes_by_name[structure.blocks[i].attention] for i in range(points[0][0], L)} if fused else {}
        # GroupQueryAttention's seqlens_k / total_sequence_length are rebuilt per layer below
        per_layer_lengths = {id(n.inputs[j]) for n in gqa.values() for j in (5, 6)}

        # 1. the downstream region of every pruning point and the values it reads from outside
        regions = [_forward_closure([r]) for r in residuals]
        stage_of: dict[int, int] = {}
        for k, region in enumerate(regions):
            for node in region:
                stage_of[id(node)] = k  # later (smaller) regions overwrite: the deepest stage wins
        downstream = {id(n) for n in regions[0]}
        produced_inside = {id(out) for n in regions[0] for out in n.outputs}
        side: dict[int, ir.Value] = {}
        for node in regions[0]:
            for v in node.inputs:
                if v is None or id(v) in produced_inside or _is_const(v) or any(v is r for r in residuals):
                    continue
                if v.is_graph_input() and _PAST_RE.match(v.name or ""):
                    continue
                if id(v) in per_layer_lengths:
                    continue
                side[id(v)] = v
        side_values = sorted(side.values(), key=lambda v: v.name or "")
        axes = self._classify(model, side_values)
        self.ctx.log(
            "per-token values gathered after pruning: "
            + (", ".join(f"{v.name} {axes[v.name]}" for v in side_values if set(axes[v.name]) & {"T", "S"}) or "none")
        )

        # 2. shared scalars: is pruning enabled in this run (prefill from an empty cache, no padding)?
        original_nodes = {id(n) for n in graph}
        b = _Builder(graph)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        T0 = b.dim(ids, 1, f"{PREFIX}/seq_len")  # [1]
        S0 = b.dim(mask, 1, f"{PREFIX}/total_len")  # [1]
        past_log = b.op("Sub", [S0, T0], f"{PREFIX}/past_len")  # [1] logical past length
        no_past = b.op("Equal", [past_log, b.const([0])], f"{PREFIX}/no_past")
        mask_min = b.op("ReduceMin", [mask], f"{PREFIX}/mask_min", attrs={"keepdims": 0})
        no_pad = b.op("Equal", [mask_min, b.const(1)], f"{PREFIX}/no_padding")
        enabled = b.op("And", [no_past, no_pad], f"{PREFIX}/enabled")  # [1] bool
        B = b.dim(ids, 0, f"{PREFIX}/batch")  # (from input_ids: the fused layout's first RoPE reads orig)
        T0s = b.op("Squeeze", [T0, b.const([0])], f"{PREFIX}/seq_len_scalar")
        arange = b.op("Range", [b.const(0), T0s, b.const(1)], f"{PREFIX}/arange")
        orig = b.op("Expand", [b.op("Unsqueeze", [arange, b.const([0])], f"{PREFIX}/arange_row"),
                               b.op("Concat", [B, b.const([1])], f"{PREFIX}/orig_shape", attrs={"axis": 0})],
                    f"{PREFIX}/orig_0")  # [B, T] original token indices

        # 3. one TokenPrune per point
        originals: list[ir.Value] = []
        for k, ((p, ratio), r, attn) in enumerate(zip(points, residuals, attn_nodes)):
            pk = f"{PREFIX}/{k}"
            T_in = b.dim(r, 1, f"{pk}/rows_in")
            # keep_count(): floor(double(fl32(ratio))·T·(1 + 2⁻²⁰)), the product exact in float64
            prod = b.op("Mul", [b.op("Cast", [T_in], f"{pk}/rows_double", attrs={"to": ir.DataType.DOUBLE}),
                                b.const([float(np.float32(ratio))], np.float64)], f"{pk}/rows_times_ratio")
            prod = b.op("Mul", [prod, b.const([KEEP_RATIO_SLACK], np.float64)], f"{pk}/rows_times_ratio_slack")
            want = b.op("Cast", [b.op("Floor", [prod], f"{pk}/Floor")], f"{pk}/keep_wanted", attrs={"to": ir.DataType.INT64})
            keep = b.op("Where", [enabled, want, T_in], f"{pk}/keep_or_all")
            keep_s = b.op("Squeeze", [keep, b.const([0])], f"{pk}/keep_count")
            if fused:
                # the op computes the scores from this layer's post-RoPE queries and keys (original positions)
                q_rot, k_rot = self._gqa_rope(b, attn, b.op("Add", [past_log, orig], f"{pk}/positions"), f"{pk}/rope")
                a = attn.attributes
                attrs = {"num_heads": a.get_int("num_heads"), "kv_num_heads": a.get_int("kv_num_heads", a.get_int("num_heads")),
                         "score": self.params.score}
                if a.get_float("scale", 0.0):
                    attrs["scale"] = a.get_float("scale")
                pruned, _kept, orig_next = b.op("TokenPrune", [r, None, keep_s, orig, None, None, q_rot, k_rot],
                                                f"{pk}/TokenPrune", num_outputs=3, domain=DOMAIN, attrs=attrs)
                for use in list(r.uses()):
                    if id(use.node) in original_nodes:
                        use.node.replace_input_with(use.idx, pruned)
                originals.append(orig_next)
                orig = orig_next
                continue
            probs = attn.outputs[0]
            if self.params.score == "first_token":
                scores = probs
            else:  # causal-normalized column sums over the new-token keys
                T_in_s = b.op("Squeeze", [T_in, b.const([0])], f"{pk}/rows_in_scalar")
                cols = b.op("Slice", [probs, b.op("Neg", [T_in], f"{pk}/neg_rows"), b.const([INT64_MAX]), b.const([3])],
                            f"{pk}/new_key_columns")
                colsum = b.op("ReduceSum", [cols, b.const([1, 2])], f"{pk}/column_sum", attrs={"keepdims": 0})
                t = b.op("Range", [b.const(0), T_in_s, b.const(1)], f"{pk}/key_index")
                seen_by = b.op("Cast", [b.op("Sub", [T_in_s, t], f"{pk}/queries_seeing")], f"{pk}/queries_float",
                               attrs={"to": ir.DataType.FLOAT})
                scores = b.op("Div", [colsum, seen_by], f"{pk}/importance")
            node_inputs = [r, scores, keep_s, orig]
            pruned, _kept, orig_next = b.op("TokenPrune", node_inputs, f"{pk}/TokenPrune", num_outputs=3, domain=DOMAIN)
            # every reader of the residual stream after the attention of layer p now reads the kept rows
            for use in list(r.uses()):
                if id(use.node) in original_nodes:
                    use.node.replace_input_with(use.idx, pruned)
            originals.append(orig_next)
            orig = orig_next

        # 3b. fused layout, layers after the first ranking layer: RoPE at the original positions of the
        #     rows that reach them, and their own KV lengths (past_i + rows) for GroupQueryAttention
        if fused:
            rank_layers = {p for p, _ in points}
            for i in range(points[0][0] + 1, L):
                node = gqa[i]
                rows = originals[max(k for k, (p, _) in enumerate(points) if p < i)]
                li = f"{PREFIX}/layers.{i}"
                if i not in rank_layers:
                    self._gqa_rope(b, node, b.op("Add", [past_log, rows], f"{li}/positions"), f"{li}/rope")
                past_i = b.dim(inputs[f"past_key_values.{i}.key"], 2, f"{li}/past_len")
                total_i = b.op("Add", [past_i, b.dim(rows, 1, f"{li}/rows")], f"{li}/total_len")  # [1]
                last_i = b.op("Sub", [total_i, b.const([1])], f"{li}/last")
                seqlens = b.op("Cast", [b.op("Expand", [last_i, B], f"{li}/seqlens_k_i64")], f"{li}/seqlens_k",
                               attrs={"to": ir.DataType.INT32})
                total_s = b.op("Cast", [b.op("Squeeze", [total_i, b.const([0])], f"{li}/total_scalar")],
                               f"{li}/total_sequence_length", attrs={"to": ir.DataType.INT32})
                node.replace_input_with(5, seqlens)
                node.replace_input_with(6, total_s)

        # 4. per-token side values: gathered by the original indices of each stage's kept tokens
        cache: dict[tuple[str, int], ir.Value] = {}
        for node in list(graph):
            if id(node) not in downstream:
                continue
            k = stage_of[id(node)]
            for j, v in enumerate(node.inputs):
                if v is None or id(v) not in side:
                    continue
                kinds = axes[v.name]
                if "T" not in kinds and "S" not in kinds:
                    continue
                key = (v.name, k)
                if key not in cache:
                    cache[key] = self._gather_side(b, v, kinds, originals[k], k, points, L, inputs, T0, past_log)
                node.replace_input_with(j, cache[key])

        # 5. outputs, declared shapes, bookkeeping
        kept_out = b.op("Identity", [originals[-1]], f"{PREFIX}/kept_token_indices")
        kept_out.name = KEPT_OUTPUT
        kept_out.type, kept_out.shape = ir.TensorType(ir.DataType.INT64), ir.Shape(["batch_size", "kept_sequence_length"])
        graph.outputs.append(kept_out)
        for out in graph.outputs:
            if out.name == "logits" and out.shape is not None and len(out.shape) == 3:
                out.shape = ir.Shape([out.shape[0], "kept_sequence_length", out.shape[2]])
        first_pruned = points[0][0] + 1
        stage_of_layer = {q: max(k for k, (p, _) in enumerate(points) if p < q) for q in range(first_pruned, L)}
        for v in list(graph.inputs) + list(graph.outputs):
            m = _PAST_RE.match(v.name or "") or _PRESENT_RE.match(v.name or "")
            if m and int(m.group(1)) in stage_of_layer and v.shape is not None and len(v.shape) == 4:
                what = "past" if v.name.startswith("past") else "total"
                dims = list(v.shape)
                dims[2] = f"{what}_sequence_length_pruned_{stage_of_layer[int(m.group(1))]}"
                v.shape = ir.Shape(dims)
        model.opset_imports[DOMAIN] = 1
        graph.sort()
        self.ctx.invalidate_stats()
        self.ctx.record(
            kv_cache="per-layer",
            start_layer=self.params.start_layer,
            prune_after_attention_of=[p for p, _ in points],
            keep_ratios=[float(r) for _, r in points],
            score=self.params.score,
            attention_layout="fused" if fused else "explicit",
            score_source=("TokenPrune from post-RoPE query/key (GroupQueryAttention exposes no probabilities)"
                          if fused else "attention probabilities (Softmax output)"),
            layers_with_pruned_kv=list(range(first_pruned, L)),
            gathered_values={v.name: axes[v.name] for v in side_values if set(axes[v.name]) & {"T", "S"}},
            logits="a pruned prefill returns logits [B, kept, V]; output kept_token_indices gives each row's prompt index",
            onnxruntime_genai="incompatible: per-layer KV lengths",
        )
        return ir.passes.PassResult(model, True)

    # -- side values ----------------------------------------------------------------------------
    def _classify(self, model: ir.Model, values: list[ir.Value]) -> dict[str, list[str]]:
        """Per value, per axis: "B" (batch), "T" (new tokens), "S" (past + new), "1" (broadcast batch)
        or "c" (constant), from two ONNX Runtime runs of the subgraph computing the values."""
        if not values:
            return {}
        from compiler.runtime import create_session, uses_custom_domain

        graph = model.graph
        for v in values:
            if not v.name:
                raise UserError("token_prune: an unnamed value is read after the pruning point; re-export the model")
        sub_inputs = _graph_input_ancestors(values, graph)
        sub = ir.convenience.extract(graph, sub_inputs, values)
        sub.opset_imports.update(model.opset_imports)
        probe = ir.Model(sub, ir_version=model.ir_version)
        proto = ir.serde.serialize_model(probe)
        base_dirs = {str(v.const_value.base_dir) for v in sub.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)}
        sess = create_session(proto.SerializeToString(), threads=1, custom_ops=uses_custom_domain(proto),
                              external_data_dir=Path(base_dirs.pop()) if base_dirs else None)
        rng = np.random.default_rng(0)
        runs = []
        for batch, past, new in _PROBES:
            feeds = {}
            for inp in sess.get_inputs():
                m = _PAST_RE.match(inp.name)
                if inp.name == "input_ids":
                    feeds[inp.name] = rng.integers(0, 4, (batch, new)).astype(np.int64)
                elif inp.name == "attention_mask":
                    feeds[inp.name] = np.ones((batch, past + new), np.int64)
                elif m:
                    dims = [d if isinstance(d, int) else 1 for d in inp.shape]
                    feeds[inp.name] = rng.standard_normal((batch, dims[1], past, dims[3])).astype(np.float32)
                else:
                    raise UserError(f"token_prune: cannot probe graph input {inp.name}; export the model with `llmfold export`")
            runs.append(dict(zip([v.name for v in values], sess.run([v.name for v in values], feeds))))
        out = {}
        for v in values:
            a, c = runs[0][v.name], runs[1][v.name]
            if a.ndim != c.ndim:
                raise UserError(f"token_prune: the rank of {v.name} depends on the input length; cannot prune this graph")
            kinds = []
            for axis, (d1, d2) in enumerate(zip(a.shape, c.shape)):
                (b1, p1, t1), (b2, p2, t2) = _PROBES
                if (d1, d2) == (b1, b2):
                    kinds.append("B")
                elif (d1, d2) == (t1, t2):
                    kinds.append("T")
                elif (d1, d2) == (p1 + t1, p2 + t2):
                    kinds.append("S")
                elif d1 == d2:
                    kinds.append("1" if (axis == 0 and d1 == 1) else "c")
                else:
                    raise UserError(f"token_prune: axis {axis} of {v.name} ({d1} vs {d2}) follows neither the batch, the new tokens nor the total length; cannot prune this graph")
            n_t, n_s = kinds.count("T"), kinds.count("S")
            if (n_t or n_s) and (n_t > 1 or n_s > 1 or kinds[0] not in ("B", "1") or kinds.index("T" if n_t else "S") == 0):
                raise UserError(f"token_prune: {v.name} has axes {kinds}; only one token axis, one total-length axis and a leading batch axis are supported")
            if not n_t and not n_s and a.shape == c.shape and not np.array_equal(a, c) and a.dtype.kind in "iu":
                raise UserError(f"token_prune: the integer value {v.name} depends on the input length (a shape?); cannot prune this graph")
            out[v.name] = kinds
        return out

    def _gather_side(self, b: _Builder, v: ir.Value, kinds, orig, k, points, L, inputs, T0, past_log):
        """v with its T axis gathered by `orig` [B, K] and its S axis = (this stage's past columns,
        gathered new columns)."""
        safe = re.sub(r"[^A-Za-z0-9_.]", "_", v.name)
        pk = f"{PREFIX}/{k}/{safe}"
        rank = len(kinds)
        x = v
        if kinds[0] == "1":  # broadcast batch → materialize it, rows differ per sequence
            Bv = b.dim(orig, 0, f"{pk}/batch")
            x = b.op("Expand", [x, b.op("Concat", [Bv, b.const([1] * (rank - 1))], f"{pk}/batch_shape", attrs={"axis": 0})],
                     f"{pk}/expand_batch")
        K = b.dim(orig, 1, f"{pk}/kept")

        def gather(x, axis, tag):
            shape = b.op("Shape", [x], f"{pk}/{tag}/shape")
            parts = []
            if axis > 0:
                parts.append(b.op("Slice", [shape, b.const([0]), b.const([axis])], f"{pk}/{tag}/shape_head"))
            parts.append(K)
            if axis + 1 < rank:
                parts.append(b.op("Slice", [shape, b.const([axis + 1]), b.const([rank])], f"{pk}/{tag}/shape_tail"))
            target = b.op("Concat", parts, f"{pk}/{tag}/index_shape", attrs={"axis": 0})
            unsq = [a for a in range(rank) if a not in (0, axis)]
            idx = b.op("Unsqueeze", [orig, b.const(unsq)], f"{pk}/{tag}/index") if unsq else orig
            idx = b.op("Expand", [idx, target], f"{pk}/{tag}/index_expand")
            return b.op("GatherElements", [x, idx], f"{pk}/{tag}/GatherElements", attrs={"axis": axis})

        if "T" in kinds:
            x = gather(x, kinds.index("T"), "rows")
        if "S" in kinds:
            c = kinds.index("S")
            p = points[k][0]
            if p + 1 >= L:  # no later layer reads keys: nothing to align
                raise UserError(f"token_prune: {v.name} (total-length axis) is read after the last layer's pruning point")
            past_i = b.dim(inputs[f"past_key_values.{p + 1}.key"], 2, f"{pk}/layer_past")
            start = b.op("Sub", [past_log, past_i], f"{pk}/past_start")
            past_cols = b.op("Slice", [x, start, past_log, b.const([c])], f"{pk}/past_columns")
            new_cols = b.op("Slice", [x, past_log, b.const([INT64_MAX]), b.const([c])], f"{pk}/new_columns")
            new_cols = gather(new_cols, c, "columns")
            x = b.op("Concat", [past_cols, new_cols], f"{pk}/columns", attrs={"axis": c})
        return x


__all__ = ["TokenPrunePass", "TokenPruneParams", "keep_count", "KEPT_OUTPUT"]
