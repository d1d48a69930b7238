"""SVD-LLM pass: the truncation theorem, PD repair, rank allocation, the update, the graph pass."""

from __future__ import annotations

import numpy as np
import pytest

from passes.svd import (
    LayerShape,
    allocate_budgeted,
    allocate_uniform,
    allocation_loss,
    allocation_saving,
    max_saving_rank,
    reduced_rank_fit,
    refit_first_factor,
    saves_parameters,
    truncate_whitened,
    uniform_rank,
    whiten_cholesky,
    whitened_spectrum,
)


def correlated_inputs(rng, T, K, decay=0.9):
    """Rows with strongly anisotropic, correlated channels (like LLM activations)."""
    mix = rng.standard_normal((K, K)) * (decay ** np.arange(K))[None, :]
    return rng.standard_normal((T, K)) @ mix.T + 0.3 * rng.standard_normal((T, K))


# --------------------------------------------------------------------------------------------
# the theorem


@pytest.mark.parametrize("K,N,k", [(48, 32, 5), (32, 48, 17), (40, 40, 1), (40, 40, 39)])
def test_output_error_equals_discarded_singular_values(K, N, k):
    rng = np.random.default_rng(K * 100 + k)
    X = correlated_inputs(rng, 400, K)
    W = rng.standard_normal((K, N))
    S = whiten_cholesky(X.T @ X).S
    f = truncate_whitened(W, S, k)
    assert f.W1.shape == (K, k) and f.W2.shape == (k, N)
    err = np.sum((X @ W - X @ f.W1 @ f.W2) ** 2)
    discarded = np.sum(f.sigma[k:] ** 2)
    assert err == pytest.approx(discarded, rel=1e-9, abs=1e-9 * np.sum(f.sigma**2))
    assert f.discarded_energy == pytest.approx(discarded)


def test_whitened_truncation_beats_plain_svd_on_outputs():
    rng = np.random.default_rng(1)
    K, N, k = 64, 48, 12
    X = correlated_inputs(rng, 500, K)
    W = rng.standard_normal((K, N))
    S = whiten_cholesky(X.T @ X).S
    whitened = truncate_whitened(W, S, k)
    plain = truncate_whitened(W, None, k)
    err_w = np.sum((X @ (W - whitened.W1 @ whitened.W2)) ** 2)
    err_p = np.sum((X @ (W - plain.W1 @ plain.W2)) ** 2)
    assert err_w < 0.8 * err_p
    # and no rank-k matrix does better: random rank-k perturbations of the optimum only lose
    for _ in range(5):
        W_alt = (whitened.W1 + 1e-2 * rng.standard_normal((K, k))) @ whitened.W2
        assert np.sum((X @ (W - W_alt)) ** 2) > err_w
    # plain SVD is optimal for the weights themselves
    assert np.sum((W - plain.W1 @ plain.W2) ** 2) == pytest.approx(np.sum(plain.sigma[k:] ** 2))


def test_full_rank_is_exact():
    rng = np.random.default_rng(2)
    X = correlated_inputs(rng, 200, 24)
    W = rng.standard_normal((24, 16))
    f = truncate_whitened(W, whiten_cholesky(X.T @ X).S, 16)
    np.testing.assert_allclose(f.W1 @ f.W2, W, atol=1e-9)
    np.testing.assert_allclose(whitened_spectrum(W, whiten_cholesky(X.T @ X).S), f.sigma)


# --------------------------------------------------------------------------------------------
# non positive definite statistics


def test_non_pd_gram_is_shifted_and_logged():
    rng = np.random.default_rng(3)
    K = 32
    X = rng.standard_normal((10, K))  # 10 tokens < 32 channels: XᵀX is singular
    X[:, 5] = 0.0  # a dead channel
    G = X.T @ X
    G[0, 1] = G[1, 0] = G[0, 1] + 1e-3  # and slightly indefinite
    assert np.linalg.eigvalsh(G)[0] < 0
    messages = []
    w = whiten_cholesky(G, eps=1e-6, log=messages.append, name="layers.0.q")
    assert w.shift > 0
    assert len(messages) == 1 and "layers.0.q" in messages[0] and "not positive definite" in messages[0]
    np.testing.assert_allclose(w.S @ w.S.T, G + w.shift * np.eye(K), atol=1e-9)
    assert np.all(np.tril(w.S) == w.S)
    # the shift is the smallest that works up to eps: -λ_min + eps·mean(diag)
    expected = -np.linalg.eigvalsh(G)[0] + 1e-6 * np.mean(np.diag(G))
    assert w.shift == pytest.approx(expected, rel=1e-6)
    # and the factors are usable: a truncation with the repaired S is finite
    f = truncate_whitened(rng.standard_normal((K, 8)), w.S, 4)
    assert np.all(np.isfinite(f.W1)) and np.all(np.isfinite(f.W2))


def test_pd_gram_is_not_shifted_or_logged():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((100, 8))
    messages = []
    w = whiten_cholesky(X.T @ X, log=messages.append)
    assert w.shift == 0.0 and messages == []


def test_all_zero_input_gets_a_unit_scale_shift():
    messages = []
    w = whiten_cholesky(np.zeros((6, 6)), log=messages.append)
    assert 0 < w.shift < 1e-3 and len(messages) == 1


# --------------------------------------------------------------------------------------------
# rank allocation


