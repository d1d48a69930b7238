"""INT4 pass: quantizer math (RTN, clipping search, GPTQ vs a naive OBS reference), TRIP, packing,
and the graph rewrite on a tiny model through ONNX Runtime with the custom op library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.errors import UserError
from passes.int4 import (
    Int4Params,
    block_scale_zero,
    choose_block_params,
    choose_trip_shifts,
    fake_quantize_activations,
    fold_hadamard,
    fold_trip_shifts,
    hadamard_gram,
    output_error,
    quantize_codes,
    quantize_gptq,
    quantize_rtn,
    refit_block_scales,
    shrink_grid,
    split_columns,
    trip_objective,
)


def correlated_layer(K=96, N=40, T=1024, seed=0, outlier=None):
    """A layer with correlated inputs (so GPTQ has something to exploit) and its XᵀX."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * 0.4 + np.eye(K)
    X = (rng.standard_normal((T, K)) @ mix).astype(np.float32)
    if outlier is not None:
        X[:, outlier] *= 25.0
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    return X, W, X.astype(np.float64).T @ X.astype(np.float64)


# --------------------------------------------------------------------------------------------
# block format
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_scales_and_dequantization(symmetric):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((80, 24)).astype(np.float32)  # 80 = 64 + a short last block of 16
    qw = quantize_rtn(W, 64, symmetric)
    assert qw.q.dtype == np.uint8 and qw.q.shape == (80, 24) and qw.q.max() <= 15
    assert qw.scales.shape == (2, 24) and (qw.scales > 0).all()
    assert (qw.zero_points is None) == symmetric
    if not symmetric:
        assert qw.zero_points.dtype == np.uint8 and qw.zero_points.max() <= 15
    W_hat = qw.dequantize()
    rows = np.arange(80) // 64
    # RTN: every value is within half a step of its block column's grid, and the grid spans W
    assert (np.abs(W - W_hat) <= qw.scales[rows] * 0.5 + 1e-6).all()
    # α = 1 represents the block extremes without clipping
    if symmetric:
        assert np.allclose(W_hat.max(0) / W.max(0), 1, atol=0.15)
    # dequantize = scale·(q − zp) by hand
    zp = 8 if symmetric else qw.zero_points[rows].astype(np.float32)
    assert np.array_equal(W_hat, (qw.scales[rows] * (qw.q.astype(np.float32) - zp)).astype(np.float32))


def test_all_zero_block_column_dequantizes_to_zero():
    W = np.zeros((64, 3), np.float32)
    W[:, 1] = np.linspace(-1, 1, 64)
    for sym in (True, False):
        qw = quantize_rtn(W, 64, sym)
        assert np.array_equal(qw.dequantize()[:, 0], np.zeros(64, np.float32))
        assert np.array_equal(qw.dequantize()[:, 2], np.zeros(64, np.float32))


def test_packing_round_trip_through_custom_ops():
    from compiler import custom_ops as cops

    rng = np.random.default_rng(2)
    for K, N, g, sym in [(96, 40, 64, True), (96, 40, 32, False), (130, 17, 16, False), (576, 48, 128, True)]:
        W = rng.standard_normal((K, N)).astype(np.float32)
        qw = quantize_rtn(W, g, sym)
        packed = cops.pack_int4_blocks(qw.q, qw.scales, qw.zero_points, g)
        assert (packed["zero_points"] is None) == sym
        back = cops.unpack_int4_blocks(packed["data"], packed["scales"], packed["zero_points"], K, N, g)
        assert np.array_equal(back["q"], qw.q)
        assert np.array_equal(back["scales"], qw.scales)
        if not sym:
            assert np.array_equal(back["zero_points"], qw.zero_points)
        deq = cops.dequantize_int4(packed["data"], packed["scales"], packed["zero_points"], K, N, g)
        assert np.array_equal(deq, qw.dequantize())


# --------------------------------------------------------------------------------------------
# clipping search
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("objective", ["diag", "full"])
def test_rtn_clip_never_worse_than_rtn_on_its_objective(symmetric, objective):
    X, W, H = correlated_layer(seed=3, outlier=7)
    rtn = quantize_rtn(W, 32, symmetric)
    clip = quantize_rtn(W, 32, symmetric, clip=True, hessian=H, clip_objective=objective)

    def objective_value(qw):
        D = (W - qw.dequantize()).astype(np.float64)
        total = 0.0
        for b0 in range(0, W.shape[0], 32):
            d = D[b0 : b0 + 32]
            Hb = H[b0 : b0 + 32, b0 : b0 + 32]
            total += (np.einsum("kn,k->", d**2, np.diag(Hb)) if objective == "diag" else np.einsum("kn,kj,jn->", d, Hb, d))
        return total

    assert objective_value(clip) <= objective_value(rtn) * (1 + 1e-6)
    assert objective_value(clip) < 0.95 * objective_value(rtn)  # the search does find something
    # block by block too (each block column is chosen independently)
    Dr, Dc = W - rtn.dequantize(), W - clip.dequantize()
    d = np.diag(H)
    if objective == "diag":
        for b0 in range(0, W.shape[0], 32):
            er = np.einsum("kn,k->n", Dr[b0 : b0 + 32] ** 2, d[b0 : b0 + 32])
            ec = np.einsum("kn,k->n", Dc[b0 : b0 + 32] ** 2, d[b0 : b0 + 32])
            assert (ec <= er * (1 + 1e-5) + 1e-9).all()


