"""Export a Llama-family model to an ONNX graph with KV cache, built directly with onnx_ir.

The graph is written op by op from the Hugging Face state dict (no tracing), with standard ONNX
ops (opset 23, IR version 10; the fused attention layout adds com.microsoft.GroupQueryAttention),
deterministic names, and onnxruntime-genai's I/O:

    input_ids [batch, seq] int64, attention_mask [batch, total] int64,
    past_key_values.{i}.key/value [batch, kv_heads, past, head_dim] float32
    → logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]

The math, per block i (x: residual stream [B,T,D]; rows are tokens; W initializers are [K,N]):

    positions  p = cumsum(mask) − 1, with padded slots set to 1, last T columns (as HF generate)
    RMSNorm    n(x) = (x / sqrt(mean(x², −1) + eps)) · w   (w: its own initializer). Explicit
               layout: standard elementwise ops with mean(x²), eps and sqrt in float64, then one
               rounding to float32. Fused layout: one RMSNormalization node (opset 23, float32
               accumulation) — 1 node instead of 8, which is what a decode step pays for
               (ORT costs a few µs per node); measured on SmolLM2 it is as close to transformers
               as the float64 chain (see test_smollm2_logits_match_transformers)
    attention  q = n·Wq, k = n·Wk, v = n·Wv  (three MatMuls sharing n; one packed in "fused")
               rope(z) = z·cos[p] + rotate_half(z)·sin[p], rotate_half([a, b]) = [−b, a]
               K = concat(past_k, rope(k)), V = concat(past_v, v)       (→ present.{i}.*)
               P = Softmax(q·Kᵀ · head_dim^−½ + M)  over [B, H, T, S],
               M = 0 where key j ≤ query position and mask[j] = 1, else float32 min
               a = P·V, x ← x + a·Wo
    MLP        n = n2(x); x ← x + (silu(n·Wg) ⊙ (n·Wu))·Wd,  silu(z) = z / (1 + exp(−z))
    head       logits = n_f(x)·W_lm

Why it is exact (fp32, up to rounding order): every op is the same fp32 operation transformers
performs in the same order. cos/sin tables are computed by the model's own rotary module for
positions 0..max_position_embeddings−1 and gathered, so any static RoPE variant (default, linear,
llama3) is reproduced bit for bit. Grouped-query attention is done without copying K/V: the H
query heads are reshaped to [B, kv_heads, (H/kv)·T, hd], so each K/V head meets exactly the
query heads that transformers' repeat_kv pairs it with (head h uses kv head h // (H/kv)); the
dot products are the same. float32-min masking (as transformers) keeps fully padded rows finite.

Attention layouts (`export(..., attention=...)`, recorded as "attention" in llmfold.json):

* "explicit": the standard ops above (rope with Split/Neg/Concat, Softmax visible to passes).
* "fused": RMSNorms are RMSNormalization nodes (residual adds stay apart: ORT's
  SkipSimplifiedLayerNormalization, which fuses them, moved SmolLM2's logits to 2.4e-4 from
  float64 transformers, 2.9× transformers' own fp32 error — quantized recipes fuse them with the
  `skip_norm` pass); per block q/k/v are ONE MatMul
  `/model/layers.{i}/attn/qkv_proj/MatMul` with weight `model.layers.{i}.self_attn.qkv_proj.weight`
  = [Wq | Wk | Wv] (columns concatenated: the same dot products, one launch instead of three —
  what a decode step pays for), feeding GroupQueryAttention's packed `query` input, which splits
  it by definition into columns [0, H·hd), [H·hd, (H+KV)·hd), [(H+KV)·hd, (H+2KV)·hd) (the layer
  map records these ranges; passes that rewrite linears get q/k/v split back exactly, see
  passes/pack.py). ONE com.microsoft.GroupQueryAttention node `/model/layers.{i}/attn/GroupQueryAttention`
  (num_heads=H, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0, scale=head_dim^−½):
      inputs  qkv [B,T,(H+2KV)·hd], "", "", past_key_values.{i}.key/value, seqlens_k, total_sequence_length,
              cos_cache, sin_cache, "" (position_ids), attention_bias
      outputs `/model/layers.{i}/attn/GroupQueryAttention/output_0` [B,T,H·hd] (→ o MatMul),
              present.{i}.key, present.{i}.value (BNSH, as in the explicit layout)
  Shared by all blocks: cos_cache/sin_cache = the rotary module's tables' first halves
  (initializers `model.rotary_emb.cos_cache` / `sin_cache`, [max_pos, head_dim/2]: rotate_half
  RoPE tables are cat(f, f)); `/model/gqa/seqlens_k` = int32 [B] filled with S − 1 and
  `/model/gqa/total_sequence_length` = int32 S (S = attention_mask.shape[1]);
  attention_bias = the additive mask M above, `/model/mask/additive/output_0` [B, 1, T, S].
  Why seqlens_k = S − 1 for every row and not genai's sum(mask) − 1: ORT's kernel treats the
  first seqlens_k + 1 cache rows of each sequence as its tokens (right padding), so with the
  left padding of HF generate (and of our runtime's I/O contract) sum(mask) − 1 would attend to
  pad rows and write the new K/V at the wrong row. With S − 1 the kernel keeps the explicit
  layout's cache rows, M masks padded keys exactly as in the explicit graph, and RoPE uses the
  row index as position (the kernel ignores position_ids on the first prompt): for a left-padded
  row that is the true position + its number of pads, the same shift for q and every k, and RoPE
  scores depend only on position differences, so logits are unchanged up to rounding (tests:
  within 1e-4 of transformers with left padding). What does differ: the absolute rotation of
  the K cache rows of padded sequences (a fused and an explicit export's caches of a padded
  batch are not interchangeable), and a padded batch needs S ≤ max_position_embeddings (row
  indices, not true positions, index the tables). A step of more than one new token on top of a
  past (chunked prefill) needs batch 1: ORT's GroupQueryAttention refuses it for batch > 1
  ("batch_size must be 1 when sequence_length > 1 and past context is given"); llmfold's runtime
  only runs batch 1, and HF-style batched generation (prefill without past, then one token per
  step) works at any batch size.

Tied embeddings: the Gather keeps the [V, D] matrix and lm_head gets its own [D, V] copy, so
every linear layer (lm_head included) is a plain MatMul with an initializer weight.
"""