def test_uniform_rank_formula_and_skip_rule():
    # k = floor((1 - r) K N / (K + N))
    assert uniform_rank(576, 576, 0.2) == int(0.8 * 576 * 576 / 1152)  # 230
    assert uniform_rank(576, 1536, 0.4) == int(0.6 * 576 * 1536 / 2112)  # 251
    assert uniform_rank(576, 192, 0.1) == 129  # 0.9 * 144 = 129.6
    assert uniform_rank(100, 100, 0.5) == 25  # exact products are not rounded down by float error
    layers = [LayerShape("a", 576, 576), LayerShape("b", 576, 192), LayerShape("c", 64, 64)]
    ranks = allocate_uniform(layers, 0.2)
    assert ranks == {"a": 230, "b": 115, "c": 25}
    for lay in layers:
        assert saves_parameters(lay.K, lay.N, ranks[lay.name])
    # r = 0: k = KN/(K+N) exactly saves nothing for square layers -> they stay dense
    ranks0 = allocate_uniform(layers, 0.0)
    assert ranks0["a"] is None and ranks0["c"] is None
    assert ranks0["b"] is None  # 576·192/768 = 144 exactly
    # ... while a shape with a fractional break-even rank still saves a little at r = 0
    assert allocate_uniform([LayerShape("e", 64, 96)], 0.0) == {"e": 38}  # 38·160 < 6144
    # min_rank can push a pair past break-even: then the layer is skipped as well
    assert allocate_uniform([LayerShape("d", 64, 64)], 0.9, min_rank=40) == {"d": None}
    assert allocate_uniform([LayerShape("d", 64, 64)], 0.9, min_rank=5) == {"d": 5}
    assert max_saving_rank(64, 64) == 31 and saves_parameters(64, 64, 31)
    assert not saves_parameters(64, 64, 32)


def synthetic_spectra(rng):
    """Layers with very different spectral decay (and output scales)."""
    layers, spectra = [], {}
    for i, (K, N, decay, scale) in enumerate(
        [(96, 96, 0.7, 1.0), (96, 96, 0.99, 50.0), (96, 32, 0.9, 0.01), (32, 96, 0.97, 3.0), (64, 128, 0.8, 1.0)]
    ):
        name = f"layers.{i}.x"
        layers.append(LayerShape(name, K, N))
        s = scale * decay ** np.arange(min(K, N)) * (1 + 0.05 * rng.random(min(K, N)))
        spectra[name] = np.sort(s)[::-1]
    return layers, spectra


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.6])
def test_budgeted_spends_no_more_and_loses_less_than_uniform(ratio):
    layers, spectra = synthetic_spectra(np.random.default_rng(5))
    uniform = allocate_uniform(layers, ratio)
    target = allocation_saving(layers, uniform)
    budgeted = allocate_budgeted(layers, spectra, target)
    assert allocation_saving(layers, budgeted) >= target  # spends at most the same parameters
    for lay in layers:
        k = budgeted[lay.name]
        assert k is None or (1 <= k and saves_parameters(lay.K, lay.N, k))
    loss_u = allocation_loss(uniform, spectra)
    loss_b = allocation_loss(budgeted, spectra)
    assert loss_b < 0.7 * loss_u, (loss_b, loss_u, budgeted, uniform)
    # the fast-decaying layer gives more rank away than the flat one
    assert (budgeted["layers.0.x"] or 99) < (budgeted["layers.1.x"] or 99)


def test_budgeted_is_near_the_brute_force_optimum():
    import itertools

    rng = np.random.default_rng(6)
    layers = [LayerShape("a", 24, 24), LayerShape("b", 24, 16), LayerShape("c", 16, 32), LayerShape("d", 20, 20)]
    spectra = {
        lay.name: np.sort(rng.random(min(lay.K, lay.N)))[::-1] ** p
        for lay, p in zip(layers, [3, 1, 0.5, 2])
    }
    choices = [[None] + list(range(1, max_saving_rank(l.K, l.N) + 1)) for l in layers]
    table = []
    for combo in itertools.product(*choices):
        r = dict(zip("abcd", combo))
        table.append((allocation_saving(layers, r), allocation_loss(r, spectra)))
    savings, losses = np.array(table).T
    for frac in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        target = int(frac * savings.max())
        best = losses[savings >= target].min()
        got = allocate_budgeted(layers, spectra, target)
        assert allocation_saving(layers, got) >= target
        # exact knapsack optimum is NP-hard in general; Lagrangian + hand-back + swaps is close
        assert allocation_loss(got, spectra) <= best * 1.08 + 1e-12, frac


def test_budgeted_rejects_an_unreachable_budget():
    layers = [LayerShape("a", 8, 8)]
    with pytest.raises(ValueError, match="cannot remove"):
        allocate_budgeted(layers, {"a": np.ones(8)}, 64)


# --------------------------------------------------------------------------------------------
# the update