def test_clip_grid_starts_with_plain_rtn():
    grid = shrink_grid(20, 0.5)
    assert grid[0] == 1.0 and grid[-1] == 0.5 and len(grid) == 20
    wb = torch.randn(64, 5)
    s1, z1 = choose_block_params(wb, True, [1.0])
    s2, z2 = block_scale_zero(wb, True)
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


# --------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------
def gptq_naive_reference(W, H, block_size, symmetric, damp, act_order, clip):
    """Sequential OBS/OBQ in float64 with an explicitly downdated inverse Hessian.

    For each channel c in processing order: fix its block's parameters from the block's current
    weights when the block is first met; quantize row c; spread its error over the remaining
    channels j with w_j -= (w_c - ŵ_c)·[H_F⁻¹]_jc / [H_F⁻¹]_cc; remove c from H_F⁻¹ by the
    Gaussian-elimination downdate H_F⁻¹ -= H_F⁻¹[:,c] H_F⁻¹[c,:] / H_F⁻¹[c,c].
    """
    K, N = W.shape
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    d = np.diag(H).copy()
    perm = np.argsort(-d, kind="stable") if act_order else np.arange(K)
    Hinv = np.linalg.inv(H + damp * d.mean() * np.eye(K))
    alphas = shrink_grid(20, 0.5) if clip else np.ones(1)
    params = {}
    q = np.zeros((K, N))
    remaining = list(perm)
    for c in perm:
        b = c // block_size
        if b not in params:
            rows = slice(b * block_size, min((b + 1) * block_size, K))
            wb = torch.as_tensor(W[rows])
            weight = torch.as_tensor(d[rows]) if clip else None
            params[b] = choose_block_params(wb, symmetric, alphas, weight=weight)
        s, z = params[b]
        qc = quantize_codes(torch.as_tensor(W[c]), s, z)
        q[c] = qc.numpy()
        err = W[c] - (s * (qc - z)).numpy()
        remaining.remove(c)
        r = np.array(remaining, dtype=int)
        if len(r):
            W[r] -= np.outer(Hinv[r, c] / Hinv[c, c], err)
        Hinv = Hinv - np.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]
    return q.astype(np.uint8), {b: (s.numpy(), z.numpy()) for b, (s, z) in params.items()}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_gptq_equals_naive_obs_reference(symmetric, act_order, clip):
    X, W, H = correlated_layer(K=72, N=24, T=512, seed=4, outlier=3)
    # block 16 with lazy batches of 24: blocks straddle batches (exercises the pending update)
    got = quantize_gptq(W, H, 16, symmetric, damp=0.01, act_order=act_order, lazy_batch=24,
                        clip=clip, precision="float64")
    q_ref, params = gptq_naive_reference(W, H, 16, symmetric, 0.01, act_order, clip)
    mismatches = int((got.q != q_ref).sum())
    assert mismatches <= 2, f"{mismatches} codes differ from the naive reference"
    for b, (s, z) in params.items():
        np.testing.assert_allclose(got.scales[b], s.astype(np.float32), rtol=1e-5)
        if not symmetric:
            assert np.array_equal(got.zero_points[b], z.astype(np.uint8))


def test_gptq_float32_close_to_float64():
    X, W, H = correlated_layer(seed=5)
    a = quantize_gptq(W, H, 32, True, precision="float32")
    b = quantize_gptq(W, H, 32, True, precision="float64")
    assert (a.q != b.q).mean() < 0.01


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_below_rtn(symmetric):
    X, W, H = correlated_layer(K=128, N=48, seed=6, outlier=11)
    rtn = output_error(W, quantize_rtn(W, 32, symmetric).dequantize(), H)
    clip = output_error(W, quantize_rtn(W, 32, symmetric, clip=True, hessian=H).dequantize(), H)
    for act_order in (False, True):
        g = output_error(W, quantize_gptq(W, H, 32, symmetric, act_order=act_order).dequantize(), H)
        assert g < 0.7 * rtn and g < clip
    # the objective is really ‖XW − XŴ‖²
    W_hat = quantize_rtn(W, 32, symmetric).dequantize()
    direct = float(np.sum((X.astype(np.float64) @ (W - W_hat).astype(np.float64)) ** 2))
    assert abs(direct - rtn) <= 1e-9 * rtn


def test_gptq_dead_input_channel():
    X, W, H = correlated_layer(K=64, N=16, seed=7)
    H[5, :] = H[:, 5] = 0.0  # channel 5 never fires
    qw = quantize_gptq(W, H, 32, True)
    assert qw.dequantize()[5].tolist() == [0.0] * 16  # its weight row is irrelevant: zeroed
    assert np.isfinite(qw.scales).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_refit_is_the_least_squares_optimum_for_the_codes(symmetric):
    """Per column, the refit scales solve min_s ‖X·w − X·U·s‖² (U: the codes minus zero points, one
    column per block) — checked against numpy's lstsq on X itself, up to the rounding to the stored
    float16 (half an ulp: 2^-11 relative); never worse than GPTQ's scales."""
    X, W, H = correlated_layer(K=80, N=24, seed=9, outlier=3)  # K = 80: a partial last block of 32
    qw = quantize_gptq(W, H, 32, symmetric, clip=True)
    ref = refit_block_scales(W, qw, H)
    np.testing.assert_array_equal(ref.q, qw.q)
    before, after = output_error(W, qw.dequantize(), H), output_error(W, ref.dequantize(), H)
    assert after < 0.97 * before
    np.testing.assert_array_equal(refit_block_scales(W, qw, H, columns_per_step=5).scales, ref.scales)  # chunked
    K, N = W.shape
    rows = np.arange(K) // 32
    zp = 8.0 if qw.zero_points is None else qw.zero_points.astype(np.float64)[rows]
    Dq = qw.q.astype(np.float64) - zp
    Xd = X.astype(np.float64)
    for n in range(N):
        U = np.zeros((K, qw.n_blocks))
        U[np.arange(K), rows] = Dq[:, n]
        s, *_ = np.linalg.lstsq(Xd @ U, Xd @ W[:, n].astype(np.float64), rcond=None)
        np.testing.assert_allclose(ref.scales[:, n], s, rtol=2.0**-11 + 2e-5, atol=1e-7)
    from compiler.custom_ops import round_scales

    np.testing.assert_array_equal(ref.scales, round_scales(ref.scales))  # what QMatMul stores


