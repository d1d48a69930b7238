"""INT4 pass: linear layers become `llmfold.QMatMul` nodes with 4-bit block-quantized weights.

Weights
-------
A linear layer computes Y = X·W with W ∈ ℝ^{K×N}. Its weight is cut into blocks of g rows along K
(block b = rows [b·g, (b+1)·g); the last block may be shorter, the op pads it) and every column n
of every block gets its own scale s_bn > 0 and integer zero point z_bn ∈ [0, 15]:

    Ŵ_kn = s_bn · (q_kn − z_bn),   q_kn = clamp(round(W_kn / s_bn) + z_bn, 0, 15),  b = ⌊k/g⌋.

* symmetric: z = 8 (not stored; the op assumes 8), q − 8 ∈ [−8, 7] and, with m⁺ = max(W,0),
  m⁻ = max(−W,0) over the block column, s = α·max(m⁺/7, m⁻/8) (α = 1 represents every value
  without clipping);
* asymmetric: s = α·(max(W,0) − min(W,0))/15, z = clamp(round(−α·min(W,0)/s), 0, 15) — an integer
  zero point (never a float minimum: the result must not depend on the checkpoint having been
  stored on a Q4_1 grid).

The quality criterion is the layer's output error on calibration inputs. With H = XᵀX (the streamed
Gram matrix of this layer's input, `compiler.stats.InputStats.xtx`) and Δ = W − Ŵ:

    E(Ŵ) = ‖X·W − X·Ŵ‖²_F = Σ_n Δ_{:,n}ᵀ H Δ_{:,n} = tr(Δᵀ H Δ).

Algorithms (`algorithm`):

* ``rtn``: α = 1, round to nearest.
* ``rtn-clip``: per block column, α from a grid {1, 1 − (1 − α_min)/(S−1), …, α_min} minimizing
  the block's share of E: with ``clip_objective = "diag"`` Σ_{k∈b} H_kk Δ_kn² (exact when the
  input channels are uncorrelated), with ``"full"`` the block-diagonal part Δ_bnᵀ H_bb Δ_bn.
  Each block column is chosen independently and α = 1 is in the grid, so the result is never worse
  than ``rtn`` on the chosen objective.
* ``gptq`` (Frantar et al., 2023): quantize the columns of Wᵀ (= the K input channels) one at a time
  and push each rounding error onto the not-yet-quantized channels along the inverse Hessian (the
  Optimal Brain Surgeon update). With H⁻¹ = UᵀU (U upper-triangular Cholesky factor of the
  damped inverse, H + λ·mean(diag H)·I) and channels in processing order, channel i:

      e_i = (w_i − ŵ_i) / U_ii,     w_j ← w_j − e_i·U_ij  for j > i          (w_i ∈ ℝ^N)

  which equals the OBS update w_j ← w_j − (w_i − ŵ_i)·[H_F⁻¹]_ij / [H_F⁻¹]_ii with H_F the Hessian
  restricted to the channels not yet quantized (tests check this against a naive float64
  implementation that downdates H_F⁻¹ explicitly). Lazy batches: the update of channels beyond the
  current batch of B channels is applied once per batch as one matrix product. ``act_order``
  processes channels by decreasing H_kk. A block's scale/zero point is fixed when its first
  channel comes up in the processing order, from the block's *current* (already error-updated)
  weights — channels of the block lying beyond the current lazy batch get their pending update
  applied first, so the result is exactly the non-lazy algorithm's. Blocks stay contiguous in the
  original K order whatever the processing order, so the packed layout needs no index table.
  With ``gptq_clip`` the block parameters are chosen by the same α-grid search as ``rtn-clip``
  (diag objective) on those current weights.

``scale_refit`` (after ``gptq`` or ``rtn-clip``): the codes stay, the float block scales are
refitted to the layer's output error. With u_bn = (q_{:,n} − z_bn) restricted to block b's rows
(zero elsewhere), column n is Ŵ_{:,n} = Σ_b s_bn·u_bn, linear in its n_blocks scales, so

    min_s (w_n − U_n s)ᵀ H (w_n − U_n s)   ⇔   (U_nᵀ H U_n) s = U_nᵀ H w_n

is a small exact least-squares problem per column (9 unknowns for K = 576 at g = 64). GPTQ chose
each block's scale before most of the block's codes were rounded and against error-updated weights;
the refit sees the final codes and the original weights. A column keeps its scales unless the
refit lowers its error, so the result is never worse on the calibration objective. Going further
overfits the calibration windows: alternating GPTQ codes on the refitted grid with refits (three
rounds, best kept) lowered the layer errors a further ≈ 3 % but raised SmolLM2 w4a8 perplexity
from 46.36 to 47.19 (and doubled the quantization time), so it was not kept.

``block_size_overrides`` gives chosen layers another block size (first matching pattern wins),
e.g. lm_head, whose output error reaches the logits directly, with finer blocks.

Activations (``act_bits``)
--------------------------
16: float activations. 8 / 4: the op quantizes each row (token) of X on the fly, symmetric, with
one scale per token: x̂_tk = σ_t·round(x_tk/σ_t), σ_t = max_k |x_tk| / Q, Q = 127 or 7.

TRIP: two-refinement power-of-two factors (Agile-Quant, after FQ-ViT's power-of-two factor)
------------------------------------------------------------------------------------------
A few input channels of an LLM linear layer carry values 10–100× larger than the rest; with one
scale per token they set σ_t and every other channel of the token rounds to a handful of levels
(at 4 bits, mostly to 0). TRIP gives channel k a shift ρ_k ∈ {0 … S}: the op quantizes
x̃_tk = x_tk·2^{−ρ_k} (σ_t = max_k |x̃_tk| / Q) and the factor is folded into the weight rows:

    X·W = (X·D⁻¹)·(D·W),   D = diag(2^{ρ_k}),   W'_{k,:} = 2^{ρ_k}·W_{k,:}.

Multiplying or dividing a float32 by a power of two only changes its exponent, so the fold is exact
in fp32 (barring overflow/underflow; tests check X·W == (X·D⁻¹)·(D·W) bit for bit): TRIP changes
nothing until quantization. The weight is then quantized as W' (block scales see the larger rows)
against the transformed statistics H' = D⁻¹ H D⁻¹ (exact: X' = X·D⁻¹).

Selection objective (per input value; the q/k/v, resp. gate/up, layers reading one value share one
set of shifts and their weights are concatenated along N): the expected squared output error per
token, with activation and weight errors treated as independent across channels,

    J(ρ) = (1/T) Σ_t Σ_k ‖W_{k,:}‖² · (x_tk − 2^{ρ_k}·x̂̃_tk)²          activation rounding, exact on
                                                                          T calibration samples
         + Σ_k (H_kk / count)·4^{−ρ_k} · Σ_n (W'_kn − Ŵ'_kn)²             weight rounding of W' (RTN,
                                                                          this pass's block format)

The first term falls as an outlier channel is shifted down (σ_t shrinks for every channel of the
token) until the channel's own rounding step 2^{ρ_k}σ_t dominates; the second term grows because
the shifted row widens its weight blocks' scales. ρ is found by coordinate descent from ρ = 0 over
the `trip_candidates` channels with the largest absmax (two sweeps, each candidate trying every
shift with the others fixed, accepting only improvements), so J(ρ) ≤ J(0) on the calibration
samples. The op divides by 2^{ρ_k} before quantizing, which for int8 activations is a shift.

Online Hadamard transform (``hadamard``: layer patterns, e.g. ["layers.*.down"])
-------------------------------------------------------------------------------
An offline rotation (passes/rotate.py) reaches every input that comes from the residual stream or
from v (rotate ``heads``), but not down_proj's: its input is the SwiGLU product SiLU(x·W_g)⊙(x·W_u),
elementwise, which no weight fold can rotate. Its outlier channels are the largest of the block
and, with one scale per token, they flatten every other channel at 4 bits. QMatMul's ``hadamard``
attribute makes the op multiply the input rows by B = diag(H_h, …, H_h) (Sylvester Hadamard
blocks of order h, entries ±1, B·B = h·I; h = the largest power of two dividing K, 512 for
K = 1536) before quantizing them (QuaRot's online Hadamard). The pass folds the rest exactly:

    X·W = (X·B)·W',   W' = B·W/h,   H' = (X·B)ᵀ(X·B) = B·H·B,   TRIP samples X·B,

so GPTQ, the clipping search, the scale refit and TRIP all work on what the op will quantize, and
in fp32 nothing changes but float rounding (tests check the fold and the per-node equivalence).
The op's cost is O(K log h) additions per row. Layers reading one input share it: a pattern must
select all of them or none.

The order trades the two quantizers against each other. A larger h spreads an outlier over more
channels (better for the activations), but it also mixes more weight rows, and GPTQ loses the
uneven H_kk it exploits (act-order, error feedback onto the quiet channels). ``hadamard_size``
caps h. On SmolLM2 down_proj (8×512 held-out tokens): at A16, no transform gives 45.93, h = 64
46.05, h = 128 46.21, h = 512 46.32; int8 activations on down alone then add +0.48, +0.04,
+0.02, +0.06. So W4A8 wants h = 64 (one weight block), and W4A4, whose activation error
dominates, wants 512.

Graph rewrite
-------------
MatMul(X, W) → QMatMul(X, data, scales, zero_points?, bias=None, channel_shift?) in domain
"llmfold" (opset 1), attributes K, N, block_size, act_bits (and hadamard when set); the packed
initializers are named ``{layer}.qweight``, ``{layer}.scales``, ``{layer}.zero_points``,
``{layer}.channel_shift``. The fp32 weight leaves the graph unless another node still reads it (a
tied embedding's Gather). The block scales are stored as float16 (custom_ops/README.md); every
quantizer here rounds a block's scale to its float16 value (``stored_scales``) before choosing the
codes, so the codes and the error feedback (GPTQ) see the weights the kernels will compute with.

Calibration statistics are requested a few blocks at a time (``stats_blocks``; lm_head joins the
last round) and dropped once those blocks are quantized, so memory stays bounded by a few blocks'
Gram matrices (SmolLM2: ≈ 27 MB per block, + 4·trip_samples·K bytes per tapped input with TRIP).
Because they are collected on the *current* graph, later rounds see the already-quantized earlier
blocks (the sequential GPTQ of the paper), including their activation quantization. Each round
runs the calibration windows through the model up to its last block, so fewer, larger rounds are
faster (stats_blocks = number of blocks: one pass, no sequential effect) and more rounds cost time.

Cost (SmolLM2-135M, 16 windows × 512 tokens, 2 cores): the pass used to run GPTQ with torch's
default two threads, and its per-channel loop of small ops then burnt 10–17× more CPU than with
one thread (≈ 1600 of the compile's CPU seconds); the pass now runs torch single-threaded. Layers
sharing an input (q/k/v, gate/up) are quantized as one concatenated matrix (one factorization,
one channel loop; identical result, every column is independent), and the calibration Gram
products are float32 per window summed in float64 (`compiler.stats`). What remains is mostly the
ONNX Runtime calibration runs (with taps) — hence the number of rounds matters.

Layers that cannot be quantized (already a QMatMul/MatMulNBits, a non-constant or non-2-D weight,
a weight shared by two layers) are all listed before anything changes; `on_unsupported = "error"`
stops with that list, `"skip"` leaves them as they are and quantizes the rest (the record in
llmfold.json names the skipped layers). A low-rank pair (SVD pass) is quantized factor by factor
(`layers.3.q.w1`, `.w2`), the second factor after the first so it sees its quantized input.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from compiler.analyze import is_onnx_op
from compiler.errors import UserError
from passes.base import CompilerPass, register_pass

CUSTOM_DOMAIN = "llmfold"
ALGORITHMS = ("rtn", "rtn-clip", "gptq")
MAX_TRIP_SHIFT = 15  # QMatMul takes channel_shift in 0..15


# ============================================================================================
# parameters
# ============================================================================================
@dataclass
class Int4Params:
    """Recipe keys of [[pass]] name = "int4"."""

    include: list[str] = field(default_factory=lambda: ["*"])  # glob patterns over layer names
    exclude: list[str] = field(default_factory=list)  # e.g. ["layers.0.*", "lm_head"]
    lm_head: bool = True  # quantize the output projection too
    block_size: int = 64  # rows of K per scale: a power of two in 16..256
    block_size_overrides: dict = field(default_factory=dict)  # {"lm_head" = 32}: first matching pattern wins
    symmetric: bool = True  # True: zero point 8 (not stored); False: integer zero points
    algorithm: str = "gptq"  # "rtn" | "rtn-clip" | "gptq"
    clip_objective: str = "diag"  # rtn-clip: "diag" (Σ H_kk Δ²) | "full" (block-diagonal ΔᵀHΔ)
    clip_grid: int = 20  # number of shrink factors α tried in [clip_min_shrink, 1]
    clip_min_shrink: float = 0.5
    damp: float = 0.01  # GPTQ dampening λ: H + λ·mean(diag H)·I
    act_order: bool = True  # GPTQ: channels by decreasing H_kk
    lazy_batch: int = 128  # GPTQ lazy-update batch (channels)
    gptq_clip: bool = False  # GPTQ: choose block scales by the α-grid search
    scale_refit: bool = False  # then least-squares block scales for the final codes (needs statistics)
    precision: str = "float32"  # GPTQ arithmetic: "float32" | "float64"
    act_bits: int = 16  # 16 | 8 | 4
    act_bits_overrides: dict = field(default_factory=dict)  # {"lm_head" = 8, "layers.*.down" = 8}
    trip: bool = False  # power-of-two channel factors (act_bits 8/4 only)
    trip_max_shift: int = 3  # S: shifts 0..S
    trip_candidates: int = 32  # channels (by absmax) the search may shift
    trip_samples: int = 1024  # calibration rows kept for the search
    hadamard: list[str] = field(default_factory=list)  # layers whose input the op multiplies by a block Hadamard
    hadamard_size: int = 0  # its largest block order h (a power of two); 0: the largest power of two dividing K
    stats_blocks: int = 6  # decoder blocks whose statistics are collected at once
    on_unsupported: str = "error"  # "skip" | "error"

    def validate(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"int4: {key} {why}")

        for key in ("include", "exclude"):
            for p in getattr(self, key):
                if not isinstance(p, str) or not p:
                    raise bad(key, f"must be a list of non-empty glob patterns, got {p!r}")
        for key, size in [("block_size", self.block_size)] + [
            (f"block_size_overrides[{pat!r}]", v) for pat, v in self.block_size_overrides.items()
        ]:
            if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 256 or size & (size - 1):
                raise bad(key, f"must be a power of two in 16..256 (what QMatMul takes), got {size!r}")
        if self.algorithm not in ALGORITHMS:
            raise bad("algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.scale_refit and self.algorithm == "rtn":
            raise bad("scale_refit", "needs calibration statistics: use algorithm 'rtn-clip' or 'gptq'")
        if self.clip_objective not in ("diag", "full"):
            raise bad("clip_objective", f"must be 'diag' or 'full', got {self.clip_objective!r}")
        if self.clip_grid < 1:
            raise bad("clip_grid", f"must be at least 1, got {self.clip_grid}")
        if not 0.0 < self.clip_min_shrink <= 1.0:
            raise bad("clip_min_shrink", f"must be in (0, 1], got {self.clip_min_shrink}")
        if not 0.0 <= self.damp < 10.0:
            raise bad("damp", f"must be in [0, 10) (a fraction of the mean Hessian diagonal), got {self.damp}")
        if self.lazy_batch < 1:
            raise bad("lazy_batch", f"must be at least 1, got {self.lazy_batch}")
        if self.precision not in ("float32", "float64"):
            raise bad("precision", f"must be 'float32' or 'float64', got {self.precision!r}")
        if self.act_bits not in (16, 8, 4):
            raise bad("act_bits", f"must be 16, 8 or 4, got {self.act_bits}")
        for pattern, bits in self.act_bits_overrides.items():
            if not isinstance(bits, int) or isinstance(bits, bool) or bits not in (16, 8, 4):
                raise bad("act_bits_overrides", f"value for {pattern!r} must be 16, 8 or 4, got {bits!r}")
        if self.trip and self.act_bits == 16 and all(b == 16 for b in self.act_bits_overrides.values()):
            raise bad("trip", "needs quantized activations (act_bits 8 or 4); set trip = false or lower act_bits")
        if not 0 <= self.trip_max_shift <= MAX_TRIP_SHIFT:
            raise bad("trip_max_shift", f"must be in 0..{MAX_TRIP_SHIFT}, got {self.trip_max_shift}")
        if self.trip_candidates < 1:
            raise bad("trip_candidates", f"must be at least 1, got {self.trip_candidates}")
        if self.trip_samples < 16:
            raise bad("trip_samples", f"must be at least 16, got {self.trip_samples}")
        for pat in self.hadamard:
            if not isinstance(pat, str) or not pat:
                raise bad("hadamard", f"must be a list of non-empty glob patterns, got {pat!r}")
        h = self.hadamard_size
        if not isinstance(h, int) or isinstance(h, bool) or (h != 0 and (h < 2 or h & (h - 1))):
            raise bad("hadamard_size", f"must be 0 (largest possible) or a power of two >= 2, got {h!r}")
        if h and not self.hadamard:
            raise bad("hadamard_size", "applies to the layers listed in hadamard = [...], which is empty")
        if self.stats_blocks < 1:
            raise bad("stats_blocks", f"must be at least 1, got {self.stats_blocks}")
        if self.on_unsupported not in ("skip", "error"):
            raise bad("on_unsupported", f"must be 'skip' or 'error', got {self.on_unsupported!r}")

    def block_size_for(self, layer: str) -> int:
        """block_size of one layer: the first matching override pattern, else block_size."""
        for pattern, size in self.block_size_overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                return size
        return self.block_size

    def act_bits_for(self, layer: str) -> int:
        """act_bits of one layer: the first matching override pattern, else act_bits."""
        for pattern, bits in self.act_bits_overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                return bits
        return self.act_bits

    def hadamard_for(self, layer: str, K: int) -> int:
        """Order h of the online input Hadamard transform of one layer (0: none): the largest power
        of two dividing K (K = 1536 → 512, 576 → 64), capped at hadamard_size when that is set."""
        if not any(fnmatch.fnmatchcase(layer, p) for p in self.hadamard):
            return 0
        h = K & -K
        if self.hadamard_size:
            h = min(h, self.hadamard_size)
        return h if h >= 2 else 0

    def selects(self, layer: str) -> bool:
        if layer == "lm_head" and not self.lm_head:
            return False
        if not any(fnmatch.fnmatchcase(layer, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(layer, p) for p in self.exclude)


# ============================================================================================
# block quantization primitives (torch, weight orientation [K, N])
# ============================================================================================
@dataclass
class QuantizedWeight:
    """4-bit codes of a [K, N] weight in blocks of `block_size` rows along K."""

    q: np.ndarray  # uint8 [K, N] in 0..15
    scales: np.ndarray  # float32 [n_blocks, N]
    zero_points: np.ndarray | None  # uint8 [n_blocks, N]; None = symmetric (8)
    block_size: int

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[0]

    def dequantize(self) -> np.ndarray:
        """Ŵ = scale·(q − zp) in float32, exactly as the op computes it."""
        K = self.q.shape[0]
        rows = np.arange(K) // self.block_size
        zp = self.zero_points.astype(np.float32) if self.zero_points is not None else np.float32(8.0)
        zp = zp[rows] if self.zero_points is not None else zp
        return (self.scales[rows] * (self.q.astype(np.float32) - zp)).astype(np.float32)


def split_columns(qw: QuantizedWeight, widths: list[int]) -> list[QuantizedWeight]:
    """The quantized weights of layers whose [K, N_i] weights were concatenated along N."""
    out, n0 = [], 0
    for n in widths:
        cols = slice(n0, n0 + n)
        zp = None if qw.zero_points is None else np.ascontiguousarray(qw.zero_points[:, cols])
        out.append(QuantizedWeight(np.ascontiguousarray(qw.q[:, cols]), np.ascontiguousarray(qw.scales[:, cols]), zp, qw.block_size))
        n0 += n
    return out


def n_blocks_of(K: int, block_size: int) -> int:
    return -(-K // block_size)


def _torch():
    import torch

    return torch


def shrink_grid(steps: int, min_shrink: float) -> np.ndarray:
    """α values tried by the clipping search, 1 first (so α = 1, plain RTN, wins ties)."""
    if steps == 1:
        return np.ones(1)
    return np.linspace(1.0, min_shrink, steps)


def stored_scales(scale):
    """The scales as QMatMul stores them (float16, compiler.custom_ops.round_scales), in the
    tensor's dtype: every quantizer here picks its codes for these values, not for the float ones.
    Nonzero scales below float16's smallest (2^-24) become ±2^-24; overflow gives inf, which the
    packer reports."""
    torch = _torch()
    r = scale.to(torch.float16).to(scale.dtype)
    return torch.where((r == 0) & (scale != 0), torch.copysign(torch.full_like(scale, 2.0**-24), scale), r)


def block_scale_zero(wb, symmetric: bool, shrink=1.0):
    """Scale and zero point of block columns.

    wb: tensor [..., g, N] (the g rows of a block); shrink: float or tensor [A] (then the result
    gets a leading A axis). Returns (scale [.., N] float, zero [.., N] float holding integers);
    the scale is rounded to the stored float16 value before the zero point is derived from it.
    An all-zero column gets scale 1 (its values quantize to the zero point, i.e. to 0).
    """
    torch = _torch()
    mx = wb.amax(-2).clamp(min=0)
    mn = wb.amin(-2).clamp(max=0)
    a = torch.as_tensor(shrink, dtype=wb.dtype)
    if a.ndim == 1:
        a = a.view(-1, *([1] * mx.ndim))
    if symmetric:
        scale = torch.maximum(mx / 7.0, -mn / 8.0) * a
        scale = stored_scales(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.full_like(scale, 8.0)
    else:
        scale = (mx - mn) * a / 15.0
        scale = stored_scales(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.clamp(torch.round(-mn * a / scale), 0, 15)
    return scale, zero


def quantize_codes(w, scale, zero):
    """q = clamp(round(w/scale) + zero, 0, 15) (broadcasting)."""
    torch = _torch()
    return torch.clamp(torch.round(w / scale) + zero, 0, 15)


def fake_quantize(w, scale, zero):
    return scale * (quantize_codes(w, scale, zero) - zero)


def choose_block_params(wb, symmetric: bool, alphas, weight=None, hessian=None, chunk: int = 8192):
    """Scale/zero of one block [g, N] minimizing the weighted rounding error over the α grid.

    weight: [g] per-row weights (diag objective Σ_k weight_k Δ_kn²), or hessian: [g, g] (ΔᵀHΔ).
    Neither: plain squared error. Ties keep the first α (α = 1 when it leads the grid).
    """
    torch = _torch()
    alphas_t = torch.as_tensor(np.asarray(alphas), dtype=wb.dtype)
    if len(alphas_t) == 1:
        return block_scale_zero(wb, symmetric, float(alphas_t[0]))
    g, N = wb.shape
    out_scale = torch.empty(N, dtype=wb.dtype)
    out_zero = torch.empty(N, dtype=wb.dtype)
    for c0 in range(0, N, chunk):
        w = wb[:, c0 : c0 + chunk]
        scale, zero = block_scale_zero(w, symmetric, alphas_t)  # [A, n]
        delta = w.unsqueeze(0) - fake_quantize(w.unsqueeze(0), scale.unsqueeze(1), zero.unsqueeze(1))
        if hessian is not None:
            err = (delta * torch.einsum("kj,ajn->akn", hessian, delta)).sum(1)
        elif weight is not None:
            err = (delta.square() * weight.view(1, -1, 1)).sum(1)
        else:
            err = delta.square().sum(1)
        best = err.argmin(0)  # first minimum
        idx = torch.arange(w.shape[1])
        out_scale[c0 : c0 + chunk] = scale[best, idx]
        out_zero[c0 : c0 + chunk] = zero[best, idx]
    return out_scale, out_zero


def _pack_result(q, scales, zeros, symmetric: bool, block_size: int) -> QuantizedWeight:
    return QuantizedWeight(
        q=q.to(_torch().uint8).numpy(),
        scales=scales.to(_torch().float32).numpy(),
        zero_points=None if symmetric else zeros.to(_torch().uint8).numpy(),
        block_size=block_size,
    )


def quantize_rtn(
    W: np.ndarray,
    block_size: int,
    symmetric: bool = True,
    *,
    clip: bool = False,
    hessian: np.ndarray | None = None,
    clip_objective: str = "diag",
    clip_grid: int = 20,
    clip_min_shrink: float = 0.5,
) -> QuantizedWeight:
    """Round-to-nearest (α = 1) or, with clip, the per-block α search ('rtn-clip').

    W: [K, N]. hessian: XᵀX [K, K] weighting the clip objective (None: unweighted).
    """
    torch = _torch()
    Wt = torch.as_tensor(np.asarray(W, np.float32))
    K, N = Wt.shape
    nb = n_blocks_of(K, block_size)
    H = torch.as_tensor(np.asarray(hessian, np.float32)) if hessian is not None else None
    alphas = shrink_grid(clip_grid, clip_min_shrink) if clip else np.ones(1)
    scales = torch.empty(nb, N)
    zeros = torch.empty(nb, N)
    q = torch.empty(K, N)
    for b in range(nb):
        r0, r1 = b * block_size, min((b + 1) * block_size, K)
        wb = Wt[r0:r1]
        weight = hb = None
        if H is not None and clip_objective == "full":
            hb = H[r0:r1, r0:r1]
        elif H is not None:
            weight = torch.diagonal(H)[r0:r1]
        s, z = choose_block_params(wb, symmetric, alphas, weight=weight, hessian=hb)
        scales[b], zeros[b] = s, z
        q[r0:r1] = quantize_codes(wb, s, z)
    return _pack_result(q, scales, zeros, symmetric, block_size)


def quantize_gptq(
    W: np.ndarray,
    H: np.ndarray,
    block_size: int,
    symmetric: bool = True,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    lazy_batch: int = 128,
    clip: bool = False,
    clip_grid: int = 20,
    clip_min_shrink: float = 0.5,
    precision: str = "float32",
) -> QuantizedWeight:
    """GPTQ with lazy batched updates, optional act-order, blocks contiguous in K (module doc).

    W: [K, N] weight; H: [K, K] = XᵀX of the layer input (float64 fine).
    """
    torch = _torch()
    dtype = torch.float64 if precision == "float64" else torch.float32
    K, N = W.shape
    Wt = torch.as_tensor(np.asarray(W)).to(dtype).T.contiguous()  # [N, K]: channel = column
    H = torch.as_tensor(np.asarray(H, np.float64)).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Wt[:, dead] = 0.0
    diag_h = torch.diagonal(H).clone()  # undamped: weights of the clip objective
    perm = torch.argsort(diag_h, descending=True, stable=True) if act_order else torch.arange(K)
    pos_of = torch.empty(K, dtype=torch.long)
    pos_of[perm] = torch.arange(K)
    Wt = Wt[:, perm].contiguous()
    U = _inverse_cholesky_upper(H[perm][:, perm], damp).to(dtype)

    nb = n_blocks_of(K, block_size)
    alphas = shrink_grid(clip_grid, clip_min_shrink) if clip else np.ones(1)
    scales = torch.zeros(nb, N, dtype=dtype)
    zeros = torch.zeros(nb, N, dtype=dtype)
    have = [False] * nb
    Q = torch.zeros(N, K, dtype=dtype)  # codes, processing order

    for i1 in range(0, K, lazy_batch):
        i2 = min(i1 + lazy_batch, K)
        W1 = Wt[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            ch = int(perm[i1 + i])
            b = ch // block_size
            if not have[b]:
                # the block's channels in processing order: all still ahead of us (none visited)
                pos = pos_of[b * block_size : min((b + 1) * block_size, K)]
                cur = torch.empty(N, len(pos), dtype=dtype)
                inside = pos < i2
                cur[:, inside] = W1[:, pos[inside] - i1]
                if (~inside).any():  # pending lazy update of channels beyond this batch
                    far = pos[~inside]
                    cur[:, ~inside] = Wt[:, far] - E1[:, :i] @ U[i1 : i1 + i][:, far]
                wb = cur.T  # [g, N]
                weight = diag_h[b * block_size : min((b + 1) * block_size, K)].to(dtype) if clip else None
                scales[b], zeros[b] = choose_block_params(wb, symmetric, alphas, weight=weight)
                have[b] = True
            w = W1[:, i]
            q = quantize_codes(w, scales[b], zeros[b])
            Q[:, i1 + i] = q
            err = (w - scales[b] * (q - zeros[b])) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Wt[:, i2:] -= E1 @ U[i1:i2, i2:]

    q = Q[:, pos_of].T  # back to original channel order, [K, N]
    return _pack_result(q, scales, zeros, symmetric, block_size)


def refit_block_scales(
    W: np.ndarray, qw: QuantizedWeight, H: np.ndarray, ridge: float = 1e-9, columns_per_step: int | None = None
) -> QuantizedWeight:
    """Least-squares block scales for fixed codes: per column n, with u_bn = (q − z)·[k ∈ block b]
    (K-vectors, one per block) and Ŵ_{:,n} = Σ_b s_bn·u_bn, minimize the output error
    (w_n − U_n s_n)ᵀ H (w_n − U_n s_n) over s_n: (U_nᵀ H U_n) s_n = U_nᵀ H w_n, an n_blocks-square
    system per column, rounded to the stored float16 values. The current scales are feasible, so a
    column whose rounded refit does not lower its error (or is not finite) keeps them: never worse
    on the calibration objective. float64."""
    torch = _torch()
    K, N = qw.q.shape
    g, nb = qw.block_size, qw.n_blocks
    rows = torch.arange(K) // g
    zp = torch.full((nb, N), 8.0, dtype=torch.float64) if qw.zero_points is None else torch.from_numpy(qw.zero_points).double()
    Dq = torch.from_numpy(qw.q).double() - zp[rows]  # [K, N], q − z
    Hd = torch.from_numpy(np.asarray(H, np.float64))
    Wd = torch.from_numpy(np.asarray(W, np.float64))
    s0 = torch.from_numpy(qw.scales).double()  # [nb, N]
    pad = nb * g - K

    def block_sums(x):  # [K, N] → [nb, N], Σ over each block's rows
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(nb, g, x.shape[1]).sum(1)

    chunk = columns_per_step or max(1, (1 << 24) // K)  # a [K, chunk] float64 product stays ≈ 128 MB
    s_new = s0.clone()
    for n0 in range(0, N, chunk):
        cols = slice(n0, min(n0 + chunk, N))
        Dc, Wc, sc = Dq[:, cols], Wd[:, cols], s0[:, cols]
        G = torch.empty(Dc.shape[1], nb, nb, dtype=torch.float64)  # [n, b, c] = u_bᵀ H u_c
        for c in range(nb):
            r0, r1 = c * g, min((c + 1) * g, K)
            G[:, :, c] = block_sums(Dc * (Hd[:, r0:r1] @ Dc[r0:r1])).T
        rhs = block_sums(Dc * (Hd @ Wc)).T  # [n, b] = u_bᵀ H w
        # solve for the change from the current scales; the ridge keeps blocks whose codes are all
        # at the zero point (u_b = 0, a zero row of G) at their scale
        diag = torch.diagonal(G, dim1=1, dim2=2)
        lam = ridge * diag.mean(1, keepdim=True).clamp_min(1e-300)
        A = G + torch.diag_embed(lam.expand(-1, nb))
        b = rhs - (G @ sc.T.unsqueeze(2)).squeeze(2)
        delta, info = torch.linalg.solve_ex(A, b)
        cand = stored_scales(sc.T + delta)  # [n, b], judged as stored
        # error per column, before and after: wᵀHw − 2 sᵀr + sᵀGs (the constant cancels)
        def err(sv):
            return -2 * (sv * rhs).sum(1) + (sv.unsqueeze(1) @ G @ sv.unsqueeze(2)).reshape(-1)

        ok = (info == 0) & torch.isfinite(cand).all(1) & (err(cand) < err(sc.T))
        s_new[:, cols] = torch.where(ok.unsqueeze(0), cand.T, sc)
    return QuantizedWeight(qw.q, s_new.to(torch.float32).numpy(), qw.zero_points, g)


def _inverse_cholesky_upper(H, damp: float):
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹ (H⁻¹ = UᵀU), float64; the dampening
    is raised ×10 until the factorization succeeds."""
    torch = _torch()
    H = H.to(torch.float64)
    mean_diag = torch.diagonal(H).mean()
    lam = damp
    for _ in range(8):
        Hd = H + (lam * mean_diag) * torch.eye(H.shape[0], dtype=H.dtype)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        lam = max(lam * 10, 1e-6)
    raise RuntimeError("GPTQ: the layer's Hessian could not be factorized even with heavy dampening")


