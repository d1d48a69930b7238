"""Residual-stream rotation: multiply the hidden state of every block by one orthogonal Q.

A Llama decoder keeps a residual stream h ∈ ℝ^D (row vector). Everything that touches it is

    embedding      h₀ = E[token]                                  (writer)
    block i        x = RMSNorm(h)·diag(g₁) → q/k/v = x·W_{q,k,v}  (readers)
                   h ← h + attn·W_o                               (writer)
                   y = RMSNorm(h)·diag(g₂) → gate/up = y·W_{g,u}  (readers)
                   h ← h + mlp·W_d                                (writer)
    head           logits = RMSNorm(h)·diag(g_f)·W_lm             (reader)

with RMSNorm(h) = h / sqrt(mean(h²) + ε). The pass

1. folds every norm weight into the rows of the linears that read that norm's output:
   RMSNorm(h)·diag(g)·W = RMSNorm(h)·(diag(g)·W), so W ← diag(g)·W and g ← 1 (exact);
2. unties tied embeddings: the embedding is rotated on its columns (E·Q) and lm_head on its rows
   (Qᵀ·diag(g_f)·Eᵀ), so they stop being equal; llmfold's exporter already stores a tied lm_head
   as its own initializer Eᵀ, which this pass requires;
3. rotates the stream, h' = h·Q with Q orthogonal (QQᵀ = I):
   - writers: E ← E·Q, W_o ← W_o·Q, W_d ← W_d·Q, so every addition into the stream is rotated;
   - readers: W ← Qᵀ·W for q, k, v, gate, up and lm_head.
   With unit norm weight, RMSNorm(h·Q) = h·Q / sqrt(‖hQ‖²/D + ε) = RMSNorm(h)·Q because
   ‖hQ‖ = ‖h‖; then RMSNorm(hQ)·QᵀW = RMSNorm(h)·W. Every reader sees exactly what it saw
   before, every writer adds exactly the rotated version of what it added, so by induction the
   stream is h·Q everywhere and the logits are unchanged (exact in real arithmetic; in fp32 only
   the rounding of the stored weights changes, computed in float64).

4. optionally (`heads = true`) rotates each head's values, per block one orthogonal R of size
   head_dim: W_v,g ← W_v,g·R for every kv head g, W_o,h ← Rᵀ·W_o,h for every query head h.
   Attention mixes value rows over positions only, out_h = P_h·V_g, so the head output becomes
   out_h·R and out_h·R·Rᵀ·W_o,h = out_h·W_o,h: exact (QuaRot's value/output rotation). It
   spreads the outliers of o_proj's input channels, which the residual rotation never touches.
   Measured on SmolLM2-135M (8×512 held-out tokens, × fp32 perplexity): no gain with 4-bit
   weights — w4a16 1.080× / 1.105× with it vs 1.076× / 1.099× without (compile seeds 0 / 1),
   w4a8 1.094× vs 1.088× — so the shipped recipes leave it off.

Why: a rotation spreads the few huge outlier channels of the residual stream (and of every norm
output) over all channels, so per-token activation quantization (A8/A4) loses much less; the
weights become "incoherent" too. A diagonal (SmoothQuant/AffineQuant-through-the-norm) transform
cannot do that, because only diagonal maps pass through RMSNorm's weight — a rotation passes
through RMSNorm itself once the weight is folded.

The matrix: Q = diag(s)·H/√D with s a seeded random ±1 vector and H a Hadamard matrix
(HHᵀ = D·I, entries ±1) when one can be built for D: D = 2^a·m with H = H_{2^a} ⊗ H_m,
H_{2^a} Sylvester's and H_m from Paley's constructions (m = q+1, q prime ≡ 3 mod 4, Paley I;
m = 2(q+1), q prime ≡ 1 mod 4, Paley II), e.g. 576 = 16·36 (Paley II with q = 17). Sizes with no
such factorization fall back to a seeded random orthogonal matrix (QR of a Gaussian matrix with
the signs of R's diagonal fixed, i.e. Haar-distributed). `kind = "random"` forces the fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from passes._weights import add_weight, get_weight, node_by_name, set_weight
from passes.base import CompilerPass, register_pass


# ---------------------------------------------------------------------------------------------
# orthogonal matrices
# ---------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    f = 2
    while f * f <= q:
        if q % f == 0:
            return False
        f += 1
    return True


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i), χ the quadratic character of GF(q), q an odd prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Hadamard matrix of order q+1 for a prime q ≡ 3 (mod 4)."""
    n = q + 1
    s = np.zeros((n, n), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Hadamard matrix of order 2(q+1) for a prime q ≡ 1 (mod 4)."""
    n = q + 1
    c = np.zeros((n, n), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(n, dtype=np.int64), np.array([[1, 1], [1, -1]]))


def _small_hadamard(m: int) -> np.ndarray | None:
    if m in (1, 2):
        return np.array([[1]]) if m == 1 else np.array([[1, 1], [1, -1]])
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def hadamard_matrix(n: int) -> np.ndarray | None:
    """A ±1 matrix with H·Hᵀ = n·I, or None when no Sylvester ⊗ Paley construction gives order n."""
    if n < 1:
        return None
    a = 0
    while n % (2 ** (a + 1)) == 0:
        a += 1
    for k in range(a, -1, -1):  # largest power-of-two factor first: the smallest Paley block
        hm = _small_hadamard(n // 2**k)
        if hm is not None:
            h = np.array([[1]], np.int64)
            for _ in range(k):
                h = np.kron(h, np.array([[1, 1], [1, -1]], np.int64))
            return np.kron(h, hm)
    return None


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs of diag(R) fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def rotation_matrix(n: int, rng: np.random.Generator, kind: str = "hadamard") -> tuple[np.ndarray, str]:
    """(Q float64 orthogonal [n, n], description). Randomized Hadamard when possible."""
    if kind == "hadamard":
        h = hadamard_matrix(n)
        if h is not None:
            signs = rng.choice(np.array([-1.0, 1.0]), size=n)
            return signs[:, None] * h.astype(np.float64) / np.sqrt(n), f"randomized Hadamard {n}"
    return random_orthogonal(n, rng), f"random orthogonal {n}"


# ---------------------------------------------------------------------------------------------
# graph helpers used by rotate and affine
# ---------------------------------------------------------------------------------------------
def require_dense(structure, what: str) -> None:
    """The fold passes rewrite fp weights: every block linear must still be a dense MatMul."""
    if not structure.blocks:
        raise UserError(f"{what}: no decoder blocks were recognized in the graph; re-export the model")
    for lin in structure.linears():
        if lin.kind != "dense" or lin.weight is None:
            raise UserError(
                f"{what}: layer {lin.name} is {lin.kind}, not a dense fp weight; put '{what}' before "
                "int4/svd passes in the recipe"
            )
    if structure.unrecognized:
        raise UserError(
            f"{what}: the structure analysis could not place {', '.join(structure.unrecognized[:5])}; "
            "this pass needs every reader of the residual stream recognized"
        )


def untie_lm_head(model: ir.Model, structure) -> str:
    """The name of lm_head's own [K, N] weight initializer, so the embedding and lm_head can be
    transformed independently. llmfold's exporter already gives a tied lm_head its own copy
    (Eᵀ); an lm_head reading the embedding itself is refused rather than guessed at."""
    lm = structure.lm_head
    node = node_by_name(model, lm.node)
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if (
        node.op_type == "MatMul"
        and w_value is not None
        and w_value.is_initializer()
        and w_value.name != structure.embedding
        and w_value.name == lm.weight
    ):
        return w_value.name
    raise UserError(
        f"rotate: lm_head {lm.node} shares the embedding tensor; re-export the model with "
        "`llmfold export` (which gives lm_head its own copy)"
    )


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RotateParams:
    kind: Literal["hadamard", "random"] = "hadamard"  # randomized Hadamard (fallback random) or random orthogonal
    seed: int = 0  # mixed with the compile seed
    heads: bool = False  # also rotate each attention head's values: W_v columns ·R_b, W_o head rows R_bᵀ·

    def validate(self) -> None:
        if self.kind not in ("hadamard", "random"):
            raise UserError(f"rotate: kind must be 'hadamard' or 'random', got {self.kind!r}")
        if self.seed < 0:
            raise UserError(f"rotate: seed must be ≥ 0, got {self.seed}")


@register_pass
class RotatePass(CompilerPass):
    name = "rotate"
    Params = RotateParams
    description = "fold norm weights, untie embeddings, rotate the residual stream by a randomized Hadamard Q"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        s = self.ctx.structure(model, refresh=True)
        require_dense(s, "rotate")
        if s.final_norm is None or s.lm_head is None or s.embedding is None:
            raise UserError("rotate: the model needs a recognized embedding, final norm and lm_head")
        D = s.hidden_size
        Q, kind = rotation_matrix(D, self.ctx.rng("rotate", self.params.seed), self.params.kind)

        lm_weight = untie_lm_head(model, s) if s.tied_embeddings else s.lm_head.weight

        def fold_norm(norm, readers: list[str]) -> None:
            g = get_weight(model, norm.weight)
            if g.shape != (D,):
                raise UserError(f"rotate: norm weight {norm.weight} has shape {g.shape}, expected ({D},)")
            for w in dict.fromkeys(readers):  # a fused q/k/v weight is transformed once
                W = get_weight(model, w)
                set_weight(model, w, Q.T @ (g[:, None] * W))
            set_weight(model, norm.weight, np.ones(D))

        writers = []
        for b in s.blocks:
            fold_norm(b.input_norm, [b.q.weight, b.k.weight, b.v.weight])
            fold_norm(b.post_attention_norm, [b.gate.weight, b.up.weight])
            writers += [b.o.weight, b.down.weight]
        fold_norm(s.final_norm, [lm_weight])
        for w in dict.fromkeys(writers):
            set_weight(model, w, get_weight(model, w) @ Q)
        set_weight(model, s.embedding, get_weight(model, s.embedding) @ Q)
        if self.params.heads:
            self._rotate_heads(model, s)

        # every linear input downstream of the stream changed (X' = X·diag(1/g)·Q, g may be 0)
        self.ctx.invalidate_stats()
        self.ctx.invalidate_structure()
        self.ctx.record(
            matrix=kind, hidden=D, untied=bool(s.tied_embeddings), blocks=len(s.blocks), heads=self.params.heads
        )
        self.ctx.log(f"rotated the residual stream ({kind}){' and the heads' if self.params.heads else ''}, {len(s.blocks)} blocks")
        return ir.passes.PassResult(model, True)

    def _rotate_heads(self, model: ir.Model, s) -> None:
        """Per block one orthogonal R [hd, hd]: each kv head's value columns W_v,g ← W_v,g·R and
        every query head's o_proj rows W_o,h ← Rᵀ·W_o,h."""
        from passes.affine import fold_vo  # affine imports this module's helpers

        if s.num_heads % s.num_kv_heads:
            raise UserError(f"rotate: {s.num_heads} heads do not split into {s.num_kv_heads} kv groups")
        rng = self.ctx.rng("rotate-heads", self.params.seed)
        for b in s.blocks:
            R, _ = rotation_matrix(s.head_dim, rng, self.params.kind)
            # fold_vo applies W_v·A⁻¹ and A·W_o; A = Rᵀ gives W_v·R and Rᵀ·W_o
            fold_vo(model, b, s, np.broadcast_to(R.T, (s.num_kv_heads, *R.shape)))


__all__ = ["RotatePass", "RotateParams", "hadamard_matrix", "random_orthogonal", "rotation_matrix"]