def test_scale_refit_keeps_blocks_without_signal():
    """A block whose codes all sit at the zero point (u_b = 0) has no least-squares scale: it keeps
    its own; a dead input channel does not make the system singular."""
    X, W, H = correlated_layer(K=64, N=8, seed=10)
    qw = quantize_rtn(W, 32, True)
    qw.q[32:, 2] = 8  # column 2's second block dequantizes to 0 whatever its scale
    H[5, :] = H[:, 5] = 0.0
    ref = refit_block_scales(W, qw, H)
    assert ref.scales[1, 2] == qw.scales[1, 2]
    assert np.isfinite(ref.scales).all()
    assert output_error(W, ref.dequantize(), H) <= output_error(W, qw.dequantize(), H)


# --------------------------------------------------------------------------------------------
# activations and TRIP
# --------------------------------------------------------------------------------------------
def test_fake_activation_quantization_matches_the_op_rule():
    x = np.array([[1.0, -0.5, 0.24, 7.0], [0, 0, 0, 0]], np.float32)
    y = fake_quantize_activations(x, 4)
    assert np.allclose(y[0], [1.0, -0.0, 0.0, 7.0]) and np.array_equal(y[1], np.zeros(4, np.float32))
    y8 = fake_quantize_activations(x, 8)
    assert np.abs(y8 - x).max() <= 7.0 / 127 / 2 + 1e-6
    # shifting: channel 3 divided by 4 before quantizing, multiplied back afterwards
    ys = fake_quantize_activations(x[:1], 4, np.array([0, 0, 0, 2], np.uint8))
    assert ys[0, 3] == 7.0 and abs(ys[0, 0] - 1.0) < 1.75 / 7 / 2 + 1e-6


def test_trip_fold_is_exact_in_fp32():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((33, 64)).astype(np.float32) * np.float32(3.0)
    W = rng.standard_normal((64, 20)).astype(np.float32)
    shifts = rng.integers(0, 8, 64).astype(np.uint8)
    Xs = X * np.exp2(-shifts.astype(np.float32))
    Wf = fold_trip_shifts(W, shifts)
    # every product is bit-identical, so sums in the same order are too
    assert np.array_equal(Xs[:, :, None] * Wf[None], X[:, :, None] * W[None])
    assert np.array_equal(np.einsum("tk,kn->tn", Xs, Wf), np.einsum("tk,kn->tn", X, W))
    assert np.array_equal(Xs * np.exp2(shifts.astype(np.float32)), X)


def test_trip_reduces_a4_error_on_an_outlier_channel():
    rng = np.random.default_rng(9)
    K, N, T = 128, 64, 2048
    X = rng.standard_normal((T, K)).astype(np.float32)
    X[:, 17] = rng.standard_normal(T).astype(np.float32) * 40.0  # one massive outlier channel
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    H = X.astype(np.float64).T @ X
    hdiag = np.diag(H) / T
    shifts = choose_trip_shifts(X[:1024], W, hdiag, act_bits=4, max_shift=4, block_size=32)
    assert shifts[17] > 0 and shifts.dtype == np.uint8
    assert shifts.max() <= 4

    # on held-out rows: the activation error propagated through W falls
    Xt = X[1024:]
    e0 = np.sum(((Xt - fake_quantize_activations(Xt, 4)) @ W) ** 2)
    e1 = np.sum(((Xt - fake_quantize_activations(Xt, 4, shifts)) @ W) ** 2)
    assert e1 < 0.5 * e0

    # the full W4A4 output error (folded weights quantized with RTN) falls too
    def w4a4_error(sh):
        Wq = quantize_rtn(fold_trip_shifts(W, sh), 32, True).dequantize()
        Xq = fake_quantize_activations(Xt, 4, sh) * np.exp2(-sh.astype(np.float32))
        return np.sum((Xt @ W - Xq @ Wq) ** 2)

    assert w4a4_error(shifts) < 0.6 * w4a4_error(np.zeros(K, np.uint8))

    # coordinate descent never increases its objective
    j0 = trip_objective(X[:1024], W, hdiag, np.zeros(K, np.uint8), 4, 32)
    j1 = trip_objective(X[:1024], W, hdiag, shifts, 4, 32)
    assert j1 < j0