def output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """tr(ΔᵀHΔ) = ‖XW − XŴ‖²_F for H = XᵀX (float64)."""
    D = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    return float(np.einsum("kn,kj,jn->", D, np.asarray(H, np.float64), D))


# ============================================================================================
# activations and TRIP
# ============================================================================================
def fake_quantize_activations(x: np.ndarray, act_bits: int, shifts: np.ndarray | None = None) -> np.ndarray:
    """What the op's activation quantization makes of rows x [T, K], back in the domain of x.

    Shifted domain x̃ = x·2^{−ρ}; σ_t = max|x̃_t|/Q; x̂̃ = σ_t·nearbyint(x̃·Q/max|x̃_t|) (round half
    to even, as the reference kernel); returned: x̂̃·2^{ρ}. act_bits 16 returns x unchanged.
    """
    x = np.asarray(x, np.float32)
    if act_bits == 16:
        return x.copy()
    qmax = np.float32(7 if act_bits == 4 else 127)
    factor = np.ones(x.shape[-1], np.float32) if shifts is None else np.exp2(-np.asarray(shifts, np.float32))
    xs = x * factor
    absmax = np.abs(xs).max(-1, keepdims=True)
    safe = np.where(absmax > 0, absmax, np.float32(1))
    q = np.clip(np.rint(xs * (qmax / safe)), -qmax, qmax)
    deq = q * (safe / qmax)
    return (deq / factor).astype(np.float32)


