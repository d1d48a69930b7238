"""SVD-LLM: truncation-aware whitened low-rank pairs, closed-form refit, budgeted ranks.

Orientation (ONNX): a linear layer computes Y = X·W with X [T, K] (tokens × input channels) and
W [K, N]. The pass replaces  MatMul(X, W)  by  MatMul(MatMul(X, W₁), W₂)  with W₁ [K, k] and
W₂ [k, N]; the pair stores k(K+N) numbers instead of KN and saves parameters iff k < KN/(K+N).

Whitened truncation (Wang et al., ICLR 2025, Theorem 3.2 in our orientation)
----------------------------------------------------------------------------
Let G = XᵀX (float64, from calibration) = S·Sᵀ with S lower triangular (Cholesky). For any W'

    ‖X·W − X·W'‖_F² = tr((W−W')ᵀ G (W−W')) = ‖Sᵀ(W − W')‖_F².                            (1)

Take the SVD SᵀW = U·Σ·Vᵀ and keep the k largest singular values:

    W₁ = S⁻ᵀ·U_k·Σ_k^½   (K×k),      W₂ = Σ_k^½·V_kᵀ   (k×N),

so Sᵀ·W₁W₂ = U_kΣ_kV_kᵀ, the best rank-k approximation of SᵀW (Eckart–Young). By (1):

    THEOREM  ‖X·W − X·W₁W₂‖_F² = ‖SᵀW − U_kΣ_kV_kᵀ‖_F² = Σ_{i>k} σ_i²,

every discarded singular value costs exactly its square in output error, and no rank-k matrix
does better on this calibration set (S is invertible, so W' ↦ SᵀW' is a bijection of rank-k
matrices). Plain SVD (the ablation, `whiten = false`) is the same with S = I: it minimizes
‖W − W'‖ and says nothing about the output. If G is not positive definite (dead channels,
fewer tokens than K, rounding) Cholesky fails; we shift G by (−λ_min + ε·mean(diag G))·I, which
makes it PD, and log the shift (SVD-LLM's released code fails here on 13B models).

Closed-form update: reduced-rank regression against the original outputs
-------------------------------------------------------------------------
Compressing layer after layer shifts the inputs: layer ℓ sees X̃ (produced by the already
compressed upstream model) instead of X. The target stays the original output T = X·W (for the
two layers that write the residual stream, o and down, optionally T = X·W + R − R̃ with R / R̃
the residual stream of the original / compressed model, so the layer also cancels the upstream
error already in the residual; `residual_target`). Minimize over rank-k W':

    ‖X̃·W' − T‖_F².

With G̃ = X̃ᵀX̃ = S̃S̃ᵀ and B = X̃ᵀT, the unconstrained least-squares
solution is W* = G̃⁻¹B, and the residual T − X̃W* is orthogonal to the columns of X̃, so

    ‖X̃W' − T‖² = ‖X̃W* − T‖² + ‖S̃ᵀ(W' − W*)‖²,

i.e. the best rank-k W' is the whitened truncation (metric S̃) of W*: SVD of S̃ᵀW* = S̃⁻¹B, then
W₁ = S̃⁻ᵀU_kΣ_k^½, W₂ = Σ_k^½V_kᵀ as above (`refit = "both"`; exact optimum). The paper's
variant keeps W₂ and solves least squares for W₁ alone (`refit = "w1"`):
W₁ = G̃⁻¹·B·W₂ᵀ(W₂W₂ᵀ)⁻¹. Without the shift (X̃ = X, δ = 0, residual_target off) both reduce to
the whitened truncation of W.

Regularization: directions of the input space that calibration barely excites are fitted from
almost no data. We therefore minimize ‖X̃W' − T‖² + δ‖W' − W‖² (a ridge toward the original weight,
not toward zero), which is the same problem with statistics G̃ + δI and B + δW; δ = damp·mean(diag G̃)
plus whatever positive-definite repair G̃ needed. Where X̃ = X exactly, W* = (G + δI)⁻¹(G + δI)W = W
for any δ, so full rank stays exact even when XᵀX is singular. The refit is a K×N regression
from a few ten thousand tokens and overfits without it (layers.5.down of SmolLM2 refit on 16×512
tokens: relative error 0.28 on them but 0.67 on held-out text, worse than no update, 0.60); damp = 0.05 took svd-20 from
3.11× to 2.46× the fp32 perplexity (0.15: 2.48×). The ridge does not replace data: svd-20 with
64 instead of 32 calibration windows went from 91.2 to 86.6 (damp 0.05; the recipes now use 48,
the most the svd-20 compile budget allows, or 64 for svd-10).

Token weights (`token_weights = "residual"`): the error the next RMSNorm sees
----------------------------------------------------------------------------
The objectives above weight every calibration token alike. SmolLM2-135M has massive activations:
from block 2 on, the residual stream of each window's first token is ~100× the others' in norm
(after block 19 the 32 first tokens hold 96 % of the residual energy of 16k tokens; block 1's down
input puts 64 % of its energy on 1 % of the tokens). Unweighted, the o/down refits (and their
residual target R − R̃, whose energy is that of those tokens) spend the rank on a few tokens. But
a layer that adds e_t to the residual r_t reaches every later layer through an RMSNorm, i.e. as
e_t / rms(r_t): the first-order perturbation of the normalized stream is

    Σ_t ‖e_t‖² / rms(r_t)²  =  ‖D^½·(X̃·W' − T)‖_F²,     D = diag(w_t),  w_t ∝ 1 / mean_c r_tc²,

with r the original model's residual after the layer's Add (w normalized to mean 1; a floor at
1e-3 of the median keeps a zero residual from taking all the weight). Everything above holds
with D inserted: G̃ = X̃ᵀDX̃, B = X̃ᵀD·T, ν = Σ_t w_t Δ_t²/12, the theorem in the D-weighted norm
(the tests check both). o uses the residual after the attention Add; gate/up/down the residual
after the MLP Add (the MLP is position-wise, so their error on token t only reaches token t).
q/k/v stay unweighted: through attention their error on one token reaches all later tokens,
and their inputs are already normalized (a first token holds ~0.2 % of their energy). The
budgeted ranks use the same weighted statistics (no longer one token's rank-one massive output;
that did not rescue `budgeted`, see "Rank allocation"). Measured (uniform ranks, damp 0.05,
residual target): svd-20 93.7 → 91.2 held-out perplexity, at the same compile cost (svd-10 with
all three 74.0, svd-40 137.8, vs 104.0 / 221.0 with the unregularized refit alone).
The trade-off: a massive token then counts as one token, so its own relative error is not
protected beyond that (tests/test_svd.py builds the case); the first tokens are attention sinks,
which argues for weighting them by the attention they receive, not done here.

Downstream output metrics (`output_metric = ["q", "k", "v", "gate", "up"]`)
-------------------------------------------------------------------------
The refit of a layer whose output is not added to the residual stream measures its error as
‖X̃W' − T‖² in the output's own coordinates, but the next operation weighs those coordinates very
unequally. With a positive definite output metric M (N×N, or diagonal) the objective becomes

    tr((X̃W' − T)·M·(X̃W' − T)ᵀ) + δ·tr((W' − W)·M·(W' − W)ᵀ),

which is the plain problem for W'' = W'·M^½ and target T·M^½ (M^½ is invertible, so it maps rank-k
matrices onto rank-k matrices): B'' = (B + δW)·M^½, the same whitened truncation, then W₂ = W₂''·M^−½.
Every statement above (optimality, theorem, full rank exact) holds in the M norm; the tests check
the optimum and the theorem for a diagonal and a full M. Each M is a first-order model of what the
error meets next, built from the original weights and this stage's statistics, normalized to mean
(diagonal) 1 with a floor of 1e-3 (a channel the model says is irrelevant is still fitted a little):

  q, k   the score q_h·k_g (g = the KV head of query head h, after RoPE): Δq costs Σ_keys (Δq·k)²,
         i.e. the metric E[k kᵀ] of the keys it meets; RoPE rotates dims d and d + head_dim/2
         together by position-dependent angles, which averages each pair's energy over the window
         and cancels the cross terms, so M_q = diag of the key energy of head g per RoPE pair
         (e_k = diag(W_kᵀG̃W_k) paired), and M_k = Σ_{h→g} paired query energy. The massive
         low-frequency q/k dims of SmolLM2 thus get the rank; an error where the partner is ~0
         costs nothing. (Uncentered energy: a constant score shift is softmax-invariant, so this
         overweights the keys' mean; not refined here.)
  v      ΔV_g reaches o's output as Σ_{h→g} A_h·ΔV_g·W_o[h] (A_h the attention of head h, W_o[h] its
         head_dim rows of W_o): M_v = blockdiag_g Σ_{h→g} W_o[h]·W_o[h]ᵀ (the heads' errors taken as
         adding incoherently).
  gate,  h = silu(g) ⊙ u, out = h·W_d: Δu_c reaches out as silu(g_c)·Δu_c·W_d[c], Δg_c as
  up     silu′(g_c)·u_c·Δg_c·W_d[c]; diagonals M_up = E[silu(g)²]·‖W_d[c]‖², M_gate =
         E[(silu′(g)·u)²]·‖W_d[c]‖² (token-weighted means over one calibration batch; the full
         metric (W_dW_dᵀ) ⊙ E[s sᵀ] would need a 1536² eigendecomposition per layer).

o and down write the residual stream and keep their token weights (the next RMSNorm is their
"metric"). Measured (svd-20 settings, 32 windows): q/k/v 91.2 → 89.3, q/k/v/gate/up → 86.4;
with 48 windows 84.0 (1.96× fp32; 64 windows without metrics: 86.6). svd-10 with 64 windows and
all five metrics: 74.0 → 69.2.

Quantized inputs (`act_bits` < 16): svd-20-w4a8 went from 894× to 3.77× the fp32 perplexity
-------------------------------------------------------------------------------------------
(3.54× with damp = 0.05 and the residual target as well; the recipe's notes have the figures).
The refit is a least-squares regression on X̃, and X̃ can be extremely ill-conditioned: in
SmolLM2-135M the inputs of block 1 have channels with variance ~1e-6 (median ~6e-3; X̃ᵀX̃ spans
eigenvalues 4e-11 … 1). Unregularized, the regression uses those nearly constant directions to
"explain" the upstream error X − X̃ on the calibration tokens and puts weights of norm 200–1600
on them (dense rows: ~1). In fp32 that costs little, but the int4 pass then quantizes every token
of X̃ to int8 with one step Δ_t = max_k|x̃_tk|/127 for all channels, i.e. rounding noise of
variance ~8e-5 on channels whose own variance is 1e-6, and the huge rows multiply that noise:
the layer's output error under A8 went from 0.02 to 0.68 (relative), and GPTQ of such a W₁ (block
scales set by one huge row) alone cost 0.16 — measured on layers.1.q/gate, the collapse.

The fix is to fit what will run. With the deployed input X̂ = X̃ + E, E the rounding error
(uniform in [−Δ_t/2, Δ_t/2], mean 0, independent across channels and of X̃ to first order),

    E‖X̂·W' − T‖² = ‖X̃·W' − T‖² + ν·‖W'‖_F²,       ν = Σ_t Δ_t²/12   (`activation_noise_energy`),

a ridge toward **zero** with a weight measured on the calibration tokens (no tuning): statistics
G̃ + νI and B unchanged. It is invisible where X̃ is well excited (ν ≪ the eigenvalues: layers.5.q's
fp32 error moved by < 1e-4) and caps exactly the directions the noise would blow up; the exact
fit of the clean input is the ν → 0 limit. Set `act_bits` to the int4 pass's act_bits. Without
the update the same applies to the truncation (G + νI, B = G·W). The rank-space intermediate
X̂·W₁ is quantized too, but it is well scaled (the whitened input times U_kΣ_k^½): int8 on it costs
~3e-5 relative, so the Σ split stays balanced (and W₂'s GPTQ, whose statistics the int4 pass
collects on the already quantized W₁'s output, costs ~0.005). The noise model is an upper bound
where it is not exact: at 4 bits many small values round to 0 (error −x, smaller than Δ²/12), and
equal channels round alike (their difference has no noise); both only make the ridge cautious.

The statistics this needs, G̃ = X̃ᵀX̃ and the cross term X̃ᵀX (B = X̃ᵀX·W, plus X̃ᵀ(R − R̃) for the
residual target), pair every calibration token's input in the compressed model with the same
token's input in the original model. We get them exactly and with bounded memory by running the
two models side by side one decoder block at a time (`BlockRunner`): the residual stream entering
the current block is kept for every calibration token for both models ([tokens, hidden] float32
each, 2 × 38 MB for SmolLM2 at 32×512), the block's subgraph (extracted from the *current*
graph, so it includes every layer already compressed) is run in ONNX Runtime on those states,
and the sums are accumulated batch by batch (float32 products of ≤ 2048 tokens, float64 sums).
Inside a block the layers are compressed in dataflow order (q/k/v, then o, then gate/up, then
down); before each stage the current graph is run from the values already computed for this block
(the block input, earlier stages' inputs, the mid-block residual — each reused only if it does not
depend on a layer still to be rewritten), so every layer's X̃ comes from a graph in which
everything upstream, including earlier layers of the same block, is already compressed, and the
compressed block costs one block forward in total. Memory: the block's tapped activations for all
calibration tokens, original and compressed (≈ 0.5 GB for SmolLM2 at 32×512), plus O(K²) sums.
Cost: about one forward of the original and one of the compressed decoder over the calibration
set, plus the Gram products and one SVD per layer. The pass's last log line splits it (svd-20,
32 windows, shared machine): block forwards ~180 s, statistics products ~155 s (both linear in the
windows), fits ~100 s (fixed). Hence: Gram matrices as (D^½X̃)ᵀ(D^½X̃) (BLAS syrk, half a GEMM),
down's X̃ᵀ(X·W) and X̃ᵀ(R − R̃) as one product X̃ᵀ(X·W + R − R̃), one Cholesky per stage, the
leading singular triplets from the eigendecomposition of the smaller Gram matrix of S̃⁻¹B
(`_svd_top`, ~2.5× cheaper than the SVD; SVD fallback when σ_k < 1e-6·σ₁) and the error
diagnostic in float32.

Rank allocation
---------------
`uniform` (the paper): every selected layer gets k = ⌊(1−r)·K·N/(K+N)⌋ (at least min_rank); a layer
where that pair would not save parameters stays dense. `budgeted`: the same total number of
parameters removed (≥ the uniform allocation's saving), spent where it costs least. The cost of
rank k in layer ℓ is its normalized truncation loss Σ_{i>k} σ_i² / Σ_i σ_i² (the relative output
error of the layer, so layers of different output scale compare), measured on the original model's
statistics (the first `budget_windows` calibration windows: the ranks need the spectra's shape,
not their last digit). Choosing one option per layer (dense, or a rank that saves parameters) is
a multiple-choice knapsack; we solve its Lagrangian relaxation exactly (each layer minimizes
loss − λ·saving, bisection on λ for the smallest λ meeting the budget), hand the overshoot back
greedily (largest loss reduction first) while the budget still holds, and finish with pairwise
one-rank swaps between layers that lower the loss at the same budget (the relaxation's gap).

Which layers pay (measured on SmolLM2-135M, held-out perplexity, fp32 42.76): `budgeted` loses to
`uniform` — svd-20 with damp 0.05: 113.2 vs 105.0 (the knapsack gave layers.11.down rank 1: its
relative loss was one massive token's rank-one output); with the token-weighted statistics below
and the residual target it collapses (2.6·10⁵ vs 91.2: v, up and down almost all dense, layers.0.q/o
cut to rank 32/17). Summing per-layer relative losses treats every layer's error as equally
harmful, which the sequential refit (it repairs upstream error) and attention sinks make false,
and the knapsack then drives the allocation to extremes. A structural argument says square layers
are the least efficient to factorize (to remove a fraction r a pair keeps (1−r)/2 of a square
layer's rank but (1−r)·0.73 of gate/up/down's), yet spending the whole svd-20 budget on the MLP
(`include` gate/up/down, ratio 0.2667, attention dense) measured 97.6 vs 93.7 uniform on all seven
linears: an evenly spread truncation, each layer refit against the compressed upstream, beats
concentrating it. A bounded knapsack (every rank within ±25 % of the uniform rank, no layer dense;
tried with the svd-20 settings below, 48 windows, output metrics) still lost: 87.8 vs 84.0 uniform
(it cut q/o/gate to 0.75× and gave up/down 1.1–1.25×; truncation loss 4.36 vs 6.12 by its own
measure). `uniform` is therefore what the recipes use; the bounded variant was not kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from passes.base import CompilerPass, register_pass

# ---------------------------------------------------------------------------------------------
# linear algebra (float64; LAPACK calls through torch, whose CPU LAPACK is several times faster
# than numpy's bundled one here, e.g. SVD of 576×1536: 0.5 s vs 8 s of CPU)


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


@contextlib.contextmanager
def _lapack():
    """torch with one thread for the call: these factorizations are at most 1536², and torch's
    OpenMP team costs far more than it gains at that size when the cores are shared (measured
    30× slower for small SVDs). The caller's thread count is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