def trip_search_brute_force(X, W, hdiag, act_bits, max_shift, block_size, candidates, sweeps=2):
    """The same coordinate descent, every trial scored by the direct objective (slow)."""
    K = W.shape[0]
    shifts = np.zeros(K, np.int64)
    order = np.argsort(-np.abs(X).max(0), kind="stable")[:candidates]
    for _ in range(sweeps):
        changed = False
        for c in order:
            vals = []
            for s in range(max_shift + 1):
                trial = shifts.copy()
                trial[c] = s
                vals.append(trip_objective(X, W, hdiag, trial, act_bits, block_size))
            best = int(np.argmin(vals))
            if best != shifts[c] and vals[best] < vals[shifts[c]]:
                shifts[c] = best
                changed = True
        if not changed:
            break
    return shifts


@pytest.mark.parametrize("act_bits", [4, 8])
def test_trip_search_equals_brute_force_coordinate_descent(act_bits):
    rng = np.random.default_rng(11)
    K, N, T = 48, 24, 300
    X = rng.standard_normal((T, K)).astype(np.float32)
    X[:, 3] *= 30.0
    X[:, 20] *= 8.0
    X[::7, 41] = 60.0  # an outlier on some tokens only
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    hdiag = (X.astype(np.float64) ** 2).mean(0)
    fast = choose_trip_shifts(X, W, hdiag, act_bits, max_shift=4, block_size=16, candidates=6)
    slow = trip_search_brute_force(X, W, hdiag, act_bits, 4, 16, candidates=6)
    assert fast.tolist() == slow.tolist()
    assert fast.any()


def test_trip_keeps_shifts_zero_without_outliers():
    rng = np.random.default_rng(10)
    X = rng.standard_normal((1024, 64)).astype(np.float32)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    shifts = choose_trip_shifts(X, W, np.ones(64), act_bits=8, max_shift=3, block_size=32)
    assert shifts.sum() <= 2  # at most marginal changes on isotropic data


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"block_size": 20}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"block_size": 96}, "block_size"),
        ({"block_size": 512}, "block_size"),
        ({"algorithm": "awq"}, "algorithm"),
        ({"act_bits": 6}, "act_bits"),
        ({"act_bits_overrides": {"lm_head": 5}}, "act_bits_overrides"),
        ({"block_size_overrides": {"lm_head": 48}}, "block_size_overrides"),
        ({"scale_refit": True, "algorithm": "rtn"}, "scale_refit"),
        ({"trip": True}, "trip"),
        ({"trip_max_shift": 16, "act_bits": 4}, "trip_max_shift"),
        ({"on_unsupported": "ignore"}, "on_unsupported"),
        ({"clip_min_shrink": 0.0}, "clip_min_shrink"),
        ({"damp": -1.0}, "damp"),
        ({"precision": "float16"}, "precision"),
        ({"include": [""]}, "include"),
        ({"hadamard": [""]}, "hadamard"),
        ({"hadamard": ["layers.*.down"], "hadamard_size": 48}, "hadamard_size"),
        ({"hadamard": ["layers.*.down"], "hadamard_size": 1}, "hadamard_size"),
        ({"hadamard_size": 64}, "hadamard_size"),
    ],
)
def test_bad_params_raise_user_errors_naming_the_key(kwargs, key):
    with pytest.raises(UserError, match=key):
        Int4Params(**kwargs).validate()


def test_layer_selection_and_act_bits_overrides():
    p = Int4Params(exclude=["layers.0.*"], act_bits=4, act_bits_overrides={"lm_head": 8, "layers.*.down": 16})
    assert p.selects("layers.1.q") and not p.selects("layers.0.q") and p.selects("lm_head")
    assert not Int4Params(lm_head=False).selects("lm_head")
    assert not Int4Params(include=["layers.*"]).selects("lm_head")
    assert p.act_bits_for("lm_head") == 8 and p.act_bits_for("layers.3.down") == 16
    assert p.act_bits_for("layers.3.up") == 4
    b = Int4Params(block_size=64, block_size_overrides={"lm_head": 32, "layers.*.down": 128})
    assert [b.block_size_for(x) for x in ("lm_head", "layers.2.down", "layers.2.up")] == [32, 128, 64]
    h = Int4Params(hadamard=["layers.*.down"])
    assert [h.hadamard_for("layers.2.down", K) for K in (1536, 576, 96, 7)] == [512, 64, 32, 0]
    assert h.hadamard_for("layers.2.up", 1536) == 0
    h64 = Int4Params(hadamard=["layers.*.down"], hadamard_size=64)
    assert [h64.hadamard_for("layers.2.down", K) for K in (1536, 576, 96, 7)] == [64, 64, 32, 0]


def test_hadamard_fold_is_exact():
    """X·W = (X·B)·W' with W' = fold_hadamard(W) (B block-diagonal Sylvester, B·B = h·I), and the
    statistics the pass hands GPTQ for the transformed input are exactly (X·B)ᵀ(X·B)."""
    from compiler.custom_ops import hadamard_rows_reference

    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 96)).astype(np.float32)
    X[:, 5] *= 40.0  # an outlier channel: the transform spreads it over its block
    W = rng.standard_normal((96, 24)).astype(np.float32)
    for h in (2, 32):
        XB = hadamard_rows_reference(X, h).astype(np.float64)
        Y = X.astype(np.float64) @ W
        assert np.abs(XB @ fold_hadamard(W, h) - Y).max() < 1e-5 * np.abs(Y).max()
        G = X.astype(np.float64).T @ X
        assert np.allclose(hadamard_gram(G, h), XB.T @ XB, rtol=1e-6, atol=1e-6 * np.abs(G).max())
    # outlier spread: the per-token absmax relative to the RMS drops, which is what int4 inputs need
    XB = hadamard_rows_reference(X, 32)
    ratio = lambda Z: float(np.median(np.abs(Z).max(1) / np.sqrt((Z**2).mean(1))))
    assert ratio(XB) < 0.5 * ratio(X)