from __future__ import annotations

import json

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError

OPSET = 23  # RMSNormalization (fused layout) is standard from opset 23
IR_VERSION = 10
FLOAT32_MIN = float(np.finfo(np.float32).min)
INT64_MAX = int(np.iinfo(np.int64).max)
ATTENTION_LAYOUTS = ("fused", "explicit")
DEFAULT_ATTENTION = "fused"
# llmfold.json "graph_version": bumped when the exported graph's form changes (2: RMSNormalization
# in the fused layout, 3: packed q/k/v in the fused layout), so cached exports are rebuilt
GRAPH_VERSION = 3
# names in the fused layout (other passes and tools look them up)
GQA_COS_CACHE = "model.rotary_emb.cos_cache"  # [max_pos, head_dim/2]
GQA_SIN_CACHE = "model.rotary_emb.sin_cache"
GQA_SEQLENS_K = "/model/gqa/seqlens_k"  # int32 [B]
GQA_TOTAL_SEQ_LEN = "/model/gqa/total_sequence_length"  # int32 scalar
GQA_ATTENTION_BIAS = "/model/mask/additive/output_0"  # float32 [B, 1, T, S] (both layouts)


def packed_qkv_names(layer: int) -> tuple[str, str]:
    """(weight, node) names of block `layer`'s packed q/k/v MatMul (also used by passes.pack)."""
    return f"model.layers.{layer}.self_attn.qkv_proj.weight", f"/model/layers.{layer}/attn/qkv_proj/MatMul"