def fold_trip_shifts(W: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """W' = diag(2^ρ)·W (exact in fp32), so X·W = (X·2^{−ρ})·W'."""
    return (np.asarray(W, np.float32) * np.exp2(np.asarray(shifts, np.float32))[:, None]).astype(np.float32)


def fold_hadamard(W: np.ndarray, h: int) -> np.ndarray:
    """W' = B·W/h with B = diag(H_h, …, H_h) (K/h blocks), so X·W = (X·B)·W' (B·B = h·I)."""
    from compiler.custom_ops import sylvester_hadamard

    K, N = W.shape
    Wb = np.asarray(W, np.float64).reshape(K // h, h, N)
    return (np.matmul(sylvester_hadamard(h).astype(np.float64), Wb) / h).reshape(K, N).astype(np.float32)


def hadamard_gram(H: np.ndarray, h: int) -> np.ndarray:
    """(X·B)ᵀ(X·B) = B·XᵀX·B for the block-diagonal B of fold_hadamard (float64; two batched
    products with the h×h blocks, O(h·K²))."""
    from compiler.custom_ops import sylvester_hadamard

    K = H.shape[0]
    Hh = sylvester_hadamard(h).astype(np.float64)
    left = np.matmul(Hh, np.asarray(H, np.float64).reshape(K // h, h, K)).reshape(K, K)  # B·H
    return np.matmul(left.reshape(K, K // h, h), Hh).reshape(K, K)  # (B·H)·B (Hh symmetric)


def trip_objective_terms(
    samples,
    row_energy,
    hdiag,
    W,
    shifts,
    act_bits: int,
    block_size: int,
    symmetric: bool,
):
    """(activation term, weight term) of J(ρ) (module doc), torch float32/64 tensors in.

    samples [T, K]; row_energy [K] = ‖W_k,:‖²; hdiag [K] = H_kk/count; W [K, N]; shifts [K] int.
    """
    torch = _torch()
    act = _trip_activation_error(samples, row_energy, shifts.unsqueeze(0), act_bits)[0]
    f = torch.exp2(shifts.to(W.dtype))
    Wp = W * f[:, None]
    werr = torch.zeros(W.shape[0], dtype=W.dtype)
    for b0 in range(0, W.shape[0], block_size):
        wb = Wp[b0 : b0 + block_size]
        s, z = block_scale_zero(wb, symmetric)
        werr[b0 : b0 + block_size] = (wb - fake_quantize(wb, s, z)).square().sum(1)
    return act, float((hdiag / f.square() * werr).sum())


def _trip_activation_error(samples, row_energy, shifts_batch, act_bits: int):
    """Activation term for a batch of shift vectors shifts_batch [C, K] → [C] (mean over tokens)."""
    torch = _torch()
    qmax = 7.0 if act_bits == 4 else 127.0
    f = torch.exp2(-shifts_batch.to(samples.dtype))  # [C, K]
    xs = samples.unsqueeze(0) * f.unsqueeze(1)  # [C, T, K]
    absmax = xs.abs().amax(-1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    deq = torch.clamp(torch.round(xs * (qmax / safe)), -qmax, qmax) * (safe / qmax)
    err = (samples.unsqueeze(0) - deq / f.unsqueeze(1)).square()
    return (err * row_energy).sum(-1).mean(-1)


def choose_trip_shifts(
    samples: np.ndarray,
    W: np.ndarray,
    hdiag: np.ndarray,
    act_bits: int,
    max_shift: int,
    block_size: int,
    symmetric: bool = True,
    candidates: int = 32,
    sweeps: int = 2,
) -> np.ndarray:
    """Per-channel shifts ρ ∈ {0..max_shift} (uint8 [K]) minimizing J(ρ) by coordinate descent.

    samples: [T, K] calibration rows of the input; W: [K, N] weights of every layer reading it
    (concatenated along N); hdiag: E[x_k²] per channel (H_kk / count).

    Exact and cheap: trying shifts for channel c changes σ_t only for the tokens A_c where c is
    the per-token maximum, |x_tc| > max_{k≠c} |x̃_tk| (for the others σ_t stays and only channel c's
    own rounding changes). The sets A_c are disjoint (one argmax per token), so a whole sweep costs
    O(T·K) plus one full re-evaluation per accepted change.
    """
    X = np.ascontiguousarray(samples, dtype=np.float32)
    Wm = np.asarray(W, np.float32)
    K = Wm.shape[0]
    shifts = np.zeros(K, np.int64)
    if max_shift == 0 or act_bits == 16 or len(X) == 0:
        return shifts.astype(np.uint8)
    Q = np.float32(7 if act_bits == 4 else 127)
    w = (Wm.astype(np.float64) ** 2).sum(1)  # ‖W_k,:‖²
    hd = np.asarray(hdiag, np.float64)
    T = len(X)
    rows = np.arange(T)
    options = np.arange(max_shift + 1)

    def evaluate(sh):
        f = np.exp2(-sh.astype(np.float32))
        a = np.abs(X * f)
        i1 = a.argmax(1)
        top1 = a[rows, i1]
        a[rows, i1] = -1.0
        top2 = np.maximum(a.max(1), 0.0) if K > 1 else np.zeros(T, np.float32)
        sigma = np.where(top1 > 0, top1 / Q, np.float32(1.0)).astype(np.float32)
        err = (X - _round_to_grid(X * f, sigma[:, None]) / f) ** 2  # [T, K]
        return i1, top1, top2, sigma, err, err.astype(np.float64) @ w

    def weight_term(c, sh_options):  # weight rounding of c's block for each option of ρ_c
        b0 = (c // block_size) * block_size
        b1 = min(b0 + block_size, K)
        sh = np.repeat(shifts[None, b0:b1], len(sh_options), 0)
        sh[:, c - b0] = sh_options
        f = np.exp2(sh.astype(np.float64))  # [A, g]
        torch = _torch()
        wb = torch.as_tensor(Wm[b0:b1].astype(np.float64))[None] * torch.as_tensor(f)[..., None]
        s_, z_ = block_scale_zero(wb, symmetric)
        e = (wb - fake_quantize(wb, s_.unsqueeze(-2), z_.unsqueeze(-2))).square().sum(-1).numpy()  # [A, g]
        return (hd[b0:b1] / f**2 * e).sum(1)

    i1, top1, top2, sigma, err, e_t = evaluate(shifts)
    order = np.argsort(-np.abs(X).max(0), kind="stable")[: min(candidates, K)]
    for _ in range(sweeps):
        changed = False
        for c in order.tolist():
            others = np.where(i1 == c, top2, top1)  # max_{k≠c} |x̃_tk|
            xc = X[:, c]
            affected = np.abs(xc) > others
            free = ~affected
            base = e_t[free].sum() - w[c] * err[free, c].astype(np.float64).sum()
            total = np.empty(len(options))
            for j, s_opt in enumerate(options):
                f = np.float32(2.0**-s_opt)
                xf = xc[free]
                own = ((xf - _round_to_grid(xf * f, sigma[free]) / f).astype(np.float64) ** 2).sum()
                total[j] = base + w[c] * own
                if affected.any():
                    sh = shifts.copy()
                    sh[c] = s_opt
                    ff = np.exp2(-sh.astype(np.float32))
                    xa = X[affected] * ff
                    amax = np.abs(xa).max(1, keepdims=True)
                    sg = np.where(amax > 0, amax / Q, np.float32(1.0)).astype(np.float32)
                    total[j] += (((X[affected] - _round_to_grid(xa, sg) / ff) ** 2).astype(np.float64) @ w).sum()
            total = total / T + weight_term(c, options)
            best = int(total.argmin())
            if options[best] != shifts[c] and total[best] < total[int(shifts[c])]:
                shifts[c] = options[best]
                changed = True
                i1, top1, top2, sigma, err, e_t = evaluate(shifts)
        if not changed:
            break
    return shifts.astype(np.uint8)


def _round_to_grid(x, sigma):
    """σ·round(x/σ), round half to even as the op. With σ = absmax/Q every |x/σ| ≤ Q (up to one
    float rounding at the maximum, which rint maps back to ±Q), so the op's clamp never acts."""
    return np.rint(x / sigma) * sigma


def trip_objective(samples, W, hdiag, shifts, act_bits: int, block_size: int, symmetric: bool = True) -> float:
    """J(ρ) evaluated directly (every token, every channel): the reference for the search."""
    torch = _torch()
    X = torch.as_tensor(np.asarray(samples, np.float64))
    Wt = torch.as_tensor(np.asarray(W, np.float64))
    act, wterm = trip_objective_terms(
        X, Wt.square().sum(1), torch.as_tensor(np.asarray(hdiag, np.float64)), Wt,
        torch.as_tensor(np.asarray(shifts, np.int64)), act_bits, block_size, symmetric,
    )  # fmt: skip
    return float(act) + wterm


# ============================================================================================
# the graph pass
# ============================================================================================
@dataclass
class QuantUnit:
    """One MatMul to quantize: a dense layer, or one factor of a low-rank pair."""

    name: str  # "layers.3.q", or "layers.3.q.w1" / ".w2" for a low-rank pair's factors
    layer: str  # the layer map name the recipe's patterns match
    block: int | None
    node: ir.Node
    weight: ir.Value
    K: int
    N: int
    act_bits: int
    block_size: int

    @property
    def input_name(self) -> str:
        return self.node.inputs[0].name

    @property
    def base(self) -> str:
        """Prefix of the packed initializer names: the weight's name without '.weight'."""
        w = self.weight.name
        return w[: -len(".weight")] if w.endswith(".weight") else f"{self.name}"


def _unsupported_reason(unit_node: ir.Node | None, weight: ir.Value | None) -> str | None:
    if unit_node is None:
        return "its node is not in the graph (re-analyze the model)"
    if unit_node.domain == CUSTOM_DOMAIN and unit_node.op_type == "QMatMul":
        return "already quantized (a QMatMul computes it); the model was compiled with int4 before"
    if not is_onnx_op(unit_node, "MatMul"):
        return f"computed by {unit_node.op_type}, not a plain MatMul"
    if weight is None or not weight.is_initializer() or weight.const_value is None:
        return "its weight is not a constant initializer"
    dims = weight.const_value.shape
    if len(dims) != 2:
        return f"its weight has shape {list(dims)}, the op takes a 2-D [K, N] weight"
    if weight.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"its weight is {weight.const_value.dtype.name}, not float (already quantized?)"
    K, N = dims
    if K < 1 or N < 1:
        return f"its weight shape {list(dims)} is empty"
    x = unit_node.inputs[0]
    if x is None:
        return "its MatMul has no activation input"
    if x.shape is not None and len(x.shape) >= 1 and isinstance(x.shape[-1], int) and x.shape[-1] != K:
        return f"its input has {x.shape[-1]} channels but the weight has K = {K} rows"
    return None


@register_pass
class Int4Pass(CompilerPass):
    """Linear layers → llmfold.QMatMul with 4-bit block weights (RTN / clipping search / GPTQ),
    optional per-token int8/int4 activations and TRIP power-of-two channel factors."""

    name = "int4"
    Params = Int4Params
    description = "4-bit block-quantized weights (GPTQ/RTN), QMatMul with A16/A8/A4 activations, TRIP"

    def requires(self, model: ir.Model) -> None:
        structure = self.ctx.structure(model)
        if not structure.blocks:
            raise UserError("int4: the model has no recognizable decoder blocks; export it with `llmfold export`")

    # -- planning -------------------------------------------------------------------------------
    def plan(self, model: ir.Model) -> tuple[list[QuantUnit], list[str]]:
        """Units to quantize, and messages for selected layers that cannot be quantized."""
        p = self.params
        structure = self.ctx.structure(model)
        nodes = {n.name: n for n in model.graph}
        units: list[QuantUnit] = []
        problems: list[str] = []
        for lin in structure.linears():
            if not p.selects(lin.name):
                continue
            if lin.kind != "dense" and lin.kind != "low-rank":
                node = nodes.get(lin.node)
                op = f"{node.domain}.{node.op_type}" if node is not None else lin.kind
                problems.append(f"{lin.name}: already quantized ({lin.kind}, computed by {op})")
                continue
            names = lin.nodes or [lin.node]
            if lin.kind == "low-rank" and len(names) != 2:
                problems.append(f"{lin.name}: low-rank layer with {len(names)} nodes; expected a pair of MatMuls")
                continue
            layer_units = []
            for i, node_name in enumerate(names):
                node = nodes.get(node_name)
                weight = node.inputs[1] if node is not None and len(node.inputs) > 1 else None
                why = _unsupported_reason(node, weight)
                if why:
                    problems.append(f"{lin.name}: {why}")
                    layer_units = None
                    break
                K, N = (int(d) for d in weight.const_value.shape)
                uname = lin.name if len(names) == 1 else f"{lin.name}.w{i + 1}"
                layer_units.append(QuantUnit(
                    uname, lin.name, lin.block, node, weight, K, N, p.act_bits_for(lin.name), p.block_size_for(lin.name)
                ))
            if layer_units:
                units.extend(layer_units)
        # a weight shared by two nodes cannot become two packed copies silently
        users: dict[str, list[str]] = {}
        for u in units:
            users.setdefault(u.weight.name, []).append(u.name)
        for w, us in users.items():
            if len(us) > 1:
                problems.append(f"{', '.join(us)}: share the weight {w}; quantize it once by excluding all but one")
                units = [u for u in units if u.weight.name != w]
        return units, problems

    # -- the pass -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        p = self.params
        units, problems = self.plan(model)
        if problems:
            if p.on_unsupported == "error":
                raise UserError(
                    "int4: cannot quantize " + "; ".join(problems)
                    + ". Exclude these layers (exclude = [...]) or set on_unsupported = \"skip\""
                )
            for msg in problems:
                self.ctx.log(f"skipping {msg}")
        if not units:
            self.ctx.log("no layer selected for quantization")
            self.ctx.record(quantized=0, skipped=problems)
            return ir.passes.PassResult(model, False)

        from compiler.custom_ops import pack_int4_blocks

        self._pack = pack_int4_blocks
        self._tiny_scales: dict[str, int] = {}  # layer → scales in float16's subnormal range
        model.opset_imports[CUSTOM_DOMAIN] = 1
        t0 = time.perf_counter()
        self._timing = {"calibration": 0.0, "quantize": 0.0, "trip": 0.0}
        rounds = self._rounds(units)
        per_layer: dict[str, dict] = {}
        with self.ctx.progress("int4", total=len(units)) as advance, _one_torch_thread():
            for round_units in rounds:
                self._quantize_round(model, round_units, per_layer, advance)
        errors = [v["rel_err"] for v in per_layer.values() if v.get("rel_err") is not None]
        self.ctx.record(
            quantized=len(units),
            skipped=problems,
            algorithm=p.algorithm,
            block_size=p.block_size,
            block_size_overrides=dict(p.block_size_overrides),
            scale_refit=p.scale_refit,
            symmetric=p.symmetric,
            act_bits=p.act_bits,
            act_bits_overrides=dict(p.act_bits_overrides),
            trip=p.trip,
            mean_rel_output_error=round(float(np.mean(errors)), 6) if errors else None,
            layers=per_layer,
        )
        if self._tiny_scales:  # fewer significant bits there (2^-24 steps): say where
            worst = sorted(self._tiny_scales.items(), key=lambda kv: -kv[1])[:3]
            self.ctx.log(f"{sum(self._tiny_scales.values())} block scales in {len(self._tiny_scales)} layer(s) are below "
                         f"float16's normal range (2^-14) and keep fewer than 11 significant bits: "
                         + ", ".join(f"{k} ({v})" for k, v in worst))
        # timings go to the log, not the record: the same inputs and seed give identical files
        t = self._timing
        self.ctx.log(
            f"{len(units)} layers in {len(rounds)} statistics round(s), {time.perf_counter() - t0:.1f} s: "
            f"calibration {t['calibration']:.1f} s, quantization {t['quantize']:.1f} s, "
            f"TRIP {t['trip']:.1f} s"
        )
        self.ctx.invalidate_structure()
        return ir.passes.PassResult(model, True)

    def _rounds(self, units: list[QuantUnit]) -> list[list[QuantUnit]]:
        """Groups of units whose statistics are collected together: `stats_blocks` decoder blocks
        per round, in block order. Layers outside blocks (lm_head) join the last round: its
        collection runs the whole model anyway, so lm_head's input costs no extra pass."""
        by_round: dict[int, list[QuantUnit]] = {}
        blocks = [u.block for u in units if u.block is not None]
        last = max(blocks) // self.params.stats_blocks if blocks else 0
        for u in units:
            r = u.block // self.params.stats_blocks if u.block is not None else last
            by_round.setdefault(r, []).append(u)
        return [by_round[r] for r in sorted(by_round)]

    def _needs_stats(self, unit: QuantUnit) -> bool:
        return self.params.algorithm != "rtn" or (self.params.trip and unit.act_bits < 16)

    def _quantize_round(self, model, units: list[QuantUnit], per_layer: dict, advance) -> None:
        p = self.params
        # low-rank second factors read a value produced by the first factor: after quantizing the
        # first, their input changes, so they are handled in a second step of the round
        stages = [[u for u in units if not u.name.endswith(".w2")], [u for u in units if u.name.endswith(".w2")]]
        for stage in stages:
            if not stage:
                continue
            values = list(dict.fromkeys(u.input_name for u in stage if self._needs_stats(u)))
            trip_values = {u.input_name for u in stage if p.trip and u.act_bits < 16}
            stats = {}
            t0 = time.perf_counter()
            if values:
                plain = [v for v in values if v not in trip_values]
                if plain:
                    stats.update(self.ctx.input_stats(model, plain))
                if trip_values:
                    stats.update(self.ctx.input_stats(model, sorted(trip_values), max_samples=p.trip_samples))
            self._timing["calibration"] += time.perf_counter() - t0
            by_input: dict[str, list[QuantUnit]] = {}
            for u in stage:
                by_input.setdefault(u.input_name, []).append(u)
            for value, group in by_input.items():
                self._quantize_group(model, value, group, stats.get(value), per_layer, advance)
            self.ctx.invalidate_stats(values)

    def _quantize_group(self, model, value: str, group: list[QuantUnit], stats, per_layer, advance) -> None:
        """Layers reading one input value: shared TRIP shifts, then each layer's weight."""
        p = self.params
        weights = {u.name: u.weight.const_value.numpy().astype(np.float32) for u in group}
        H = stats.xtx if stats is not None else None
        samples = stats.samples if stats is not None else None
        orders = {p.hadamard_for(u.layer, u.K) for u in group}
        if len(orders) > 1:
            raise UserError(
                f"int4: hadamard selects some but not all of the layers reading {value} "
                f"({', '.join(u.layer for u in group)}); they share one input transform: select all or none"
            )
        had = orders.pop()
        if had:  # the op multiplies the input by B; the weights and statistics follow exactly
            from compiler.custom_ops import hadamard_rows_reference

            weights = {name: fold_hadamard(W, had) for name, W in weights.items()}
            H = hadamard_gram(H, had) if H is not None else None
            samples = hadamard_rows_reference(samples, had) if samples is not None and len(samples) else samples
        shifts = None
        quantized_act = [u for u in group if u.act_bits < 16]
        if p.trip and quantized_act:
            if stats is None or samples is None or len(samples) == 0:
                raise UserError(f"int4: TRIP needs calibration samples of {value}; none were collected")
            W_cat = np.concatenate([weights[u.name] for u in quantized_act], axis=1)
            t0 = time.perf_counter()
            shifts = choose_trip_shifts(
                samples,
                W_cat,
                np.diag(H) / max(stats.count, 1),
                act_bits=min(u.act_bits for u in quantized_act),
                max_shift=p.trip_max_shift,
                block_size=quantized_act[0].block_size,
                symmetric=p.symmetric,
                candidates=p.trip_candidates,
            )
            self._timing["trip"] += time.perf_counter() - t0
        # Layers reading the same input with the same channel shifts see the same H, so GPTQ's
        # processing order, Cholesky factor and error propagation are the same for them; every
        # output column is quantized independently (its block scales, codes and error updates use
        # only that column). Their weights are therefore quantized as one [K, ΣN] matrix: the
        # result equals quantizing each layer alone, with one factorization and one channel loop.
        subsets: dict[tuple[bool, int], list[QuantUnit]] = {}
        for u in group:
            shifted = shifts is not None and u.act_bits < 16 and bool(shifts.any())
            subsets.setdefault((shifted, u.block_size), []).append(u)
        for (shifted, block_size), units in subsets.items():
            t0 = time.perf_counter()
            unit_shift = shifts if shifted else None
            Ws = [weights[u.name] for u in units]
            H_u = H
            if unit_shift is not None:
                Ws = [fold_trip_shifts(W, unit_shift) for W in Ws]
                if H is not None:
                    inv = np.exp2(-unit_shift.astype(np.float64))
                    H_u = H * inv[:, None] * inv[None, :]  # (X·D⁻¹)ᵀ(X·D⁻¹) = D⁻¹ XᵀX D⁻¹
            qws = split_columns(self.quantize_weight(np.concatenate(Ws, axis=1), H_u, block_size), [W.shape[1] for W in Ws])
            self._timing["quantize"] += time.perf_counter() - t0
            for u, W, qw in zip(units, Ws, qws):
                rel = None if H_u is None else _relative_output_error(W, qw.dequantize(), H_u)
                self._replace(model, u, qw, unit_shift, had)
                per_layer[u.name] = {
                    "act_bits": u.act_bits,
                    **({"hadamard": had} if had else {}),
                    "rel_err": None if rel is None else round(rel, 6),
                    "shifted_channels": int((unit_shift > 0).sum()) if unit_shift is not None else 0,
                }
                advance(1, info=u.name)

    def quantize_weight(self, W: np.ndarray, H: np.ndarray | None, block_size: int | None = None) -> QuantizedWeight:
        p = self.params
        block_size = block_size or p.block_size
        if p.algorithm == "gptq":
            qw = quantize_gptq(
                W, H, block_size, p.symmetric, damp=p.damp, act_order=p.act_order,
                lazy_batch=p.lazy_batch, clip=p.gptq_clip, clip_grid=p.clip_grid,
                clip_min_shrink=p.clip_min_shrink, precision=p.precision,
            )  # fmt: skip
        else:
            qw = quantize_rtn(
                W, block_size, p.symmetric, clip=p.algorithm == "rtn-clip", hessian=H,
                clip_objective=p.clip_objective, clip_grid=p.clip_grid, clip_min_shrink=p.clip_min_shrink,
            )  # fmt: skip
        if p.scale_refit and H is not None:
            qw = refit_block_scales(W, qw, H)
        return qw

    def _replace(self, model: ir.Model, u: QuantUnit, qw: QuantizedWeight, shifts: np.ndarray | None,
                 hadamard: int = 0) -> None:
        """MatMul(X, W) → QMatMul(X, data, scales, zero_points?, bias=None, channel_shift?)."""
        graph = model.graph
        try:
            packed = self._pack(qw.q, qw.scales, qw.zero_points, qw.block_size)
        except ValueError as e:  # scales beyond float16: weights of magnitude > 7·65504
            raise UserError(f"int4: {u.name}: {e}") from None
        tiny = int(((np.abs(qw.scales) < 2.0**-14) & (qw.scales != 0)).sum())
        if tiny:
            self._tiny_scales[u.name] = tiny

        def init(suffix: str, arr: np.ndarray) -> ir.Value:
            name = f"{u.base}.{suffix}"
            if name in graph.initializers:
                raise UserError(f"int4: initializer {name} already exists; was the model quantized before?")
            arr = np.ascontiguousarray(arr)
            tensor = ir.Tensor(arr, name=name)
            v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            graph.register_initializer(v)
            return v

        inputs: list[ir.Value | None] = [
            u.node.inputs[0],
            init("qweight", packed["data"]),
            init("scales", packed["scales"]),
            init("zero_points", packed["zero_points"]) if packed.get("zero_points") is not None else None,
            None,  # bias
            init("channel_shift", shifts.astype(np.uint8)) if shifts is not None else None,
        ]
        while inputs[-1] is None:
            inputs.pop()
        old_name = u.node.name or f"{u.name}/MatMul"
        new_name = old_name[: -len("MatMul")] + "QMatMul" if old_name.endswith("MatMul") else f"{old_name}/QMatMul"
        node = ir.Node(
            CUSTOM_DOMAIN,
            "QMatMul",
            inputs=inputs,
            attributes=[
                ir.AttrInt64("K", u.K),
                ir.AttrInt64("N", u.N),
                ir.AttrInt64("block_size", qw.block_size),
                ir.AttrInt64("act_bits", u.act_bits),
                *([ir.AttrInt64("hadamard", hadamard)] if hadamard else []),
            ],
            num_outputs=1,
            name=new_name,
            # tags such as metadata_props["llmfold.layer"] (the SVD pass's low-rank factors) stay
            # on the node, so analysis still recognizes a QMatMul→QMatMul low-rank pair
            metadata_props=dict(u.node.metadata_props),
        )
        ir.convenience.replace_nodes_and_values(
            graph, insertion_point=u.node, old_nodes=[u.node], new_nodes=[node],
            old_values=list(u.node.outputs), new_values=list(node.outputs),
        )  # fmt: skip
        if not u.weight.uses() and u.weight.name in graph.initializers:
            graph.initializers.pop(u.weight.name)


@contextlib.contextmanager
def _one_torch_thread():
    """torch with one intra-op thread while the pass runs: GPTQ is a sequence of small ops on
    [N, ≤128] slices, for which torch's OpenMP team costs far more than it gains — measured on the
    2-core machine with other jobs running: 10–17× more CPU time (and wall time) with 2 threads
    than with 1 for SmolLM2's 576×576 … 1536×576 layers. Calibration runs in ONNX Runtime, whose
    threads this does not touch. The caller's setting is restored."""
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _relative_output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """tr(ΔᵀHΔ) / tr(WᵀHW): the layer's relative output error on the calibration inputs (a
    diagnostic rounded to 6 digits: float32 products, float64 sums; lm_head's [576, 49152] weight
    made the float64 products a noticeable share of the pass)."""
    torch = _torch()
    Ht = torch.as_tensor(np.asarray(H, np.float32))
    Wt = torch.as_tensor(np.asarray(W, np.float32))
    D = Wt - torch.as_tensor(np.asarray(W_hat, np.float32))
    den = float((Wt * (Ht @ Wt)).sum(dtype=torch.float64))
    return float((D * (Ht @ D)).sum(dtype=torch.float64)) / den if den > 0 else 0.0