# --------------------------------------------------------------------------------------------
# the graph pass on the tiny model, through ONNX Runtime with the custom op library
# --------------------------------------------------------------------------------------------
def _library_or_skip():
    from compiler import custom_ops

    try:
        custom_ops.library_path()
    except FileNotFoundError as e:
        pytest.skip(f"custom op library not built: {e}")


CALIB_TEXT = (
    "Once upon a time a small language model lived on a phone. It was quantized to four bits and it "
    "still told stories about cats, dogs, rivers and mountains. The compiler folds affine transforms "
    "into norms, splits weights into low rank pairs and packs four bit blocks. "
)
EVAL_TEXT = "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. " * 6


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("int4calib") / "calib.txt"
    p.write_text(CALIB_TEXT * 30)
    return p


def write_recipe(path, **params):
    lines = ["[calibration]", "windows = 4", "seq_len = 64", "", "[[pass]]", 'name = "int4"']
    for k, v in params.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str):
            v = f'"{v}"'
        elif isinstance(v, dict):
            v = "{ " + ", ".join(f'"{a}" = {b}' for a, b in v.items()) + " }"
        elif isinstance(v, list):
            v = "[" + ", ".join(f'"{a}"' for a in v) + "]"
        lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


def compile_tiny(src, tmp_path, name, calib, **params):
    from compiler.driver import compile_model

    recipe = write_recipe(tmp_path / f"{name}.toml", **params)
    return compile_model(src, tmp_path / name, recipe=str(recipe), calib=calib, progress=False)


def prefill_logits(model_dir, ids):
    from compiler.runtime import open_session

    return open_session(model_dir, threads=1).prefill_logits(ids)