@dataclass
class LlamaDims:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rope_type: str
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: object
    eos_token_id: object

    @staticmethod
    def from_config(cfg) -> "LlamaDims":
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if theta is None:
            theta = getattr(cfg, "rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return LlamaDims(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rope_theta=float(theta),
            rope_type=rope_type,
            rms_norm_eps=float(cfg.rms_norm_eps),
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
        )

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        return d


class GraphBuilder:
    """Appends nodes with deterministic names; outputs are named `{node_name}/output_{k}`."""

    def __init__(self):
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        self._consts: dict[tuple, ir.Value] = {}

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        if name in self.initializers:
            raise ValueError(f"duplicate initializer {name}")
        array = np.ascontiguousarray(array)
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array, name=name),
        )
        self.initializers[name] = value
        return value

    def const(self, values, dtype=np.int64, name: str | None = None) -> ir.Value:
        """A small shared constant initializer (shapes, axes, scalars), named by content."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            if name is None:
                flat = "_".join(str(v) for v in array.reshape(-1).tolist()) if array.size <= 8 else str(len(self._consts))
                shape = "x".join(map(str, array.shape)) or "scalar"
                name = f"const_{array.dtype.name}_{shape}_{flat}".replace("-", "m").replace(".", "p")
            self._consts[key] = self.initializer(name, array)
        return self._consts[key]

    def op(self, op_type: str, inputs, name: str, attrs=None, num_outputs: int = 1, output_names=None, domain: str = ""):
        node = ir.node(op_type, list(inputs), attributes=attrs or {}, num_outputs=num_outputs, name=name, domain=domain)
        for k, out in enumerate(node.outputs):
            out.name = output_names[k] if output_names else f"{name}/output_{k}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)


def _float_value(name, dims):
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(dims))


def _int64_value(name, dims):
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(dims))


def rope_tables(hf_model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim] computed by the model's own rotary module (exact)."""
    import torch

    rotary = hf_model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].float().numpy(), sin[0].float().numpy()