def test_reduced_rank_fit_is_the_truncation_when_inputs_are_unchanged():
    rng = np.random.default_rng(7)
    X = correlated_inputs(rng, 300, 40)
    W = rng.standard_normal((40, 24))
    G = X.T @ X
    S = whiten_cholesky(G).S
    a = truncate_whitened(W, S, 9)
    b = reduced_rank_fit(S, G @ W, 9)
    np.testing.assert_allclose(a.W1 @ a.W2, b.W1 @ b.W2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("K,N,k,deficient", [(60, 30, 12, False), (30, 60, 12, False), (40, 40, 20, True)])
def test_top_singular_triplets_match_the_svd(K, N, k, deficient):
    """_svd_top (eigendecomposition of the smaller Gram matrix) = the SVD's leading k triplets,
    orthonormal; a rank-deficient M (σ_k = 0) falls back to the SVD instead of dividing by 0."""
    from passes.svd import _svd_top

    rng = np.random.default_rng(K + N + k)
    M = rng.standard_normal((K, N)) * (0.9 ** np.arange(N))[None, :]
    if deficient:
        M = M[:, :10] @ rng.standard_normal((10, N))
    U, s, Vt = _svd_top(M, k)
    ref = np.linalg.svd(M, full_matrices=False)
    assert U.shape == (K, k) and Vt.shape == (k, N) and np.all(np.isfinite(U))
    np.testing.assert_allclose(s, ref[1], rtol=0, atol=1e-10 * ref[1][0])
    np.testing.assert_allclose((U * s[:k]) @ Vt, (ref[0][:, :k] * ref[1][:k]) @ ref[2][:k], atol=1e-9 * ref[1][0])
    if not deficient:
        np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
        np.testing.assert_allclose(Vt @ Vt.T, np.eye(k), atol=1e-10)


def _two_layer_case(seed):
    """x → W_a → relu → W_b: compress W_a, then W_b sees shifted inputs."""
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, 2000, 48)
    Wa = rng.standard_normal((48, 64)) / 7
    Wb = rng.standard_normal((64, 40)) / 8
    return X, Wa, Wb


@pytest.mark.parametrize("seed", [8, 9])
def test_update_reduces_error_on_a_two_layer_case(seed):
    X, Wa, Wb = _two_layer_case(seed)
    relu = lambda z: np.maximum(z, 0.0)  # noqa: E731
    ka, kb = 8, 32  # a harsh upstream truncation, a mild one downstream
    target = relu(X @ Wa) @ Wb

    H = relu(X @ Wa)  # layer b's input in the original model
    fa = truncate_whitened(Wa, whiten_cholesky(X.T @ X).S, ka)
    H_tilde = relu(X @ fa.W1 @ fa.W2)  # ... and in the model with layer a compressed

    # no update: layer b truncated with the original statistics
    fb = truncate_whitened(Wb, whiten_cholesky(H.T @ H).S, kb)
    err_plain = np.sum((H_tilde @ fb.W1 @ fb.W2 - target) ** 2)

    # the paper's update: keep W2, least squares for W1 against the original outputs
    S_t = whiten_cholesky(H_tilde.T @ H_tilde).S
    B = H_tilde.T @ H @ Wb  # X̃ᵀ·(X·W): the cross term
    W1 = refit_first_factor(S_t, B, fb.W2)
    err_w1 = np.sum((H_tilde @ W1 @ fb.W2 - target) ** 2)

    # refit both factors (reduced-rank regression)
    fr = reduced_rank_fit(S_t, B, kb)
    err_both = np.sum((H_tilde @ fr.W1 @ fr.W2 - target) ** 2)

    assert err_w1 < 0.97 * err_plain
    assert err_both <= err_w1 * (1 + 1e-9)
    # W1 is the exact least-squares solution: the gradient vanishes
    grad = H_tilde.T @ (H_tilde @ W1 @ fb.W2 - target) @ fb.W2.T
    assert np.abs(grad).max() < 1e-8 * np.abs(H_tilde.T @ target @ fb.W2.T).max()
    # and the reduced-rank fit is optimal: the best rank-kb matrix on the shifted inputs
    W_star = np.linalg.lstsq(H_tilde, target, rcond=None)[0]
    opt = np.sum((H_tilde @ W_star - target) ** 2) + np.sum(fr.sigma[kb:] ** 2)
    assert err_both == pytest.approx(opt, rel=1e-7)


# --------------------------------------------------------------------------------------------
# downstream output metrics (output_metric)


@pytest.mark.parametrize("kind", ["diagonal", "matrix"])
def test_output_metric_fit_is_optimal_in_that_metric(kind):
    """tr((X̃W' − T)M(X̃W' − T)ᵀ) of the metric fit = the weighted least-squares optimum + the
    discarded σ² (the theorem in the M metric), and it beats the unweighted fit in that metric."""
    from passes.svd import metric_roots

    rng = np.random.default_rng(11)
    X, Wa, Wb = _two_layer_case(11)
    Xt = X + 0.3 * rng.standard_normal(X.shape)  # shifted inputs
    T = X @ Wa
    N, k = T.shape[1], 10
    if kind == "diagonal":
        M = np.exp(2.0 * rng.standard_normal(N))
        Mm = np.diag(M)
    else:
        A = rng.standard_normal((N, N)) * (0.8 ** np.arange(N))[None, :]
        Mm = M = A @ A.T + 0.05 * np.eye(N)
    R, Rinv = metric_roots(M, N)
    Rm = np.diag(R) if R.ndim == 1 else R
    np.testing.assert_allclose(Rm @ Rm, Mm, rtol=1e-9, atol=1e-9 * np.abs(Mm).max())
    S = whiten_cholesky(Xt.T @ Xt).S
    B = Xt.T @ T
    f = reduced_rank_fit(S, B, k, M)
    plain = reduced_rank_fit(S, B, k)

    def cost(W):
        E = Xt @ W - T
        return float(np.trace(E @ Mm @ E.T))

    W_star = np.linalg.lstsq(Xt, T, rcond=None)[0]  # the unconstrained optimum (any metric)
    assert cost(f.W1 @ f.W2) == pytest.approx(cost(W_star) + np.sum(f.sigma[k:] ** 2), rel=1e-7)
    assert cost(f.W1 @ f.W2) < 0.95 * cost(plain.W1 @ plain.W2)
    assert np.linalg.matrix_rank(f.W1 @ f.W2) == k
    # the identity metric is the plain fit
    g = reduced_rank_fit(S, B, k, np.ones(N))
    np.testing.assert_allclose(g.W1 @ g.W2, plain.W1 @ plain.W2, rtol=1e-9, atol=1e-12)