def simulated_logits(model_dir, ids):
    """Logits of the compiled graph with every QMatMul replaced by standard ops computing the same
    thing from the packed initializers: MatMul by the Hadamard blocks, Mul(2^-shift), per-token fake quantization (the op's rule:
    round-half-even of x·(Q/absmax), scale absmax/Q) and MatMul with the dequantized weight."""
    import onnx_ir as ir

    from compiler import custom_ops as cops
    from compiler.runtime import KVLayout, create_session

    model = ir.load(str(Path(model_dir) / "model.onnx"))
    g = model.graph
    for node in [n for n in g if n.op_type == "QMatMul"]:
        a = {k: v.value for k, v in node.attributes.items()}
        K, N, bs, act_bits = a["K"], a["N"], a["block_size"], a.get("act_bits", 16)
        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        arr = lambda v: None if v is None else v.const_value.numpy()
        W_hat = cops.dequantize_int4(arr(ins[1]), arr(ins[2]), arr(ins[3]), K, N, bs)
        new, x = [], ins[0]

        def const(name, value):
            t = ir.tensor(np.asarray(value), name=f"{node.name}/sim/{name}")
            v = ir.Value(name=t.name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
            g.register_initializer(v)
            return v

        def op(t, inputs, **attrs):
            n = ir.node(t, inputs, attributes=attrs, name=f"{node.name}/sim/{t}{len(new)}")
            new.append(n)
            return n.outputs[0]

        if a.get("hadamard"):
            h = a["hadamard"]
            x = op("MatMul", [x, const("hadamard", np.kron(np.eye(K // h), cops.sylvester_hadamard(h)).astype(np.float32))])
        if ins[5] is not None:
            x = op("Mul", [x, const("shift", np.exp2(-arr(ins[5]).astype(np.float32)))])
        if act_bits < 16:
            Q = np.float32(7 if act_bits == 4 else 127)
            amax = op("ReduceMax", [op("Abs", [x]), const("axis", np.array([-1], np.int64))], keepdims=1)
            q = op("Round", [op("Mul", [x, op("Div", [const("Q", Q), amax])])])
            x = op("Mul", [q, op("Div", [amax, const("Q2", Q)])])
        op("MatMul", [x, const("w", W_hat)])
        ir.convenience.replace_nodes_and_values(g, node, [node], new, list(node.outputs), [new[-1].outputs[0]])
    model.opset_imports.pop("llmfold", None)
    sim_dir = Path(model_dir).parent / (Path(model_dir).name + "-sim")
    sim_dir.mkdir(exist_ok=True)
    tmp = sim_dir / "model.onnx"
    ir.save(model, tmp, external_data="model.onnx.data")
    sess = create_session(tmp, threads=1)
    layout = KVLayout.from_session(sess, {"num_kv_heads": 2, "head_dim": 16})
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64), **layout.empty_past(1)}
    return sess.run(["logits"], feeds)[0][0]


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("act_bits, bound", [(16, 0.2), (8, 0.2), (4, 0.4)])
def test_compiled_tiny_model_runs_the_op_and_stays_close_to_fp32(tiny_model_dir, tmp_path, calib_file, act_bits, bound):
    import onnx_ir as ir

    from compiler.runtime import open_session

    _library_or_skip()
    out = compile_tiny(tiny_model_dir, tmp_path, f"a{act_bits}", calib_file, block_size=32,
                       act_bits=act_bits, trip=act_bits < 16, trip_max_shift=3)
    model = ir.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph]
    assert ops.count("QMatMul") == 2 * 7 + 1 and model.opset_imports.get("llmfold") == 1
    dense = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()]
    assert dense == []  # every linear layer, lm_head included, left the fp32 path
    inits = set(model.graph.initializers)
    assert "model.layers.0.self_attn.q_proj.qweight" in inits and "lm_head.scales" in inits
    assert not any(n.endswith("proj.weight") or n == "lm_head.weight" for n in inits)
    meta = json.loads((out / "llmfold.json").read_text())
    kinds = {lin["kind"] for b in meta["structure"]["blocks"] for lin in (b[r] for r in ("q", "k", "v", "o", "gate", "up", "down"))}
    assert kinds == {"int4"}
    record = meta["passes"][-1]["records"][0]
    assert record["quantized"] == 15 and record["skipped"] == []

    lm = open_session(tiny_model_dir, threads=1)
    ids = lm.encode(EVAL_TEXT)[:64]
    fp32 = lm.prefill_logits(ids)
    compiled = prefill_logits(out, ids)
    if act_bits == 16:
        # float activations: the whole graph equals the same graph in standard ops from the packed data
        assert rel_err(compiled, simulated_logits(out, ids)) < 2e-3
    # every QMatMul computes, on the inputs it actually receives, what the pass meant (per-token
    # fake quantization of x·2^-shift times the dequantized folded weight) ...
    check_each_qmatmul(out, tiny_model_dir, ids)
    # ... and the quantized model stays close to the fp32 one
    assert rel_err(compiled, fp32) < bound
    assert (compiled.argmax(-1) == fp32.argmax(-1)).mean() > 0.5


def check_each_qmatmul(model_dir, fp32_dir, ids):
    """Run the compiled model with every QMatMul input/output exposed; check each node against
    numpy on its own input (so one rounding-boundary flip upstream cannot hide or fake a bug), and
    its packed weight against the fp32 weight with the Hadamard (B·W/h) and TRIP shifts (2^s·W)
    folded in."""
    import onnx
    import onnx_ir as ir

    from compiler import custom_ops as cops
    from compiler.runtime import KVLayout, create_session

    proto = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    qnodes = [n for n in proto.graph.node if n.op_type == "QMatMul"]
    taps = list(dict.fromkeys([v for n in qnodes for v in (n.input[0], n.output[0])]))
    existing = {o.name for o in proto.graph.output}
    for name in taps:
        if name not in existing:
            vi = onnx.ValueInfoProto()
            vi.name = name
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            proto.graph.output.append(vi)
    sess = create_session(proto.SerializeToString(), 1, True, external_data_dir=Path(model_dir).resolve())
    layout = KVLayout.from_session(sess, {"num_kv_heads": 2, "head_dim": 16})
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64), **layout.empty_past(1)}
    got = dict(zip(taps, sess.run(taps, feeds)))
    model = ir.load(str(Path(model_dir) / "model.onnx"))
    fp32 = ir.load(str(Path(fp32_dir) / "model.onnx"))
    from compiler.analyze import analyze
    from passes.pack import unpack_qkv

    unpack_qkv(fp32, analyze(fp32))  # the export packs q/k/v; the int4 pass quantized them apart
    nodes = {n.name: n for n in model.graph}
    for qn in qnodes:
        node = nodes[qn.name]
        a = {k: v.value for k, v in node.attributes.items()}
        K, N, bs, act_bits, had = a["K"], a["N"], a["block_size"], a["act_bits"], a.get("hadamard", 0)
        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        arr = lambda v: None if v is None else v.const_value.numpy()
        W_hat = cops.dequantize_int4(arr(ins[1]), arr(ins[2]), arr(ins[3]), K, N, bs)
        shift = arr(ins[5])
        x = got[qn.input[0]].reshape(-1, K)
        if had:
            x = cops.hadamard_rows_reference(x, had)
        xs = x * np.exp2(-shift.astype(np.float32)) if shift is not None else x
        expected = fake_quantize_activations(xs, act_bits) @ W_hat
        y = got[qn.output[0]].reshape(-1, N)
        row_err = np.abs(y - expected).max(1) / (np.abs(expected).max(1) + 1e-6)
        assert (row_err < 1e-4).mean() >= 0.95, f"{qn.name}: {int((row_err >= 1e-4).sum())} rows differ"
        # the packed weight is the layer's fp32 weight (rows scaled by 2^shift), 4-bit rounded
        base = ins[1].name[: -len(".qweight")]
        W = fp32.graph.initializers[f"{base}.weight"].const_value.numpy()
        if had:
            W = fold_hadamard(W, had)
        if shift is not None:
            W = fold_trip_shifts(W, shift)
        assert np.linalg.norm(W_hat - W) / np.linalg.norm(W) < 0.2, qn.name


def test_gptq_beats_rtn_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, calib_file):
    from compiler.runtime import open_session

    _library_or_skip()
    ids = open_session(tiny_model_dir, threads=1).encode(CALIB_TEXT * 2)[:64]  # calibration-like text
    fp32 = prefill_logits(tiny_model_dir, ids)
    errs = {}
    for algo in ("rtn", "rtn-clip", "gptq"):
        out = compile_tiny(tiny_model_dir, tmp_path, algo, calib_file, block_size=32, algorithm=algo)
        errs[algo] = rel_err(prefill_logits(out, ids), fp32)
    assert errs["gptq"] < errs["rtn"] and errs["rtn-clip"] < errs["rtn"], errs