def build_graph(state: dict[str, np.ndarray], dims: LlamaDims, cos: np.ndarray, sin: np.ndarray, on_layer=None,
                attention: str = DEFAULT_ATTENTION) -> ir.Model:
    """The decoder graph from a float32 HF state dict (torch layout: Linear weight [N, K]).

    attention: "explicit" (standard ops, visible Softmax) or "fused" (one com.microsoft
    GroupQueryAttention per block); see the module docstring.
    """
    if attention not in ATTENTION_LAYOUTS:
        raise UserError(f"attention layout {attention!r} is unknown; use one of {', '.join(ATTENTION_LAYOUTS)}.")
    fused = attention == "fused"
    D, H, KV, hd = dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim
    if fused:
        half = hd // 2
        if hd % 2 or not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
            raise UserError("the model's RoPE tables are not of the form cat(f, f) (rotate_half RoPE), which "
                            "GroupQueryAttention needs; export with --attention explicit.")
    g = GraphBuilder()
    input_ids = _int64_value("input_ids", ["batch_size", "sequence_length"])
    attention_mask = _int64_value("attention_mask", ["batch_size", "total_sequence_length"])
    graph_inputs = [input_ids, attention_mask]
    graph_outputs = []
    kv_dims = ["batch_size", KV, "past_sequence_length", hd]
    present_dims = ["batch_size", KV, "total_sequence_length", hd]

    def linear(x, weight_name: str, node_name: str):
        w = state[weight_name]  # [N, K]
        return g.op("MatMul", [x, g.initializer(weight_name, w.T)], node_name)

    def rms_norm(x, weight_name: str, prefix: str):
        if fused:  # one ORT node instead of eight (see the module docstring)
            return g.op("RMSNormalization", [x, g.initializer(weight_name, state[weight_name])], f"{prefix}/RMSNormalization",
                        attrs={"axis": -1, "epsilon": float(np.float32(dims.rms_norm_eps)), "stash_type": 1})  # fmt: skip
        # mean(x²) in float64: ORT's float ReduceMean sums sequentially (error ~√D·eps), while
        # torch's vectorized mean is far more accurate; in float64 ours is at least as accurate.
        xd = g.op("Cast", [x], f"{prefix}/CastDouble", attrs={"to": ir.DataType.DOUBLE})
        sq = g.op("Mul", [xd, xd], f"{prefix}/Square")
        mean = g.op("ReduceMean", [sq, g.const([-1])], f"{prefix}/ReduceMean", attrs={"keepdims": 1})
        var = g.op("Add", [mean, g.const(np.float32(dims.rms_norm_eps), np.float64, name="rms_norm_epsilon")], f"{prefix}/Add")
        std = g.op("Cast", [g.op("Sqrt", [var], f"{prefix}/Sqrt")], f"{prefix}/CastFloat", attrs={"to": ir.DataType.FLOAT})
        normed = g.op("Div", [x, std], f"{prefix}/Div")
        return g.op("Mul", [normed, g.initializer(weight_name, state[weight_name])], f"{prefix}/Mul")

    # ---- shared: positions, rope tables, additive mask -------------------------------------
    seq_len = g.op("Shape", [input_ids], "/model/pos/seq_len", attrs={"start": 1, "end": 2})  # [1] = T
    total_len = g.op("Shape", [attention_mask], "/model/pos/total_len", attrs={"start": 1, "end": 2})  # [1] = S
    if fused:
        # GroupQueryAttention rotates by row index itself: cos/sin caches [max_pos, head_dim/2]
        cos_cache = g.initializer(GQA_COS_CACHE, np.ascontiguousarray(cos[:, : hd // 2]))
        sin_cache = g.initializer(GQA_SIN_CACHE, np.ascontiguousarray(sin[:, : hd // 2]))
    else:
        cum = g.op("CumSum", [attention_mask, g.const(1)], "/model/pos/CumSum")
        pos_all = g.op("Sub", [cum, g.const(1)], "/model/pos/Sub")
        is_pad = g.op("Equal", [attention_mask, g.const(0)], "/model/pos/IsPad")
        pos_fixed = g.op("Where", [is_pad, g.const(1), pos_all], "/model/pos/PadTo1")
        neg_t = g.op("Neg", [seq_len], "/model/pos/NegSeqLen")
        position_ids = g.op("Slice", [pos_fixed, neg_t, g.const([INT64_MAX]), g.const([1])], "/model/pos/position_ids")
        cos_table = g.initializer("model.rotary_emb.cos_cached", cos)
        sin_table = g.initializer("model.rotary_emb.sin_cached", sin)
        cos_bt = g.op("Gather", [cos_table, position_ids], "/model/rotary/GatherCos")  # [B, T, hd]
        sin_bt = g.op("Gather", [sin_table, position_ids], "/model/rotary/GatherSin")
        cos_b1t = g.op("Unsqueeze", [cos_bt, g.const([1])], "/model/rotary/cos")  # [B, 1, T, hd]
        sin_b1t = g.op("Unsqueeze", [sin_bt, g.const([1])], "/model/rotary/sin")

    total_scalar = g.op("Squeeze", [total_len, g.const([0])], "/model/mask/total_scalar")
    seq_scalar = g.op("Squeeze", [seq_len, g.const([0])], "/model/mask/seq_scalar")
    past_scalar = g.op("Sub", [total_scalar, seq_scalar], "/model/mask/past_len")
    key_index = g.op("Range", [g.const(0), total_scalar, g.const(1)], "/model/mask/key_index")  # [S]
    query_index = g.op("Range", [past_scalar, total_scalar, g.const(1)], "/model/mask/query_index")  # [T]
    key_row = g.op("Unsqueeze", [key_index, g.const([0])], "/model/mask/key_row")  # [1, S]
    query_col = g.op("Unsqueeze", [query_index, g.const([1])], "/model/mask/query_col")  # [T, 1]
    causal = g.op("LessOrEqual", [key_row, query_col], "/model/mask/causal")  # [T, S]
    keep = g.op("Cast", [attention_mask], "/model/mask/keep", attrs={"to": ir.DataType.BOOL})
    keep_b11s = g.op("Unsqueeze", [keep, g.const([1, 2])], "/model/mask/keep_b11s")
    allowed = g.op("And", [causal, keep_b11s], "/model/mask/allowed")  # [B, 1, T, S]
    additive_mask = g.op(
        "Where", [allowed, g.const(0.0, np.float32), g.const(FLOAT32_MIN, np.float32, name="const_float32_min")],
        "/model/mask/additive",
    )
    if fused:
        # every row is "valid" for GQA (seqlens_k = S − 1 for each batch entry: past and present
        # keep the full [.., S, ..] layout as in the explicit graph); padding is masked by the
        # additive mask passed as attention_bias
        batch = g.op("Shape", [input_ids], "/model/gqa/batch", attrs={"start": 0, "end": 1})  # [1] = B
        last = g.op("Sub", [total_len, g.const([1])], "/model/gqa/last")  # [1] = S − 1
        seqlens_k = g.op("Cast", [g.op("Expand", [last, batch], "/model/gqa/seqlens_k_i64")], "/model/gqa/seqlens_k_cast",
                         attrs={"to": ir.DataType.INT32}, output_names=[GQA_SEQLENS_K])  # [B]
        total_seq = g.op("Cast", [total_scalar], "/model/gqa/total_cast", attrs={"to": ir.DataType.INT32},
                         output_names=[GQA_TOTAL_SEQ_LEN])  # scalar S

    def gqa(i, p, q, k, v, past_k, past_v):
        node_name = f"{p}/attn/GroupQueryAttention"
        attn, present_k, present_v = g.op(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, seqlens_k, total_seq, cos_cache, sin_cache, None, additive_mask],
            node_name, domain="com.microsoft", num_outputs=3,
            attrs={"num_heads": H, "kv_num_heads": KV, "do_rotary": 1, "rotary_interleaved": 0,
                   "scale": float(hd) ** -0.5},
            output_names=[f"{node_name}/output_0", f"present.{i}.key", f"present.{i}.value"],
        )
        return attn, present_k, present_v

    def rope(z, prefix):
        first, second = g.op("Split", [z], f"{prefix}/Split", attrs={"axis": -1, "num_outputs": 2}, num_outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [second], f"{prefix}/Neg"), first], f"{prefix}/Concat", attrs={"axis": -1})
        return g.op("Add", [g.op("Mul", [z, cos_b1t], f"{prefix}/MulCos"), g.op("Mul", [rotated, sin_b1t], f"{prefix}/MulSin")], f"{prefix}/Add")

    # ---- embedding + blocks ------------------------------------------------------------------
    embed_name = "model.embed_tokens.weight"
    x = g.op("Gather", [g.initializer(embed_name, state[embed_name]), input_ids], "/model/embed_tokens/Gather")
    if not fused:
        scale = g.const(float(hd) ** -0.5, np.float32, name="attention_scale")
        shape_bthd_q = g.const([0, 0, H, hd])
        shape_bthd_kv = g.const([0, 0, KV, hd])
        shape_grouped = g.const([0, KV, -1, hd])
        shape_scores = g.const([0, H, -1, 0])
        shape_scores_grouped = g.const([0, KV, -1, 0])
        shape_ctx_heads = g.const([0, H, -1, hd])
        shape_btd = g.const([0, 0, H * hd])
    for i in range(dims.num_layers):
        p = f"/model/layers.{i}"
        w = f"model.layers.{i}"
        past_k = _float_value(f"past_key_values.{i}.key", kv_dims)
        past_v = _float_value(f"past_key_values.{i}.value", kv_dims)
        graph_inputs += [past_k, past_v]

        h = rms_norm(x, f"{w}.input_layernorm.weight", f"{p}/input_layernorm")
        if fused:
            # one MatMul for [q | k | v] feeding GQA's packed input (see the module docstring)
            qkv_w = np.concatenate([state[f"{w}.self_attn.{r}_proj.weight"] for r in "qkv"], axis=0)  # [N, K]
            qkv_weight, qkv_node = packed_qkv_names(i)
            qkv = g.op("MatMul", [h, g.initializer(qkv_weight, qkv_w.T)], qkv_node)
            ctx_btd, present_k, present_v = gqa(i, p, qkv, None, None, past_k, past_v)
            present_k.type, present_k.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(present_dims)
            present_v.type, present_v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(present_dims)
            graph_outputs += [present_k, present_v]
        else:
            q = linear(h, f"{w}.self_attn.q_proj.weight", f"{p}/attn/q_proj/MatMul")
            k = linear(h, f"{w}.self_attn.k_proj.weight", f"{p}/attn/k_proj/MatMul")
            v = linear(h, f"{w}.self_attn.v_proj.weight", f"{p}/attn/v_proj/MatMul")
            perm = {"perm": [0, 2, 1, 3]}
            q4 = g.op("Transpose", [g.op("Reshape", [q, shape_bthd_q], f"{p}/attn/q_heads/Reshape")], f"{p}/attn/q_heads/Transpose", attrs=perm)
            k4 = g.op("Transpose", [g.op("Reshape", [k, shape_bthd_kv], f"{p}/attn/k_heads/Reshape")], f"{p}/attn/k_heads/Transpose", attrs=perm)
            v4 = g.op("Transpose", [g.op("Reshape", [v, shape_bthd_kv], f"{p}/attn/v_heads/Reshape")], f"{p}/attn/v_heads/Transpose", attrs=perm)
            q_rot = rope(q4, f"{p}/attn/q_rotary")
            k_rot = rope(k4, f"{p}/attn/k_rotary")
            present_k = g.op("Concat", [past_k, k_rot], f"{p}/attn/present_key/Concat", attrs={"axis": 2}, output_names=[f"present.{i}.key"])
            present_v = g.op("Concat", [past_v, v4], f"{p}/attn/present_value/Concat", attrs={"axis": 2}, output_names=[f"present.{i}.value"])
            present_k.type, present_k.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(present_dims)
            present_v.type, present_v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(present_dims)
            graph_outputs += [present_k, present_v]
            q_grouped = g.op("Reshape", [q_rot, shape_grouped], f"{p}/attn/q_grouped/Reshape")  # [B, KV, rep·T, hd]
            k_t = g.op("Transpose", [present_k], f"{p}/attn/key_t/Transpose", attrs={"perm": [0, 1, 3, 2]})
            scores_grouped = g.op("MatMul", [q_grouped, k_t], f"{p}/attn/qk/MatMul")  # [B, KV, rep·T, S]
            scores = g.op("Reshape", [scores_grouped, shape_scores], f"{p}/attn/scores/Reshape")  # [B, H, T, S]
            scaled = g.op("Mul", [scores, scale], f"{p}/attn/scores/Mul")
            masked = g.op("Add", [scaled, additive_mask], f"{p}/attn/scores/AddMask")
            probs = g.op("Softmax", [masked], f"{p}/attn/Softmax", attrs={"axis": -1})
            probs_grouped = g.op("Reshape", [probs, shape_scores_grouped], f"{p}/attn/probs_grouped/Reshape")
            ctx = g.op("MatMul", [probs_grouped, present_v], f"{p}/attn/pv/MatMul")  # [B, KV, rep·T, hd]
            ctx_heads = g.op("Reshape", [ctx, shape_ctx_heads], f"{p}/attn/ctx_heads/Reshape")  # [B, H, T, hd]
            ctx_bthd = g.op("Transpose", [ctx_heads], f"{p}/attn/ctx/Transpose", attrs=perm)
            ctx_btd = g.op("Reshape", [ctx_bthd, shape_btd], f"{p}/attn/ctx/Reshape")
        attn_out = linear(ctx_btd, f"{w}.self_attn.o_proj.weight", f"{p}/attn/o_proj/MatMul")
        x = g.op("Add", [x, attn_out], f"{p}/attn_residual/Add")

        h2 = rms_norm(x, f"{w}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
        gate = linear(h2, f"{w}.mlp.gate_proj.weight", f"{p}/mlp/gate_proj/MatMul")
        up = linear(h2, f"{w}.mlp.up_proj.weight", f"{p}/mlp/up_proj/MatMul")
        # silu(z) = z / (1 + exp(−z)): transformers' formula. (ORT's Sigmoid is a polynomial with
        # ~1e-7 absolute error, i.e. large relative error for z < −5, which the huge "up" values of
        # massive-activation tokens amplify beyond 1e-4 in the logits; ORT's Exp is ~1 ulp.)
        exp_neg = g.op("Exp", [g.op("Neg", [gate], f"{p}/mlp/act/Neg")], f"{p}/mlp/act/Exp")
        denom = g.op("Add", [exp_neg, g.const(1.0, np.float32)], f"{p}/mlp/act/Add")
        act = g.op("Div", [gate, denom], f"{p}/mlp/act/Div")
        prod = g.op("Mul", [act, up], f"{p}/mlp/gate_up/Mul")
        down = linear(prod, f"{w}.mlp.down_proj.weight", f"{p}/mlp/down_proj/MatMul")
        x = g.op("Add", [x, down], f"{p}/mlp_residual/Add")
        if on_layer is not None:
            on_layer(i)

    hf = rms_norm(x, "model.norm.weight", "/model/norm")
    lm_name = "lm_head.weight" if "lm_head.weight" in state and not dims.tie_word_embeddings else embed_name
    lm_w = g.initializer("lm_head.weight", state[lm_name].T)
    logits = g.op("MatMul", [hf, lm_w], "/lm_head/MatMul", output_names=["logits"])
    logits.type, logits.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch_size", "sequence_length", dims.vocab_size])
    graph = ir.Graph(
        inputs=graph_inputs,
        outputs=[logits] + graph_outputs,
        nodes=g.nodes,
        initializers=list(g.initializers.values()),
        opset_imports={"": OPSET, "com.microsoft": 1} if fused else {"": OPSET},
        name="llmfold_llama",
    )
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="llmfold", producer_version=_version())


def _version() -> str:
    from compiler import __version__

    return __version__


def _state_dict_numpy(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not enabled, transient=False,
    )


def export(source: str, out_dir, progress: bool = True, attention: str = DEFAULT_ATTENTION) -> Path:
    """Export SOURCE (HF dir, .gguf or alias) to the model directory `out_dir`; return its path.

    attention: "fused" (one com.microsoft GroupQueryAttention per block, fast in ONNX Runtime)
    or "explicit" (standard ops with a visible Softmax); recorded in llmfold.json.
    """
    from compiler import modeldir
    from compiler.analyze import analyze
    from compiler.sources import load_source, resolve_source

    if attention not in ATTENTION_LAYOUTS:
        raise UserError(f"attention layout {attention!r} is unknown; use one of {', '.join(ATTENTION_LAYOUTS)}.")
    out = modeldir.check_output_dir(out_dir)  # fail before the slow load
    resolve_source(source)  # fail fast on bad sources, before importing torch
    t0 = time.perf_counter()
    with _progress(progress) as bar:
        load_task = bar.add_task("load source", total=None)
        loaded = load_source(source, status=lambda msg: bar.update(load_task, description=msg))
        bar.update(load_task, total=1, completed=1, description=f"loaded {loaded.architecture}")
        dims = LlamaDims.from_config(loaded.config)
        if dims.num_heads % dims.num_kv_heads:
            raise UserError(f"{source}: {dims.num_heads} heads are not a multiple of {dims.num_kv_heads} kv heads.")
        state = _state_dict_numpy(loaded.model)
        cos, sin = rope_tables(loaded.model, dims.max_position_embeddings)
        build_task = bar.add_task("build graph (layers)", total=dims.num_layers)
        model = build_graph(state, dims, cos, sin, on_layer=lambda i: bar.advance(build_task), attention=attention)
        structure = analyze(model)
        meta = {
            "format": modeldir.META_FORMAT,
            "version": modeldir.META_VERSION,
            "source": loaded.info,
            "architecture": loaded.architecture,
            "config": {
                "num_layers": dims.num_layers,
                "hidden_size": dims.hidden_size,
                "num_heads": dims.num_heads,
                "num_kv_heads": dims.num_kv_heads,
                "head_dim": dims.head_dim,
                "intermediate_size": dims.intermediate_size,
                "vocab_size": dims.vocab_size,
                "rope_theta": dims.rope_theta,
                "rope_type": dims.rope_type,
                "rms_norm_eps": dims.rms_norm_eps,
                "max_position_embeddings": dims.max_position_embeddings,
                "tie_word_embeddings": dims.tie_word_embeddings,
                "bos_token_id": dims.bos_token_id,
                "eos_token_id": dims.eos_token_id,
            },
            "attention": attention,
            "graph_version": GRAPH_VERSION,
            "structure": structure.to_json(),
            "passes": [],
            "custom_ops_library": None,
            "kv_cache": "uniform",
        }
        extra = _hf_side_files(loaded)
        from compiler.genai_config import genai_files

        gen = extra.get("generation_config.json")
        # genai_config.json: the export also runs in onnxruntime-genai as is
        extra.update(genai_files(model, meta, json.loads(gen) if gen else None))
        save_task = bar.add_task("write model.onnx + data", total=len(model.graph.initializers))
        with modeldir.AtomicDir(out) as tmp:
            modeldir.save_onnx(model, tmp / modeldir.MODEL_FILE, progress=lambda done, total: bar.update(save_task, completed=done, total=total))
            for name, content in extra.items():
                (tmp / name).write_bytes(content)
            modeldir.write_meta(tmp / modeldir.META_FILE, meta)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"exported {loaded.architecture} to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def _hf_side_files(loaded) -> dict[str, bytes]:
    """config.json, generation_config.json and tokenizer files, as bytes (written into the dir)."""
    import copy
    import tempfile

    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        cfg = copy.deepcopy(loaded.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.architectures = [loaded.architecture]
        cfg.dtype = "float32"
        cfg.to_json_file(td / "config.json", use_diff=True)
        gen = getattr(loaded.model, "generation_config", None)
        if gen is not None:
            gen.to_json_file(td / "generation_config.json", use_diff=True)
        tok_dir = td / "tok"
        loaded.tokenizer.save_pretrained(tok_dir)
        for p in sorted(tok_dir.iterdir()):
            if p.is_file() and p.name != "config.json":
                files[p.name] = p.read_bytes()
        for name in ("config.json", "generation_config.json"):
            if (td / name).is_file():
                files[name] = (td / name).read_bytes()
    return files


__all__ = ["export", "build_graph", "LlamaDims", "rope_tables", "OPSET", "IR_VERSION", "ATTENTION_LAYOUTS",
           "DEFAULT_ATTENTION", "GQA_COS_CACHE", "GQA_SIN_CACHE", "GQA_SEQLENS_K", "GQA_TOTAL_SEQ_LEN",
           "GQA_ATTENTION_BIAS"]