def test_attention_metrics_follow_rope_pairs_gqa_and_o():
    from passes.svd import attention_output_metrics

    rng = np.random.default_rng(12)
    K, d, H, KV = 24, 8, 4, 2
    X = correlated_inputs(rng, 300, K)
    G = X.T @ X
    Wq, Wk = rng.standard_normal((K, H * d)), rng.standard_normal((K, KV * d))
    Wo = rng.standard_normal((H * d, K))
    m = attention_output_metrics(Wq, Wk, Wo, G, d, KV, floor=0.0)
    q, k = X @ Wq, X @ Wk
    # q's metric: the energy of the keys its head attends with, averaged over each RoPE pair
    ek = np.sum(k**2, axis=0).reshape(KV, 2, d // 2).mean(axis=1)  # [KV, d/2]
    want_q = np.concatenate([np.tile(ek[h // 2], 2) for h in range(H)])
    np.testing.assert_allclose(m["q"], want_q / want_q.mean(), rtol=1e-9)
    eq = np.sum(q**2, axis=0).reshape(H, 2, d // 2).mean(axis=1)
    want_k = np.concatenate([np.tile(eq[2 * g] + eq[2 * g + 1], 2) for g in range(KV)])
    np.testing.assert_allclose(m["k"], want_k / want_k.mean(), rtol=1e-9)
    # v's metric: a value error of KV head g costs Σ over its query heads of ‖ΔV·W_o[h]‖²
    dV = rng.standard_normal((5, KV * d))
    cost = sum(np.sum((dV[:, (h // 2) * d:(h // 2 + 1) * d] @ Wo[h * d:(h + 1) * d]) ** 2) for h in range(H))
    Mv = m["v"]
    scale = np.mean([np.sum(Wo[h * d:(h + 1) * d] ** 2) for h in range(H)]) * 2 / d  # mean diagonal
    assert np.trace(dV @ Mv @ dV.T) * scale == pytest.approx(cost, rel=1e-9)
    assert np.allclose(Mv[:d, d:], 0.0)  # KV heads do not mix


def test_mlp_metrics_are_the_first_order_output_change():
    """Perturbing one channel of up's (gate's) output by ε changes the MLP output by
    ε²·m_c·(scale) to first order; the metric's ratios between channels match that."""
    from passes.svd import mlp_output_metrics

    rng = np.random.default_rng(13)
    K, F = 16, 24
    X = correlated_inputs(rng, 400, K)
    Wg, Wu, Wd = rng.standard_normal((K, F)) / 3, rng.standard_normal((K, F)) / 3, rng.standard_normal((F, K))
    w = rng.uniform(0.2, 2.0, len(X))
    m = mlp_output_metrics(X, Wg, Wu, Wd, w, floor=0.0)
    silu = lambda z: z / (1.0 + np.exp(-z))  # noqa: E731
    base = (silu(X @ Wg) * (X @ Wu)) @ Wd
    eps = 1e-5
    for role in ("up", "gate"):
        got = []
        for c in range(F):
            g, u = X @ Wg, X @ Wu
            if role == "up":
                u[:, c] += eps
            else:
                g[:, c] += eps
            got.append(np.sum(w * np.sum(((silu(g) * u) @ Wd - base) ** 2, axis=1)) / eps**2)
        got = np.array(got)
        np.testing.assert_allclose(m[role], got / got.mean(), rtol=1e-4)


# --------------------------------------------------------------------------------------------
# token weights (token_weights = "residual")


def test_residual_token_weights_are_inverse_mean_squares_normalized_to_mean_one():
    from passes.svd import residual_token_weights

    rng = np.random.default_rng(21)
    R = rng.standard_normal((3, 50, 16))
    R[0, 0] *= 100.0  # a massive token
    w = residual_token_weights(R)
    assert w.shape == (3, 50) and np.mean(w) == pytest.approx(1.0, rel=1e-6)
    ms = np.mean(R**2, axis=-1)
    np.testing.assert_allclose(w * ms, np.mean(w * ms), rtol=1e-5)  # w_t ∝ 1 / mean_c r_tc²
    assert w[0, 0] < 1e-3 * np.median(w)
    np.testing.assert_allclose(residual_token_weights(7.0 * R), w, rtol=1e-5)  # scale-free
    Z = R.copy()
    Z[1, 3] = 0.0  # a zero residual is floored, not infinite
    assert np.all(np.isfinite(residual_token_weights(Z))) and residual_token_weights(Z).max() < 1e4


def test_token_weighted_fit_is_not_dominated_by_massive_tokens():
    """A layer that writes a massive activation on a few tokens (input and residual both ~300× the
    others, in their own directions, like SmolLM2's block-1 down): the unweighted fit spends its
    rank on those tokens; weighting token t by 1/rms²(r_t) (the next RMSNorm's view of the error)
    fits the normal tokens much better and is optimal for its objective (each massive token then
    counts as one token: its error relative to its own residual is what is minimized)."""
    from passes.svd import residual_token_weights

    rng = np.random.default_rng(22)
    T, K, N, k = 3000, 48, 32, 10
    X = correlated_inputs(rng, T, K)
    massive = rng.choice(T, 12, replace=False)
    X[massive] = 300.0 * (rng.standard_normal((12, 1)) * rng.standard_normal((1, K))
                          + 0.3 * rng.standard_normal((12, K)))
    W = rng.standard_normal((K, N)) / np.sqrt(K)
    Y = X @ W
    R = rng.standard_normal((T, N)) * 3.0 + Y  # the residual after the add: massive where Y is
    w = residual_token_weights(R)
    normal = np.setdiff1d(np.arange(T), massive)

    def fit(weights):
        Xw = X * weights[:, None]
        return reduced_rank_fit(whiten_cholesky(Xw.T @ X).S, Xw.T @ Y, k)

    plain, weighted = fit(np.ones(T)), fit(w)
    E_plain, E_weighted = X @ plain.W1 @ plain.W2 - Y, X @ weighted.W1 @ weighted.W2 - Y
    werr = lambda E: float(np.sum(w[:, None] * E**2))  # noqa: E731
    # optimal for the weighted objective: the discarded spectrum of the weighted whitening
    assert werr(E_weighted) == pytest.approx(np.sum(weighted.sigma[k:] ** 2), rel=1e-7)
    assert werr(E_weighted) < 0.5 * werr(E_plain)
    rel = lambda E, rows: np.sum(E[rows] ** 2) / np.sum(Y[rows] ** 2)  # noqa: E731
    assert rel(E_weighted, normal) < 0.7 * rel(E_plain, normal)
    # the objective is the error the next RMSNorm passes on: Σ_t ‖e_t / rms(r_t)‖², up to a constant
    per_token = np.sum(E_weighted**2, axis=1) / np.mean(R**2, axis=1)
    assert werr(E_weighted) == pytest.approx(np.sum(per_token) / np.mean(1.0 / np.mean(R**2, axis=1)), rel=1e-5)


# --------------------------------------------------------------------------------------------
# quantized inputs: the noise-aware refit (act_bits < 16)


def test_activation_noise_energy_is_the_rounding_error_energy():
    from passes.int4 import fake_quantize_activations
    from passes.svd import activation_noise_energy

    rng = np.random.default_rng(11)
    X = correlated_inputs(rng, 3000, 64).astype(np.float32)
    X[:, 5] *= 20.0  # an outlier channel sets every token's step
    per_channel = {}
    for bits, qmax in ((8, 127.0), (4, 7.0)):
        E = fake_quantize_activations(X, bits).astype(np.float64) - X
        per_channel[bits] = np.sum(E**2, axis=0) / activation_noise_energy(X, qmax)
    # int8: per channel Σ_t E_tk² ≈ ν (the outlier channel, often the token max, rounds exactly)
    assert np.median(per_channel[8]) == pytest.approx(1.0, rel=0.05)
    assert per_channel[8][5] < 0.5
    # int4: steps comparable to the channels' values (many round to 0): ν is an upper bound
    assert np.all(per_channel[4] < 1.05)


def _ill_conditioned_refit_case(seed, T=3000, K=48, N=40):
    """A layer whose input has a nearly unexcited direction (channel 3 = 0.6·ch4 + 0.3·ch5 up to
    1e-6 of their size: XᵀX's smallest eigenvalue ~1e-12 of the others, like SmolLM2's block-1 inputs,
    eigenvalues 4e-11 … 1) and an upstream error X − X̃ the regression can chase there."""
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, 2 * T, K)
    X[:, 7] *= 8.0  # an outlier channel: the per-token int8 step is large
    X_tilde = X + 0.3 * rng.standard_normal(X.shape) * X.std(0)  # upstream compression error
    X_tilde[:, 3] = 0.6 * X_tilde[:, 4] + 0.3 * X_tilde[:, 5] + 1e-6 * X[:, 4].std() * rng.standard_normal(2 * T)
    X[:, 3] = 0.6 * X[:, 4] + 0.3 * X[:, 5]
    W = rng.standard_normal((K, N)) / np.sqrt(K)
    return X[:T], X_tilde[:T], X[T:], X_tilde[T:], W


@pytest.mark.parametrize("seed", [12, 13])
def test_noise_aware_refit_survives_int8_inputs(seed):
    """Regression test for svd-20-w4a8's collapse: the unregularized refit puts huge weights on a
    nearly dead input channel, and per-token int8 rounding noise on that channel then dominates
    the output. The act_bits = 8 fit (G̃ + νI) keeps the weights bounded: far lower error under
    int8 inputs, and the clean calibration error barely changes."""
    from passes.int4 import fake_quantize_activations
    from passes.svd import activation_noise_energy

    X, Xt, X_eval, Xt_eval, W = _ill_conditioned_refit_case(seed)
    k = 16
    G, B = Xt.T @ Xt, Xt.T @ (X @ W)
    nu = activation_noise_energy(Xt, 127.0)

    plain = reduced_rank_fit(whiten_cholesky(G).S, B, k)
    aware = reduced_rank_fit(whiten_cholesky(G, noise=nu).S, B, k)

    def rel_err(Xin, Xref, f, bits):
        Xq = fake_quantize_activations(Xin.astype(np.float32), bits).astype(np.float64)
        Y = Xref @ W
        return np.sum((Xq @ f.W1 @ f.W2 - Y) ** 2) / np.sum(Y**2)

    # the unregularized fit chases the upstream error along the unexcited direction
    rows = np.abs(plain.W1).max(1)
    others = np.delete(np.arange(48), [3, 4, 5])
    assert rows[3] > 100 * rows[others].max()
    rows = np.abs(aware.W1).max(1)
    assert rows[[3, 4, 5]].max() < 3 * rows[others].max()
    # with int8 inputs (held-out tokens) the noise-aware pair is far better ...
    assert rel_err(Xt_eval, X_eval, aware, 8) < 0.2 * rel_err(Xt_eval, X_eval, plain, 8)
    # ... and in fp32 on the calibration tokens it gives up almost nothing
    assert rel_err(Xt, X, aware, 16) < 1.05 * rel_err(Xt, X, plain, 16)
    # the ridge is toward 0 and exact in expectation: E‖(X̃+E)W' − T‖² = ‖X̃W' − T‖² + ν‖W'‖²
    Wp = aware.W1 @ aware.W2
    Y = X @ W
    Eq = fake_quantize_activations(Xt.astype(np.float32), 8).astype(np.float64) - Xt
    lhs = np.sum((Xt @ Wp + Eq @ Wp - Y) ** 2)
    rhs = np.sum((Xt @ Wp - Y) ** 2) + nu * np.sum(Wp**2)
    assert lhs == pytest.approx(rhs, rel=0.05)


# --------------------------------------------------------------------------------------------
# the pass on the tiny model

CALIB = '[calibration]\nwindows = 8\nseq_len = 64\n'


def _text(tmp_path):
    from compiler.testing import _training_text

    p = tmp_path / "calib.txt"
    p.write_text("\n".join([_training_text()] * 3))
    return p


def _text_ids(model_dir, text_path, B=2, T=40):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir))(text_path.read_text(), add_special_tokens=False)["input_ids"]
    return np.asarray(ids[1000 : 1000 + B * T], np.int64).reshape(B, T)


def _recipe(tmp_path, body: str, name: str = "r"):
    p = tmp_path / f"{name}.toml"
    p.write_text(CALIB + '[[pass]]\nname = "svd"\n' + body + "\n")
    return str(p)


def _logits(onnx_path, ids):
    from compiler.testing import onnx_prefill_decode_logits, onnx_session

    sess = onnx_session(onnx_path)
    mask = np.ones_like(ids)
    logits, _ = onnx_prefill_decode_logits(sess, ids, mask, ids[:, :3])
    return logits


def _ids(B=2, T=24, vocab=300, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, (B, T)).astype(np.int64)


def _low_rank_nodes(onnx_path):
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        layer = next((p.value for p in n.metadata_props if p.key == "llmfold.layer"), None)
        if layer is not None:
            out.setdefault(layer, []).append((n.name, inits[n.input[1]]))
    return out, inits


@pytest.mark.parametrize("update,token_weights,metric", [(False, "none", False), (True, "none", False),
                                                          (True, "residual", False), (True, "residual", True)])
def test_full_rank_reproduces_the_logits(tiny_model_dir, tmp_path, update, token_weights, metric):
    """rank = min(K, N) everywhere: W₁W₂ = W (and the refit returns W, with or without token
    weights: (X̃ᵀDX̃ + δI)⁻¹(X̃ᵀDX̃ + δI)W = W for any D), logits within 1e-4."""
    import onnx_ir as ir

    from compiler.driver import CompileContext
    from compiler.modeldir import open_model_dir
    from compiler.recipe import CalibrationConfig
    from passes.svd import SvdParams, SvdPass

    src = open_model_dir(tiny_model_dir)
    model = src.load_model()
    ctx = CompileContext(src, CalibrationConfig(windows=8, seq_len=64), _text(tmp_path), progress=False)
    try:
        params = SvdParams(rank=10_000, update=update, token_weights=token_weights, residual_target=metric,
                           output_metric=["q", "k", "v", "gate", "up"] if metric else [])
        params.validate()
        if token_weights == "residual":  # the weights come from both residual Adds of every block
            for block in ctx.structure(model).blocks:
                adds = SvdPass._residual_adds(model, block)
                assert adds["attention"] and adds["mlp"] and adds["attention"] != adds["mlp"]
        result = SvdPass(ctx, params)(model)
    finally:
        ctx.close()
    assert result.modified
    out = tmp_path / "full.onnx"
    ir.save(result.model, out, external_data="full.onnx.data")
    pairs, inits = _low_rank_nodes(out)
    assert len(pairs) == 2 * 7  # 2 blocks × 7 linears, each now a pair
    for layer, nodes in pairs.items():
        (n1, (K, k1)), (n2, (k2, N)) = nodes
        assert n1.endswith("_lowrank_1") and n2.endswith("_lowrank_2") and k1 == k2 == min(K, N)
    assert not any(name.endswith("q_proj.weight") for name in inits)  # dense weights left the graph
    ids = _ids()
    ref = _logits(tiny_model_dir / "model.onnx", ids)
    got = _logits(out, ids)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def _svd_pass_to_file(src, tmp_path, name: str, params) -> tuple:
    """Run the svd pass on `src` (4 × 64 calibration tokens), save it as NAME.onnx; returns the
    path and its low-rank factor initializers by name."""
    import onnx
    import onnx_ir as ir

    from compiler.driver import CompileContext
    from compiler.recipe import CalibrationConfig
    from passes.svd import SvdPass

    ctx = CompileContext(src, CalibrationConfig(windows=4, seq_len=64), _text(tmp_path), progress=False)
    try:
        result = SvdPass(ctx, params)(src.load_model())
    finally:
        ctx.close()
    path = tmp_path / f"{name}.onnx"
    ir.save(result.model, path, external_data=f"{name}.onnx.data")
    inits = onnx.load(str(path)).graph.initializer
    return path, {t.name: onnx.numpy_helper.to_array(t) for t in inits if "lowrank" in t.name}


def test_output_metric_moves_the_fit_and_keeps_the_model(tiny_model_dir, tmp_path):
    """output_metric at ratio 0.3: q and up (among others) get different pairs than the plain
    refit, and the logits stay close to the plain refit's."""
    from compiler.modeldir import open_model_dir
    from passes.svd import SvdParams

    src = open_model_dir(tiny_model_dir)
    out = {}
    for name, metric in (("plain", []), ("metric", ["q", "k", "v", "gate", "up"])):
        params = SvdParams(ratio=0.3, damp=0.05, residual_target=True, token_weights="residual", output_metric=metric)
        params.validate()
        _, factors = _svd_pass_to_file(src, tmp_path, name, params)
        out[name] = {n: a for n, a in factors.items() if "lowrank_2" in n}
    assert out["plain"].keys() == out["metric"].keys()
    moved = {n for n in out["plain"] if not np.allclose(out["plain"][n], out["metric"][n], rtol=1e-4, atol=1e-6)}
    assert any("q_proj" in n for n in moved) and any("up_proj" in n for n in moved), moved
    ids = _ids()
    a = _logits(tmp_path / "plain.onnx", ids)[0]
    b = _logits(tmp_path / "metric.onnx", ids)[0]
    assert np.all(np.isfinite(b)) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_residual_target_from_the_add_output_equals_the_two_product_form(tiny_model_dir, tmp_path, monkeypatch):
    """o/down's residual target T = X·W + R − R̃ taken as A − R̃ (A the original Add's output, one
    product X̃ᵀD(A − R̃)) gives the same pairs as X̃ᵀD(X·W) + X̃ᵀD(R − R̃), up to float32 rounding."""
    import dataclasses

    import passes.svd as svd
    from compiler.modeldir import open_model_dir

    src = open_model_dir(tiny_model_dir)
    real = svd._block_stages
    out = {}
    for name, strip in (("direct", False), ("two", True)):
        if strip:  # without the Add outputs the pass falls back to the two-product form
            monkeypatch.setattr(svd, "_block_stages", lambda *a: [dataclasses.replace(st, add_outputs={}) for st in real(*a)])
        params = svd.SvdParams(ratio=0.3, damp=0.05, residual_target=True, token_weights="residual")
        _, out[name] = _svd_pass_to_file(src, tmp_path, name, params)
    assert out["direct"].keys() == out["two"].keys() and len(out["direct"]) == 2 * 2 * 7
    # singular vectors are defined up to sign: compare each pair's product W₁W₂
    for n1 in [n for n in out["direct"] if n.endswith("lowrank_1")]:
        n2 = n1[: -len("lowrank_1")] + "lowrank_2"
        pa = out["direct"][n1].astype(np.float64) @ out["direct"][n2]
        pb = out["two"][n1].astype(np.float64) @ out["two"][n2]
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-4 * np.abs(pb).max(), err_msg=n1)  # measured ≤ 2e-5


def test_compile_writes_pairs_with_the_uniform_ranks(tiny_model_dir, tmp_path):
    import json

    from compiler.driver import compile_model
    from compiler.modeldir import open_model_dir

    calib = _text(tmp_path)
    out = compile_model(tiny_model_dir, tmp_path / "svd", recipe=_recipe(tmp_path, "ratio = 0.3"), calib=calib, progress=False)
    structure = open_model_dir(out).structure()
    for block in structure.blocks:
        for lin in block.linears():
            assert lin.kind == "low-rank", lin
            assert lin.rank == uniform_rank(lin.K, lin.N, 0.3)
            assert len(lin.nodes) == 2
    pairs, _ = _low_rank_nodes(out / "model.onnx")
    assert set(pairs) == {lin.name for b in structure.blocks for lin in b.linears()}
    meta = json.loads((out / "llmfold.json").read_text())
    rec = meta["passes"][-1]["records"][0]
    rows = {r["layer"]: r for r in rec["layers"]}
    assert rows["layers.0.gate"]["rank"] == uniform_rank(64, 128, 0.3) == 29
    assert rows["layers.1.k"]["rank"] == uniform_rank(64, 32, 0.3) == 14
    assert 0.29 < rec["removed_fraction"] < 0.33
    assert all(0.0 <= r["output_rel_error"] < 1.0 for r in rec["layers"])
    # the compressed model still runs and is not wrecked on text like its calibration text
    ids = _text_ids(tiny_model_dir, calib)
    a = _logits(tiny_model_dir / "model.onnx", ids)[0]
    b = _logits(out / "model.onnx", ids)[0]
    assert np.all(np.isfinite(b))
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    print("logit correlation", corr)
    assert corr > 0.5


def _prefill_correlation(dir_a, dir_b, ids) -> float:
    """Correlation of two model directories' prefill logits on the same tokens."""
    from compiler.runtime import open_session

    a = open_session(dir_a, threads=1).prefill_logits(ids)
    b = open_session(dir_b, threads=1).prefill_logits(ids)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_low_rank_pairs_go_through_the_int4_pass(tiny_model_dir, tmp_path):
    """svd then int4: both factors of every pair become QMatMuls, the result is still recognized
    (pairs by their llmfold.layer tags), inspect reports them as 4-bit low-rank, logits stay close."""
    from compiler.driver import compile_model
    from compiler.inspect import inspect_model
    from compiler.modeldir import open_model_dir

    calib = _text(tmp_path)
    svd_only = compile_model(tiny_model_dir, tmp_path / "svd", recipe=_recipe(tmp_path, "ratio = 0.3"), calib=calib, progress=False)
    body = 'ratio = 0.3\n\n[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 16\nact_bits = 16\nlm_head = false'
    out = compile_model(tiny_model_dir, tmp_path / "svdq", recipe=_recipe(tmp_path, body, "rq"), calib=calib, progress=False)
    ranks = {lin.name: lin.rank for b in open_model_dir(svd_only).structure().blocks for lin in b.linears()}
    structure = open_model_dir(out).structure()
    for block in structure.blocks:
        for lin in block.linears():
            assert lin.kind == "low-rank" and lin.bits == 4 and lin.block_size == 16, lin
            assert lin.rank == ranks[lin.name]
    rows = {r["name"]: r for r in inspect_model(out)["linear_layers"]}
    assert rows["layers.1.down"]["bits"] == 4 and rows["layers.1.down"]["rank"] == ranks["layers.1.down"]
    corr = _prefill_correlation(svd_only, out, _text_ids(tiny_model_dir, calib)[0])
    print("logit correlation svd vs svd+int4", corr)
    assert corr > 0.9


def test_act_bits_fits_the_pairs_for_int8_inputs(tiny_model_dir, tmp_path):
    """svd with act_bits = 8 then int4 W4A8 (the svd-20-w4a8 chain): the noise-aware refit is
    recorded, its pairs differ from the fp32 fit only by the small ridge, and the chain stays close
    to the svd-only logits."""
    import json

    from compiler.driver import compile_model

    calib = _text(tmp_path)
    svd_only = compile_model(tiny_model_dir, tmp_path / "svd", recipe=_recipe(tmp_path, "ratio = 0.3"), calib=calib, progress=False)
    body = 'ratio = 0.3\nact_bits = 8\n\n[[pass]]\nname = "int4"\nalgorithm = "gptq"\nblock_size = 16\nact_bits = 8\nlm_head = false'
    out = compile_model(tiny_model_dir, tmp_path / "svdq8", recipe=_recipe(tmp_path, body, "rq8"), calib=calib, progress=False)
    rec = json.loads((out / "llmfold.json").read_text())["passes"][0]["records"][0]
    assert rec["act_bits"] == 8 and rec["factorized"] > 0
    corr = _prefill_correlation(svd_only, out, _text_ids(tiny_model_dir, calib)[0])
    print("logit correlation svd vs svd(act_bits=8)+W4A8", corr)
    assert corr > 0.9


@pytest.mark.parametrize("extra", ["", '\ntoken_weights = "residual"'])
def test_budgeted_compile_spends_the_uniform_budget(tiny_model_dir, tmp_path, extra):
    import json

    from compiler.driver import compile_model

    calib = _text(tmp_path)
    out = compile_model(
        tiny_model_dir, tmp_path / "b", recipe=_recipe(tmp_path, 'ratio = 0.4\nallocation = "budgeted"' + extra),
        calib=calib, progress=False,
    )
    rec = json.loads((out / "llmfold.json").read_text())["passes"][-1]["records"][0]
    layers = [LayerShape(r["layer"], r["K"], r["N"]) for r in rec["layers"]]
    uniform = allocate_uniform(layers, 0.4)
    budgeted = {r["layer"]: r["rank"] for r in rec["layers"]}
    assert allocation_saving(layers, budgeted) >= allocation_saving(layers, uniform)
    assert rec["params_after"] <= sum(l.K * l.N for l in layers) - allocation_saving(layers, uniform)
    assert budgeted != uniform  # random layers have different spectra: the ranks move
    assert all("budget_loss" in r for r in rec["layers"])


def test_include_exclude_select_layers(tiny_model_dir, tmp_path):
    from compiler.driver import compile_model
    from compiler.modeldir import open_model_dir

    out = compile_model(
        tiny_model_dir, tmp_path / "sel",
        recipe=_recipe(tmp_path, 'ratio = 0.3\nupdate = false\ninclude = ["layers.*.gate", "layers.*.up", "layers.0.*"]\nexclude = ["layers.0.q"]'),
        calib=_text(tmp_path), progress=False,
    )
    kinds = {lin.name: lin.kind for b in open_model_dir(out).structure().blocks for lin in b.linears()}
    low = {n for n, k in kinds.items() if k == "low-rank"}
    assert low == {"layers.0.k", "layers.0.v", "layers.0.o", "layers.0.gate", "layers.0.up", "layers.0.down",
                   "layers.1.gate", "layers.1.up"}


@pytest.mark.parametrize(
    "body,match",
    [
        ("ratio = 1.0", "ratio must be in"),
        ("ratio = -0.1", "ratio must be in"),
        ("min_rank = 0", "min_rank must be at least 1"),
        ("rank = 0", "rank must be at least 1"),
        ('rank = 8\nallocation = "budgeted"', "exclude each other"),
        ('allocation = "greedy"', "allocation"),
        ('refit = "w2"', "refit"),
        ("include = []", "include must name"),
        ("damp = 2.0", "damp must be"),
        ("act_bits = 6", "act_bits must be 16, 8 or 4"),
        ("whiten = false\nupdate = false\nact_bits = 8", "act_bits < 16 needs"),
        ("update = false\nresidual_target = true", "residual_target needs update"),
        ("budget_windows = 0", "budget_windows must be at least 1"),
        ('output_metric = ["o"]', "output_metric takes roles"),
        ('output_metric = ["q"]\nrefit = "w1"', "output_metric needs update"),
        ("ratio = \"20%\"", "ratio"),
        ("rank_ratio = 0.2", "unknown parameter"),
    ],
)
def test_bad_params_are_user_errors(tmp_path, body, match):
    from compiler.errors import UserError
    from compiler.recipe import load_recipe

    with pytest.raises(UserError, match=match):
        load_recipe(_recipe(tmp_path, body))


def test_patterns_matching_nothing_are_a_user_error(tiny_model_dir, tmp_path):
    from compiler.driver import compile_model
    from compiler.errors import UserError

    with pytest.raises(UserError, match="select no decoder linear"):
        compile_model(tiny_model_dir, tmp_path / "none", recipe=_recipe(tmp_path, 'include = ["lm_head"]'),
                      calib=_text(tmp_path), progress=False)
    assert not (tmp_path / "none").exists()