def test_already_quantized_model_error_or_skip(tiny_model_dir, tmp_path, calib_file):
    _library_or_skip()
    once = compile_tiny(tiny_model_dir, tmp_path, "once", calib_file, block_size=32, algorithm="rtn",
                        exclude=["layers.1.*"])
    with pytest.raises(UserError, match=r"layers\.0\.q: already quantized"):
        compile_tiny(once, tmp_path, "twice_error", calib_file, block_size=32, algorithm="rtn")
    assert not (tmp_path / "twice_error").exists()  # nothing half-written
    twice = compile_tiny(once, tmp_path, "twice_skip", calib_file, block_size=32, algorithm="rtn",
                         on_unsupported="skip")
    meta = json.loads((twice / "llmfold.json").read_text())
    record = meta["passes"][-1]["records"][0]
    assert record["quantized"] == 7  # layers.1.*: the still-dense ones
    assert len(record["skipped"]) == 8 and all("already quantized" in s for s in record["skipped"])  # layers.0.*, lm_head


def test_block_size_overrides_and_scale_refit_in_the_graph(tiny_model_dir, tmp_path, calib_file):
    """Overridden layers get their own block size in the QMatMul node and packed scales; the
    refit lowers the compiled model's logit error against fp32 on calibration-like text."""
    import onnx_ir as ir

    from compiler.runtime import open_session

    _library_or_skip()
    ids = open_session(tiny_model_dir, threads=1).encode(CALIB_TEXT * 2)[:64]
    fp32 = prefill_logits(tiny_model_dir, ids)
    plain = compile_tiny(tiny_model_dir, tmp_path, "plain", calib_file, block_size=32)
    out = compile_tiny(tiny_model_dir, tmp_path, "refit", calib_file, block_size=32, scale_refit=True,
                       block_size_overrides={"lm_head": 16, "layers.*.down": 64})
    sizes = {n.name: n.attributes.get_int("block_size") for n in ir.load(str(out / "model.onnx")).graph if n.op_type == "QMatMul"}
    assert sizes["/lm_head/QMatMul"] == 16
    assert {v for k, v in sizes.items() if "/mlp/down_proj/" in k} == {64}
    assert {v for k, v in sizes.items() if "/mlp/up_proj/" in k} == {32}
    record = json.loads((out / "llmfold.json").read_text())["passes"][-1]["records"][0]
    assert record["scale_refit"] is True and record["block_size_overrides"] == {"lm_head": 16, "layers.*.down": 64}
    same_blocks = compile_tiny(tiny_model_dir, tmp_path, "refit32", calib_file, block_size=32, scale_refit=True)
    assert rel_err(prefill_logits(same_blocks, ids), fp32) < rel_err(prefill_logits(plain, ids), fp32)


@pytest.mark.parametrize("act_bits,size", [(16, 0), (4, 0), (8, 16)])
def test_hadamard_input_transform_in_the_graph(tiny_model_dir, tmp_path, calib_file, act_bits, size):
    """hadamard = ["layers.*.down"]: the down QMatMuls get the attribute (the largest power of two
    dividing K, or hadamard_size when smaller), every node computes what the pass meant on its
    actual input (transform, TRIP shifts, fake quantization, folded weights), A16 equals the same
    graph in standard ops, and the model stays close to fp32."""
    import onnx_ir as ir

    from compiler.runtime import open_session

    _library_or_skip()
    out = compile_tiny(tiny_model_dir, tmp_path, f"had{act_bits}", calib_file, block_size=32, act_bits=act_bits,
                       trip=act_bits == 4, hadamard=["layers.*.down"], hadamard_size=size)
    nodes = [n for n in ir.load(str(out / "model.onnx")).graph if n.op_type == "QMatMul"]
    had = {n.name: n.attributes.get_int("hadamard", 0) for n in nodes}
    downs = {k: v for k, v in had.items() if "/mlp/down_proj/" in k}
    K = next(n.attributes.get_int("K") for n in nodes if "/mlp/down_proj/" in n.name)
    want = min(K & -K, size) if size else K & -K
    assert size == 0 or want == size < K & -K  # the cap is exercised
    assert len(downs) == 2 and set(downs.values()) == {want}
    assert all(v == 0 for k, v in had.items() if k not in downs)
    record = json.loads((out / "llmfold.json").read_text())["passes"][-1]["records"][0]
    assert {k for k, v in record["layers"].items() if v.get("hadamard")} == {"layers.0.down", "layers.1.down"}
    from compiler.inspect import inspect_model

    rows = {r["name"]: r for r in inspect_model(out)["linear_layers"]}
    assert rows["layers.1.down"]["hadamard"] == want and rows["layers.1.up"]["hadamard"] is None
    lm = open_session(tiny_model_dir, threads=1)
    ids = lm.encode(EVAL_TEXT)[:64]
    fp32 = lm.prefill_logits(ids)
    compiled = prefill_logits(out, ids)
    check_each_qmatmul(out, tiny_model_dir, ids)
    if act_bits == 16:
        assert rel_err(compiled, simulated_logits(out, ids)) < 2e-3
    assert rel_err(compiled, fp32) < (0.2 if act_bits == 16 else 0.4)


