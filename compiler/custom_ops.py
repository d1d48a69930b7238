"""Python side of llmfold's custom operators (domain ``llmfold``, version 1).

- where the built C++ library is (:func:`library_path`) and ORT session options that load it;
- ONNX schemas with type/shape inference so ``onnx.checker`` and ``onnx.shape_inference`` accept
  models using ``QMatMul``, ``PackedMatMul`` and ``TokenPrune`` (:func:`register_schemas`);
- the packed INT4 weight layout (:func:`pack_int4_blocks` / :func:`unpack_int4_blocks`) and the float
  tile layout (:func:`pack_float_tiles` / :func:`unpack_float_tiles`), written at compile time
  exactly as the kernels read them (see custom_ops/kernels/kernels.h and
  custom_ops/README.md);
- numpy reference implementations the C++ ops are tested against.

numpy and onnx only (no torch), so the runtime side stays light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

DOMAIN = "llmfold"
OPSET_VERSION = 1
TILE_N = 16  # output columns per packed tile
GROUP_K = 8  # k values per 64-byte packed group
SCALE_DTYPE = np.float16  # block scales are stored as IEEE binary16 (half the bytes of float32)
# llmfold.json "packed_layout" of compiled models: 2 = QMatMul's fp16 block scales and PackedMatMul's
# tile groups (both 2026-12-07); models without it hold float32 scales, which the op refuses
# (compiler.runtime says to recompile). Bump it whenever a packed layout changes.
PACKED_LAYOUT = 2
FP16_MAX = 65504.0
LIB_ENV = "LLMFOLD_OPS_LIB"
LIB_NAME = "libllmfold_ops.so"

_REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# The library


def library_path() -> Path:
    """Path of the built ``libllmfold_ops.so``: ``$LLMFOLD_OPS_LIB`` or ``<repo>/build/custom_ops``."""
    env = os.environ.get(LIB_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"{LIB_ENV}={env} does not name a file; unset it or point it at {LIB_NAME}")
        return p
    p = _REPO / "build" / "custom_ops" / LIB_NAME
    if not p.is_file():
        raise FileNotFoundError(
            f"llmfold custom op library not found at {p}; build it with `make setup` (or set {LIB_ENV})"
        )
    return p


def make_session_options(threads: int | None = None):
    """``onnxruntime.SessionOptions`` with the llmfold op library registered.

    ``threads`` sets intra-op threads (ORT's pool, which the ops use through ParallelFor)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library_path()))
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


# --------------------------------------------------------------------------------------------
# Packed INT4 layout


def _layout_dims(K: int, N: int, block_size: int) -> tuple[int, int, int, int]:
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    if K < 1 or N < 1:
        raise ValueError(f"K and N must be positive, got K={K} N={N}")
    n_blocks = -(-K // block_size)
    n_tiles = -(-N // TILE_N)
    return n_blocks, n_tiles, n_blocks * block_size, n_tiles * TILE_N


def packed_sizes(K: int, N: int, block_size: int) -> dict:
    """Element counts of the packed tensors for a K x N weight."""
    n_blocks, n_tiles, Kp, _ = _layout_dims(K, N, block_size)
    return dict(data=n_tiles * (Kp // GROUP_K) * 64, scales=n_tiles * n_blocks * TILE_N,
                zero_points=n_tiles * n_blocks * TILE_N, n_blocks=n_blocks, n_tiles=n_tiles, Kp=Kp)


def round_scales(scales: np.ndarray) -> np.ndarray:
    """The float32 values of ``scales`` as the packed layout stores them: rounded to the nearest
    float16 (ties to even), so a quantizer can choose its codes for the scales the kernels will see.
    A nonzero scale too small for float16 (below 2^-24) becomes ±2^-24 rather than 0 (a zero
    scale would turn its codes into NaN for the quantizers that divide by it). Raises ValueError
    for a non-finite scale or one beyond float16's range (|s| > 65504)."""
    s = np.asarray(scales, dtype=np.float32)
    bad = ~np.isfinite(s) | (np.abs(s) > FP16_MAX)
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), s.shape)
        raise ValueError(f"block scales: {int(bad.sum())} value(s) are not finite or exceed float16's range ±{FP16_MAX:g} "
                         f"(e.g. {float(s[i]):g} at index {tuple(int(x) for x in i)}); the packed layout stores "
                         "fp16 scales, so weights this large cannot be packed")
    r = s.astype(np.float16).astype(np.float32)
    tiny = (r == 0) & (s != 0)
    return np.where(tiny, np.copysign(np.float32(2.0**-24), s), r).astype(np.float32)


def pack_int4_blocks(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, block_size: int) -> dict:
    """Packs 4-bit codes into the kernel layout.

    q: uint8 [K, N] in 0..15; scales: float [n_blocks, N] (rounded to float16 by
    :func:`round_scales`); zero_points: uint8 [n_blocks, N] in 0..15 or None (symmetric: 8).
    W[k, n] = scales[k // bs, n] * (q[k, n] - zp[k // bs, n]).
    Returns dict(data=uint8 [n_tiles*Kp/8*64], scales=float16 [n_tiles*n_blocks*16],
    zero_points=uint8 [...] or None) -- flat arrays, the QMatMul inputs B, scales, zero_points.
    """
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"q must be [K, N], got shape {q.shape}")
    K, N = q.shape
    n_blocks, n_tiles, Kp, Np = _layout_dims(K, N, block_size)
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError("q values must be in [0, 15]")
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (n_blocks, N):
        raise ValueError(f"scales must be [n_blocks={n_blocks}, N={N}], got {scales.shape}")
    zp = None
    if zero_points is not None:
        zp = np.asarray(zero_points)
        if zp.shape != (n_blocks, N):
            raise ValueError(f"zero_points must be [n_blocks={n_blocks}, N={N}], got {zp.shape}")
        if zp.size and (zp.min() < 0 or zp.max() > 15):
            raise ValueError("zero_points values must be in [0, 15]")
        zp = zp.astype(np.uint8)
    zfull = zp if zp is not None else np.full((n_blocks, N), 8, np.uint8)
    # Padded k rows hold the block's zero point (dequantize to 0); padded columns hold 8, scale 0.
    Q = np.full((Kp, Np), 8, np.uint8)
    Q[:Kp, :N] = np.repeat(zfull, block_size, axis=0)
    Q[:K, :N] = q.astype(np.uint8)
    # [g, half, j, t, c] -> byte[t, g, 4c + j] = lo | hi << 4
    Q5 = Q.reshape(Kp // GROUP_K, 2, 4, n_tiles, TILE_N)
    byte = Q5[:, 0] | (Q5[:, 1] << 4)  # [g, j, t, c]
    data = np.ascontiguousarray(byte.transpose(2, 0, 3, 1)).reshape(-1)
    S = np.zeros((n_blocks, Np), SCALE_DTYPE)
    S[:, :N] = round_scales(scales)
    by_tile = lambda X: np.ascontiguousarray(X.reshape(n_blocks, n_tiles, TILE_N).transpose(1, 0, 2)).reshape(-1)
    out = dict(data=data.astype(np.uint8), scales=by_tile(S), zero_points=None)
    if zp is not None:
        Z = np.full((n_blocks, Np), 8, np.uint8)
        Z[:, :N] = zp
        out["zero_points"] = by_tile(Z)
    return out


def unpack_int4_blocks(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int,
                       block_size: int) -> dict:
    """Exact inverse of :func:`pack_int4_blocks`: dict(q [K,N] uint8, scales [n_blocks,N] float32
    (the stored float16 values), zero_points [n_blocks,N] uint8 or None). ``scales`` must be
    float16, the packed layout's type."""
    sz = packed_sizes(K, N, block_size)
    n_blocks, n_tiles, Kp = sz["n_blocks"], sz["n_tiles"], sz["Kp"]
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    scales = np.asarray(scales)
    if scales.dtype != SCALE_DTYPE:
        raise ValueError(f"packed scales must be float16, got {scales.dtype} (a model packed before the fp16 layout: "
                         "recompile it)")
    scales = scales.astype(np.float32).reshape(-1)
    if data.size != sz["data"] or scales.size != sz["scales"]:
        raise ValueError(f"packed sizes {data.size}/{scales.size} do not match K={K} N={N} block_size={block_size} "
                         f"(need {sz['data']}/{sz['scales']})")
    byte = data.reshape(n_tiles, Kp // GROUP_K, TILE_N, 4).transpose(1, 3, 0, 2)  # [g, j, t, c]
    Q5 = np.stack([byte & 15, byte >> 4], axis=1)  # [g, half, j, t, c]
    Q = Q5.reshape(Kp, n_tiles * TILE_N)
    S = scales.reshape(n_tiles, n_blocks, TILE_N).transpose(1, 0, 2).reshape(n_blocks, -1)
    out = dict(q=np.ascontiguousarray(Q[:K, :N]), scales=np.ascontiguousarray(S[:, :N]), zero_points=None)
    if zero_points is not None:
        Z = np.asarray(zero_points, dtype=np.uint8).reshape(n_tiles, n_blocks, TILE_N).transpose(1, 0, 2)
        out["zero_points"] = np.ascontiguousarray(Z.reshape(n_blocks, -1)[:, :N])
    return out


def dequantize_int4(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int,
                    block_size: int) -> np.ndarray:
    """float32 [K, N] weights of a packed tensor: scale * float(q - zp) (the kernels' definition)."""
    u = unpack_int4_blocks(data, scales, zero_points, K, N, block_size)
    n_blocks = u["scales"].shape[0]
    zp = u["zero_points"] if u["zero_points"] is not None else np.full((n_blocks, N), 8, np.uint8)
    b = np.arange(K) // block_size
    return (u["q"].astype(np.float32) - zp[b].astype(np.float32)) * u["scales"][b]


TILE_GROUP = 4  # PackedMatMul: tiles per group, whose k rows are stored side by side


def _tile_groups(n_tiles: int):
    """(first tile, tiles) of each PackedMatMul tile group."""
    return [(t, min(TILE_GROUP, n_tiles - t)) for t in range(0, n_tiles, TILE_GROUP)]


def pack_float_tiles(W: np.ndarray) -> np.ndarray:
    """PackedMatMul's weight layout: float32 [K, N] → a flat float32 array of n_tiles·K·16 values.
    Columns in 16-column tiles (the last one zero-padded), tiles in groups of 4 stored [K][gt][16]
    (gt = tiles in the group, 4 but for the last group), group after group: W[k, n] (tile t = n // 16)
    is at 64·(t // 4)·K + 16·(k·gt + t % 4) + n % 16 (custom_ops/kernels/kernels.h)."""
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"pack_float_tiles needs a non-empty 2-D [K, N] weight, got shape {W.shape}")
    if W.dtype != np.float32:
        raise ValueError(f"pack_float_tiles packs float32 weights, got {W.dtype}")
    K, N = W.shape
    n_tiles = -(-N // TILE_N)
    padded = np.zeros((K, n_tiles * TILE_N), np.float32)
    padded[:, :N] = W
    return np.concatenate([padded[:, TILE_N * t: TILE_N * (t + gt)].reshape(-1) for t, gt in _tile_groups(n_tiles)])


def unpack_float_tiles(packed: np.ndarray, K: int, N: int) -> np.ndarray:
    """Exact inverse of :func:`pack_float_tiles`: float32 [K, N]."""
    n_tiles = -(-N // TILE_N)
    packed = np.asarray(packed)
    if packed.dtype != np.float32 or packed.size != n_tiles * K * TILE_N:
        raise ValueError(f"packed float tiles of {packed.size} {packed.dtype} elements do not match K={K} N={N} "
                         f"(need {n_tiles * K * TILE_N} float32)")
    flat = packed.reshape(-1)
    W = np.concatenate([flat[K * TILE_N * t: K * TILE_N * (t + gt)].reshape(K, TILE_N * gt)
                        for t, gt in _tile_groups(n_tiles)], axis=1)
    return np.ascontiguousarray(W[:, :N])


MAX_FLOAT_GROUPS = 8  # PackedMatMul's block-diagonal form: outputs the op declares


def check_float_groups(K: int, N: int, group_k: Sequence[int], group_n: Sequence[int]) -> None:
    """ValueError unless group_k/group_n describe a block-diagonal PackedMatMul [K, N] (the op's checks)."""
    if len(group_k) != len(group_n) or not 1 <= len(group_k) <= MAX_FLOAT_GROUPS:
        raise ValueError(f"group_k and group_n must have the same number of entries, 1 to {MAX_FLOAT_GROUPS}; "
                         f"got {len(group_k)} and {len(group_n)}")
    if min(group_k) < 1 or min(group_n) < 1:
        raise ValueError(f"every group needs at least one row and column: group_k {list(group_k)}, group_n {list(group_n)}")
    if sum(group_k) != K or sum(group_n) != N:
        raise ValueError(f"group_k must sum to K={K} and group_n to N={N}; they sum to {sum(group_k)} and {sum(group_n)}")


def pack_float_groups(weights: Sequence[np.ndarray]) -> np.ndarray:
    """The block-diagonal PackedMatMul's B: each W_g [K_g, N_g] packed by :func:`pack_float_tiles`,
    one after another."""
    return np.concatenate([pack_float_tiles(W) for W in weights])


def unpack_float_groups(packed: np.ndarray, group_k: Sequence[int], group_n: Sequence[int]) -> list[np.ndarray]:
    """Exact inverse of :func:`pack_float_groups`: the W_g."""
    flat, out, start = np.asarray(packed).reshape(-1), [], 0
    sizes = [-(-n // TILE_N) * k * TILE_N for k, n in zip(group_k, group_n)]
    if flat.size != sum(sizes):
        raise ValueError(f"packed float groups of {flat.size} elements do not match group_k {list(group_k)}, "
                         f"group_n {list(group_n)} (need {sum(sizes)})")
    for k, n, size in zip(group_k, group_n, sizes):
        out.append(unpack_float_tiles(flat[start: start + size], k, n))
        start += size
    return out


def packed_group_matmul_reference(A: np.ndarray, packed: np.ndarray, group_k: Sequence[int], group_n: Sequence[int],
                                  bias: np.ndarray | None = None) -> list[np.ndarray]:
    """The block-diagonal PackedMatMul in numpy: output g = A[..., group g's columns] · W_g (+ its bias
    slice), each through :func:`packed_matmul_reference`."""
    A = np.asarray(A, dtype=np.float32)
    outs, k0, n0 = [], 0, 0
    for k, n, W in zip(group_k, group_n, unpack_float_groups(packed, group_k, group_n)):
        b = None if bias is None else np.asarray(bias)[n0: n0 + n]
        outs.append(packed_matmul_reference(A[..., k0: k0 + k], pack_float_tiles(W), k, n, b))
        k0, n0 = k0 + k, n0 + n
    return outs


def packed_matmul_reference(A: np.ndarray, packed: np.ndarray, K: int, N: int,
                            bias: np.ndarray | None = None) -> np.ndarray:
    """PackedMatMul semantics in numpy: A float32 [..., K] times the unpacked [K, N] (+ bias), summed
    in float64 and rounded once (the kernels' reference; their float sums stay within K·2^-24 of
    Σ|a·w|)."""
    A = np.asarray(A, dtype=np.float32)
    if A.shape[-1] != K:
        raise ValueError(f"A's last dimension {A.shape[-1]} != K={K}")
    W = unpack_float_tiles(packed, K, N).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        Y = A.reshape(-1, K).astype(np.float64) @ W
        if bias is not None:
            Y = Y + np.asarray(bias, np.float64)
    return Y.astype(np.float32).reshape(*A.shape[:-1], N)


def quantize_int4_weights(W: np.ndarray, block_size: int, symmetric: bool = True) -> dict:
    """Round-to-nearest block quantization of a float [K, N] weight (a convenience for tests, the
    benchmark and simple passes). Symmetric: zp = 8, scale = absmax / 7 (codes 1..15);
    asymmetric: min/max over the block, 16 levels. Returns pack_int4_blocks' dict plus q/scales/zp."""
    W = np.asarray(W, dtype=np.float32)
    K, N = W.shape
    n_blocks = -(-K // block_size)
    Wp = np.zeros((n_blocks * block_size, N), np.float32)
    Wp[:K] = W
    Wb = Wp.reshape(n_blocks, block_size, N)
    if symmetric:
        amax = np.abs(Wb).max(axis=1)
        scales = round_scales(amax / 7.0)  # the codes are chosen for the stored (fp16) scales
        inv = np.where(scales > 0, 1.0 / np.where(scales > 0, scales, 1), 0).astype(np.float32)
        q = np.clip(np.rint(Wb * inv[:, None, :]) + 8, 0, 15).astype(np.uint8)
        zp = None
    else:
        lo, hi = Wb.min(axis=1), Wb.max(axis=1)
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scales = round_scales((hi - lo) / 15.0)
        safe = np.where(scales > 0, scales, 1)
        zp = np.clip(np.rint(-lo / safe), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(Wb / safe[:, None, :]) + zp[:, None, :], 0, 15).astype(np.uint8)
    q = q.reshape(-1, N)[:K]
    packed = pack_int4_blocks(q, scales, zp, block_size)
    packed.update(q=q, raw_scales=scales, raw_zero_points=zp)
    return packed


# --------------------------------------------------------------------------------------------
# numpy references (the C++ ops must match these)


def quantize_rows_reference(A: np.ndarray, act_bits: int, block_size: int,
                            channel_shift: np.ndarray | None = None):
    """Per-token dynamic symmetric quantization, exactly the kernels' rule (kernels/paths.h):
    x' = x * 2^-shift (float32); absmax over the row; rows with NaN/Inf get q = 0 and scale NaN;
    rows with absmax < 1e-30 get q = 0 and scale 0; else inv = qmax / absmax (float32),
    q = round_half_even(clip(x' * inv, -qmax, qmax)), scale = absmax / qmax.
    Returns (q int8 [M, Kp], scale float32 [M], block_sum int32 [M, n_blocks])."""
    A = np.asarray(A, dtype=np.float32)
    M, K = A.shape
    qmax = np.float32(7 if act_bits == 4 else 127)
    n_blocks = -(-K // block_size)
    x = A
    if channel_shift is not None:
        x = A * (np.float32(1.0) / (np.uint32(1) << np.asarray(channel_shift, np.uint32)).astype(np.float32))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        finite = np.isfinite(x).all(axis=1)
        absmax = np.where(finite, np.abs(np.where(np.isfinite(x), x, 0)).max(axis=1, initial=np.float32(0)),
                          np.float32(0)).astype(np.float32)
        ok = finite & (absmax >= np.float32(1e-30))
        inv = np.where(ok, qmax / np.where(ok, absmax, 1), 0).astype(np.float32)
        v = np.clip(x * inv[:, None], -qmax, qmax)
        q = np.where(ok[:, None], np.rint(v), 0).astype(np.int8)
        scale = np.where(ok, absmax / qmax, np.where(finite, 0, np.nan)).astype(np.float32)
    qp = np.zeros((M, n_blocks * block_size), np.int8)
    qp[:, :K] = q
    bsum = qp.reshape(M, n_blocks, block_size).astype(np.int32).sum(axis=2).astype(np.int32)
    return qp, scale, bsum


def sylvester_hadamard(h: int) -> np.ndarray:
    """H_h (h a power of two): H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]; ±1, symmetric, H·H = h·I."""
    if h < 1 or h & (h - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {h}")
    H = np.ones((1, 1), np.float32)
    while H.shape[0] < h:
        H = np.block([[H, H], [H, -H]])
    return H


def hadamard_rows_reference(A: np.ndarray, h: int) -> np.ndarray:
    """QMatMul's `hadamard` input transform: each block of h channels of every row times H_h
    (kernels/ref/hadamard.h), by the same float32 butterfly as the op (log2 h stages of
    (u, v) → (u + v, u − v) on x[j], x[j + len]), so it matches the op bit for bit."""
    A = np.asarray(A, np.float32)
    K = A.shape[-1]
    if h < 2 or h & (h - 1) or K % h:
        raise ValueError(f"hadamard must be a power of two >= 2 dividing K={K}, got {h}")
    x = A.reshape(-1, K).copy()
    length = 1
    while length < h:
        v = x.reshape(x.shape[0], K // (2 * length), 2, length)
        u, w = v[:, :, 0, :].copy(), v[:, :, 1, :].copy()
        v[:, :, 0, :] = u + w
        v[:, :, 1, :] = u - w
        length *= 2
    return x.reshape(A.shape)


def qmatmul_reference(A: np.ndarray, data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                      K: int, N: int, block_size: int, act_bits: int = 16,
                      channel_shift: np.ndarray | None = None, bias: np.ndarray | None = None,
                      hadamard: int = 0, swiglu: int = 0) -> np.ndarray:
    """QMatMul semantics in numpy. A: float32 [..., K]; returns float32 [..., N] ([..., N/2] with
    swiglu: silu(Z[..., :N/2]) * Z[..., N/2:] of the product Z, silu(g) = g / (1 + exp(-g)))."""
    if swiglu:
        if N % 2:
            raise ValueError(f"swiglu needs an even N, got {N}")
        Z = qmatmul_reference(A, data, scales, zero_points, K, N, block_size, act_bits, channel_shift, bias, hadamard)
        return swiglu_reference(Z)
    A = np.asarray(A, dtype=np.float32)
    if A.shape[-1] != K:
        raise ValueError(f"A's last dimension {A.shape[-1]} != K={K}")
    lead = A.shape[:-1]
    A2 = A.reshape(-1, K)
    if hadamard:
        A2 = hadamard_rows_reference(A2, hadamard)
    u = unpack_int4_blocks(data, scales, zero_points, K, N, block_size)
    n_blocks = u["scales"].shape[0]
    zp = u["zero_points"] if u["zero_points"] is not None else np.full((n_blocks, N), 8, np.uint8)
    if act_bits == 16:
        if channel_shift is not None:
            raise ValueError("channel_shift requires act_bits 8 or 4")
        Wf = dequantize_int4(data, scales, zero_points, K, N, block_size).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            Y = A2.astype(np.float64) @ Wf
            if bias is not None:
                Y = Y + np.asarray(bias, np.float64)
        return Y.astype(np.float32).reshape(*lead, N)
    if act_bits not in (8, 4):
        raise ValueError(f"act_bits must be 16, 8 or 4, got {act_bits}")
    qa, sa, bsum = quantize_rows_reference(A2, act_bits, block_size, channel_shift)
    Kp = n_blocks * block_size
    qw = np.zeros((Kp, N), np.int64)
    qw[:K] = u["q"]
    M = A2.shape[0]
    dots = np.einsum("mbk,bkn->mbn", qa.reshape(M, n_blocks, block_size).astype(np.int64),
                     qw.reshape(n_blocks, block_size, N))
    d = dots - zp.astype(np.int64)[None] * bsum.astype(np.int64)[:, :, None]
    acc = (d.astype(np.float64) * u["scales"].astype(np.float64)[None]).sum(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        Y = acc.astype(np.float32) * sa[:, None]
        if bias is not None:
            Y = Y + np.asarray(bias, np.float32)
    return Y.astype(np.float32).reshape(*lead, N)


def swiglu_reference(Z: np.ndarray) -> np.ndarray:
    """QMatMul's swiglu epilogue (kernels/ref): g, u = halves of the last axis; g / (1 + exp(-g)) * u in float32."""
    Z = np.asarray(Z, np.float32)
    I = Z.shape[-1] // 2
    g, u = Z[..., :I], Z[..., I:]
    with np.errstate(over="ignore", invalid="ignore"):
        return (g / (np.float32(1) + np.exp(-g)) * u).astype(np.float32)


KEEP_RATIO_SLACK = 1.0 + 2.0 ** -20  # see token_prune_keep


def token_prune_keep(T: int, keep_count: int | None = None, keep_ratio: float | None = None) -> int:
    """Number of kept tokens (see custom_ops/kernels/ref/token_prune.h): keep_count, else
    floor(double(fl32(keep_ratio)) · T · (1 + 2⁻²⁰)) — at most ratio·T tokens kept; the factor only keeps
    a product that is mathematically an integer from being floored one below by the float32 ratio —
    then clamped to [2, T]; T ≤ 2 keeps all."""
    if T <= 2:
        return T
    if keep_count is not None:
        k = int(keep_count)
    elif keep_ratio is not None:
        x = float(np.float32(keep_ratio)) * float(T)
        x = x * KEEP_RATIO_SLACK
        c = math.floor(x) if math.isfinite(x) else T
        k = T if c >= T else max(c, 0)
    else:
        raise ValueError("needs keep_count or keep_ratio")
    return min(max(k, 2), T)


def token_prune_scores(scores: np.ndarray, score: str = "first_token") -> np.ndarray:
    """float64 [B, T] scores: importance as is, or from attention [B,H,T,S] (the last T key columns are
    this step's tokens): first_token Σ_h P[..., t, 0] in head order; column_sum
    Σ_h Σ_q P[..., q, S−T+t] / (T − t)."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim == 2:
        return scores.astype(np.float64)
    if scores.ndim != 4:
        raise ValueError(f"scores must be [B,T] or [B,H,T,S], got {scores.shape}")
    B, H, T, S = scores.shape
    s = np.zeros((B, T), np.float64)
    for h in range(H):
        if score == "first_token":
            s += scores[:, h, :, 0].astype(np.float64)
        else:
            s += scores[:, h, :, S - T:].astype(np.float64).sum(axis=1)
    if score == "column_sum":
        s /= np.arange(T, 0, -1, dtype=np.float64)
    return s


def token_prune_attention_probs(query: np.ndarray, key: np.ndarray, num_heads: int, kv_num_heads: int | None = None,
                                scale: float | None = None) -> np.ndarray:
    """Causal softmax attention probabilities [B,H,T,T] (float64) from post-RoPE query [B,T,H·d] and
    key [B,T,Hkv·d] of one prefill (no past); head h reads kv head h // (H/Hkv). For tests: the op
    itself computes the same row by row and never holds [H,T,T]."""
    q = np.asarray(query, np.float64)
    k = np.asarray(key, np.float64)
    B, T, HD = q.shape
    H = int(num_heads)
    Hkv = int(kv_num_heads or H)
    d = HD // H
    if HD % H or H % Hkv or k.shape != (B, T, Hkv * d):
        raise ValueError(f"query {q.shape} / key {k.shape} do not fit num_heads={H}, kv_num_heads={Hkv}")
    sc = float(np.float32(scale)) if scale else float(np.float32(1.0 / math.sqrt(d)))
    qh = q.reshape(B, T, H, d).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(B, T, Hkv, d).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    logits = sc * (qh @ kh.transpose(0, 1, 3, 2))
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def token_prune_qk_scores(query: np.ndarray, key: np.ndarray, num_heads: int, kv_num_heads: int | None = None,
                          scale: float | None = None, score: str = "first_token") -> np.ndarray:
    """float64 [B, T] scores from query/key: the same as token_prune_scores on their probabilities."""
    P = token_prune_attention_probs(query, key, num_heads, kv_num_heads, scale)
    B, H, T, _ = P.shape
    s = np.zeros((B, T), np.float64)
    for h in range(H):
        s += P[:, h, :, 0] if score == "first_token" else P[:, h].sum(axis=1)
    if score == "column_sum":
        s /= np.arange(T, 0, -1, dtype=np.float64)
    return s


def token_prune_reference(hidden: np.ndarray, scores: np.ndarray | None, keep_count: int | None = None,
                          keep_ratio: float | None = None, companions: Sequence[np.ndarray] = (),
                          score: str = "first_token", query: np.ndarray | None = None, key: np.ndarray | None = None,
                          num_heads: int | None = None, kv_num_heads: int | None = None, scale: float | None = None):
    """TokenPrune semantics in numpy. Returns (pruned [B,keep,D], indices int64 [B,keep], [companions]).
    Scores come from `scores` (importance or probabilities) or, when it is None, from query/key."""
    hidden = np.asarray(hidden)
    B, T, _ = hidden.shape
    if scores is not None:
        s = token_prune_scores(scores, score)
    else:
        s = token_prune_qk_scores(query, key, num_heads, kv_num_heads, scale, score)
    keep = token_prune_keep(T, keep_count, keep_ratio)
    idx = np.zeros((B, keep), np.int64)
    for b in range(B):
        if keep >= T:
            idx[b] = np.arange(T)
            continue
        row = s[b]

        def key(t: int):
            v = row[t]
            return (1, 0.0, t) if math.isnan(v) else (0, -v, t)

        best = sorted(range(1, T - 1), key=key)[: keep - 2]
        idx[b] = sorted(best + [0, T - 1])
    take = lambda x: np.take_along_axis(np.asarray(x), idx.reshape(B, keep, *([1] * (np.asarray(x).ndim - 2))), axis=1)
    return take(hidden), idx, [take(c) for c in companions]


# --------------------------------------------------------------------------------------------
# ONNX schemas


def _qmatmul_infer(ctx) -> None:
    import onnx

    def attr_i(name, default=None):
        a = ctx.get_attribute(name)
        return default if a is None else a.i

    K, N, bs, act_bits = attr_i("K"), attr_i("N"), attr_i("block_size"), attr_i("act_bits", 16)
    had = attr_i("hadamard", 0)
    glu = attr_i("swiglu", 0)
    if K is None or N is None or bs is None:
        raise onnx.shape_inference.InferenceError("[llmfold.QMatMul] attributes K, N, block_size are required")
    if bs < 16 or bs > 256 or bs & (bs - 1):
        raise onnx.shape_inference.InferenceError(
            f"[llmfold.QMatMul] block_size must be a power of two in [16, 256], got {bs}")
    if act_bits not in (16, 8, 4):
        raise onnx.shape_inference.InferenceError(f"[llmfold.QMatMul] act_bits must be 16, 8 or 4, got {act_bits}")
    if K is not None and had != 0 and (had < 2 or had & (had - 1) or K % had):
        raise onnx.shape_inference.InferenceError(
            f"[llmfold.QMatMul] hadamard must be 0 or a power of two >= 2 dividing K={K}, got {had}")
    if glu not in (0, 1) or (glu and N % 2):
        raise onnx.shape_inference.InferenceError(f"[llmfold.QMatMul] swiglu must be 0, or 1 with an even N (got swiglu={glu}, N={N})")
    _set_linear_output(ctx, "QMatMul", K, N // 2 if glu else N)


def _set_linear_output(ctx, op: str, K: int, n_out: int, index: int = 0) -> None:
    """Output `index` of a linear op: float [..., n_out] for A [..., K] (A's last dimension checked)."""
    import onnx

    out = onnx.TypeProto()
    out.tensor_type.elem_type = onnx.TensorProto.FLOAT
    a = ctx.get_input_type(0)
    if a is not None and a.tensor_type.HasField("shape"):
        dims = list(a.tensor_type.shape.dim)
        if not dims:
            raise onnx.shape_inference.InferenceError(f"[llmfold.{op}] A must have rank >= 1")
        if dims[-1].HasField("dim_value") and dims[-1].dim_value != K:
            raise onnx.shape_inference.InferenceError(f"[llmfold.{op}] A's last dimension {dims[-1].dim_value} != K={K}")
        shp = out.tensor_type.shape
        for d in dims[:-1]:
            shp.dim.add().CopyFrom(d)
        shp.dim.add().dim_value = n_out
    ctx.set_output_type(index, out)


def _packed_matmul_infer(ctx) -> None:
    import onnx

    K = ctx.get_attribute("K")
    N = ctx.get_attribute("N")
    if K is None or N is None or K.i < 1 or N.i < 1:
        raise onnx.shape_inference.InferenceError("[llmfold.PackedMatMul] positive attributes K and N are required")
    gk, gn = ctx.get_attribute("group_k"), ctx.get_attribute("group_n")
    gk, gn = (list(gk.ints) if gk else [K.i]), (list(gn.ints) if gn else [N.i])
    try:
        check_float_groups(K.i, N.i, gk, gn)
    except ValueError as e:
        raise onnx.shape_inference.InferenceError(f"[llmfold.PackedMatMul] {e}") from None
    if ctx.get_num_outputs() != len(gk):
        raise onnx.shape_inference.InferenceError(
            f"[llmfold.PackedMatMul] {ctx.get_num_outputs()} outputs for {len(gk)} group(s); one output per group")
    for g, n in enumerate(gn):
        _set_linear_output(ctx, "PackedMatMul", K.i, n, index=g)


def _token_prune_infer(ctx) -> None:
    import onnx

    def dims_of(i):
        t = ctx.get_input_type(i) if ctx.has_input(i) else None
        if t is None or not t.tensor_type.HasField("shape"):
            return t, None
        return t, list(t.tensor_type.shape.dim)

    h, hd = dims_of(0)
    if hd is not None and len(hd) != 3:
        raise onnx.shape_inference.InferenceError("[llmfold.TokenPrune] hidden must be [B,T,D]")
    n_out = ctx.get_num_outputs()
    n_comp = sum(1 for i in range(3, min(6, ctx.get_num_inputs())) if ctx.has_input(i))
    has_scores = ctx.get_num_inputs() > 1 and ctx.has_input(1)
    has_q = ctx.get_num_inputs() > 6 and ctx.has_input(6)
    has_k = ctx.get_num_inputs() > 7 and ctx.has_input(7)
    if has_q != has_k:
        raise onnx.shape_inference.InferenceError("[llmfold.TokenPrune] query and key go together")
    if has_scores == has_q:
        raise onnx.shape_inference.InferenceError(
            "[llmfold.TokenPrune] give either scores or query and key (exactly one source)")
    if n_out > 2 + n_comp:
        raise onnx.shape_inference.InferenceError(
            f"[llmfold.TokenPrune] {n_out} outputs but only {n_comp} companion inputs")

    def make(elem, dims, keep_axis=1):
        tp = onnx.TypeProto()
        tp.tensor_type.elem_type = elem
        if dims is not None:
            for i, d in enumerate(dims):
                nd = tp.tensor_type.shape.dim.add()
                if i != keep_axis:
                    nd.CopyFrom(d)
        return tp

    ctx.set_output_type(0, make(onnx.TensorProto.FLOAT, hd))
    if n_out > 1 and ctx.has_output(1):
        ctx.set_output_type(1, make(onnx.TensorProto.INT64, hd[:2] if hd is not None else None))
    for o in range(2, n_out):
        if not ctx.has_output(o):
            continue
        t, cd = dims_of(o + 1)
        if t is None:
            raise onnx.shape_inference.InferenceError(f"[llmfold.TokenPrune] output {o} has no companion input {o + 1}")
        ctx.set_output_type(o, make(t.tensor_type.elem_type, cd))


def _schemas():
    from onnx import defs, helper

    OS = defs.OpSchema
    FP = OS.FormalParameter
    opt = OS.FormalParameterOption.Optional
    q = OS(
        "QMatMul", DOMAIN, OPSET_VERSION,
        doc="Y[...,N] = A[...,K] . dequant(B)[K,N] (+ bias); 4-bit block-quantized weights in llmfold's packed "
            "layout (custom_ops/README.md). act_bits 16: float activations; 8/4: per-token dynamic symmetric "
            "integer activations. channel_shift: per-input-channel power-of-two divisors (TRIP) applied before "
            "activation quantization. hadamard h > 0: A's rows are first multiplied, per block of h channels, by "
            "the Sylvester Hadamard matrix of order h (entries +-1; the weights hold H_h/h folded into their rows). "
            "swiglu 1: the weights are [gate | up] (N = 2I) and Y[..., j] = silu(Z[..., j]) * Z[..., I + j] for the "
            "product Z, silu(g) = g / (1 + exp(-g)); Y is [..., I].",
        inputs=[FP("A", "T", "float activations [..., K]"),
                FP("B", "U", "packed 4-bit weights, n_tiles*Kp/8*64 bytes"),
                FP("scales", "S", "float16 block scales [n_tiles, n_blocks, 16]"),
                FP("zero_points", "U", "4-bit zero points [n_tiles, n_blocks, 16]", param_option=opt),
                FP("bias", "T", "bias [N]", param_option=opt),
                FP("channel_shift", "U", "shift exponents [K] in 0..15", param_option=opt)],
        outputs=[FP("Y", "T", "output [..., N] ([..., N/2] with swiglu)")],
        type_constraints=[("T", ["tensor(float)"], "float"), ("S", ["tensor(float16)"], "fp16 scales"),
                          ("U", ["tensor(uint8)"], "bytes")],
        attributes=[OS.Attribute("K", OS.AttrType.INT, "input features"),
                    OS.Attribute("N", OS.AttrType.INT, "output features"),
                    OS.Attribute("block_size", OS.AttrType.INT, "weights per scale along K (16..256, power of 2)"),
                    OS.Attribute("act_bits", helper.make_attribute("act_bits", 16), "16, 8 or 4"),
                    OS.Attribute("hadamard", helper.make_attribute("hadamard", 0),
                                 "0, or the order h (power of two dividing K) of the input Hadamard transform"),
                    OS.Attribute("swiglu", helper.make_attribute("swiglu", 0),
                                 "0, or 1: SwiGLU epilogue over [gate | up] (N even, output N/2)")],
    )
    q.set_type_and_shape_inference_function(_qmatmul_infer)
    f = OS(
        "PackedMatMul", DOMAIN, OPSET_VERSION,
        doc="Y[...,N] = A[...,K] . W[K,N] (+ bias) in float32, W in 16-column tiles, 4 tiles to a group stored "
            "[K][tiles][16] (custom_ops/README.md): ONNX MatMul's product with the weights in the order a decode step "
            "reads them. With group_k/group_n (G entries summing to K and N) W is block-diagonal and output g is "
            "A[..., group g's columns] . W_g (+ bias slice), the G packings one after another in B.",
        inputs=[FP("A", "T", "float activations [..., K]"),
                FP("B", "T", "packed float32 weights, n_tiles*K*16 values (16-column tiles in groups of 4), per group"),
                FP("bias", "T", "bias [N]", param_option=opt)],
        outputs=[FP("Y", "T", "output [..., N], or one [..., group_n[g]] per group",
                    param_option=OS.FormalParameterOption.Variadic, is_homogeneous=True, min_arity=1)],
        type_constraints=[("T", ["tensor(float)"], "float")],
        attributes=[OS.Attribute("K", OS.AttrType.INT, "input features"),
                    OS.Attribute("N", OS.AttrType.INT, "output features"),
                    OS.Attribute("group_k", OS.AttrType.INTS, "block-diagonal W: input features per group (sum K)",
                                 required=False),
                    OS.Attribute("group_n", OS.AttrType.INTS, "block-diagonal W: output features per group (sum N)",
                                 required=False)],
    )
    f.set_type_and_shape_inference_function(_packed_matmul_infer)
    t = OS(
        "TokenPrune", DOMAIN, OPSET_VERSION,
        doc="Agile-Quant token pruning: keeps token 0, token T-1 and the highest-scoring others (scores: "
            "importance [B,T], attention probabilities [B,H,T,S], or post-RoPE query [B,T,H*d] and key "
            "[B,T,Hkv*d] from which the op computes causal softmax attention row by row; score first_token: "
            "sum over heads of P[...,t,0], column_sum: sum over heads and queries of P[...,q,t] / (T-t)); "
            "outputs keep rows in original order, the kept indices and the gathered companion tensors.",
        inputs=[FP("hidden", "T", "[B,T,D]"),
                FP("scores", "T", "importance [B,T] or attention probabilities [B,H,T,S] (or give query/key)",
                   param_option=opt),
                FP("keep_count", "I", "int64 scalar; else attribute keep_ratio", param_option=opt),
                FP("companion0", "C0", "[B,T,...]", param_option=opt),
                FP("companion1", "C1", "[B,T,...]", param_option=opt),
                FP("companion2", "C2", "[B,T,...]", param_option=opt),
                FP("query", "T", "post-RoPE queries [B,T,num_heads*head_dim] (no past)", param_option=opt),
                FP("key", "T", "post-RoPE keys [B,T,kv_num_heads*head_dim] (no past)", param_option=opt)],
        outputs=[FP("pruned", "T", "[B,keep,D]"),
                 FP("kept_indices", "I", "int64 [B,keep], ascending", param_option=opt),
                 FP("companion0_out", "C0", "[B,keep,...]", param_option=opt),
                 FP("companion1_out", "C1", "[B,keep,...]", param_option=opt),
                 FP("companion2_out", "C2", "[B,keep,...]", param_option=opt)],
        type_constraints=[("T", ["tensor(float)"], "float"), ("I", ["tensor(int64)"], "int64"),
                          ("C0", ["tensor(float)", "tensor(int64)"], "companion"),
                          ("C1", ["tensor(float)", "tensor(int64)"], "companion"),
                          ("C2", ["tensor(float)", "tensor(int64)"], "companion")],
        attributes=[OS.Attribute("keep_ratio", OS.AttrType.FLOAT, "fraction of tokens kept, in (0, 1]",
                                 required=False),
                    OS.Attribute("score", OS.AttrType.STRING, "first_token (default) or column_sum", required=False),
                    OS.Attribute("num_heads", OS.AttrType.INT, "query heads (with query/key)", required=False),
                    OS.Attribute("kv_num_heads", OS.AttrType.INT, "key heads, divides num_heads (default num_heads)",
                                 required=False),
                    OS.Attribute("scale", OS.AttrType.FLOAT, "logit scale (default head_dim^-0.5)", required=False)],
    )
    t.set_type_and_shape_inference_function(_token_prune_infer)
    return [q, f, t]


def register_schemas() -> None:
    """Registers the llmfold ONNX schemas (idempotent)."""
    from onnx import defs

    for s in _schemas():
        try:
            defs.get_schema(s.name, OPSET_VERSION, DOMAIN)
            continue
        except defs.SchemaError:
            pass
        defs.register_schema(s)


def make_qmatmul_node(inputs: Sequence[str], output: str, K: int, N: int, block_size: int, act_bits: int = 16,
                      name: str | None = None, hadamard: int = 0, swiglu: int = 0):
    """A QMatMul NodeProto (inputs: A, B, scales[, zero_points, bias, channel_shift]; '' skips one)."""
    from onnx import helper

    extra = {"hadamard": int(hadamard)} if hadamard else {}
    if swiglu:
        extra["swiglu"] = int(swiglu)
    return helper.make_node("QMatMul", list(inputs), [output], name=name, domain=DOMAIN, K=int(K), N=int(N),
                            block_size=int(block_size), act_bits=int(act_bits), **extra)


def make_packed_matmul_node(inputs: Sequence[str], output: str, K: int, N: int, name: str | None = None):
    """A PackedMatMul NodeProto (inputs: A, B[, bias])."""
    from onnx import helper

    return helper.make_node("PackedMatMul", list(inputs), [output], name=name, domain=DOMAIN, K=int(K), N=int(N))
