"""AffineQuant (Ma et al., ICLR 2024): learned affine transforms folded exactly into the weights.

Idea. A linear layer Y = X·W (X: tokens × K, W: K × N) equals (X·A⁻¹)·(A·W) for any invertible
A. Choosing A well makes both factors easier to quantize: X·A⁻¹ (the activations the QMatMul
quantizes per token) loses its outlier channels, A·W (the weight quantized in blocks of g rows)
stays well-behaved. The paper only simulates this in PyTorch; here every A is folded into
neighbouring weights of the ONNX graph, so the compiled model has no extra op at all.

Where the transforms go (ONNX orientation, W is [K, N]; each fold is exact in real arithmetic
and computed in float64, so in fp32 only the rounding of the stored weights changes):

1. input norm → q/k/v, post-attention norm → gate/up: diagonal A = diag(s).
   RMSNorm(h)·diag(g) is the readers' input X, so X·A⁻¹ = RMSNorm(h)·diag(g/s): the norm weight
   becomes g/s and the readers' rows become diag(s)·W. A full matrix cannot pass through the
   norm (it would have to commute with the division by ‖h‖·diag(g) — only diagonals do); the
   `rotate` pass goes further by rotating the residual stream itself.
2. v → o: one full head_dim × head_dim block A_g per kv group g. Attention is linear in V:
   ctx_h = P_h·V_g for every query head h reading kv head g (GQA: h ↦ g = h // (H/KV)), so
   V_g·A_g⁻¹ gives ctx_h·A_g⁻¹, which the o projection undoes with its rows of head h ← A_g·.
   Folded as W_v[:, group g columns] ← ·A_g⁻¹ and W_o[head h rows] ← A_g·. The o projection's
   input is then X_o·blockdiag(A⁻¹) (what is quantized) and its weight blockdiag(A)·W_o.
3. up → down: diagonal. m = silu(gate) ⊙ up is elementwise per channel, so up's columns ← /s
   gives m·diag(1/s), and down's rows ← diag(s)·W_d undoes it.
4. q/k (optional, `qk = true`): only transforms commuting with RoPE. RoPE rotates each pair
   (i, i + d/2) of a head by R(θ_t,i) = [[cos, sin], [−sin, cos]] (row-vector convention,
   rope(z) = z·cos + rotate_half(z)·sin). Per kv group g and pair i a scaled rotation
   M = c·R(φ) commutes with every R(θ) (2-D rotations commute, c is a scalar); q's pair columns
   ← ·M, k's pair columns ← ·M⁻ᵀ = ·(1/c)·R(φ). Then rope(qM)·rope(kM⁻ᵀ)ᵀ =
   q R_t M M⁻¹ R_sᵀ kᵀ = q R_t R_sᵀ kᵀ: the attention scores are unchanged. (The released
   AffineQuant code uses a general matrix before RoPE, which is not exact for Llama.)
   This changes only the q/k weights (their column mixing), not any quantized activation.
5. final norm → lm_head (`lm_head = true`, quantized activations only): diagonal, folded like 1.
   Not learned: the SmoothQuant exponent a ∈ {0.25, 0.5, 0.75} minimizing the fake-quantized
   lm_head's output error on calibration tokens is used, or no transform if none beats it.

Learning (per block, in order; the paper's recipe with this compiler's quantizer):

* A torch reconstruction of the block is built from the graph's weights and checked against the
  ONNX block (residual stream in → out, one calibration window run in ONNX Runtime):
  max|Δ| ≤ check_tolerance·max(1, max|y|) (1e-4 by default, relative to the stream's scale
  because SmolLM2's residual stream reaches values in the hundreds). A mismatch is a UserError:
  the pass never learns on a model it does not understand.
* Objective: MSE between the fp block's output on the fp stream (the target) and the output of
  the transformed, fake-quantized block fed by the outputs of the already-learned, fake-quantized
  previous blocks. By default (`loss = "relative"`) each token's squared error is divided by
  that token's mean square y_t², i.e. the MSE of the stream as its readers see it (every reader
  of the residual stream is an RMSNorm, which divides by exactly that scale). Reason: from some
  block on (block 11 of SmolLM2-135M) the first token of every window carries a "massive
  activation" (|y| ≈ 27 000 against ≈ 100 for other tokens); the plain MSE (`loss = "mse"`, the
  paper's) is then > 99% that one token's error and learning stops improving the others. Weights: the INT4 pass's block format (blocks of `block_size` rows along K,
  symmetric s = max(max⁺/7, max⁻/8), or asymmetric with integer zero points), times a learnable
  clipping factor σ(θ) per block column (OmniQuant's LWC, θ₀ = 4); activations: the op's
  per-token symmetric quantization at `act_bits` (σ_t = max|x_t|/Q). Rounding uses the
  straight-through estimator; scales stay differentiable.
* Parametrization: diagonal transforms as s = exp(u) (positive, any magnitude); a v→o block as
  A = diag(d) + α·(M_e ⊙ O) with the gradual mask M_e: epoch e (1-based, of E) unlocks the
  off-diagonal band |i − j| ≤ ⌈(e/E)·n⌉ (n = head_dim); α is the stability factor. `mask =
  "none"` unlocks every off-diagonal entry from the first epoch (the ablation).
* Invertibility: after every optimizer step each row must satisfy strict diagonal dominance,
  |d_i| > Σ_{j≠i} |A_ij| (Levy–Desplanques ⇒ A invertible); a row with
  Σ_{j≠i}|A_ij| ≥ (1 − margin)·|d_i| has its off-diagonal entries shrunk by the factor that
  brings the sum to (1 − margin)·|d_i|. Inverses are computed in float64.
* Initialization: SmoothQuant, s_j = max|X_j|^a / max|W_j,:|^(1−a) (a = smooth_alpha; the max
  over W runs over every reader of the channel) on every diagonal (also the v→o diagonal,
  pooled over the query heads of a kv group), off-diagonals 0. `init = "identity"` starts
  from A = I.
* AdamW over `epochs` passes of the training windows (`samples` windows of `seq_len` tokens,
  less the held-out ones), `batch` windows a step.
* Keep-best on held-out windows: the last round(holdout·samples) windows are never trained on;
  the block's loss on them is evaluated for the initialization and after every epoch, and the
  block keeps the best of these transforms (the initialization wins ties), logged as "kept the
  initialization" / "kept epoch e". The identity (no transform) is a candidate as well
  (`keep_identity`, logged "kept the identity"): the SmoothQuant scales do not help every block.
  So learning never returns a block whose held-out loss is above its initialization's (or the
  identity's). With `epochs = 0` nothing is fitted and the init/identity choice uses every
  window. Reason: at the budgets this 2-core machine affords (a few
  thousand tokens per block) learning over-fits the learning windows — in an earlier torch
  simulation (RTN W4A4, 1 epoch of 8×128 tokens) learned transforms gave 70× fp32 perplexity
  against the initialization's 27×. `holdout = 0` selects on the learning windows instead.
  A non-finite loss rolls the block back to its last good state (logged and recorded), ends
  that block's learning, and that state competes with the best so far. Only one block's
  activations (fp input, quantized input, fp target) are held at a time.

Folding and hand-off. After a block is learned its transforms are folded into the graph with
float64 arithmetic; A is re-checked (finite, diagonally dominant, ‖A·A⁻¹ − I‖ small) before any
weight is written — a transform failing that check is replaced by the identity and logged, so a
failed inverse never reaches the graph. The statistics of every transformed linear input are
invalidated, so the INT4 pass collects them on the transformed graph (its GPTQ runs on the
transformed inputs, sequentially over the partially quantized graph, which is better than the
fp-graph Gram matrices A⁻ᵀ XᵀX A⁻¹ this pass could hand on).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Literal

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from passes._weights import get_weight, node_by_name, set_weight
from passes.base import CompilerPass, register_pass
from passes.rotate import require_dense


# =============================================================================================
# parameters
# =============================================================================================
@dataclasses.dataclass
class AffineParams:
    """Recipe keys of [[pass]] name = "affine". Quantizer keys must match the int4 pass's."""

    act_bits: int = 16  # activation bits the QMatMul will use (16 | 8 | 4) — as int4's act_bits
    block_size: int = 64  # weight block along K — as int4's block_size
    symmetric: bool = True  # as int4's symmetric
    epochs: int = 5  # 0: fold the initialization (SmoothQuant scales) without learning
    samples: int = 32  # calibration windows used for learning
    holdout: float = 0.25  # fraction of `samples` held out to pick the best epoch (keep-best); 0: none
    keep_identity: bool = True  # the identity (no transform) is a keep-best candidate too
    seq_len: int = 256  # tokens per window (≤ the recipe's calibration seq_len)
    batch: int = 2  # windows per optimizer step
    lr: float = 5e-3  # transforms (log-scales of diagonals, entries of v→o blocks)
    lwc_lr: float = 1e-2  # learnable weight clipping
    weight_decay: float = 0.0
    alpha: float = 1e-2  # stability factor of the gradual mask (off-diagonal factor)
    mask: str = "gradual"  # "gradual" | "none"
    vo: str = "full"  # "full" (head_dim blocks) | "diagonal" | "off"
    qkv: bool = True  # input norm → q/k/v diagonal
    gate_up: bool = True  # post-attention norm → gate/up diagonal
    down: bool = True  # up → down diagonal
    qk: bool = False  # RoPE-commuting per-pair scaled rotations on q/k
    lm_head: bool = True  # final norm → lm_head diagonal, SmoothQuant a searched (act_bits < 16)
    loss: str = "relative"  # "relative": per-token normalized MSE | "mse": plain MSE (the paper's)
    lwc: bool = True
    init: str = "smoothquant"  # "smoothquant" | "identity"
    smooth_alpha: float = 0.5
    margin: float = 0.01  # strict diagonal dominance margin
    check_tolerance: float = 1e-4  # torch vs ONNX block reconstruction (relative to max(1, |y|))

    def validate(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"affine: {key} {why}")

        if self.act_bits not in (16, 8, 4):
            raise bad("act_bits", f"must be 16, 8 or 4, got {self.act_bits}")
        if self.block_size < 16 or self.block_size % 8:
            raise bad("block_size", f"must be a multiple of 8 and at least 16 (as the int4 pass), got {self.block_size}")
        if self.epochs < 0:
            raise bad("epochs", f"must be at least 0 (0 = fold the initialization only), got {self.epochs}")
        for key in ("samples", "seq_len", "batch"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be at least 1, got {getattr(self, key)}")
        if not (math.isfinite(self.holdout) and 0 <= self.holdout < 1):
            raise bad("holdout", f"must be in [0, 1), got {self.holdout}")
        for key in ("lr", "lwc_lr"):
            v = getattr(self, key)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise bad(key, f"must be in (0, 1], got {v}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise bad("weight_decay", f"must be in [0, 1), got {self.weight_decay}")
        if not (math.isfinite(self.alpha) and 0 < self.alpha <= 1):
            raise bad("alpha", f"(stability factor) must be in (0, 1], got {self.alpha}")
        if self.mask not in ("gradual", "none"):
            raise bad("mask", f"must be 'gradual' or 'none', got {self.mask!r}")
        if self.vo not in ("full", "diagonal", "off"):
            raise bad("vo", f"must be 'full', 'diagonal' or 'off', got {self.vo!r}")
        if self.loss not in ("relative", "mse"):
            raise bad("loss", f"must be 'relative' or 'mse', got {self.loss!r}")
        if self.init not in ("smoothquant", "identity"):
            raise bad("init", f"must be 'smoothquant' or 'identity', got {self.init!r}")
        if not (0 <= self.smooth_alpha <= 1):
            raise bad("smooth_alpha", f"must be in [0, 1], got {self.smooth_alpha}")
        if not (0 < self.margin < 1):
            raise bad("margin", f"must be in (0, 1), got {self.margin}")
        if not (0 < self.check_tolerance < 1):
            raise bad("check_tolerance", f"must be in (0, 1), got {self.check_tolerance}")
        if not (self.qkv or self.gate_up or self.down or self.qk or self.vo != "off"):
            raise bad("qkv/gate_up/down/qk/vo", "disable every transform; enable at least one")


# =============================================================================================
# exact folds (numpy float64) — used by the pass and by the exactness tests
# =============================================================================================
def _heads(structure) -> tuple[int, int, int, int]:
    H, KV, hd = structure.num_heads, structure.num_kv_heads, structure.head_dim
    if H % KV:
        raise UserError(f"affine: {H} heads do not split into {KV} kv groups")
    return H, KV, hd, H // KV


def _check_unshared(block) -> None:
    names = [lin.weight for lin in block.linears()]
    if len(set(names)) != len(names):
        raise UserError(f"affine: block {block.index} has fused/shared linear weights; export with separate q/k/v/gate/up")


def _check_attention(model: ir.Model, block) -> None:
    """The block's attention must be what `block_forward` computes: the exported softmax
    attention, or llmfold's fused layout (a com.microsoft.GroupQueryAttention reading separate
    q/k/v MatMuls, RoPE inside the op with rotate_half pairs, scale head_dim^−½)."""
    kind = block.attention_kind
    if kind == "softmax":
        return
    if kind == "GroupQueryAttention" and not any(lin.columns for lin in (block.q, block.k, block.v)):
        node = node_by_name(model, block.attention)
        a = node.attributes
        hd = block.q.N // a.get_int("num_heads")
        if (a.get_int("do_rotary", 0) == 1 and a.get_int("rotary_interleaved", 0) == 0
                and np.isclose(a.get_float("scale", hd ** -0.5), hd ** -0.5)
                and a.get_int("local_window_size", -1) == -1 and a.get_float("softcap", 0.0) == 0.0
                and a.get_int("smooth_softmax", 0) == 0):
            return
        raise UserError(f"affine: block {block.index}'s GroupQueryAttention {node.name} is not plain causal RoPE "
                        "attention (do_rotary=1, rotary_interleaved=0, default scale, no window/softcap)")
    raise UserError(f"affine: block {block.index} uses fused attention ({kind}"
                    f"{', packed QKV' if block.q.columns else ''}); affine needs llmfold's exported attention "
                    "(`llmfold export`, either --attention layout)")


def fold_norm_diag(model: ir.Model, norm, readers: list, s: np.ndarray) -> None:
    """A = diag(s) after a norm: g ← g/s, every reader W ← diag(s)·W (exact)."""
    s = np.asarray(s, np.float64)
    if not (np.all(np.isfinite(s)) and np.all(s != 0)):
        raise ValueError("diagonal transform must be finite and nonzero")
    g = get_weight(model, norm.weight)
    set_weight(model, norm.weight, g / s)
    for lin in readers:
        set_weight(model, lin.weight, s[:, None] * get_weight(model, lin.weight))


def fold_up_down(model: ir.Model, block, s: np.ndarray) -> None:
    """A = diag(s) on the MLP hidden: up's columns ← /s, down's rows ← diag(s)· (exact)."""
    s = np.asarray(s, np.float64)
    if not (np.all(np.isfinite(s)) and np.all(s != 0)):
        raise ValueError("diagonal transform must be finite and nonzero")
    set_weight(model, block.up.weight, get_weight(model, block.up.weight) / s[None, :])
    set_weight(model, block.down.weight, s[:, None] * get_weight(model, block.down.weight))


def fold_vo(model: ir.Model, block, structure, A: np.ndarray) -> None:
    """A: [KV, hd, hd] — W_v's group-g columns ← ·A_g⁻¹, W_o's head-h rows ← A_{h//rep}· (exact)."""
    H, KV, hd, rep = _heads(structure)
    A = np.asarray(A, np.float64)
    Ainv = safe_inverse(A)
    Wv = get_weight(model, block.v.weight)  # [D, KV·hd]
    Wo = get_weight(model, block.o.weight)  # [H·hd, D]
    D = Wv.shape[0]
    Wv = np.einsum("dgi,gij->dgj", Wv.reshape(D, KV, hd), Ainv).reshape(D, KV * hd)
    Wo = Wo.reshape(H, hd, -1)
    Wo = np.einsum("hij,hjn->hin", A[np.arange(H) // rep], Wo).reshape(H * hd, -1)
    set_weight(model, block.v.weight, Wv)
    set_weight(model, block.o.weight, Wo)


def qk_pair_matrices(c: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """M = c·R(φ) per (group, pair): [..., 2, 2] with R(φ) = [[cos φ, sin φ], [−sin φ, cos φ]]."""
    cos, sin = np.cos(phi), np.sin(phi)
    return c[..., None, None] * np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)


def _pair_transform(W: np.ndarray, heads: int, hd: int, M_per_head: np.ndarray) -> np.ndarray:
    """W [D, heads·hd] with each head's columns (i, i+hd/2) ← [a, b]·M_h,i."""
    D = W.shape[0]
    Wr = W.reshape(D, heads, 2, hd // 2)  # [D, h, half(0: first, 1: second), i]
    a, b = Wr[:, :, 0, :], Wr[:, :, 1, :]
    M = M_per_head  # [h, i, 2, 2]
    a2 = a * M[None, :, :, 0, 0] + b * M[None, :, :, 1, 0]
    b2 = a * M[None, :, :, 0, 1] + b * M[None, :, :, 1, 1]
    return np.stack([a2, b2], 2).reshape(D, heads * hd)


def fold_qk(model: ir.Model, block, structure, c: np.ndarray, phi: np.ndarray) -> None:
    """Per kv group g and pair i: q's pair columns ← ·c·R(φ), k's ← ·(1/c)·R(φ) (exact with RoPE)."""
    H, KV, hd, rep = _heads(structure)
    c, phi = np.asarray(c, np.float64), np.asarray(phi, np.float64)
    if c.shape != (KV, hd // 2) or phi.shape != (KV, hd // 2) or not np.all(np.isfinite(c)) or np.any(c == 0):
        raise ValueError("qk transform: c, phi must be finite [kv_heads, head_dim/2] with c ≠ 0")
    Mq = qk_pair_matrices(c, phi)
    Mk = qk_pair_matrices(1.0 / c, phi)
    Wq = get_weight(model, block.q.weight)
    Wk = get_weight(model, block.k.weight)
    set_weight(model, block.q.weight, _pair_transform(Wq, H, hd, Mq[np.arange(H) // rep]))
    set_weight(model, block.k.weight, _pair_transform(Wk, KV, hd, Mk))


# =============================================================================================
# invertibility
# =============================================================================================
def diagonally_dominant(A: np.ndarray) -> bool:
    """Strict row diagonal dominance |A_ii| > Σ_{j≠i} |A_ij| for every row of [..., n, n]."""
    A = np.asarray(A, np.float64)
    d = np.abs(np.diagonal(A, axis1=-2, axis2=-1))
    off = np.abs(A).sum(-1) - d
    return bool(np.all(d > off))


def safe_inverse(A: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """float64 inverse of [..., n, n], refusing anything non-finite or inaccurate."""
    A = np.asarray(A, np.float64)
    if not np.all(np.isfinite(A)):
        raise ValueError("transform is not finite")
    Ainv = np.linalg.inv(A)
    eye = np.broadcast_to(np.eye(A.shape[-1]), A.shape)
    if not np.all(np.isfinite(Ainv)) or np.abs(A @ Ainv - eye).max() > tol:
        raise ValueError("transform inverse is inaccurate")
    return Ainv


def band_mask(n: int, band: int):
    """Off-diagonal band 0 < |i − j| ≤ band as a float torch tensor [n, n] (diagonal 0)."""
    import torch

    idx = torch.arange(n)
    dist = (idx[:, None] - idx[None, :]).abs()
    return ((dist > 0) & (dist <= band)).float()


def gradual_band(epoch: int, epochs: int, n: int) -> int:
    """Band unlocked in epoch e (1-based) of E: ⌈(e/E)·n⌉ (n at the last epoch)."""
    return min(n, math.ceil(epoch / epochs * n))


def enforce_dominance(d, off, margin: float, coef=None) -> int:
    """Make A = diag(d) + coef ⊙ off strictly diagonally dominant by rows, in place.

    d [..., n], off [..., n, n] (its diagonal is ignored: coef or the caller zeroes it), coef
    broadcastable to off (the mask times α) or None (1). Rows with Σ_j |coef·off|_ij ≥
    (1 − margin)·|d_i| get their off-diagonal entries scaled down to (1 − margin)·|d_i|.
    Returns how many rows were shrunk."""
    import torch

    with torch.no_grad():
        n = off.shape[-1]
        eff = off * (1.0 - torch.eye(n, dtype=off.dtype))
        if coef is not None:
            eff = eff * coef
        rowsum = eff.abs().sum(-1)
        limit = (1.0 - margin) * d.abs()
        bad = rowsum > limit
        n_bad = int(bad.sum())
        if n_bad:
            factor = torch.where(bad, limit / rowsum.clamp_min(1e-30), torch.ones_like(rowsum))
            off.mul_(factor.unsqueeze(-1))
    return n_bad


# =============================================================================================
# torch reconstruction of a block and fake quantization
# =============================================================================================
def round_ste(x):
    return (x.round() - x).detach() + x


def fake_quant_weight(W, block_size: int, symmetric: bool, clip=None):
    """The int4 pass's block format, differentiable (STE). W [K, N]; clip: shrink [nb, N] or None.

    symmetric: s = a·max(max(W,0)/7, max(−W,0)/8), q ∈ [0,15] around 8;
    asymmetric: s = a·(max(W,0) − min(W,0))/15, z = clamp(round(−a·min/s), 0, 15) (integer);
    s rounded to float16 as stored.
    """
    import torch

    from passes.int4 import stored_scales

    K, N = W.shape
    nb = -(-K // block_size)
    pad = nb * block_size - K
    Wp = torch.nn.functional.pad(W, (0, 0, 0, pad)) if pad else W
    Wb = Wp.reshape(nb, block_size, N)
    mx = Wb.amax(1).clamp(min=0)
    mn = Wb.amin(1).clamp(max=0)
    if symmetric:
        scale = torch.maximum(mx / 7.0, -mn / 8.0)
    else:
        scale = (mx - mn) / 15.0
    if clip is not None:
        scale = scale * clip
    # stored as QMatMul stores it (float16), straight through: the gradient stays in float32 (through
    # the cast itself it would be rounded to float16, and small ones would flush to zero)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = (scale + (stored_scales(scale.detach()) - scale.detach())).unsqueeze(1)
    if symmetric:
        zero = torch.full_like(scale, 8.0)
    else:
        zero = torch.clamp(torch.round(-(mn * (clip if clip is not None else 1.0)).unsqueeze(1) / scale), 0, 15).detach()
    q = torch.clamp(round_ste(Wb / scale) + zero, 0, 15)
    out = (scale * (q - zero)).reshape(nb * block_size, N)
    return out[:K] if pad else out


def fake_quant_act(x, bits: int):
    """Per-token symmetric quantization as the op does it (σ_t = max|x_t|/Q), STE rounding."""
    import torch

    if bits >= 16:
        return x
    qmax = 7.0 if bits == 4 else 127.0
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / qmax
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


@dataclasses.dataclass
class BlockWeights:
    """fp32 torch tensors of one decoder block, read from the graph (orientation [K, N])."""

    g1: "torch.Tensor"
    g2: "torch.Tensor"
    eps1: float
    eps2: float
    q: "torch.Tensor"
    k: "torch.Tensor"
    v: "torch.Tensor"
    o: "torch.Tensor"
    gate: "torch.Tensor"
    up: "torch.Tensor"
    down: "torch.Tensor"

    @staticmethod
    def from_graph(model: ir.Model, block) -> "BlockWeights":
        import torch

        def t(name):
            return torch.from_numpy(get_weight(model, name).astype(np.float32))

        return BlockWeights(
            g1=t(block.input_norm.weight),
            g2=t(block.post_attention_norm.weight),
            eps1=float(block.input_norm.epsilon),
            eps2=float(block.post_attention_norm.epsilon),
            **{r: t(getattr(block, r).weight) for r in ("q", "k", "v", "o", "gate", "up", "down")},
        )


def rope_tables(model: ir.Model, structure, seq_len: int):
    """cos/sin [seq_len, head_dim]: the graph's own tables when present (exact), else default RoPE."""
    import torch

    inits = model.graph.initializers
    if "model.rotary_emb.cos_cached" in inits and "model.rotary_emb.sin_cached" in inits:
        cos = inits["model.rotary_emb.cos_cached"].const_value.numpy()
        sin = inits["model.rotary_emb.sin_cached"].const_value.numpy()
        if cos.shape[0] < seq_len:
            raise UserError(f"affine: seq_len {seq_len} exceeds the model's {cos.shape[0]} positions")
        return torch.from_numpy(np.array(cos[:seq_len], np.float32)), torch.from_numpy(np.array(sin[:seq_len], np.float32))
    if "model.rotary_emb.cos_cache" in inits and "model.rotary_emb.sin_cache" in inits:
        # the fused layout's GroupQueryAttention caches [max_pos, head_dim/2]: rotate_half RoPE
        # uses cat(f, f) over the head
        cos = inits["model.rotary_emb.cos_cache"].const_value.numpy()
        sin = inits["model.rotary_emb.sin_cache"].const_value.numpy()
        if cos.shape[0] < seq_len:
            raise UserError(f"affine: seq_len {seq_len} exceeds the model's {cos.shape[0]} positions")
        cos, sin = np.array(cos[:seq_len], np.float32), np.array(sin[:seq_len], np.float32)
        return torch.from_numpy(np.concatenate([cos, cos], -1)), torch.from_numpy(np.concatenate([sin, sin], -1))
    hd = structure.head_dim
    theta = structure.rope_theta or 10000.0
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.arange(seq_len).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def _rms(x, eps: float):
    import torch

    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(z, cos, sin):
    import torch

    half = z.shape[-1] // 2
    rot = torch.cat([-z[..., half:], z[..., :half]], -1)
    return z * cos + rot * sin


def block_forward(x, w: dict, cfg: dict, act_bits: int = 16, taps: dict | None = None):
    """One Llama block on x [B, T, D] with (possibly transformed/fake-quantized) weights.

    w: g1, g2, q, k, v, o, gate, up, down, eps1, eps2; cfg: H, KV, hd, cos, sin. A linear given
    as a tensor W computes fake_quant(X, act_bits)·W (activation quantization on its input, as
    the QMatMul does; once per input shared by several linears); one given as a callable is
    called on X and owns its input transform (passes/distill.py's StudentLinear). `taps`
    (optional) receives the four linear inputs before quantization.
    """
    import torch.nn.functional as F

    B, T, D = x.shape
    H, KV, hd = cfg["H"], cfg["KV"], cfg["hd"]
    cos, sin = cfg["cos"][:T], cfg["sin"][:T]

    def linears(z, tap: str, *roles):
        if taps is not None:
            taps[tap] = z
        zq = None
        out = []
        for r in roles:
            if callable(w[r]):
                out.append(w[r](z))
            else:
                zq = fake_quant_act(z, act_bits) if zq is None else zq
                out.append(zq @ w[r])
        return out

    q, k, v = linears(_rms(x, w["eps1"]) * w["g1"], "qkv", "q", "k", "v")
    q = _rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)
    k = _rope(k.view(B, T, KV, hd).transpose(1, 2), cos, sin)
    v = v.view(B, T, KV, hd).transpose(1, 2)
    if KV != H:
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5)
    (o,) = linears(a.transpose(1, 2).reshape(B, T, H * hd), "o", "o")
    h = x + o
    gate, up = linears(_rms(h, w["eps2"]) * w["g2"], "gate_up", "gate", "up")
    (down,) = linears(F.silu(gate) * up, "down", "down")
    return h + down


def fp_weights(bw: BlockWeights) -> dict:
    return {f.name: getattr(bw, f.name) for f in dataclasses.fields(bw)}


# =============================================================================================
# learnable transforms of one block
# =============================================================================================
class BlockTransform:
    """The learnable parameters of one block (torch leaf tensors) and the transformed weights."""

    def __init__(self, bw: BlockWeights, cfg: dict, p: AffineParams, init: dict | None = None):
        import torch

        self.bw, self.cfg, self.p = bw, cfg, p
        D, I = bw.q.shape[0], bw.down.shape[0]
        KV, hd = cfg["KV"], cfg["hd"]
        init = init or {}

        def logp(key, n):
            v = init.get(key)
            t = torch.zeros(n) if v is None else torch.log(torch.as_tensor(v, dtype=torch.float32))
            return t.clone().requires_grad_(True)

        self.u_qkv = logp("qkv", D) if p.qkv else None
        self.u_gu = logp("gate_up", D) if p.gate_up else None
        self.u_down = logp("down", I) if p.down else None
        self.vo_d = self.vo_off = self.vo_u = None
        if p.vo == "full":
            d0 = init.get("vo")
            self.vo_d = (torch.ones(KV, hd) if d0 is None else torch.as_tensor(d0, dtype=torch.float32).clone()).requires_grad_(True)
            self.vo_off = torch.zeros(KV, hd, hd, requires_grad=True)
        elif p.vo == "diagonal":
            self.vo_u = logp("vo", (KV, hd)) if init.get("vo") is not None else torch.zeros(KV, hd, requires_grad=True)
        self.qk_logc = self.qk_phi = None
        if p.qk:
            self.qk_logc = torch.zeros(KV, hd // 2, requires_grad=True)
            self.qk_phi = torch.zeros(KV, hd // 2, requires_grad=True)
        self.clip = {}
        if p.lwc:
            for r in ("q", "k", "v", "o", "gate", "up", "down"):
                K, N = getattr(bw, r).shape
                self.clip[r] = torch.full((-(-K // p.block_size), N), 4.0, requires_grad=True)
        self.band = hd if p.mask == "none" else 0  # gradual: set per epoch

    # -- parameter groups ---------------------------------------------------------------------
    def transform_params(self) -> list:
        return [t for t in (self.u_qkv, self.u_gu, self.u_down, self.vo_d, self.vo_off, self.vo_u, self.qk_logc, self.qk_phi) if t is not None]

    def clip_params(self) -> list:
        return list(self.clip.values())

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self._named().items()}

    def load_state(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for k, v in self._named().items():
                v.copy_(state[k])

    def _named(self) -> dict:
        named = {
            n: getattr(self, n)
            for n in ("u_qkv", "u_gu", "u_down", "vo_d", "vo_off", "vo_u", "qk_logc", "qk_phi")
            if getattr(self, n) is not None
        }
        named.update({f"clip.{r}": t for r, t in self.clip.items()})
        return named

    # -- the v→o matrices -----------------------------------------------------------------------
    def vo_mask(self):
        return band_mask(self.cfg["hd"], self.band)

    def vo_matrix(self):
        """Effective A [KV, hd, hd] (None when vo = "off")."""
        import torch

        if self.vo_d is not None:
            return torch.diag_embed(self.vo_d) + self.p.alpha * self.vo_mask() * self.vo_off
        if self.vo_u is not None:
            return torch.diag_embed(torch.exp(self.vo_u))
        return None

    def enforce(self) -> int:
        """Strict diagonal dominance of every v→o block (in place); returns rows shrunk."""
        import torch

        if self.vo_d is None:
            return 0
        with torch.no_grad():  # keep the diagonal away from 0 (it starts positive)
            self.vo_d.clamp_(min=float(1e-4 * self.vo_d.abs().amax().clamp_min(1e-30)))
        return enforce_dominance(self.vo_d, self.vo_off, self.p.margin, coef=self.p.alpha * self.vo_mask())

    # -- transformed weights ---------------------------------------------------------------------
    def weights(self, quantize: bool) -> dict:
        """The block's weights after the transforms (and fake quantization when `quantize`)."""
        import torch

        bw, cfg, p = self.bw, self.cfg, self.p
        H, KV, hd = cfg["H"], cfg["KV"], cfg["hd"]
        rep = H // KV
        D = bw.q.shape[0]
        g1, g2 = bw.g1, bw.g2
        Wq, Wk, Wv, Wo, Wg, Wu, Wd = bw.q, bw.k, bw.v, bw.o, bw.gate, bw.up, bw.down
        if self.u_qkv is not None:
            s = torch.exp(self.u_qkv)
            g1 = g1 / s
            Wq, Wk, Wv = s[:, None] * Wq, s[:, None] * Wk, s[:, None] * Wv
        if self.u_gu is not None:
            s = torch.exp(self.u_gu)
            g2 = g2 / s
            Wg, Wu = s[:, None] * Wg, s[:, None] * Wu
        if self.u_down is not None:
            s = torch.exp(self.u_down)
            Wu = Wu / s[None, :]
            Wd = s[:, None] * Wd
        A = self.vo_matrix()
        if A is not None:
            Ainv = torch.linalg.inv(A.double()).float()
            Wv = torch.einsum("dgi,gij->dgj", Wv.view(D, KV, hd), Ainv).reshape(D, KV * hd)
            Wo = torch.einsum("hij,hjn->hin", A[torch.arange(H) // rep], Wo.view(H, hd, -1)).reshape(H * hd, -1)
        if self.qk_logc is not None:
            Wq = self._pair(Wq, H, self.qk_logc[torch.arange(H) // rep], self.qk_phi[torch.arange(H) // rep], 1.0)
            Wk = self._pair(Wk, KV, self.qk_logc, self.qk_phi, -1.0)
        out = {"g1": g1, "g2": g2, "eps1": bw.eps1, "eps2": bw.eps2}
        for r, W in zip(("q", "k", "v", "o", "gate", "up", "down"), (Wq, Wk, Wv, Wo, Wg, Wu, Wd)):
            if quantize:
                clip = torch.sigmoid(self.clip[r]) if r in self.clip else None
                W = fake_quant_weight(W, p.block_size, p.symmetric, clip)
            out[r] = W
        return out

    def _pair(self, W, heads: int, logc, phi, sign: float):
        import torch

        hd = self.cfg["hd"]
        D = W.shape[0]
        c = torch.exp(sign * logc)
        cos, sin = torch.cos(phi), torch.sin(phi)
        Wr = W.view(D, heads, 2, hd // 2)
        a, b = Wr[:, :, 0, :], Wr[:, :, 1, :]
        a2 = c * (a * cos - b * sin)
        b2 = c * (a * sin + b * cos)
        return torch.stack([a2, b2], 2).reshape(D, heads * hd)

    # -- final numpy transforms for folding -------------------------------------------------------
    def numpy_transforms(self) -> dict:
        out = {}
        with _no_grad():
            if self.u_qkv is not None:
                out["qkv"] = np.exp(self.u_qkv.double().numpy())
            if self.u_gu is not None:
                out["gate_up"] = np.exp(self.u_gu.double().numpy())
            if self.u_down is not None:
                out["down"] = np.exp(self.u_down.double().numpy())
            A = self.vo_matrix()
            if A is not None:
                if self.vo_d is not None:  # recompute in float64 from the parameters
                    A = np.einsum("gi,ij->gij", self.vo_d.double().numpy(), np.eye(self.cfg["hd"])) + self.p.alpha * (
                        self.vo_mask().double().numpy() * self.vo_off.double().numpy()
                    )
                else:
                    A = A.double().numpy()
                out["vo"] = A
            if self.qk_logc is not None:
                out["qk"] = (np.exp(self.qk_logc.double().numpy()), self.qk_phi.double().numpy())
        return out


class _no_grad:
    def __enter__(self):
        import torch

        self._ctx = torch.no_grad()
        self._ctx.__enter__()

    def __exit__(self, *a):
        return self._ctx.__exit__(*a)


def smoothquant_init(bw: BlockWeights, cfg: dict, amax: dict, p: AffineParams) -> dict:
    """SmoothQuant scales s_j = max|X_j|^a / max|W_j,:|^(1−a) for every diagonal."""
    import torch

    a = p.smooth_alpha
    H, KV, hd = cfg["H"], cfg["KV"], cfg["hd"]
    rep = H // KV

    def scales(x_amax, w_amax):
        s = x_amax.clamp_min(1e-5).pow(a) / w_amax.clamp_min(1e-5).pow(1 - a)
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s)).clamp(1e-4, 1e4)
        return s

    out = {}
    if p.qkv:
        w = torch.cat([bw.q, bw.k, bw.v], 1).abs().amax(1)
        out["qkv"] = scales(amax["qkv"], w)
    if p.gate_up:
        w = torch.cat([bw.gate, bw.up], 1).abs().amax(1)
        out["gate_up"] = scales(amax["gate_up"], w)
    if p.down:
        out["down"] = scales(amax["down"], bw.down.abs().amax(1))
    if p.vo != "off":
        x = amax["o"].view(KV, rep, hd).amax(1)
        w = bw.o.abs().amax(1).view(KV, rep, hd).amax(1)
        out["vo"] = scales(x, w)
    return out


# =============================================================================================
# ONNX block taps (for the reconstruction check)
# =============================================================================================
def onnx_block_io(ctx, model: ir.Model, structure, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(residual in, residual out) of every block for one window ids [1, T], run in ORT."""
    import onnx

    from compiler.runtime import KVLayout, create_session, prefill_feeds, uses_custom_domain

    names = []
    for b in structure.blocks:
        if b.residual_in is None or b.mlp_residual_add is None:
            raise UserError(f"affine: block {b.index}'s residual stream was not recognized; re-export the model")
        names += [b.residual_in, node_by_name(model, b.mlp_residual_add).outputs[0].name]
    path = ctx.save_temp_model(model)
    proto = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for n in dict.fromkeys(names):
        if n not in have:
            vi = onnx.ValueInfoProto()
            vi.name = n
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            proto.graph.output.append(vi)
    sess = create_session(proto.SerializeToString(), ctx.threads, uses_custom_domain(proto), external_data_dir=path.parent.resolve())
    layout = KVLayout.from_session(sess)
    fetch = list(dict.fromkeys(names))
    outs = dict(zip(fetch, sess.run(fetch, prefill_feeds(layout, ids))))
    return [(outs[names[2 * i]], outs[names[2 * i + 1]]) for i in range(len(structure.blocks))]


# =============================================================================================
# learning one block
# =============================================================================================
class BlockLearner:
    """Learns the transforms of one block against the fp block (module doc, "Learning")."""

    def __init__(self, bw: BlockWeights, cfg: dict, p: AffineParams, rng: np.random.Generator, log=print):
        self.bw, self.cfg, self.p, self.rng, self.log = bw, cfg, p, rng, log
        self.fp = fp_weights(bw)
        self.tr: BlockTransform | None = None
        self.rolled_back = False
        self.enforced_rows = 0

    def activation_amax(self, x_fp) -> dict:
        import torch

        amax = {}
        with torch.no_grad():
            for i in range(0, len(x_fp), self.p.batch):
                taps: dict = {}
                block_forward(x_fp[i : i + self.p.batch], self.fp, self.cfg, 16, taps)
                for k, v in taps.items():
                    m = v.abs().amax((0, 1))
                    amax[k] = m if k not in amax else torch.maximum(amax[k], m)
        return amax

    def targets(self, x_fp):
        import torch

        with torch.no_grad():
            return torch.cat([block_forward(x_fp[i : i + self.p.batch], self.fp, self.cfg) for i in range(0, len(x_fp), self.p.batch)])

    def loss(self, xq, y):
        """(Per-token normalized) MSE of the transformed fake-quantized block on xq against y."""
        out = block_forward(xq, self.tr.weights(quantize=True), self.cfg, self.p.act_bits)
        err = (out - y).pow(2).mean(-1)  # [B, T]
        if self.p.loss == "relative":
            err = err / y.pow(2).mean(-1).clamp_min(1e-12)
        return err.mean()

    def eval_loss(self, xq, y, transform: BlockTransform | None = None) -> float:
        import torch

        saved = self.tr
        if transform is not None:
            self.tr = transform
        try:
            with torch.no_grad():
                tot = 0.0
                for i in range(0, len(xq), self.p.batch):
                    tot += float(self.loss(xq[i : i + self.p.batch], y[i : i + self.p.batch])) * len(xq[i : i + self.p.batch])
                return tot / len(xq)
        finally:
            self.tr = saved

    def identity_transform(self) -> BlockTransform:
        p = dataclasses.replace(self.p, qkv=False, gate_up=False, down=False, vo="off", qk=False)
        return BlockTransform(self.bw, self.cfg, p)

    def split(self, S: int) -> tuple[slice, slice]:
        """(training windows, held-out windows): the last round(holdout·S) windows (at least one
        when holdout > 0 and S ≥ 2) are held out; with no held-out window both are all of them."""
        h = 0
        if self.p.holdout > 0 and S >= 2:
            h = min(S - 1, max(1, round(self.p.holdout * S)))
        if h == 0:
            return slice(0, S), slice(0, S)
        return slice(0, S - h), slice(S - h, S)

    def learn(self, x_fp, x_q, y, advance=lambda n=1, info="": None) -> dict:
        """Learn on fp inputs x_fp (for the init statistics), quantized inputs x_q and targets y.

        Keep-best: the windows are split into training and held-out ones (`split`). The loss of
        the transformed, fake-quantized block on the held-out windows is evaluated for the
        initialization and after every epoch; the block ends with the transforms of the best of
        these (ties keep the earlier one, so the initialization wins a tie). Learning can
        therefore never return a block whose held-out loss is above its initialization's."""
        import torch

        p = self.p
        init = smoothquant_init(self.bw, self.cfg, self.activation_amax(x_fp), p) if p.init == "smoothquant" else None
        self.tr = BlockTransform(self.bw, self.cfg, p, init)
        # nothing is fitted without epochs: the choice init/identity then uses every window
        tr_sl, ho_sl = self.split(len(x_q)) if p.epochs else (slice(0, len(x_q)),) * 2
        xt, yt, xh, yh = x_q[tr_sl], y[tr_sl], x_q[ho_sl], y[ho_sl]
        loss_identity = self.eval_loss(xh, yh, self.identity_transform())
        if p.mask == "gradual":
            self.tr.band = 0
        loss_init = self.eval_loss(xh, yh)
        self._init_state = self.tr.state()
        self.heldout = [loss_init]  # held-out loss after epoch 0 (init), 1, 2, ...
        best = (loss_init, 0, self._init_state, self.tr.band)
        steps = 0
        if p.epochs == 0:
            return self._summary(loss_identity, loss_init, best, steps)
        groups = [{"params": self.tr.transform_params(), "lr": p.lr}]
        if self.tr.clip_params():
            groups.append({"params": self.tr.clip_params(), "lr": p.lwc_lr})
        opt = torch.optim.AdamW(groups, weight_decay=p.weight_decay)
        good = self.tr.state()
        S = len(xt)
        for epoch in range(1, p.epochs + 1):
            if p.mask == "gradual":
                self.tr.band = gradual_band(epoch, p.epochs, self.cfg["hd"])
            order = self.rng.permutation(S)
            for i in range(0, S, p.batch):
                idx = torch.as_tensor(order[i : i + p.batch])
                opt.zero_grad(set_to_none=True)
                loss = self.loss(xt[idx], yt[idx])
                if not torch.isfinite(loss):
                    self.tr.load_state(good)
                    self.rolled_back = True
                    self.log(f"non-finite loss at epoch {epoch}, step {steps}: rolled the block back to its last good transforms")
                    advance(0, info="rolled back")
                    # the last good transforms compete with the best so far on held-out data
                    h = self.eval_loss(xh, yh)
                    self.heldout.append(h)
                    if math.isfinite(h) and h < best[0]:
                        best = (h, epoch, self.tr.state(), self.tr.band)
                    return self._summary(loss_identity, loss_init, best, steps)
                loss.backward()
                opt.step()
                self.enforced_rows += self.tr.enforce()
                steps += 1
                if all(torch.isfinite(t).all() for t in self.tr.state().values()):
                    good = self.tr.state()
                advance(1, info=f"loss {float(loss.detach()):.4g}")
            h = self.eval_loss(xh, yh)
            self.heldout.append(h)
            if math.isfinite(h) and h < best[0]:
                best = (h, epoch, self.tr.state(), self.tr.band)
        return self._summary(loss_identity, loss_init, best, steps)

    def identity_state(self) -> dict:
        """The state whose transforms are all the identity (the initialization's clipping)."""
        state = {k: v.clone() for k, v in self._init_state.items()}
        for k in ("u_qkv", "u_gu", "u_down", "vo_off", "vo_u", "qk_logc", "qk_phi"):
            if k in state:
                state[k].zero_()
        if "vo_d" in state:
            state["vo_d"].fill_(1.0)
        return state

    def _summary(self, loss_identity, loss_init, best, steps) -> dict:
        loss_best, epoch_best, state, band = best
        if self.p.keep_identity and math.isfinite(loss_identity) and loss_identity < loss_best:
            # no transform at all beats every candidate (e.g. SmoothQuant scales that hurt)
            loss_best, epoch_best, state = loss_identity, -1, self.identity_state()
        self.tr.load_state(state)
        self.tr.band = band
        kept_init = epoch_best == 0
        kept = {0: "the initialization", -1: "the identity (no transform)"}.get(epoch_best, f"epoch {epoch_best}")
        if steps or epoch_best == -1:
            held = " → ".join(f"{h:.4g}" for h in self.heldout)
            self.log(f"held-out loss identity {loss_identity:.4g}, per epoch (0 = init): {held}; kept {kept}")
        return {
            "loss_identity": loss_identity,
            "loss_init": loss_init,
            "loss_final": loss_best,
            "heldout_per_epoch": list(self.heldout),
            "kept_epoch": epoch_best,
            "steps": steps,
            "kept_init": bool(kept_init and steps),
            "rolled_back": self.rolled_back,
            "dominance_rows_shrunk": self.enforced_rows,
        }

    def outputs(self, x_q):
        """Block outputs of the learned transformed fake-quantized block (next block's input)."""
        import torch

        with torch.no_grad():
            w = self.tr.weights(quantize=True)
            return torch.cat([block_forward(x_q[i : i + self.p.batch], w, self.cfg, self.p.act_bits) for i in range(0, len(x_q), self.p.batch)])


# =============================================================================================
# the pass
# =============================================================================================
def fold_block(model: ir.Model, block, structure, tf: dict, log=print) -> list[str]:
    """Fold one block's transforms (numpy) into the graph; returns what was folded. Transforms
    that fail the invertibility checks are skipped (identity) and logged."""
    done = []

    def ok_diag(s):
        return s is not None and np.all(np.isfinite(s)) and np.all(s > 0)

    if "qkv" in tf:
        if ok_diag(tf["qkv"]):
            fold_norm_diag(model, block.input_norm, [block.q, block.k, block.v], tf["qkv"])
            done.append("qkv")
        else:
            log(f"block {block.index}: q/k/v scales not finite/positive; left as identity")
    if "gate_up" in tf:
        if ok_diag(tf["gate_up"]):
            fold_norm_diag(model, block.post_attention_norm, [block.gate, block.up], tf["gate_up"])
            done.append("gate_up")
        else:
            log(f"block {block.index}: gate/up scales not finite/positive; left as identity")
    if "down" in tf:
        if ok_diag(tf["down"]):
            fold_up_down(model, block, tf["down"])
            done.append("down")
        else:
            log(f"block {block.index}: down scales not finite/positive; left as identity")
    if "vo" in tf:
        A = tf["vo"]
        try:
            if not diagonally_dominant(A):
                raise ValueError("not strictly diagonally dominant")
            safe_inverse(A)
            fold_vo(model, block, structure, A)
            done.append("vo")
        except ValueError as e:
            log(f"block {block.index}: v→o transform rejected ({e}); left as identity")
    if "qk" in tf:
        c, phi = tf["qk"]
        if np.all(np.isfinite(c)) and np.all(c > 0) and np.all(np.isfinite(phi)):
            fold_qk(model, block, structure, c, phi)
            done.append("qk")
        else:
            log(f"block {block.index}: q/k pair transform not finite; left as identity")
    return done


@register_pass
class AffinePass(CompilerPass):
    name = "affine"
    Params = AffineParams
    description = "AffineQuant: learned affine transforms (gradual mask) folded exactly into the weights"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import torch

        p: AffineParams = self.params
        s = self.ctx.structure(model, refresh=True)
        require_dense(s, "affine")
        if s.embedding is None:
            raise UserError("affine: the embedding was not recognized; re-export the model")
        for b in s.blocks:
            _check_unshared(b)
            _check_attention(model, b)
        H, KV, hd, _ = _heads(s)
        if hd % 2:
            raise UserError(f"affine: head_dim {hd} is odd; RoPE needs pairs")

        windows = self.ctx.calibration_windows()
        if p.seq_len > windows.shape[1]:
            raise UserError(
                f"affine: seq_len {p.seq_len} exceeds the calibration windows' {windows.shape[1]} tokens; "
                "lower affine seq_len or raise [calibration] seq_len"
            )
        if p.samples > windows.shape[0]:
            raise UserError(
                f"affine: samples {p.samples} exceeds the {windows.shape[0]} calibration windows; "
                "lower affine samples or raise [calibration] windows"
            )
        ids = windows[: p.samples, : p.seq_len]
        threads_before = torch.get_num_threads()
        if self.ctx.threads:
            torch.set_num_threads(int(self.ctx.threads))
        try:
            return self._learn_and_fold(model, s, ids, cfg_dims=(H, KV, hd))
        finally:
            torch.set_num_threads(threads_before)

    def _learn_and_fold(self, model: ir.Model, s, ids: np.ndarray, cfg_dims) -> ir.passes.PassResult:
        import torch

        p: AffineParams = self.params
        H, KV, hd = cfg_dims
        cos, sin = rope_tables(model, s, p.seq_len)
        cfg = {"H": H, "KV": KV, "hd": hd, "cos": cos, "sin": sin}

        # the torch reconstruction must equal the ONNX graph, block by block
        check = onnx_block_io(self.ctx, model, s, ids[:1])
        worst = 0.0
        for b, (xin, yout) in zip(s.blocks, check):
            bw = BlockWeights.from_graph(model, b)
            with torch.no_grad():
                y = block_forward(torch.from_numpy(np.asarray(xin, np.float32)), fp_weights(bw), cfg).numpy()
            err = float(np.abs(y - yout).max()) / max(1.0, float(np.abs(yout).max()))
            worst = max(worst, err)
            if err > p.check_tolerance:
                raise UserError(
                    f"affine: the torch reconstruction of block {b.index} differs from the ONNX graph by "
                    f"{err:.2e} (relative) > {p.check_tolerance:g}; this graph is not a plain Llama block"
                )
        self.ctx.log(f"torch reconstruction matches the ONNX blocks (max relative error {worst:.1e})")

        emb = get_weight(model, s.embedding).astype(np.float32)
        x_fp = torch.from_numpy(emb[ids])  # [S, T, D]
        xin0 = np.asarray(check[0][0], np.float32)
        if np.abs(x_fp[:1].numpy() - xin0).max() > p.check_tolerance * max(1.0, float(np.abs(xin0).max())):
            raise UserError("affine: the embedding output differs from the ONNX graph's first block input; this graph is not a plain Llama")
        x_q = x_fp.clone()
        blocks_info = []
        for b in s.blocks:
            t0 = time.perf_counter()
            bw = BlockWeights.from_graph(model, b)
            learner = BlockLearner(bw, cfg, p, self.ctx.rng("affine", b.index), log=self.ctx.log)
            y = learner.targets(x_fp)
            n_train = learner.split(len(x_q))[0].stop
            with self.ctx.progress(f"affine block {b.index}", total=p.epochs * -(-n_train // p.batch)) as advance:
                info = learner.learn(x_fp, x_q, y, advance)
            if learner.rolled_back:
                self.ctx.log(f"block {b.index}: rolled back to its last good transforms")
            x_q = learner.outputs(x_q)
            x_fp = y
            folded = fold_block(model, b, s, learner.tr.numpy_transforms(), log=self.ctx.log)
            self.ctx.invalidate_stats([b.q.input, b.k.input, b.v.input, b.o.input, b.gate.input, b.up.input, b.down.input])
            info.update(block=b.index, folded=folded)  # no timings in records: same seed, same files
            blocks_info.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()})
            self.ctx.log(
                f"block {b.index}: held-out loss identity {info['loss_identity']:.4g} → init {info['loss_init']:.4g} → "
                f"kept {info['loss_final']:.4g} (epoch {info['kept_epoch']}) ({time.perf_counter() - t0:.1f} s)"
            )
        lm_info = None
        if p.lm_head and p.act_bits < 16 and s.final_norm is not None and s.lm_head is not None and s.lm_head.kind == "dense":
            lm_info = self._smooth_lm_head(model, s, x_fp)
            self.ctx.invalidate_stats([s.lm_head.input])
        self.ctx.invalidate_structure()
        self.ctx.record(
            lm_head=lm_info,
            act_bits=p.act_bits,
            check_max_relative_error=worst,
            blocks=blocks_info,
        )
        return ir.passes.PassResult(model, True)

    def _smooth_lm_head(self, model: ir.Model, s, x_fp, tokens: int = 256) -> dict:
        """final norm → lm_head: diag(s) with SmoothQuant exponent a ∈ {0.25, 0.5, 0.75} chosen to
        minimize the fake-quantized lm_head's output error on calibration tokens; kept only if
        it beats no transform (so it never makes that error worse). Exact fold: g_f ← g_f/s,
        W_lm ← diag(s)·W_lm."""
        import torch

        p = self.params
        g = torch.from_numpy(get_weight(model, s.final_norm.weight).astype(np.float32))
        W = torch.from_numpy(get_weight(model, s.lm_head.weight).astype(np.float32))
        flat = x_fp.reshape(-1, x_fp.shape[-1])
        pick = torch.from_numpy(np.sort(self.ctx.rng("affine", "lm_head").choice(len(flat), min(tokens, len(flat)), replace=False)))
        with torch.no_grad():
            X = _rms(flat[pick], float(s.final_norm.epsilon)) * g
            ref = X @ W
            x_amax = _rms(flat, float(s.final_norm.epsilon)).mul(g).abs().amax(0)
            w_amax = W.abs().amax(1)

            def err(scale):
                Wq = fake_quant_weight(scale[:, None] * W, p.block_size, p.symmetric)
                return float((fake_quant_act(X / scale, p.act_bits) @ Wq - ref).pow(2).mean())

            best_a, best_s, best_e = None, torch.ones_like(g), err(torch.ones_like(g))
            base = best_e
            for a in (0.25, 0.5, 0.75):
                sc = (x_amax.clamp_min(1e-5).pow(a) / w_amax.clamp_min(1e-5).pow(1 - a)).clamp(1e-4, 1e4)
                e = err(sc)
                if math.isfinite(e) and e < best_e:
                    best_a, best_s, best_e = a, sc, e
        if best_a is not None:
            fold_norm_diag(model, s.final_norm, [s.lm_head], best_s.double().numpy())
        self.ctx.log(f"lm_head: output error {base:.4g} → {best_e:.4g} (SmoothQuant a = {best_a})")
        return {"smooth_alpha": best_a, "error_identity": round(base, 6), "error": round(best_e, 6)}


__all__ = [
    "AffineParams",
    "AffinePass",
    "BlockLearner",
    "BlockTransform",
    "BlockWeights",
    "block_forward",
    "diagonally_dominant",
    "enforce_dominance",
    "fake_quant_act",
    "fake_quant_weight",
    "fold_norm_diag",
    "fold_qk",
    "fold_up_down",
    "fold_vo",
    "gradual_band",
    "safe_inverse",
]