def test_hadamard_must_select_every_reader_of_an_input(tiny_model_dir, tmp_path, calib_file):
    with pytest.raises(UserError, match=r"hadamard selects some but not all of the layers reading .*select all or none"):
        compile_tiny(tiny_model_dir, tmp_path, "had_q", calib_file, block_size=32, hadamard=["layers.*.q"])
    assert not (tmp_path / "had_q").exists()


def test_excluded_layers_stay_dense(tiny_model_dir, tmp_path, calib_file):
    import onnx_ir as ir

    _library_or_skip()
    out = compile_tiny(tiny_model_dir, tmp_path, "partial", calib_file, block_size=32, algorithm="rtn",
                       exclude=["layers.*.down"], lm_head=False)
    model = ir.load(str(out / "model.onnx"))
    dense = sorted(n.inputs[1].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer())
    assert dense == ["lm_head.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize(
    "line, key",
    [("block_size = 48", "block_size"), ('block_size = "64"', "block_size"), ('algorithm = "gptq2"', "algorithm"),
     ("act_bits = 2", "act_bits"), ('on_unsupported = "warn"', "on_unsupported"), ("trip = true", "trip"),
     ("blocksize = 64", "blocksize")],
)
def test_bad_recipe_values_are_user_errors(tmp_path, line, key):
    from compiler.recipe import load_recipe

    p = tmp_path / "bad.toml"
    p.write_text(f'[[pass]]\nname = "int4"\n{line}\n')
    with pytest.raises(UserError, match=key):
        load_recipe(str(p))


def test_qmatmul_keeps_the_layer_tag_of_the_matmul_it_replaces(tiny_model_dir, tmp_path, calib_file):
    """The SVD pass tags both factor MatMuls with metadata_props["llmfold.layer"]; the QMatMuls that
    replace them keep the tag (analysis recognizes QMatMul→QMatMul low-rank pairs by it)."""
    import onnx
    import onnx_ir as ir

    from compiler.driver import CompileContext
    from compiler.modeldir import open_model_dir
    from compiler.recipe import CalibrationConfig
    from passes.int4 import Int4Pass
    from passes.svd import SvdParams, SvdPass

    src = open_model_dir(tiny_model_dir)
    model = src.load_model()
    ctx = CompileContext(src, CalibrationConfig(windows=4, seq_len=64), calib_file, progress=False)
    try:
        svd = SvdParams(ratio=0.3)
        svd.validate()
        model = SvdPass(ctx, svd)(model).model
        ctx.invalidate_structure()
        tagged = {n.name: n.metadata_props["llmfold.layer"] for n in model.graph if "llmfold.layer" in n.metadata_props}
        assert len(tagged) == 2 * 2 * 7  # 2 blocks × 7 linears × 2 factors
        params = Int4Params(algorithm="rtn", block_size=16, lm_head=False)
        params.validate()
        model = Int4Pass(ctx, params)(model).model
    finally:
        ctx.close()
    out = tmp_path / "svd-int4.onnx"
    ir.save(model, out, external_data="svd-int4.onnx.data")
    proto = onnx.load(str(out), load_external_data=False)
    got = {n.name: {p.key: p.value for p in n.metadata_props}.get("llmfold.layer") for n in proto.graph.node
           if n.op_type == "QMatMul"}
    assert len(got) == len(tagged)
    for name, layer in tagged.items():
        assert got[name[: -len("MatMul")] + "QMatMul" if name.endswith("MatMul") else f"{name}/QMatMul"] == layer


@pytest.mark.parametrize("algorithm", ["gptq", "rtn-clip"])
def test_layers_sharing_an_input_quantize_as_one_matrix(algorithm):
    """q/k/v (gate/up) share H: quantizing [W_a | W_b] at once equals quantizing each alone."""
    X, W, H = correlated_layer(K=128, N=72)
    Wa, Wb = W[:, :40], W[:, 40:]
    if algorithm == "gptq":
        run = lambda w: quantize_gptq(w, H, 32, False, act_order=True, clip=True, lazy_batch=48)
    else:
        run = lambda w: quantize_rtn(w, 32, False, clip=True, hessian=H)
    joint = split_columns(run(W), [40, 32])
    for alone, part in zip((run(Wa), run(Wb)), joint):
        assert (alone.q == part.q).mean() > 0.999  # a float tie may break differently, nothing more
        np.testing.assert_allclose(alone.scales, part.scales, rtol=1e-5)
        np.testing.assert_array_equal(alone.zero_points, part.zero_points)
        np.testing.assert_allclose(part.dequantize(), alone.dequantize(), atol=1e-5 * np.abs(W).max())


def test_weights_beyond_fp16_block_scales_are_a_user_error(tiny_model_dir, tmp_path, calib_file):
    """The packed layout stores float16 block scales: a weight block whose scale would exceed
    65504 stops the compile with the layer's name, and nothing is written."""
    import shutil

    import onnx_ir as ir

    from passes._weights import get_weight, set_weight

    _library_or_skip()
    src = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, src)
    model = ir.load(str(src / "model.onnx"))
    name = next(k for k in model.graph.initializers if "layers.1." in k and "down" in k and k.endswith("weight"))
    set_weight(model, name, get_weight(model, name) * 1e9)
    ir.save(model, str(src / "model.onnx"))
    with pytest.raises(UserError, match=r"int4: layers\.1\.down: block scales: .* exceed float16's range"):
        compile_tiny(src, tmp_path, "huge_out", calib_file, block_size=32, algorithm="rtn")
    assert not (tmp_path / "huge_out").exists()