def _cholesky(G: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor, or None when G is not (numerically) positive definite."""
    with _lapack() as torch:
        L, info = torch.linalg.cholesky_ex(_t(G))
    return None if int(info) != 0 else L.numpy()


def _svd(M: np.ndarray):
    with _lapack() as torch:
        U, s, Vt = torch.linalg.svd(_t(M), full_matrices=False)
    return U.numpy(), s.numpy(), Vt.numpy()


def _svd_top(M: np.ndarray, k: int, min_ratio: float = 1e-6):
    """The k leading singular triplets of M (U[:, :k], all σ, Vt[:k]) through the eigendecomposition
    of the smaller Gram matrix MᵀM or MMᵀ: ~3× less CPU than an SVD of a 1536×576 matrix. Squaring
    costs precision ~ε·σ₁²/σ_i² on σ_i, so when σ_k < min_ratio·σ₁ this falls back to the SVD.
    The singular vectors of the smaller side come from the eigenvectors, the other side's as
    M·v/σ (orthonormal to the same precision)."""
    K, N = M.shape
    with _lapack() as torch:
        A = _t(M)
        lam, V = torch.linalg.eigh(A.T @ A if K >= N else A @ A.T)
        lam, V = lam.flip(0).clamp(min=0.0), V.flip(1)
        sigma = lam.sqrt()
        if k > len(sigma) or not float(sigma[k - 1]) > min_ratio * float(sigma[0]):
            U, s, Vt = torch.linalg.svd(A, full_matrices=False)
            return U[:, :k].numpy(), s.numpy(), Vt[:k].numpy()
        Vk = V[:, :k]
        if K >= N:  # V: right singular vectors
            return (A @ Vk / sigma[:k]).numpy(), sigma.numpy(), Vk.T.numpy()
        return Vk.numpy(), sigma.numpy(), ((Vk.T @ A) / sigma[:k, None]).numpy()


def _svdvals(M: np.ndarray) -> np.ndarray:
    with _lapack() as torch:
        return torch.linalg.svdvals(_t(M)).numpy()


def _solve_triangular(L: np.ndarray, B: np.ndarray, upper: bool) -> np.ndarray:
    with _lapack() as torch:
        return torch.linalg.solve_triangular(_t(L), _t(B), upper=upper).numpy()


def _smallest_eigenvalue(G: np.ndarray) -> float:
    with _lapack() as torch:
        return float(torch.linalg.eigvalsh(_t(G))[0])


@dataclass
class Whitening:
    """S with G + shift·I = S·Sᵀ (S lower triangular); shift = 0 when G was positive definite."""

    S: np.ndarray
    shift: float


def whiten_cholesky(
    gram: np.ndarray,
    eps: float = 1e-6,
    damp: float = 0.0,
    log: Callable[[str], None] | None = None,
    name: str = "",
    noise: float = 0.0,
) -> Whitening:
    """Cholesky factor of the Gram matrix XᵀX, shifted to positive definite if needed.

    `damp` adds damp·mean(diag) to the diagonal up front (a ridge term, not a repair; not logged).
    `noise` adds a fixed amount to the diagonal as well: the energy of an input noise that is
    independent of X (activation quantization, module docstring). It is not part of the returned
    `shift` (that one is the ridge *toward W*; the noise term is a ridge toward 0).
    If Cholesky still fails, shift by the smallest eigenvalue plus eps·mean(diag) (ε grows ×10 if
    rounding still defeats it) and report the shift through `log`.
    """
    G = np.asarray(gram, np.float64)
    G = (G + G.T) * 0.5
    scale = float(np.mean(np.diag(G)))
    if not np.isfinite(scale) or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"statistics of {name or 'a layer'} are not finite")
    if scale <= 0.0:
        scale = 1.0  # an all-zero input: any PD shift works, keep it O(1)
    shift = damp * scale if damp > 0 else 0.0
    if shift or noise:
        G = G + (shift + noise) * np.eye(len(G))
    S = _cholesky(G)
    if S is not None:
        return Whitening(S, shift)
    lam_min = _smallest_eigenvalue(G)
    extra_eps = eps
    for _ in range(8):
        extra = max(-lam_min, 0.0) + extra_eps * scale
        S = _cholesky(G + extra * np.eye(len(G)))
        if S is None:
            extra_eps *= 10.0
            continue
        if log is not None:
            log(
                f"{name or 'layer'}: XᵀX not positive definite (smallest eigenvalue {lam_min:.3g}); "
                f"shifted the diagonal by {extra:.3g} (= -λ_min + {extra_eps:g}·mean(diag))"
            )
        return Whitening(S, shift + extra)
    raise ValueError(f"cannot make the Gram matrix of {name or 'a layer'} positive definite")


@dataclass
class LowRankFactors:
    """W ≈ W1·W2 with W1 [K, k], W2 [k, N]; `sigma` the full spectrum of the fitted matrix."""

    W1: np.ndarray
    W2: np.ndarray
    sigma: np.ndarray  # all singular values of SᵀW (whitened) or W (plain), descending

    @property
    def rank(self) -> int:
        return self.W1.shape[1]

    @property
    def discarded_energy(self) -> float:
        """Σ of the discarded σ²: the calibration output error of the truncation (theorem)."""
        return float(np.sum(self.sigma[self.rank :] ** 2))


def _solve_upper(St: np.ndarray, B: np.ndarray) -> np.ndarray:
    """S⁻ᵀ·B for S lower triangular (St = Sᵀ upper triangular)."""
    return _solve_triangular(St, B, upper=True)


def _factors_from_svd(U, sigma, Vt, k, St: np.ndarray | None) -> LowRankFactors:
    root = np.sqrt(sigma[:k])
    left = U[:, :k] * root
    W1 = left if St is None else _solve_upper(St, left)
    W2 = root[:, None] * Vt[:k]
    return LowRankFactors(W1, W2, sigma)


def truncate_whitened(W: np.ndarray, S: np.ndarray | None, rank: int) -> LowRankFactors:
    """Rank-`rank` pair minimizing ‖X·W − X·W₁W₂‖ where XᵀX = S·Sᵀ (S = None: plain SVD of W)."""
    W = np.asarray(W, np.float64)
    k = _check_rank(rank, *W.shape)
    if S is None:
        U, sigma, Vt = _svd(W)
        return _factors_from_svd(U, sigma, Vt, k, None)
    St = np.asarray(S, np.float64).T
    U, sigma, Vt = _svd(St @ W)
    return _factors_from_svd(U, sigma, Vt, k, St)


def whitened_spectrum(W: np.ndarray, S: np.ndarray | None) -> np.ndarray:
    """Singular values of SᵀW (or of W when S is None), descending."""
    W = np.asarray(W, np.float64)
    M = W if S is None else np.asarray(S, np.float64).T @ W
    return _svdvals(M)


def reduced_rank_fit(S_in: np.ndarray, B: np.ndarray, rank: int, out_metric: np.ndarray | None = None) -> LowRankFactors:
    """argmin over rank-k W' of ‖X̃·W' − T‖_F², given X̃ᵀX̃ = S̃S̃ᵀ (S_in) and B = X̃ᵀT.

    W* = (S̃S̃ᵀ)⁻¹B is the unconstrained solution and S̃ᵀW* = S̃⁻¹B; truncating its SVD in the S̃
    metric is optimal (see the module docstring). `sigma` is the spectrum of S̃⁻¹B.

    `out_metric` (M: a positive vector, read as diag(M), or an N×N positive definite matrix)
    measures the error in the output metric instead: argmin tr((X̃W' − T)·M·(X̃W' − T)ᵀ). With R = M^½
    that is the plain problem for W'' = W'R and target TR (B'' = B·R; R is invertible, so rank k
    is preserved both ways): fit, then W₂ = W₂''·R⁻¹ ("Downstream output metrics").
    """
    S_in = np.asarray(S_in, np.float64)
    B = np.asarray(B, np.float64)
    k = _check_rank(rank, *B.shape)
    R = Rinv = None
    if out_metric is not None:
        R, Rinv = metric_roots(out_metric, B.shape[1])
        B = B * R[None, :] if R.ndim == 1 else B @ R
    M = _solve_triangular(S_in, B, upper=False)  # S̃⁻¹B = S̃ᵀW*
    U, sigma, Vt = _svd_top(M, k)
    f = _factors_from_svd(U, sigma, Vt, k, S_in.T)
    if Rinv is not None:
        f.W2 = f.W2 * Rinv[None, :] if Rinv.ndim == 1 else f.W2 @ Rinv
    return f


def metric_roots(metric: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray]:
    """(M^½, M^−½) of an output metric: a positive vector (diagonal; returned as vectors) or a
    symmetric positive definite N×N matrix (symmetric roots through its eigendecomposition)."""
    m = np.asarray(metric, np.float64)
    if m.ndim == 1:
        if m.shape != (N,) or not np.all(np.isfinite(m)) or np.any(m <= 0):
            raise ValueError(f"a diagonal output metric must be {N} positive numbers")
        r = np.sqrt(m)
        return r, 1.0 / r
    if m.shape != (N, N) or not np.all(np.isfinite(m)):
        raise ValueError(f"an output metric matrix must be finite and {N}×{N}")
    with _lapack() as torch:
        lam, V = torch.linalg.eigh(_t((m + m.T) * 0.5))
    lam, V = lam.numpy(), V.numpy()
    if lam[0] <= 0:
        raise ValueError("an output metric matrix must be positive definite")
    return (V * np.sqrt(lam)) @ V.T, (V / np.sqrt(lam)) @ V.T


def _floor_and_normalize(m: np.ndarray, floor: float) -> np.ndarray:
    """Diagonal metric → mean 1 with every entry ≥ floor; a matrix → mean diagonal 1, eigenvalues
    ≥ floor (added to the diagonal)."""
    m = np.asarray(m, np.float64)
    if m.ndim == 1:
        scale = float(np.mean(m))
        m = m / scale if scale > 0 else np.ones_like(m)
        return np.maximum(m, floor)
    scale = float(np.mean(np.diag(m)))
    m = m / scale if scale > 0 else np.eye(len(m))
    return (m + m.T) * 0.5 + floor * np.eye(len(m))


def attention_output_metrics(Wq: np.ndarray, Wk: np.ndarray, Wo: np.ndarray, G: np.ndarray, head_dim: int,
                             num_kv_heads: int, floor: float = 1e-3) -> dict[str, np.ndarray]:
    """Output metrics of q, k (diagonal) and v (block-diagonal matrix) from what their errors meet
    downstream (module docstring, "Downstream output metrics").

    G = XᵀX of the common input. Pre-RoPE energies e_q = diag(W_qᵀGW_q), e_k = diag(W_kᵀGW_k);
    RoPE (rotate_half: dims d and d + head_dim/2 rotate together) mixes each pair, so a pair's
    energy is shared by both of its dims. A score error Δq_h·k_g (g = the KV head of query head h)
    costs ‖Δq‖² in the metric diag(ē_k of head g); Δk_g costs Σ_{h→g} ē_q[h]. A value error ΔV_g
    reaches o's output as Σ_{h→g} A_h·ΔV_g·W_o[h] (A_h the attention of head h, W_o[h] its
    head_dim rows of W_o): metric Σ_{h→g} W_o[h]·W_o[h]ᵀ (assuming the heads' errors do not add
    coherently)."""
    d, KV = head_dim, num_kv_heads
    H = Wq.shape[1] // d
    if Wq.shape[1] != H * d or Wk.shape[1] != KV * d or Wo.shape[0] != H * d or H % KV:
        raise ValueError("attention shapes do not match head_dim / num_kv_heads")
    rep = H // KV
    half = d // 2

    def paired(e, heads):
        e = e.reshape(heads, 2, half)
        return np.repeat(e.mean(axis=1, keepdims=True), 2, axis=1).reshape(heads, d)

    e_q = paired(np.einsum("kn,kn->n", Wq, G @ Wq), H)  # [H, d]
    e_k = paired(np.einsum("kn,kn->n", Wk, G @ Wk), KV)  # [KV, d]
    m_q = np.repeat(e_k, rep, axis=0).reshape(-1)
    m_k = e_q.reshape(KV, rep, d).sum(axis=1).reshape(-1)
    m_v = np.zeros((KV * d, KV * d))
    for h in range(H):
        g = h // rep
        rows = Wo[h * d:(h + 1) * d]
        m_v[g * d:(g + 1) * d, g * d:(g + 1) * d] += rows @ rows.T
    return {"q": _floor_and_normalize(m_q, floor), "k": _floor_and_normalize(m_k, floor),
            "v": _floor_and_normalize(m_v, floor)}


def mlp_output_metrics(X: np.ndarray, Wg: np.ndarray, Wu: np.ndarray, Wd: np.ndarray,
                       weights: np.ndarray | None = None, floor: float = 1e-3) -> dict[str, np.ndarray]:
    """Diagonal output metrics of gate and up from what their errors meet downstream: the MLP
    computes h = silu(g) ⊙ u, out = h·W_d, so to first order Δu_c reaches the output as
    silu(g_c)·Δu_c·W_d[c] and Δg_c as silu′(g_c)·u_c·Δg_c·W_d[c]. Their diagonals (token-weighted
    means over the sample rows X, original weights): m_up = E[silu(g)²]·‖W_d[c]‖²,
    m_gate = E[(silu′(g)·u)²]·‖W_d[c]‖²."""
    X = np.asarray(X, np.float64)
    g, u = X @ Wg, X @ Wu
    sig = 1.0 / (1.0 + np.exp(-np.clip(g, -60, 60)))
    s, ds = g * sig, sig * (1.0 + g * (1.0 - sig))
    w = np.ones(len(X)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    w = w / np.sum(w)
    rows = np.sum(Wd**2, axis=1)
    return {"up": _floor_and_normalize((w @ s**2) * rows, floor),
            "gate": _floor_and_normalize((w @ (ds * u) ** 2) * rows, floor)}


def refit_first_factor(S_in: np.ndarray, B: np.ndarray, W2: np.ndarray) -> np.ndarray:
    """argmin over W₁ of ‖X̃·W₁·W₂ − T‖_F² with W₂ fixed (the paper's update), X̃ᵀX̃ = S̃S̃ᵀ, B = X̃ᵀT.

    Normal equations: G̃·W₁·(W₂W₂ᵀ) = B·W₂ᵀ  ⇒  W₁ = S̃⁻ᵀS̃⁻¹·B·W₂ᵀ·(W₂W₂ᵀ)⁻¹.
    """
    S_in = np.asarray(S_in, np.float64)
    W2 = np.asarray(W2, np.float64)
    rhs = np.asarray(B, np.float64) @ W2.T
    rhs = np.linalg.solve(W2 @ W2.T, rhs.T).T  # · (W₂W₂ᵀ)⁻¹ (symmetric, k×k)
    return _solve_triangular(S_in.T, _solve_triangular(S_in, rhs, upper=False), upper=True)


def activation_noise_energy(x: np.ndarray, qmax: float, weights: np.ndarray | None = None) -> float:
    """Σ_t w_t·Δ_t²/12 over rows x [T, K], Δ_t = max_k |x_tk| / qmax: the expected energy per input
    channel of the rounding error of symmetric per-token quantization with step Δ_t (uniform
    rounding error in [−Δ_t/2, Δ_t/2]). The expected ‖E·W'‖² of that error E is noise·‖W'‖²_F
    (with token weights w_t, the expected weighted ‖D^½·E·W'‖²; w_t = 1 without)."""
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    step2 = (np.abs(x).max(axis=1).astype(np.float64) / qmax) ** 2
    if weights is not None:
        step2 = step2 * np.asarray(weights, np.float64).reshape(-1)
    return float(np.sum(step2) / 12.0)


def residual_token_weights(residual: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """w_t ∝ 1 / mean_c(r_tc²) for residual-stream rows r [..., D], normalized to mean 1.

    The next RMSNorm divides token t by rms(r_t), so an error e_t added to r_t reaches every later
    layer as e_t / rms(r_t): Σ_t w_t‖e_t‖² is the error downstream layers see (module docstring,
    "Token weights"). `floor` (relative to the median mean-square) keeps a token whose residual is
    near zero from taking all the weight."""
    r = np.asarray(residual, np.float32)
    ms = np.mean(r.astype(np.float64) ** 2, axis=-1)
    ms = np.maximum(ms, floor * float(np.median(ms)) + 1e-30)
    w = 1.0 / ms
    return (w / np.mean(w)).astype(np.float32)


def _check_rank(rank: int, K: int, N: int) -> int:
    if not (1 <= rank <= min(K, N)):
        raise ValueError(f"rank {rank} outside [1, min(K, N) = {min(K, N)}]")
    return int(rank)


# ---------------------------------------------------------------------------------------------
# rank allocation


def pair_parameters(K: int, N: int, rank: int) -> int:
    return rank * (K + N)


def saves_parameters(K: int, N: int, rank: int) -> bool:
    """Does a rank-`rank` pair store fewer numbers than the dense K×N matrix?"""
    return pair_parameters(K, N, rank) < K * N


def max_saving_rank(K: int, N: int) -> int:
    """The largest rank whose pair still saves parameters (0 if none does)."""
    return (K * N - 1) // (K + N)


def uniform_rank(K: int, N: int, ratio: float) -> int:
    """The paper's per-layer rank for removing a fraction `ratio` of the layer's parameters."""
    return math.floor((1.0 - ratio) * K * N / (K + N) + 1e-9)


@dataclass
class LayerShape:
    name: str
    K: int
    N: int


def allocate_uniform(layers: list[LayerShape], ratio: float, min_rank: int = 1) -> dict[str, int | None]:
    """name → rank (None: the layer stays dense because its pair would not save parameters)."""
    out: dict[str, int | None] = {}
    for lay in layers:
        k = min(max(uniform_rank(lay.K, lay.N, ratio), min_rank), min(lay.K, lay.N))
        out[lay.name] = k if saves_parameters(lay.K, lay.N, k) else None
    return out


def allocation_saving(layers: list[LayerShape], ranks: dict[str, int | None]) -> int:
    """Parameters removed by an allocation, relative to all layers dense."""
    return sum(
        lay.K * lay.N - pair_parameters(lay.K, lay.N, ranks[lay.name])
        for lay in layers
        if ranks.get(lay.name) is not None
    )


def normalized_tail_losses(sigma: np.ndarray) -> np.ndarray:
    """loss[k] = Σ_{i≥k} σ_i² / Σ σ_i² for k = 0..len(σ): the relative error of keeping rank k."""
    e = np.asarray(sigma, np.float64) ** 2
    tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
    total = tail[0]
    return tail / total if total > 0 else np.zeros_like(tail)


def allocation_loss(ranks: dict[str, int | None], spectra: dict[str, np.ndarray]) -> float:
    """Σ over factorized layers of the normalized truncation loss."""
    return float(
        sum(normalized_tail_losses(spectra[n])[k] for n, k in ranks.items() if k is not None)
    )


def allocate_budgeted(
    layers: list[LayerShape],
    spectra: dict[str, np.ndarray],
    saving_target: int,
    min_rank: int = 1,
) -> dict[str, int | None]:
    """Ranks removing ≥ saving_target parameters at the least total normalized truncation loss.

    Options per layer: dense (saving 0, loss 0) or rank k ∈ [min_rank, max_saving_rank] (saving
    KN − k(K+N), loss Σ_{i≥k}σ_i²/Σσ_i²). Lagrangian relaxation with bisection on λ, then the
    surplus saving is handed back greedily. Raises ValueError if the target is unreachable.
    """
    options = []  # per layer: (ranks array, savings array, losses array)
    for lay in layers:
        kmax = min(max_saving_rank(lay.K, lay.N), len(spectra[lay.name]))
        ks = np.arange(min_rank, kmax + 1)
        if len(ks) == 0:
            options.append((ks, np.zeros(0), np.zeros(0)))
            continue
        savings = lay.K * lay.N - ks * (lay.K + lay.N)
        losses = normalized_tail_losses(spectra[lay.name])[ks]
        options.append((ks, savings.astype(np.float64), losses))
    best_possible = sum(float(s.max()) if len(s) else 0.0 for _, s, _ in options)
    if saving_target > best_possible:
        raise ValueError(f"cannot remove {saving_target} parameters (at most {int(best_possible)} at min_rank)")
    if saving_target <= 0:
        return {lay.name: None for lay in layers}

    def choose(lam: float) -> tuple[list[int], float]:
        picks, total = [], 0.0
        for ks, savings, losses in options:
            if len(ks) == 0:
                picks.append(-1)
                continue
            cost = losses - lam * savings
            i = int(np.argmin(cost))
            if cost[i] < 0.0:  # better than staying dense (cost 0)
                picks.append(i)
                total += savings[i]
            else:
                picks.append(-1)
        return picks, total

    lo, hi = 0.0, 1e-12
    while choose(hi)[1] < saving_target:
        hi *= 4.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if choose(mid)[1] >= saving_target:
            hi = mid
        else:
            lo = mid
    picks, total = choose(hi)

    # hand the surplus back: moves that lower the loss while the target still holds
    surplus = total - saving_target
    while True:
        best = None  # (loss reduction, layer index, new pick)
        for li, (ks, savings, losses) in enumerate(options):
            i = picks[li]
            if i < 0:
                continue
            cur_s, cur_l = savings[i], losses[i]
            # raise the rank by the largest step that fits (losses fall as rank grows)
            fits = np.nonzero(cur_s - savings[i:] <= surplus)[0]
            if len(fits):
                j = i + int(fits.max())
                gain = cur_l - losses[j]
                if j != i and (best is None or gain > best[0]):
                    best = (gain, li, j)
            if cur_s <= surplus and (best is None or cur_l > best[0]):
                best = (cur_l, li, -1)  # back to dense
        if best is None or best[0] <= 0.0:
            swap = _best_swap(options, picks, surplus)
            if swap is None:
                break
            (li, i_new), (lj, j_new) = swap
            surplus += (savings_of(options, li, i_new) - savings_of(options, li, picks[li]))
            surplus += (savings_of(options, lj, j_new) - savings_of(options, lj, picks[lj]))
            picks[li], picks[lj] = i_new, j_new
            continue
        gain, li, j = best
        ks, savings, losses = options[li]
        surplus -= savings[picks[li]] - (savings[j] if j >= 0 else 0.0)
        picks[li] = j
    return {
        lay.name: (int(options[li][0][picks[li]]) if picks[li] >= 0 else None)
        for li, lay in enumerate(layers)
    }


def savings_of(options, li: int, pick: int) -> float:
    return float(options[li][1][pick]) if pick >= 0 else 0.0


def losses_of(options, li: int, pick: int) -> float:
    return float(options[li][2][pick]) if pick >= 0 else 0.0


def _best_swap(options, picks, surplus: float, tol: float = 1e-12):
    """The best pair of one-step moves (one layer's rank +1, another's −1) that keeps the budget.

    Fills the Lagrangian's duality gap on coarse problems; returns None when no swap lowers the
    total loss.
    """
    ups, downs = [], []  # (layer, new pick, saving change, loss change)
    for li, (ks, savings, losses) in enumerate(options):
        i = picks[li]
        if i < 0:
            continue
        if i + 1 < len(ks):
            ups.append((li, i + 1, savings[i + 1] - savings[i], losses[i + 1] - losses[i]))
        if i - 1 >= 0:
            downs.append((li, i - 1, savings[i - 1] - savings[i], losses[i - 1] - losses[i]))
    if not ups or not downs:
        return None
    up = np.array([(u[2], u[3]) for u in ups])
    down = np.array([(d[2], d[3]) for d in downs])
    ds = up[:, 0][:, None] + down[:, 0][None, :]  # saving change of the pair
    dl = up[:, 1][:, None] + down[:, 1][None, :]  # loss change of the pair
    same = np.array([u[0] for u in ups])[:, None] == np.array([d[0] for d in downs])[None, :]
    dl = np.where((surplus + ds >= 0) & ~same, dl, np.inf)
    a, b = np.unravel_index(int(np.argmin(dl)), dl.shape)
    if not dl[a, b] < -tol:
        return None
    return (ups[a][0], ups[a][1]), (downs[b][0], downs[b][1])


# ---------------------------------------------------------------------------------------------
# parameters


METRIC_ROLES = ("q", "k", "v", "gate", "up")


@dataclasses.dataclass
class SvdParams:
    """Recipe keys of the svd pass."""

    ratio: float = 0.2  # fraction of the selected layers' parameters to remove
    allocation: Literal["uniform", "budgeted"] = "uniform"
    whiten: bool = True  # false: plain SVD of W (the ablation)
    update: bool = True  # closed-form refit against the original outputs, in model order
    refit: Literal["both", "w1"] = "both"  # both factors (reduced-rank regression) | W₁ only (paper)
    residual_target: bool = False  # o/down also cancel the residual-stream error of the upstream
    damp: float = 0.0  # refit ridge toward W: + δ‖W' − W‖², δ = damp·mean(diag G̃)
    token_weights: Literal["none", "residual"] = "none"  # "residual": o/gate/up/down weight token t
    # by 1/rms²(residual stream it is added to), the error the next RMSNorm passes on (docstring)
    output_metric: list[str] = dataclasses.field(default_factory=list)  # roles among q, k, v, gate,
    # up whose refit measures the error in the metric of what it meets downstream (docstring)
    act_bits: int = 16  # per-token activation bits the pair's input gets downstream (int4 act_bits):
    # < 16 fits the pair to the quantized input in expectation (ridge toward 0, module docstring)
    include: list[str] = dataclasses.field(default_factory=lambda: ["*"])  # layer-name globs
    exclude: list[str] = dataclasses.field(default_factory=list)
    min_rank: int = 1
    rank: int | None = None  # a fixed rank for every selected layer (clamped to min(K, N)); overrides ratio
    eps: float = 1e-6  # the positive-definite repair's ε (relative to mean(diag XᵀX))
    budget_windows: int = 8  # calibration windows measuring the spectra for budgeted ranks

    def validate(self) -> None:
        if not (0.0 <= self.ratio < 1.0):
            raise UserError(f"ratio must be in [0, 1) (the fraction of parameters to remove), got {self.ratio}")
        if self.min_rank < 1:
            raise UserError(f"min_rank must be at least 1, got {self.min_rank}")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"rank must be at least 1, got {self.rank}")
        if self.rank is not None and self.allocation != "uniform":
            raise UserError("a fixed rank and allocation = \"budgeted\" exclude each other; drop one of them")
        if not (0.0 <= self.damp < 1.0):
            raise UserError(f"damp must be in [0, 1) (a fraction of the mean diagonal), got {self.damp}")
        if self.act_bits not in (16, 8, 4):
            raise UserError(f"act_bits must be 16, 8 or 4 (the int4 pass's act_bits downstream), got {self.act_bits}")
        if self.act_bits < 16 and not (self.whiten or self.update):
            raise UserError("act_bits < 16 needs calibration statistics: set whiten = true or update = true")
        if not (0.0 < self.eps < 1.0):
            raise UserError(f"eps must be in (0, 1), got {self.eps}")
        if not self.include:
            raise UserError("include must name at least one layer pattern, e.g. [\"*\"] or [\"layers.*.gate\"]")
        for p in list(self.include) + list(self.exclude):
            if not p:
                raise UserError("include/exclude patterns must be non-empty globs like \"layers.*.q\"")
        if self.budget_windows < 1:
            raise UserError(f"budget_windows must be at least 1, got {self.budget_windows}")
        if self.token_weights not in ("none", "residual"):
            raise UserError(f"token_weights must be \"none\" or \"residual\", got {self.token_weights!r}")
        if self.token_weights != "none" and not (self.whiten or self.update):
            raise UserError("token_weights needs calibration statistics: set whiten = true or update = true")
        bad = [r for r in self.output_metric if r not in METRIC_ROLES]
        if bad:
            raise UserError(f"output_metric takes roles among {', '.join(METRIC_ROLES)}, got {bad}")
        if self.output_metric and not (self.update and self.refit == "both"):
            raise UserError("output_metric needs update = true and refit = \"both\" (it changes the reduced-rank refit)")
        if self.residual_target and not self.update:
            raise UserError("residual_target needs update = true (it changes the refit's target)")

    def selects(self, layer: str) -> bool:
        return any(fnmatch.fnmatchcase(layer, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(layer, p) for p in self.exclude
        )


# ---------------------------------------------------------------------------------------------
# the graph: low-rank rewrite, block subgraphs run in ONNX Runtime


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def replace_with_low_rank(model: ir.Model, node_name: str, layer: str, W1: np.ndarray, W2: np.ndarray) -> tuple[str, str]:
    """MatMul(X, W) → MatMul(MatMul(X, W₁), W₂); the output keeps its name, W leaves the graph.

    New nodes `{node}_lowrank_1/2`, initializers `{W}.lowrank_1/2`, both nodes tagged with
    metadata_props["llmfold.layer"] = layer. Returns the two initializer names.
    """
    node = next((n for n in model.graph if n.name == node_name), None)
    if node is None or node.op_type != "MatMul" or len(node.inputs) != 2:
        raise ValueError(f"{layer}: node {node_name!r} is not a MatMul in the current graph")
    x, w = node.inputs
    if w is None or w.const_value is None:
        raise ValueError(f"{layer}: {node_name} has no constant weight")
    K, N = w.const_value.shape
    if W1.shape[0] != K or W2.shape[1] != N or W1.shape[1] != W2.shape[0]:
        raise ValueError(f"{layer}: factors {W1.shape}·{W2.shape} do not match the weight [{K}, {N}]")
    if not (np.all(np.isfinite(W1)) and np.all(np.isfinite(W2))):
        raise ValueError(f"{layer}: refusing to write non-finite factors")
    dtype = w.const_value.dtype.numpy()
    names = []
    for i, arr in ((1, W1), (2, W2)):
        name = f"{w.name}.lowrank_{i}"
        while name in model.graph.initializers:
            name += "_"
        arr = np.ascontiguousarray(arr.astype(dtype))
        tensor = ir.Tensor(arr, name=name)
        model.graph.register_initializer(
            ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        )
        names.append(name)
    old_out = node.outputs[0]
    out_name = old_out.name
    meta = {"llmfold.layer": layer}
    first = ir.Node("", "MatMul", [x, model.graph.initializers[names[0]]], name=f"{node_name}_lowrank_1",
                    metadata_props=dict(meta))
    first.outputs[0].name = f"{node_name}_lowrank_1/output_0"
    first.outputs[0].type = old_out.type
    second = ir.Node("", "MatMul", [first.outputs[0], model.graph.initializers[names[1]]],
                     name=f"{node_name}_lowrank_2", metadata_props=dict(meta))
    second.outputs[0].type = old_out.type
    second.outputs[0].shape = old_out.shape
    model.graph.insert_before(node, [first, second])
    was_output = old_out.is_graph_output()
    old_out.replace_all_uses_with(second.outputs[0], replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    old_out.name = None
    second.outputs[0].name = out_name
    if not w.uses() and not w.is_graph_output() and w.name in model.graph.initializers:
        model.graph.initializers.pop(w.name)
    assert was_output == second.outputs[0].is_graph_output()
    return names[0], names[1]


def extract_subgraph(model: ir.Model, input_names: list[str], output_names: list[str]):
    """An ONNX ModelProto computing `output_names` from those of `input_names` they depend on
    (plus whatever graph inputs they still need, e.g. input_ids / attention_mask / past KV).

    Only the nodes the outputs need are kept, with their initializers copied in (a block's worth),
    so one decoder block can be run on cached residual states."""
    import onnx

    values = _values_by_name(model)
    missing = [n for n in list(input_names) + list(output_names) if n not in values]
    if missing:
        raise ValueError(f"values {missing} are not in the graph")
    stop = set(input_names)
    reached: set[str] = set()
    needed: set[int] = set()
    inits: dict[str, ir.Value] = {}
    graph_inputs: set[str] = set()
    stack = [values[n] for n in output_names]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.name in stop:
            reached.add(v.name)
            continue
        if v.name in model.graph.initializers and v.const_value is not None:
            inits[v.name] = v
            continue
        if v.is_graph_input():
            graph_inputs.add(v.name)
            continue
        node = v.producer()
        if node is None:
            raise ValueError(f"value {v.name!r} has no producer")
        needed.add(id(node))
        stack.extend(node.inputs)
    nodes = [n for n in model.graph if id(n) in needed]

    def value_info(v: ir.Value):
        vi = ir.serde.serialize_value(v)
        if not vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return vi

    ordered_inputs = [values[n] for n in input_names if n in reached]
    ordered_inputs += [v for v in model.graph.inputs if v.name in graph_inputs]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "llmfold_svd_subgraph",
        [value_info(v) for v in ordered_inputs],
        [value_info(values[n]) for n in output_names],
        initializer=[onnx.numpy_helper.from_array(v.const_value.numpy(), v.name) for v in inits.values()],
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 10
    return proto


class SubgraphRunner:
    """Runs extracted subgraphs of the current graph on calibration windows, in batches."""

    def __init__(self, windows: np.ndarray, threads: int | None, kv_shape: tuple[int, int], tokens_per_run: int = 2048):
        self.windows = np.asarray(windows, np.int64)
        self.threads = threads
        self.kv_shape = kv_shape
        W, T = self.windows.shape
        self.batch = max(1, min(W, tokens_per_run // T))

    def batches(self):
        W = len(self.windows)
        for start in range(0, W, self.batch):
            yield slice(start, min(W, start + self.batch))

    def session(self, model: ir.Model, input_names: list[str], output_names: list[str]):
        from compiler.runtime import create_session, uses_custom_domain

        proto = extract_subgraph(model, input_names, output_names)
        sess = create_session(proto.SerializeToString(), self.threads, uses_custom_domain(proto))
        return sess

    def run(self, sess, window_slice: slice, state_feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        """Run on windows `window_slice`; state_feeds: value → array over all windows [W, T, ...]."""
        ids = self.windows[window_slice]
        B, T = ids.shape
        feeds = {}
        for inp in sess.get_inputs():
            name = inp.name
            if name in state_feeds:
                feeds[name] = state_feeds[name][window_slice]
                continue
            if name == "input_ids":
                feeds[name] = ids
            elif name == "attention_mask":
                feeds[name] = np.ones((B, T), np.int64)
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
            elif name.startswith("past_key_values."):
                shape = list(inp.shape)
                heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else self.kv_shape[0]
                dim = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else self.kv_shape[1]
                feeds[name] = np.zeros((B, heads, 0, dim), np.float32)
            else:
                raise ValueError(f"the block subgraph needs graph input {name!r}, which calibration cannot provide")
        return sess.run(output_names, feeds)


# ---------------------------------------------------------------------------------------------
# the pass


@dataclass
class _Stage:
    """Selected layers of one block that read the same input value (q/k/v, o, gate/up, down)."""

    input: str
    layers: list  # compiler.structure.Linear
    partners: dict[str, str]  # layer name → the residual value its output is added to
    add_outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # layer name → that Add's output


@dataclass
class _Acc:
    """Per-stage calibration sums over all windows (float64)."""

    K: int
    gram_tilde: np.ndarray  # X̃ᵀX̃
    gram: np.ndarray | None  # XᵀX (without update, or for refit = "w1")
    cross: np.ndarray | None  # X̃ᵀX (when cheaper than per-layer X̃ᵀY)
    cross_out: dict[str, np.ndarray]  # layer → X̃ᵀ(X·W) when `cross` is None (+ X̃ᵀ(R − R̃) with the
    # residual target: one product instead of two; then `resid` has no entry for the layer)
    resid: dict[str, np.ndarray]  # layer → X̃ᵀ(R − R̃) (residual target)
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # layer → W (float64)
    sample_x: np.ndarray | None = None  # one batch of X and X̃ rows, for the error diagnostic
    sample_xt: np.ndarray | None = None
    sample_w: np.ndarray | None = None  # their token weights (None: unweighted)
    whitened: Whitening | None = None  # the factorization of G̃ (+ ridge), shared by the stage's layers
    noise: float = 0.0  # Σ_t Δ_t²/12, Δ_t = max_k |x_tk| / Q: per-channel energy of the act. rounding


def _block_stages(model: ir.Model, block, selected: set[str]) -> list[_Stage]:
    order = {node.name: i for i, node in enumerate(model.graph)}
    values = _values_by_name(model)
    residual_adds = {block.attention_residual_add, block.mlp_residual_add} - {None}
    groups: dict[str, list] = {}
    for lin in block.linears():
        if lin.name in selected:
            groups.setdefault(lin.input, []).append(lin)
    stages = []
    for inp, lins in groups.items():
        partners, add_outputs = {}, {}
        for lin in lins:
            out = values[lin.output]
            uses = list(out.uses())
            if len(uses) == 1 and uses[0].node.op_type == "Add" and uses[0].node.name in residual_adds:
                other = [v for v in uses[0].node.inputs if v is not out]
                if len(other) == 1 and other[0] is not None:
                    partners[lin.name] = other[0].name
                    add_outputs[lin.name] = uses[0].node.outputs[0].name
        stages.append(_Stage(inp, lins, partners, add_outputs))

    def position(stage: _Stage) -> int:
        prod = values[stage.input].producer()
        return order.get(prod.name, -1) if prod is not None else -1

    return sorted(stages, key=position)


def _stage_dependencies(model: ir.Model, block, stages: list[_Stage], value_names: list[str]) -> dict[str, int]:
    """value → the highest index of a stage whose layers it depends on (−1: none of them).

    A value computed for stage s may be reused by later stages only if it does not depend on a
    layer of stage ≥ s (those are rewritten later)."""
    values = _values_by_name(model)
    node_stage = {}
    for si, st in enumerate(stages):
        for lin in st.layers:
            for n in lin.nodes or [lin.node]:
                node_stage[n] = si
    out = {}
    for name in value_names:
        top, seen, stack = -1, set(), [values[name]]
        while stack:
            v = stack.pop()
            if v is None or id(v) in seen or v.name == block.residual_in:
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None:
                continue
            top = max(top, node_stage.get(node.name, -1))
            stack.extend(node.inputs)
        out[name] = top
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


@register_pass
class SvdPass(CompilerPass):
    """SVD-LLM low-rank pairs for decoder linear layers (see the module docstring for the math).

    Requires: the decoder structure (dense q/k/v/o/gate/up/down MatMuls) and calibration windows.
    Changes: each selected dense MatMul(X, W) with an allocated rank k becomes
    MatMul(MatMul(X, W₁[K,k]), W₂[k,N]); W leaves the graph. Exact only at full rank with
    update = false (W₁W₂ = W up to fp32 rounding); otherwise a lossy compression whose calibration
    output error per layer is recorded. Invalidates all calibration statistics.
    """

    name = "svd"
    Params = SvdParams
    description = "SVD-LLM: whitened low-rank pairs with closed-form update and budgeted ranks"

    # -- rank allocation ---------------------------------------------------------------------
    def _ranks(self, layers, spectra_fn) -> tuple[dict[str, int | None], dict[str, np.ndarray] | None]:
        p = self.params
        shapes = [LayerShape(lin.name, lin.K, lin.N) for lin in layers]
        if p.rank is not None:
            return {lin.name: min(p.rank, lin.K, lin.N) for lin in layers}, None
        uniform = allocate_uniform(shapes, p.ratio, p.min_rank)
        if p.allocation == "uniform":
            return uniform, None
        spectra = spectra_fn()
        target = allocation_saving(shapes, uniform)
        try:
            ranks = allocate_budgeted(shapes, spectra, target, p.min_rank)
        except ValueError as e:
            raise UserError(f"svd: {e}; lower ratio or min_rank") from None
        self.ctx.log(
            f"budgeted ranks: normalized truncation loss {allocation_loss(ranks, spectra):.4g} "
            f"vs uniform {allocation_loss(uniform, spectra):.4g} for the same {_fmt_params(target)} parameters removed"
        )
        return ranks, spectra

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        p, ctx = self.params, self.ctx
        t_start = time.perf_counter()
        self._cpu: dict[str, float] = {}
        structure = ctx.structure(model)
        candidates = [lin for b in structure.blocks for lin in b.linears() if p.selects(lin.name)]
        if not candidates:
            raise UserError(
                "svd: include/exclude select no decoder linear layer (names look like layers.3.q, "
                "layers.*.gate); fix the patterns"
            )
        not_dense = [lin.name for lin in candidates if lin.kind != "dense" or lin.weight is None]
        if not_dense:
            ctx.log(f"skipping {len(not_dense)} layer(s) that are not dense MatMuls: {', '.join(not_dense[:6])}"
                    + (" …" if len(not_dense) > 6 else ""))
        layers = [lin for lin in candidates if lin.kind == "dense" and lin.weight is not None]
        if not layers:
            raise UserError("svd: none of the selected layers is a dense MatMul; run svd before int4")

        need_stats = p.whiten or p.update
        runner = None
        if need_stats:
            windows = ctx.calibration_windows()
            runner = SubgraphRunner(windows, ctx.threads, (structure.num_kv_heads, structure.head_dim))

        def spectra_fn():
            if p.whiten:
                # the ranks only need the spectra's shape: a few windows measure it well and keep
                # this extra pass over the original model cheap
                few = SubgraphRunner(runner.windows[: p.budget_windows], ctx.threads, runner.kv_shape)
                with self._phase("spectra"):
                    return self._whitened_spectra(model, structure, layers, few)
            return {lin.name: whitened_spectrum(self._weight(model, lin), None) for lin in layers}

        ranks, spectra = self._ranks(layers, spectra_fn)
        todo = {name for name, k in ranks.items() if k is not None}
        if not todo:
            ctx.log("no selected layer would save parameters at this ratio; the graph is unchanged")
            ctx.record(ratio=p.ratio, allocation=p.allocation, layers=[], params_removed=0)
            return ir.passes.PassResult(model, False)

        results: dict[str, dict] = {}
        if need_stats:
            self._compress_sequential(model, structure, layers, ranks, runner, results)
        else:
            for lin in layers:
                k = ranks[lin.name]
                if k is None:
                    continue
                f = truncate_whitened(self._weight(model, lin), None, k)
                replace_with_low_rank(model, lin.node, lin.name, f.W1, f.W2)
                total = float(np.sum(f.sigma**2))
                results[lin.name] = {"weight_rel_error": f.discarded_energy / total if total else 0.0}
        ctx.invalidate_stats()
        ctx.invalidate_structure()

        rows = []
        before = after = 0
        for lin in layers:
            k = ranks[lin.name]
            dense = lin.K * lin.N
            kept = dense if k is None else pair_parameters(lin.K, lin.N, k)
            before += dense
            after += kept
            row = {"layer": lin.name, "K": lin.K, "N": lin.N, "rank": k, "params": kept, "dense_params": dense}
            if spectra is not None:
                row["budget_loss"] = round(float(normalized_tail_losses(spectra[lin.name])[k or len(spectra[lin.name])]), 6)
            row.update({key: round(v, 6) for key, v in results.get(lin.name, {}).items()})
            rows.append(row)
        seconds = time.perf_counter() - t_start
        ctx.record(
            ratio=p.ratio, allocation=p.allocation if p.rank is None else f"fixed rank {p.rank}",
            whiten=p.whiten, update=p.update, refit=p.refit if p.update else None,
            residual_target=p.residual_target, damp=p.damp, act_bits=p.act_bits, token_weights=p.token_weights,
            output_metric=list(p.output_metric),
            params_before=before, params_after=after,
            removed_fraction=round(1 - after / before, 6), factorized=len(todo),
            layers=rows,
        )  # no timings here: the same inputs and seed give byte-identical files
        ctx.log(
            f"{len(todo)} of {len(layers)} layers factorized; parameters {_fmt_params(before)} → "
            f"{_fmt_params(after)} ({100 * (1 - after / before):.1f} % removed) in {seconds:.0f} s; CPU seconds "
            + ", ".join(f"{k} {v:.0f}" for k, v in self._cpu.items())
        )
        return ir.passes.PassResult(model, True)

    # -- helpers -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, name: str):
        """Adds the process CPU time (all threads) spent inside to self._cpu[name] (logged at the
        end: where the pass's cost goes: block forwards, statistics products, fits)."""
        if not hasattr(self, "_cpu"):
            self._cpu = {}
        t0 = time.process_time()
        try:
            yield
        finally:
            self._cpu[name] = self._cpu.get(name, 0.0) + time.process_time() - t0

    @staticmethod
    def _weight(model: ir.Model, lin) -> np.ndarray:
        return np.asarray(model.graph.initializers[lin.weight].const_value.numpy(), np.float64)

    def _initial_states(self, model, structure, runner) -> np.ndarray:
        first = structure.blocks[0].residual_in
        sess = runner.session(model, [], [first])
        W, T = runner.windows.shape
        states = None
        for sl in runner.batches():
            (r,) = runner.run(sess, sl, {}, [first])
            if states is None:
                states = np.empty((W, T, r.shape[-1]), np.float32)
            states[sl] = r
        return states

    def _whitened_spectra(self, model, structure, layers, runner) -> dict[str, np.ndarray]:
        """σ(SᵀW) of every layer with the original model's statistics (for budgeted ranks)."""
        selected = {lin.name for lin in layers}
        by_name = {lin.name: lin for lin in layers}
        spectra: dict[str, np.ndarray] = {}
        states = self._initial_states(model, structure, runner)
        blocks = [b for b in structure.blocks]
        last = max(b.index for b in blocks if any(l.name in selected for l in b.linears()))
        with self.ctx.progress("svd: spectra for budgeted ranks", total=last + 1) as advance:
            for b in blocks[: last + 1]:
                stages = _block_stages(model, b, selected)
                nxt = blocks[b.index + 1].residual_in if b.index + 1 < len(blocks) else None
                adds = self._residual_adds(model, b) if self.params.token_weights == "residual" else {}
                outs = [s.input for s in stages] + ([nxt] if nxt and b.index < last else [])
                # the residual Adds' outputs (token weights), computed once for all windows
                vals = self._materialize(model, runner, {b.residual_in: states}, [v for v in adds.values() if v]) if adds else {}
                weights = self._stage_weights(b, stages, adds, vals)
                del vals
                sess = runner.session(model, [b.residual_in], outs)
                grams = {s.input: None for s in stages}
                new_states = np.empty_like(states) if len(outs) > len(stages) else None
                for sl in runner.batches():
                    got = runner.run(sess, sl, {b.residual_in: states}, outs)
                    for s, x in zip(stages, got):
                        x = x.reshape(-1, x.shape[-1])
                        xw = x if s.input not in weights else x * weights[s.input][sl].reshape(-1, 1)
                        g = (xw.T @ x).astype(np.float64)  # float32 GEMM per batch, float64 sum
                        grams[s.input] = g if grams[s.input] is None else grams[s.input] + g
                    if new_states is not None:
                        new_states[sl] = got[-1]
                for s in stages:
                    S = whiten_cholesky(grams[s.input], self.params.eps, log=self.ctx.log, name=s.input).S
                    for lin in s.layers:
                        spectra[lin.name] = whitened_spectrum(self._weight(model, by_name[lin.name]), S)
                states = new_states
                advance(1, info=f"block {b.index}")
        return spectra

    def _compress_sequential(self, model, structure, layers, ranks, runner, results) -> None:
        """Compress block by block in model order (module docstring, "Closed-form update").

        Per block: one run of the original block on the original residual states (cached taps),
        then per stage one run of the *current* graph computing only what the stage needs from
        values already computed for this block (earlier stages' inputs, the mid-block residual),
        so the compressed block costs about one block forward in total."""
        p, ctx = self.params, self.ctx
        selected = {lin.name for lin in layers if ranks[lin.name] is not None}
        blocks = structure.blocks
        last = max(b.index for b in blocks if any(l.name in selected for l in b.linears()))
        orig_states = self._initial_states(model, structure, runner)
        comp_states = orig_states.copy() if p.update else None
        W, T = runner.windows.shape
        with ctx.progress("svd: blocks", total=last + 1) as advance:
            for b in blocks[: last + 1]:
                t0 = time.perf_counter()
                stages = _block_stages(model, b, selected)
                nxt = blocks[b.index + 1].residual_in if b.index + 1 < len(blocks) and b.index < last else None
                taps = [s.input for s in stages]
                partner_values = sorted({v for s in stages for v in s.partners.values()} - {b.residual_in})
                # 1. the original block (not yet rewritten) on the original states
                outs = list(dict.fromkeys(taps + (partner_values if p.update else [])))
                adds = self._residual_adds(model, b) if p.token_weights == "residual" else {}
                # the original residual Adds' outputs: token weights, and the residual target in one
                # piece (X·W + R = the Add's output, see _accumulate)
                add_outs = [v for s in stages for v in s.add_outputs.values()] if p.update and p.residual_target else []
                orig_outs = list(dict.fromkeys(outs + ([nxt] if nxt else []) + [v for v in adds.values() if v] + add_outs))
                with self._phase("forward"):
                    orig = self._materialize(model, runner, {b.residual_in: orig_states}, orig_outs)
                stage_weights = self._stage_weights(b, stages, adds, orig)
                new_orig = orig[nxt] if nxt else None
                orig[b.residual_in] = orig_states
                # 2. stage by stage: statistics of the current graph, fit, rewrite
                comp = {b.residual_in: comp_states} if p.update else None
                deps = _stage_dependencies(model, b, stages, taps + partner_values) if p.update else {}
                for si, stage in enumerate(stages):
                    if p.update:
                        want = [stage.input] + ([stage.partners[n] for n in sorted(stage.partners)] if p.residual_target else [])
                        extra = [v for v in taps + partner_values if v not in comp and v not in want and deps.get(v, 99) < si]
                        missing = [v for v in dict.fromkeys(want) if v not in comp]
                        if missing:
                            with self._phase("forward"):
                                comp.update(self._materialize(model, runner, comp, missing + extra))
                    with self._phase("statistics"):
                        acc = self._accumulate(stage, orig, comp, runner, model, stage_weights.get(stage.input))
                    with self._phase("fit"):
                        metrics = self._output_metrics(model, structure, b, stage, acc) if p.output_metric else {}
                        for lin in stage.layers:
                            results[lin.name] = self._fit_and_rewrite(model, lin, ranks[lin.name], acc, metrics.get(lin.name))
                # 3. advance the states
                if nxt and p.update:
                    with self._phase("forward"):
                        comp_states = self._materialize(model, runner, comp, [nxt])[nxt]
                orig_states = new_orig
                del orig, comp
                advance(1, info=f"block {b.index}: {time.perf_counter() - t0:.1f} s")

    @staticmethod
    def _residual_adds(model, block) -> dict[str, str | None]:
        """"attention" / "mlp" → the output value of the residual Add after that sub-block."""
        outs = {n.name: n.outputs[0].name for n in model.graph if n.op_type == "Add"}
        return {"attention": outs.get(block.attention_residual_add), "mlp": outs.get(block.mlp_residual_add)}

    @staticmethod
    def _stage_weights(block, stages, adds, orig) -> dict[str, np.ndarray]:
        """stage input → token weights [W, T] (module docstring, "Token weights").

        o: the residual after the attention Add; gate/up/down: the residual after the MLP Add (the
        MLP is position-wise, so their error on token t only reaches token t's residual). q/k/v
        stay unweighted: through attention their error on one token reaches every later token."""
        if not adds:
            return {}
        kind = {block.o.name: "attention", block.gate.name: "mlp", block.up.name: "mlp", block.down.name: "mlp"}
        out = {}
        for st in stages:
            kinds = {kind.get(lin.name) for lin in st.layers}
            if len(kinds) == 1 and None not in kinds:
                value = adds[kinds.pop()]
                if value is not None and value in orig:
                    out[st.input] = residual_token_weights(orig[value])
        return out

    def _materialize(self, model, runner, known: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Values `outputs` of the current graph for every window, computed from `known` ones."""
        sess = runner.session(model, list(known), outputs)
        W, T = runner.windows.shape
        out: dict[str, np.ndarray] = {}
        for sl in runner.batches():
            for name, x in zip(outputs, runner.run(sess, sl, known, outputs)):
                if name not in out:
                    out[name] = np.empty((W,) + x.shape[1:], np.float32)
                out[name][sl] = x
        return out

    def _accumulate(self, stage: _Stage, orig, comp, runner, model, token_weights=None) -> _Acc:
        """Σ over windows of X̃ᵀX̃, X̃ᵀX (or X̃ᵀ·XW), X̃ᵀ(R − R̃) and XᵀX (when needed), each
        token weighted by `token_weights` [W, T] when given (X̃ᵀDX̃ etc., D = diag(w)).

        Products of one batch (≤ 2048 tokens) are formed in float32 (the GEMM cost dominates the
        pass; relative rounding ~1e-7 per batch sum) and accumulated in float64."""
        p = self.params
        K = stage.layers[0].K
        weights = {lin.name: self._weight(model, lin) for lin in stage.layers}
        weights32 = {n: w.astype(np.float32) for n, w in weights.items()}
        need_gram = (not p.update) or p.refit == "w1"
        acc = _Acc(K, np.zeros((K, K)), np.zeros((K, K)) if need_gram else None, None, {}, {}, weights)
        partners = stage.partners if (p.update and p.residual_target) else {}
        # residual target with the original Add's output at hand: T = X·W + R − R̃ = A − R̃, so
        # B = X̃ᵀD(A − R̃) is one product and needs neither X·W nor a separate X̃ᵀD(R − R̃)
        direct = {n: stage.add_outputs[n] for n in partners if stage.add_outputs.get(n) in orig}
        others = [lin for lin in stage.layers if lin.name not in direct]
        use_cross = bool(others) and K <= sum(lin.N for lin in others)
        if p.update and use_cross:
            acc.cross = np.zeros((K, K))
        first = True
        qmax = {8: 127.0, 4: 7.0}.get(p.act_bits)
        for sl in runner.batches():
            x = orig[stage.input][sl].reshape(-1, K)
            w = None if token_weights is None else token_weights[sl].reshape(-1, 1)
            sw = None if w is None else np.sqrt(w)  # D^½: Gram products as (D^½X)ᵀ(D^½X) (BLAS syrk, half a GEMM)
            if need_gram:
                xs = x if sw is None else x * sw
                acc.gram += (xs.T @ xs).astype(np.float64)
            if not p.update:
                if qmax:
                    acc.noise += activation_noise_energy(x, qmax, w)
                continue
            xt = comp[stage.input][sl].reshape(-1, K)
            xs = xt if sw is None else xt * sw
            xtw = xt if w is None else xs * sw  # D·X̃: every sum below is X̃ᵀD(·)
            if qmax:
                acc.noise += activation_noise_energy(xt, qmax, w)
            acc.gram_tilde += (xs.T @ xs).astype(np.float64)
            for lname, av in direct.items():
                rv = partners[lname]
                D = orig[av].shape[-1]
                y = orig[av][sl].reshape(-1, D) - comp[rv][sl].reshape(-1, D)
                acc.cross_out[lname] = acc.cross_out.get(lname, 0.0) + (xtw.T @ y).astype(np.float64)
            resid = {}
            for lname, rv in partners.items():
                if lname in direct:
                    continue
                D = orig[rv].shape[-1]
                resid[lname] = orig[rv][sl].reshape(-1, D) - comp[rv][sl].reshape(-1, D)
            if acc.cross is not None:
                acc.cross += (xtw.T @ x).astype(np.float64)
                for lname, d in resid.items():
                    acc.resid[lname] = acc.resid.get(lname, 0.0) + (xtw.T @ d).astype(np.float64)
            else:
                # X̃ᵀ(X·W) and X̃ᵀ(R − R̃) in one product: X̃ᵀ(X·W + R − R̃) (kept in cross_out)
                for lin in others:
                    y = x @ weights32[lin.name]
                    if lin.name in resid:
                        y += resid[lin.name]
                    acc.cross_out[lin.name] = acc.cross_out.get(lin.name, 0.0) + (xtw.T @ y).astype(np.float64)
            if first:  # a diagnostic sample for the per-layer output error
                acc.sample_x, acc.sample_xt = x.astype(np.float32), xt.astype(np.float32)
                acc.sample_w = None if w is None else w.reshape(-1).astype(np.float64)
                first = False
        return acc

    def _output_metrics(self, model, structure, block, stage: _Stage, acc: _Acc) -> dict[str, np.ndarray]:
        """layer name → its output metric (module docstring, "Downstream output metrics"), for the
        stage's layers whose role is in output_metric. Downstream weights are the original ones
        (a layer not yet rewritten is read from the graph; one of this stage from acc.weights)."""
        roles = {lin.role: lin for lin in stage.layers if lin.role in self.params.output_metric}
        if not roles:
            return {}

        def weight(lin):
            if lin.name in acc.weights:
                return acc.weights[lin.name]
            if lin.weight is None or lin.weight not in model.graph.initializers:
                raise UserError(f"svd: output_metric needs {lin.name} as a dense MatMul; run svd before other passes")
            return self._weight(model, lin)

        out: dict[str, np.ndarray] = {}
        if {"q", "k", "v"} & set(roles):
            m = attention_output_metrics(weight(block.q), weight(block.k), weight(block.o), acc.gram_tilde,
                                         structure.head_dim, structure.num_kv_heads)
            out.update({lin.name: m[r] for r, lin in roles.items() if r in m})
        if {"gate", "up"} & set(roles):
            m = mlp_output_metrics(acc.sample_x, weight(block.gate), weight(block.up), weight(block.down), acc.sample_w)
            out.update({lin.name: m[r] for r, lin in roles.items() if r in m})
        return out

    def _fit_and_rewrite(self, model, lin, k: int, acc: _Acc, metric: np.ndarray | None = None) -> dict:
        p, ctx = self.params, self.ctx
        W = acc.weights[lin.name]
        info: dict[str, float] = {}
        if not p.update:
            wh = whiten_cholesky(acc.gram, p.eps, damp=p.damp, log=ctx.log, name=lin.name, noise=acc.noise) if p.whiten else None
            if acc.noise > 0:
                # ‖X(W − W')‖² + δ‖W − W'‖² + ν‖W'‖²: statistics G + (δ + ν)I, B = (G + δI)W
                f = reduced_rank_fit(wh.S, acc.gram @ W + wh.shift * W, k)
            else:
                f = truncate_whitened(W, wh.S if wh else None, k)
            W1, W2 = f.W1, f.W2
            D = W - W1 @ W2
            out_energy = float(np.sum(W * (acc.gram @ W)))  # ‖X·W‖² on the calibration set
            info["output_rel_error"] = float(np.sum(D * (acc.gram @ D))) / out_energy if out_energy else 0.0
        else:
            B = acc.cross_out[lin.name] if lin.name in acc.cross_out else acc.cross @ W
            if lin.name in acc.resid:
                B = B + acc.resid[lin.name]
            # the activation-rounding noise (act_bits < 16) adds ν·I to G̃ and nothing to B
            if acc.whitened is None:  # one factorization per stage (its layers share G̃)
                acc.whitened = whiten_cholesky(acc.gram_tilde, p.eps, damp=p.damp, log=ctx.log, name=lin.name, noise=acc.noise)
            wt = acc.whitened
            # the ridge (and any PD repair) pulls toward the original weight, not toward 0:
            # ‖X̃W' − T‖² + δ‖W' − W‖²  ⇔  statistics G̃ + δI and B + δW
            B = B + wt.shift * W
            if p.refit == "both":
                f = reduced_rank_fit(wt.S, B, k, metric)
                W1, W2 = f.W1, f.W2
            else:
                wh = whiten_cholesky(acc.gram, p.eps, damp=p.damp, log=ctx.log, name=lin.name, noise=acc.noise) if p.whiten else None
                if wh is not None and acc.noise > 0:
                    W2 = reduced_rank_fit(wh.S, acc.gram @ W + wh.shift * W, k).W2
                else:
                    W2 = truncate_whitened(W, wh.S if wh else None, k).W2
                W1 = refit_first_factor(wt.S, B, W2)
            # diagnostic on one calibration batch: ‖X̃·W₁W₂ − X·W‖² / ‖X·W‖² (float32 products)
            target = acc.sample_x @ W.astype(np.float32)
            err = (acc.sample_xt @ W1.astype(np.float32)) @ W2.astype(np.float32) - target
            energy = float(np.sum(np.square(target, dtype=np.float64)))
            info["output_rel_error"] = float(np.sum(np.square(err, dtype=np.float64))) / energy if energy else 0.0
        replace_with_low_rank(model, lin.node, lin.name, W1, W2)
        return info
