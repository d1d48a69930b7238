"""The structure of a Llama-family decoder as found in an ONNX graph (the analysis result).

`compiler.analyze.analyze(model)` fills these from the graph alone; passes, calibration and
inspect read them. Names are ONNX names (nodes, values, initializers) of the graph they were
computed from: after a pass rewrites the graph, analyze it again.

Orientation: a linear layer computes Y = X · W with W an initializer of shape [K, N].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class Linear:
    """One linear layer: a MatMul (dense), a MatMul pair (low-rank) or a QMatMul (int4)."""

    name: str  # stable id: "layers.3.q", "layers.3.down", "lm_head"
    block: int | None  # decoder block index; None for lm_head
    role: str  # one of LINEAR_ROLES or "lm_head"
    node: str  # the (first) node computing it
    input: str  # value name of X (what calibration taps)
    output: str  # value name of Y
    K: int
    N: int
    kind: str = "dense"  # dense | low-rank | int4
    weight: str | None = None  # initializer [K, N] when dense
    nodes: list[str] = field(default_factory=list)  # every node of the layer (2 for low-rank)
    rank: int | None = None  # low-rank only
    bits: int | None = None  # int4 only
    block_size: int | None = None  # int4 only
    act_bits: int | None = None  # int4 only
    hadamard: int | None = None  # int4 only: order of the op's input Hadamard transform (None: none)
    # [start, stop) columns of `weight` when several roles share one fused MatMul (e.g. the packed
    # QKV of an onnxruntime-genai export); N = stop - start. None: the layer owns the whole node.
    columns: list[int] | None = None
    # [start, stop) columns of the first node's output when several low-rank layers share one
    # first factor (passes/pack_lowrank.py; nodes = [shared first node, own second node]);
    # rank = stop - start. None: the pair's first factor is its own.
    rank_columns: list[int] | None = None


@dataclass
class Norm:
    """An RMSNorm: y = x / sqrt(mean(x²) + eps) * weight."""

    node: str  # the node that applies the weight (Mul) or the fused norm op
    weight: str  # initializer [hidden]
    input: str
    output: str
    epsilon: float


@dataclass
class Block:
    index: int
    input_norm: Norm
    post_attention_norm: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    attention: str  # Softmax node, or the fused attention node
    attention_kind: str  # "softmax" | fused op type, e.g. "GroupQueryAttention"
    attention_residual_add: str | None = None  # node adding o's output to the residual
    mlp_residual_add: str | None = None  # node adding down's output to the residual
    residual_in: str | None = None  # residual-stream value entering the block

    def linears(self) -> list[Linear]:
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]


@dataclass
class ModelStructure:
    blocks: list[Block]
    final_norm: Norm | None
    lm_head: Linear | None
    embedding: str | None  # initializer [vocab, hidden] read by the Gather on input_ids
    tied_embeddings: bool  # lm_head reads the embedding matrix (possibly transposed)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float | None
    rms_norm_eps: float | None
    unrecognized: list[str] = field(default_factory=list)  # what analysis could not place

    def linears(self, include_lm_head: bool = True) -> list[Linear]:
        out = [lin for b in self.blocks for lin in b.linears()]
        if include_lm_head and self.lm_head is not None:
            out.append(self.lm_head)
        return out

    def linear(self, name: str) -> Linear:
        for lin in self.linears():
            if lin.name == name:
                return lin
        raise KeyError(name)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "ModelStructure":
        def lin(x):
            return Linear(**x) if x is not None else None

        def norm(x):
            return Norm(**x) if x is not None else None

        blocks = []
        for b in d["blocks"]:
            b = dict(b)
            for r in LINEAR_ROLES:
                b[r] = lin(b[r])
            b["input_norm"] = norm(b["input_norm"])
            b["post_attention_norm"] = norm(b["post_attention_norm"])
            blocks.append(Block(**b))
        d = dict(d)
        d["blocks"] = blocks
        d["final_norm"] = norm(d.get("final_norm"))
        d["lm_head"] = lin(d.get("lm_head"))
        return ModelStructure(**d)
