"""llmfold custom ops: packer, schemas, ORT-level QMatMul/TokenPrune against the numpy references,
bad-input handling, and the C++ kernel tests (plain and ASan+UBSan builds)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from compiler import custom_ops as co  # noqa: E402


def _lib_or_skip() -> Path:
    try:
        return co.library_path()
    except FileNotFoundError as e:
        print(f"SKIP reason: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def lib() -> Path:
    return _lib_or_skip()


# ----------------------------------------------------------------------------------------------
# helpers


def random_weights(rng, K, N, bs, with_zp):
    nb = -(-K // bs)
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    sc = co.round_scales(rng.uniform(0.01, 0.08, (nb, N)))  # values the fp16 layout holds exactly
    zp = rng.integers(0, 16, (nb, N)).astype(np.uint8) if with_zp else None
    return q, sc, zp


def qmatmul_model(K, N, bs, act_bits, packed, bias=None, shift=None, a_shape=None, a_type=TP.FLOAT,
                  zp_name=True, hadamard=0, swiglu=0):
    inits = [numpy_helper.from_array(packed["data"], "B"), numpy_helper.from_array(packed["scales"], "S")]
    names = ["A", "B", "S"]
    if packed.get("zero_points") is not None and zp_name:
        inits.append(numpy_helper.from_array(packed["zero_points"], "Z"))
        names.append("Z")
    elif bias is not None or shift is not None:
        names.append("")
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    elif shift is not None:
        names.append("")
    if shift is not None:
        inits.append(numpy_helper.from_array(shift, "shift"))
        names.append("shift")
    node = co.make_qmatmul_node(names, "Y", K, N, bs, act_bits, hadamard=hadamard, swiglu=swiglu)
    a_shape = a_shape or ["M", K]
    n_out = N // 2 if swiglu else N
    g = helper.make_graph([node], "qmatmul", [helper.make_tensor_value_info("A", a_type, a_shape)],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, list(a_shape[:-1]) + [n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    return m


def session(model, threads=1, env=None):
    return ort.InferenceSession(model.SerializeToString(), co.make_session_options(threads))


def magnitude(A, W):
    return np.abs(A.reshape(-1, A.shape[-1]).astype(np.float64)) @ np.abs(W.astype(np.float64))


# ----------------------------------------------------------------------------------------------
# packer


@pytest.mark.parametrize("K,N,bs", [(64, 16, 32), (100, 37, 32), (17, 1, 16), (300, 50, 256), (576, 96, 64)])
@pytest.mark.parametrize("with_zp", [False, True])
def test_pack_unpack_round_trip(K, N, bs, with_zp):
    rng = np.random.default_rng(K * N + bs)
    q, sc, zp = random_weights(rng, K, N, bs, with_zp)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    sizes = co.packed_sizes(K, N, bs)
    assert p["data"].size == sizes["data"] and p["scales"].size == sizes["scales"]
    u = co.unpack_int4_blocks(p["data"], p["scales"], p["zero_points"], K, N, bs)
    assert np.array_equal(u["q"], q) and np.array_equal(u["scales"], sc)
    assert (u["zero_points"] is None) == (zp is None)
    if zp is not None:
        assert np.array_equal(u["zero_points"], zp)
    W = co.dequantize_int4(p["data"], p["scales"], p["zero_points"], K, N, bs)
    z = zp if zp is not None else np.full_like(sc, 8, dtype=np.uint8)
    b = np.arange(K) // bs
    assert np.array_equal(W, (q.astype(np.float32) - z[b].astype(np.float32)) * sc[b])


def test_pack_scales_are_fp16():
    # The packer stores float16 scales, each the nearest half (ties to even) of the float given.
    K, N, bs = 32, 16, 16
    q = np.full((K, N), 9, np.uint8)
    sc = np.full((2, N), 0.1, np.float32)
    sc[0, 1] = 1 + 2.0**-11  # a tie: rounds to even (1.0)
    sc[0, 2] = 1 + 3 * 2.0**-11  # a tie: rounds to even (1 + 2^-9)
    sc[0, 3] = 2.0**-26  # below the smallest half: kept nonzero as 2^-24
    sc[0, 4] = -3e-6  # a subnormal half, sign kept
    sc[0, 5] = 65504.0
    sc[1, 0] = 0.0
    p = co.pack_int4_blocks(q, sc, None, bs)
    assert p["scales"].dtype == np.float16
    u = co.unpack_int4_blocks(p["data"], p["scales"], None, K, N, bs)
    assert u["scales"].dtype == np.float32
    assert np.array_equal(u["scales"], co.round_scales(sc))
    assert u["scales"][0, 0] == np.float32(np.float16(0.1)) and u["scales"][0, 1] == 1.0
    assert u["scales"][0, 2] == 1 + 2.0**-9 and u["scales"][0, 3] == 2.0**-24 and u["scales"][1, 0] == 0.0
    assert u["scales"][0, 4] == np.float32(np.float16(-3e-6)) < 0 and u["scales"][0, 5] == 65504.0
    # beyond float16's range or not finite: one clear error, nothing packed
    for bad in (65520.0, np.inf, np.nan):
        big = sc.copy()
        big[1, 3] = bad
        with pytest.raises(ValueError, match=r"exceed float16's range .* index \(1, 3\)"):
            co.pack_int4_blocks(q, big, None, bs)
    # unpacking float32 scales (a model packed before the fp16 layout) is refused
    with pytest.raises(ValueError, match="packed scales must be float16, got float32"):
        co.unpack_int4_blocks(p["data"], p["scales"].astype(np.float32), None, K, N, bs)


def test_quantize_int4_weights_codes_fit_the_stored_scales():
    # RTN chooses its codes for the fp16 scales it stores: requantizing the dequantized weights
    # with the stored scales reproduces the codes exactly.
    rng = np.random.default_rng(11)
    W = rng.standard_normal((96, 40)).astype(np.float32) * 0.02
    for sym in (True, False):
        r = co.quantize_int4_weights(W, 32, symmetric=sym)
        assert np.array_equal(r["raw_scales"], co.round_scales(r["raw_scales"]))
        Wq = co.dequantize_int4(r["data"], r["scales"], r["zero_points"], 96, 40, 32)
        b = np.arange(96) // 32
        zp = r["raw_zero_points"][b] if not sym else 8
        assert np.array_equal(np.rint(Wq / r["raw_scales"][b]) + zp, r["q"])


def test_pack_layout_bytes():
    # One tile, one group: byte 4c + j = q[j][c] | q[4 + j][c] << 4 (kernels.h).
    K, N, bs = 16, 16, 16
    q = (np.arange(K * N).reshape(K, N) % 16).astype(np.uint8)
    p = co.pack_int4_blocks(q, np.ones((1, N), np.float32), None, bs)
    for c in range(16):
        for j in range(4):
            assert p["data"][4 * c + j] == (q[j, c] | (q[4 + j, c] << 4))
            assert p["data"][64 + 4 * c + j] == (q[8 + j, c] | (q[12 + j, c] << 4))
    # Padding: K=20 with bs=16 pads k rows with the zero point, N=3 pads columns with 8 / scale 0.
    p = co.pack_int4_blocks(np.zeros((20, 3), np.uint8), np.ones((2, 3), np.float32), np.full((2, 3), 5, np.uint8), 16)
    d = p["data"].reshape(1, 4, 16, 4)
    # group 2 = k 16..23: k 16..19 real (0), k 20..23 padding (5); group 3 all padding
    assert (d[0, 2, :3] == 0x50).all() and (d[0, 3, :3] == 0x55).all() and (d[0, :, 3:] == 0x88).all()
    assert (p["scales"].reshape(1, 2, 16)[0, :, 3:] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_int4_weights_round_to_nearest(symmetric):
    rng = np.random.default_rng(2)
    K, N, bs = 100, 24, 32
    W = rng.standard_normal((K, N)).astype(np.float32)
    p = co.quantize_int4_weights(W, bs, symmetric=symmetric)
    Wq = co.dequantize_int4(p["data"], p["scales"], p["zero_points"], K, N, bs)
    step = np.repeat(p["raw_scales"], bs, axis=0)[:K]
    # symmetric: round to nearest; asymmetric: the rounded zero point can push an extreme code one step
    assert np.all(np.abs(Wq - W) <= (0.5 if symmetric else 1.0) * step + 1e-6)
    assert (p["zero_points"] is None) == symmetric


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="power of two"):
        co.pack_int4_blocks(np.zeros((32, 4), np.uint8), np.ones((1, 4), np.float32), None, 48)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        co.pack_int4_blocks(np.full((32, 4), 16, np.uint8), np.ones((1, 4), np.float32), None, 32)
    with pytest.raises(ValueError, match="scales"):
        co.pack_int4_blocks(np.zeros((32, 4), np.uint8), np.ones((2, 4), np.float32), None, 32)


# ----------------------------------------------------------------------------------------------
# schemas


def test_schemas_checker_and_shape_inference():
    co.register_schemas()
    co.register_schemas()  # idempotent
    rng = np.random.default_rng(0)
    q, sc, zp = random_weights(rng, 40, 24, 16, True)
    m = qmatmul_model(40, 24, 16, 8, co.pack_int4_blocks(q, sc, zp, 16), a_shape=[2, "T", 40])
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2 and dims[1].dim_param == "T" and dims[2].dim_value == 24
    bad = qmatmul_model(40, 24, 16, 8, co.pack_int4_blocks(q, sc, zp, 16), a_shape=[2, 41])
    with pytest.raises(Exception, match="K=40"):
        onnx.shape_inference.infer_shapes(bad, strict_mode=True)
    had = qmatmul_model(40, 24, 16, 8, co.pack_int4_blocks(q, sc, zp, 16), hadamard=8)
    onnx.checker.check_model(had, full_check=True)
    with pytest.raises(Exception, match="hadamard must be 0 or a power of two >= 2 dividing K=40"):
        onnx.shape_inference.infer_shapes(qmatmul_model(40, 24, 16, 8, co.pack_int4_blocks(q, sc, zp, 16),
                                                        hadamard=16), strict_mode=True)

    node = helper.make_node("TokenPrune", ["h", "s", "", "pos"], ["hp", "idx", "posp"], domain=co.DOMAIN,
                            keep_ratio=0.5)
    g = helper.make_graph([node], "tp", [helper.make_tensor_value_info("h", TP.FLOAT, [1, 10, 8]),
                                         helper.make_tensor_value_info("s", TP.FLOAT, [1, 3, 10, 10]),
                                         helper.make_tensor_value_info("pos", TP.INT64, [1, 10])],
                          [helper.make_tensor_value_info("hp", TP.FLOAT, [1, None, 8]),
                           helper.make_tensor_value_info("idx", TP.INT64, [1, None]),
                           helper.make_tensor_value_info("posp", TP.INT64, [1, None])])
    tm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    tm.ir_version = 10
    onnx.checker.check_model(tm, full_check=True)
    out = onnx.shape_inference.infer_shapes(tm, strict_mode=True).graph.output
    assert out[2].type.tensor_type.elem_type == TP.INT64


# ----------------------------------------------------------------------------------------------
# QMatMul through ORT


CASES = [
    # (M, K, N, bs)
    (1, 64, 16, 32),
    (1, 100, 37, 32),  # K % bs != 0, odd N
    (3, 576, 48, 64),
    (7, 130, 33, 16),
    (40, 256, 80, 128),
]


@pytest.mark.parametrize("act_bits", [16, 8, 4])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M,K,N,bs", CASES)
def test_qmatmul_matches_reference(lib, act_bits, with_zp, with_bias, M, K, N, bs):
    rng = np.random.default_rng(M * 1000 + K + N + bs + act_bits)
    q, sc, zp = random_weights(rng, K, N, bs, with_zp)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    shift = rng.integers(0, 4, K).astype(np.uint8) if act_bits != 16 and with_bias else None
    A = rng.standard_normal((M, K)).astype(np.float32)
    y = session(qmatmul_model(K, N, bs, act_bits, p, bias, shift)).run(None, {"A": A})[0]
    r = co.qmatmul_reference(A, p["data"], p["scales"], p["zero_points"], K, N, bs, act_bits, shift, bias)
    assert y.shape == (M, N)
    W = co.dequantize_int4(p["data"], p["scales"], p["zero_points"], K, N, bs)
    tol = 1e-5 * magnitude(A, W) + 1e-6 * np.abs(r)
    if act_bits != 16:
        # Integer dots are exact; the scales and the float epilogue may round differently.
        tol = 1e-5 * magnitude(np.abs(A) * 2.0, W) + 1e-6 * np.abs(r)
    assert np.all(np.abs(y - r) <= tol), np.abs(y - r).max()


HADAMARD_CASES = [
    # (M, K, N, bs, h)
    (1, 1536, 48, 64, 512),  # SmolLM2's down_proj input
    (3, 96, 33, 32, 32),
    (2, 100, 17, 32, 4),  # K % bs != 0 (padded blocks after the transform)
    (70, 128, 40, 16, 2),  # many rows: the transform runs as parallel tasks
]


@pytest.mark.parametrize("act_bits", [16, 8, 4])
@pytest.mark.parametrize("M,K,N,bs,h", HADAMARD_CASES)
def test_qmatmul_hadamard_matches_reference(lib, act_bits, M, K, N, bs, h):
    """The op's input transform equals numpy's (the same float32 butterfly, so the integer paths see
    the same activations bit for bit), with TRIP shifts after it; threads do not change a result."""
    rng = np.random.default_rng(M + K + N + h + act_bits)
    q, sc, zp = random_weights(rng, K, N, bs, True)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    shift = rng.integers(0, 4, K).astype(np.uint8) if act_bits != 16 else None
    A = rng.standard_normal((M, K)).astype(np.float32)
    m = qmatmul_model(K, N, bs, act_bits, p, shift=shift, hadamard=h)
    y = session(m).run(None, {"A": A})[0]
    assert np.array_equal(y, session(m, threads=2).run(None, {"A": A})[0])
    r = co.qmatmul_reference(A, p["data"], p["scales"], p["zero_points"], K, N, bs, act_bits, shift, hadamard=h)
    W = co.dequantize_int4(p["data"], p["scales"], p["zero_points"], K, N, bs)
    AH = co.hadamard_rows_reference(A, h)
    tol = 1e-5 * magnitude(np.abs(AH) * (2.0 if act_bits != 16 else 1.0), W) + 1e-6 * np.abs(r)
    assert np.all(np.abs(y - r) <= tol), np.abs(y - r).max()
    # the transform is the dense block-diagonal Sylvester product, and X·W = (X·B)·(B·W/h)
    B = np.kron(np.eye(K // h), co.sylvester_hadamard(h))
    assert np.allclose(AH, A.astype(np.float64) @ B, rtol=1e-5, atol=1e-4 * np.sqrt(h))
    assert np.allclose(B @ B, h * np.eye(K))


@pytest.mark.parametrize("act_bits", [16, 8, 4])
@pytest.mark.parametrize("M,K,N,bs", [(1, 64, 32, 32), (3, 100, 2 * 37, 32), (40, 96, 2 * 48, 16)])
def test_qmatmul_swiglu_matches_reference(lib, act_bits, M, K, N, bs):
    """swiglu=1: the product of [gate | up] goes through silu(gate)·up inside the op. Equal to the
    same op without the epilogue followed by numpy's silu·up (the product bit for bit, the
    epilogue within the kernels' exp accuracy), to the numpy reference, and thread-independent;
    the schema infers the [.., N/2] output."""
    rng = np.random.default_rng(M + K + N + act_bits)
    q, sc, zp = random_weights(rng, K, N, bs, True)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    bias = rng.standard_normal(N).astype(np.float32)
    A = (3 * rng.standard_normal((M, K))).astype(np.float32)
    m = qmatmul_model(K, N, bs, act_bits, p, bias=bias, swiglu=1)
    co.register_schemas()
    onnx.checker.check_model(m, full_check=True)
    open_shape = type(m)()
    open_shape.CopyFrom(m)
    open_shape.graph.output[0].type.tensor_type.ClearField("shape")  # inference must produce it
    dims = onnx.shape_inference.infer_shapes(open_shape, strict_mode=True).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["M", N // 2]
    y = session(m).run(None, {"A": A})[0]
    assert y.shape == (M, N // 2)
    assert np.array_equal(y, session(m, threads=2).run(None, {"A": A})[0])
    z = session(qmatmul_model(K, N, bs, act_bits, p, bias=bias)).run(None, {"A": A})[0]
    expect = co.swiglu_reference(z)
    assert np.allclose(y, expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())
    r = co.qmatmul_reference(A, p["data"], p["scales"], p["zero_points"], K, N, bs, act_bits, bias=bias, swiglu=1)
    assert np.allclose(y, r, rtol=1e-4, atol=1e-3 * np.abs(r).max())


def test_qmatmul_swiglu_bad_attributes(lib):
    rng = np.random.default_rng(9)
    K, N, bs = 64, 33, 32
    q, sc, zp = random_weights(rng, K, N, bs, False)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    co.register_schemas()
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, swiglu=1)), "needs an even N")
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, swiglu=2)), "swiglu must be 0 or 1")
    with pytest.raises(Exception, match="swiglu must be 0, or 1 with an even N"):
        onnx.shape_inference.infer_shapes(qmatmul_model(K, N, bs, 8, p, swiglu=1), strict_mode=True)


@pytest.mark.parametrize("act_bits", [16, 8, 4])
def test_qmatmul_batched_shape_threads_identical(lib, act_bits):
    rng = np.random.default_rng(7)
    K, N, bs = 192, 200, 32
    q, sc, zp = random_weights(rng, K, N, bs, True)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    A = rng.standard_normal((2, 70, K)).astype(np.float32)
    m = qmatmul_model(K, N, bs, act_bits, p, a_shape=[2, "T", K])
    y1 = session(m, threads=1).run(None, {"A": A})[0]
    y2 = session(m, threads=2).run(None, {"A": A})[0]
    assert y1.shape == (2, 70, N)
    assert np.array_equal(y1, y2)  # the task split never changes a column's arithmetic
    r = co.qmatmul_reference(A, p["data"], p["scales"], p["zero_points"], K, N, bs, act_bits)
    assert np.allclose(y1, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_bits", [16, 8, 4])
@pytest.mark.parametrize("K,N,bs", [(576, 1000, 64), (1536, 200, 64), (576, 192, 32)])
def test_qmatmul_decode_split_threads_identical(lib, act_bits, K, N, bs):
    # Few rows (decode): the glue splits the column tiles by weight bytes (576x1000: 4 tasks of 16,
    # 16, 16, 15 tiles, the last tile partial; 1536x200: 2 tasks of 7 and 6 tiles; 576x192: 1 task).
    rng = np.random.default_rng(K + N)
    q, sc, zp = random_weights(rng, K, N, bs, True)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    m = qmatmul_model(K, N, bs, act_bits, p)
    sessions = [session(m, threads=t) for t in (1, 2, 3)]
    for M in (1, 2, 3):
        A = rng.standard_normal((M, K)).astype(np.float32)
        ys = [s.run(None, {"A": A})[0] for s in sessions]
        assert ys[0].shape == (M, N)
        assert np.array_equal(ys[0], ys[1]) and np.array_equal(ys[0], ys[2])
        r = co.qmatmul_reference(A, p["data"], p["scales"], p["zero_points"], K, N, bs, act_bits)
        assert np.allclose(ys[0], r, rtol=1e-4, atol=1e-4)


def test_qmatmul_nonfinite_and_zero_rows(lib):
    rng = np.random.default_rng(3)
    K, N, bs = 64, 16, 32
    q, sc, zp = random_weights(rng, K, N, bs, False)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    A = rng.standard_normal((4, K)).astype(np.float32)
    A[1, 5] = np.nan
    A[2] = 0.0
    A[3, 0] = np.inf
    for act_bits in (16, 8, 4):
        y = session(qmatmul_model(K, N, bs, act_bits, p)).run(None, {"A": A})[0]
        assert np.isfinite(y[0]).all() and not np.isfinite(y[1]).any() and not np.isfinite(y[3]).any()
        assert (y[2] == 0).all()


def test_qmatmul_empty_rows(lib):
    rng = np.random.default_rng(4)
    q, sc, zp = random_weights(rng, 32, 16, 32, False)
    s = session(qmatmul_model(32, 16, 32, 8, co.pack_int4_blocks(q, sc, zp, 32)))
    assert s.run(None, {"A": np.zeros((0, 32), np.float32)})[0].shape == (0, 16)


def test_kernel_env_override_matches(lib, tmp_path):
    """LLMFOLD_KERNELS=ref (forced path) vs the dispatched path, in fresh processes."""
    rng = np.random.default_rng(11)
    K, N, bs = 160, 40, 32
    q, sc, zp = random_weights(rng, K, N, bs, True)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    onnx.save(qmatmul_model(K, N, bs, 8, p), tmp_path / "m.onnx")
    A = rng.standard_normal((5, K)).astype(np.float32)
    np.save(tmp_path / "a.npy", A)
    code = ("import sys, numpy as np, onnxruntime as ort; sys.path.insert(0, sys.argv[1]);"
            "from compiler import custom_ops as co;"
            "s = ort.InferenceSession(sys.argv[2], co.make_session_options(1));"
            "np.save(sys.argv[3], s.run(None, {'A': np.load(sys.argv[4])})[0])")
    outs = {}
    for name in ("ref", ""):
        env = dict(os.environ, LLMFOLD_KERNELS=name)
        out = tmp_path / f"y_{name or 'best'}.npy"
        subprocess.run([sys.executable, "-c", code, str(REPO), str(tmp_path / "m.onnx"), str(out),
                        str(tmp_path / "a.npy")], check=True, env=env, timeout=120)
        outs[name] = np.load(out)
    assert np.allclose(outs["ref"], outs[""], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bad inputs: an ORT error with a clear message, never a crash


def _expect_error(fn, pattern):
    with pytest.raises(Exception) as ei:
        fn()
    assert pattern.lower() in str(ei.value).lower(), str(ei.value)


def test_qmatmul_bad_inputs(lib):
    rng = np.random.default_rng(5)
    K, N, bs = 64, 20, 32
    q, sc, zp = random_weights(rng, K, N, bs, True)
    p = co.pack_int4_blocks(q, sc, zp, bs)
    A = rng.standard_normal((2, K)).astype(np.float32)

    # wrong dtype (double activations): rejected when the session is built
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, a_type=TP.DOUBLE)), "type")
    # K mismatch at run time
    s = session(qmatmul_model(K, N, bs, 8, p, a_shape=["M", "Kdim"]))
    _expect_error(lambda: s.run(None, {"A": np.zeros((2, K + 1), np.float32)}), "last dimension is 65")
    # packed buffer too small
    small = dict(p, data=p["data"][:-1])
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, small)).run(None, {"A": A}), "packed B has")
    # block_size not a power of two
    _expect_error(lambda: session(qmatmul_model(K, N, 48, 8, p)), "power of two")
    # scales of the wrong length
    short = dict(p, scales=p["scales"][:-16])
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, short)).run(None, {"A": A}), "scales has")
    # float32 scales (the layout before fp16 scales): named, with the fix
    f32 = dict(p, scales=p["scales"].astype(np.float32))
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, f32)).run(None, {"A": A}),
                  "scales must be float16 (the packed layout's block scales), got float (a model compiled with float "
                  "scales by llmfold before the fp16 layout: recompile it)")
    # zero points out of range (constant: rejected at session creation)
    badzp = dict(p, zero_points=np.where(p["zero_points"] == 0, 16, p["zero_points"]).astype(np.uint8))
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, badzp)).run(None, {"A": A}), "zero_points values")
    # unsupported act_bits
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 5, p)), "act_bits")
    # channel_shift: wrong length, out of range, or with float activations
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, shift=np.zeros(K - 1, np.uint8))).run(None, {"A": A}),
                  "channel_shift has")
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, shift=np.full(K, 16, np.uint8))).run(None, {"A": A}),
                  "channel_shift values")
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 16, p, shift=np.zeros(K, np.uint8))).run(None, {"A": A}),
                  "requires act_bits")
    # hadamard: not a power of two, or not dividing K
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, hadamard=12)), "hadamard must be 0")
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, hadamard=128)), "dividing K=64")
    _expect_error(lambda: session(qmatmul_model(K, N, bs, 8, p, hadamard=1)), "power of two >= 2")
    # the process is alive and a good model still runs
    assert s.run(None, {"A": A})[0].shape == (2, N)


# ----------------------------------------------------------------------------------------------
# PackedMatMul


def packed_matmul_model(K, N, packed, bias=None, a_shape=None, a_type=TP.FLOAT, const_weights=True):
    inits = []
    ins = [helper.make_tensor_value_info("A", a_type, a_shape or ["M", K])]
    if const_weights:
        inits.append(numpy_helper.from_array(packed, "B"))
    else:  # weights fed at run time: the per-call validation path
        ins.append(helper.make_tensor_value_info("B", TP.FLOAT, None))
    names = ["A", "B"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    node = co.make_packed_matmul_node(names, "Y", K, N)
    y = helper.make_tensor_value_info("Y", TP.FLOAT, list((a_shape or ["M", K])[:-1]) + [N])
    g = helper.make_graph([node], "packed_matmul", ins, [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("K,N", [(1, 1), (5, 17), (64, 16), (3, 80), (576, 230), (230, 576)])
def test_pack_float_tiles_round_trip(K, N):
    W = np.random.default_rng(K * N).standard_normal((K, N)).astype(np.float32)
    p = co.pack_float_tiles(W)
    nt = -(-N // 16)
    assert p.shape == (nt * K * 16,) and p.dtype == np.float32
    for n in (0, N // 2, N - 1):  # the layout's formula (kernels.h): groups of 4 tiles, [K][gt][16]
        t = n // 16
        gt = min(4, nt - t // 4 * 4)
        at = 64 * (t // 4) * K + 16 * (np.arange(K) * gt + t % 4) + n % 16
        assert np.array_equal(p[at], W[:, n])
    last = nt - 1
    gt = min(4, nt - last // 4 * 4)
    pad = 64 * (last // 4) * K + 16 * (np.arange(K)[:, None] * gt + last % 4) + np.arange((N - 1) % 16 + 1, 16)
    assert (p[pad] == 0).all()  # the last tile's padded columns
    assert np.array_equal(co.unpack_float_tiles(p, K, N), W)
    with pytest.raises(ValueError, match="float32"):
        co.pack_float_tiles(W.astype(np.float64))
    with pytest.raises(ValueError, match="do not match"):
        co.unpack_float_tiles(p[:-1], K, N)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 64])
@pytest.mark.parametrize("K,N,with_bias", [(576, 230, False), (230, 576, True), (64, 17, True), (1536, 48, False)])
def test_packed_matmul_matches_reference_and_matmul(lib, M, K, N, with_bias):
    rng = np.random.default_rng(M * 1000 + K + N)
    W = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    A = rng.standard_normal((M, K)).astype(np.float32)
    y = session(packed_matmul_model(K, N, co.pack_float_tiles(W), bias)).run(None, {"A": A})[0]
    assert y.shape == (M, N)
    r = co.packed_matmul_reference(A, co.pack_float_tiles(W), K, N, bias)
    mag = magnitude(A, W) + (np.abs(bias) if with_bias else 0)
    assert (np.abs(y.astype(np.float64) - r) <= (K + 3) * 2.0 ** -24 * mag + 1e-30).all()
    # the same product as ONNX MatMul (+ Add) within float rounding
    ref32 = A @ W + (bias if with_bias else 0)
    assert np.allclose(y, ref32, rtol=1e-5, atol=1e-5 * float(np.abs(ref32).max()))


def test_packed_matmul_batched_threads_and_runtime_weights(lib):
    rng = np.random.default_rng(21)
    K, N = 576, 1000
    W = rng.standard_normal((K, N)).astype(np.float32)
    p = co.pack_float_tiles(W)
    m = packed_matmul_model(K, N, p, a_shape=[2, "T", K])
    mr = packed_matmul_model(K, N, p, a_shape=[2, "T", K], const_weights=False)
    for T in (1, 70):  # decode (streaming split by bytes) and prefill (tile chunks)
        A = rng.standard_normal((2, T, K)).astype(np.float32)
        ys = [session(m, threads=t).run(None, {"A": A})[0] for t in (1, 2, 3)]
        ys.append(session(mr, threads=2).run(None, {"A": A, "B": p})[0])
        assert ys[0].shape == (2, T, N)
        for y in ys[1:]:
            assert np.array_equal(ys[0], y)  # each column's arithmetic is the same whatever the split
        assert np.allclose(ys[0], A @ W, rtol=1e-4, atol=1e-4)


def test_packed_matmul_nonfinite_and_empty_rows(lib):
    rng = np.random.default_rng(22)
    K, N = 40, 20
    W = rng.standard_normal((K, N)).astype(np.float32)
    A = rng.standard_normal((3, K)).astype(np.float32)
    A[1, 7] = np.nan
    s = session(packed_matmul_model(K, N, co.pack_float_tiles(W)))
    y = s.run(None, {"A": A})[0]
    assert np.isfinite(y[[0, 2]]).all() and np.isnan(y[1]).all()
    assert s.run(None, {"A": np.zeros((0, K), np.float32)})[0].shape == (0, N)


def test_packed_matmul_bad_inputs(lib):
    rng = np.random.default_rng(23)
    K, N = 64, 20
    p = co.pack_float_tiles(rng.standard_normal((K, N)).astype(np.float32))
    A = rng.standard_normal((2, K)).astype(np.float32)
    _expect_error(lambda: session(packed_matmul_model(K, N, p, a_type=TP.DOUBLE)), "type")
    s = session(packed_matmul_model(K, N, p, a_shape=["M", "Kdim"]))
    _expect_error(lambda: s.run(None, {"A": np.zeros((2, K + 1), np.float32)}),
                  "PackedMatMul: A's last dimension is 65 but attribute K is 64")
    _expect_error(lambda: session(packed_matmul_model(K, N, p[:-1024])).run(None, {"A": A}),
                  "packed B has 1024 elements; K=64 N=20 needs exactly 2048 (n_tiles*K*16)")
    runtime = session(packed_matmul_model(K, N, p, const_weights=False))
    _expect_error(lambda: runtime.run(None, {"A": A, "B": p[:-16]}), "packed B has")
    _expect_error(lambda: session(packed_matmul_model(K, N, p, bias=np.zeros(N - 1, np.float32))).run(None, {"A": A}),
                  "bias has 19 elements; needs N=20")
    _expect_error(lambda: session(packed_matmul_model(0, N, p)), "attribute K must be in [1, 2^30], got 0")
    assert s.run(None, {"A": A})[0].shape == (2, N)  # the process is alive and a good model still runs


def test_packed_matmul_schema_shape_inference():
    co.register_schemas()
    K, N = 48, 20
    p = co.pack_float_tiles(np.zeros((K, N), np.float32))
    m = packed_matmul_model(K, N, p, a_shape=[2, "T", K])
    onnx.checker.check_model(m)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    dims = [d.dim_value or d.dim_param for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, "T", N]
    with pytest.raises(onnx.shape_inference.InferenceError, match="!= K=48"):
        onnx.shape_inference.infer_shapes(packed_matmul_model(K, N, p, a_shape=[2, 49]), strict_mode=True)


def packed_group_model(group_k, group_n, packed, bias=None, a_shape=None, outputs=None, attrs=None):
    """A block-diagonal PackedMatMul: one output per group (or `outputs` names), weights constant."""
    K, N = sum(group_k), sum(group_n)
    a_shape = a_shape or ["M", K]
    outs = outputs or [f"Y{g}" for g in range(len(group_k))]
    inits = [numpy_helper.from_array(packed, "B")]
    names = ["A", "B"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    kw = {"group_k": list(group_k), "group_n": list(group_n)} if attrs is None else attrs
    node = helper.make_node("PackedMatMul", names, outs, domain=co.DOMAIN, K=K, N=N, **kw)
    ys = [helper.make_tensor_value_info(o, TP.FLOAT, list(a_shape[:-1]) + [n]) for o, n in zip(outs, group_n)]
    g = helper.make_graph([node], "packed_group", [helper.make_tensor_value_info("A", TP.FLOAT, a_shape)], ys, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("M", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("group_k,group_n,with_bias", [((230, 115, 115), (576, 192, 192), False),
                                                       ((335, 335), (1536, 1536), False),
                                                       ((7, 30, 1), (17, 5, 40), True)])
def test_packed_matmul_groups_are_the_separate_products_bit_for_bit(lib, M, group_k, group_n, with_bias):
    """Output g of the block-diagonal form is group g's own PackedMatMul of its columns of A, bit for
    bit (each output is one k-order sum whatever the tiles around it), with 1 and 2 threads."""
    rng = np.random.default_rng(M + sum(group_k))
    Ws = [rng.standard_normal((k, n)).astype(np.float32) * 0.05 for k, n in zip(group_k, group_n)]
    bias = rng.standard_normal(sum(group_n)).astype(np.float32) if with_bias else None
    A = rng.standard_normal((M, sum(group_k))).astype(np.float32)
    packed = co.pack_float_groups(Ws)
    assert [np.array_equal(a, b) for a, b in zip(co.unpack_float_groups(packed, group_k, group_n), Ws)] == [True] * len(Ws)
    for threads in (1, 2):
        ys = session(packed_group_model(group_k, group_n, packed, bias), threads=threads).run(None, {"A": A})
        k0 = n0 = 0
        for g, (k, n) in enumerate(zip(group_k, group_n)):
            b = None if bias is None else bias[n0: n0 + n]
            alone = session(packed_matmul_model(k, n, co.pack_float_tiles(Ws[g]), b), threads=threads)
            assert np.array_equal(ys[g], alone.run(None, {"A": np.ascontiguousarray(A[:, k0: k0 + k])})[0])
            k0, n0 = k0 + k, n0 + n
    for y, r in zip(ys, co.packed_group_matmul_reference(A, packed, group_k, group_n, bias)):
        assert np.allclose(y, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


def test_packed_matmul_groups_bad_attributes(lib):
    gk, gn = (8, 4), (16, 20)
    p = co.pack_float_groups([np.ones((k, n), np.float32) for k, n in zip(gk, gn)])
    A = np.ones((2, 12), np.float32)
    _expect_error(lambda: session(packed_group_model(gk, gn, p, attrs={"group_k": [8, 4]})),
                  "attributes group_k and group_n come together (one is missing)")
    _expect_error(lambda: session(packed_group_model(gk, gn, p, attrs={"group_k": [8, 4], "group_n": [16]})),
                  "group_k and group_n must have the same number of entries, 1 to 8; got 2 and 1")
    _expect_error(lambda: session(packed_group_model(gk, gn, p, attrs={"group_k": [8, 4], "group_n": [26, 10]})).run(None, {"A": A}),
                  "packed B has 256 elements; K=12 N=36 in groups needs exactly 320")
    _expect_error(lambda: session(packed_group_model(gk, gn, p, attrs={"group_k": [12, 0], "group_n": [16, 20]})),
                  "group 1 is empty: group_k 0, group_n 20")
    _expect_error(lambda: session(packed_group_model(gk, gn, p, attrs={"group_k": [8, 5], "group_n": [16, 20]})),
                  "group_k must sum to K=12 and group_n to N=36; they sum to 13 and 36")
    _expect_error(lambda: session(packed_group_model(gk, gn, p[:-16])).run(None, {"A": A}),
                  "packed B has 240 elements; K=12 N=36 in groups needs exactly 256 (n_tiles*K*16 summed over the groups)")
    _expect_error(lambda: session(packed_group_model(gk, gn, p, outputs=["Y0"])).run(None, {"A": A}),
                  "the node has 1 outputs; its 2 group(s) need exactly as many")
    ys = session(packed_group_model(gk, gn, p)).run(None, {"A": A})  # the process is alive; a good model runs
    assert [y.shape for y in ys] == [(2, 16), (2, 20)]
    co.register_schemas()
    m = packed_group_model(gk, gn, p, a_shape=[2, "T", 12])
    onnx.checker.check_model(m)
    out = onnx.shape_inference.infer_shapes(m, strict_mode=True).graph.output
    assert [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in out] == [[2, "T", 16], [2, "T", 20]]
    with pytest.raises(onnx.shape_inference.InferenceError, match="1 outputs for 2 group"):
        onnx.shape_inference.infer_shapes(packed_group_model(gk, gn, p, outputs=["Y0"]), strict_mode=True)
    with pytest.raises(onnx.shape_inference.InferenceError, match="group_k must sum to K=12"):
        onnx.shape_inference.infer_shapes(packed_group_model(gk, gn, p, attrs={"group_k": [8, 5], "group_n": [16, 20]}),
                                          strict_mode=True)


# ----------------------------------------------------------------------------------------------
# TokenPrune


def token_prune_model(h_shape, s_shape, comps=(), keep_ratio=None, with_count=False, with_idx=True):
    ins = [helper.make_tensor_value_info("h", TP.FLOAT, h_shape), helper.make_tensor_value_info("s", TP.FLOAT, s_shape)]
    names = ["h", "s", "k" if with_count else ""]
    if with_count:
        ins.append(helper.make_tensor_value_info("k", TP.INT64, []))
    outs = [helper.make_tensor_value_info("hp", TP.FLOAT, None)]
    onames = ["hp"]
    if with_idx or comps:
        onames.append("idx" if with_idx else "")
        if with_idx:
            outs.append(helper.make_tensor_value_info("idx", TP.INT64, None))
    for i, (elem, shape) in enumerate(comps):
        ins.append(helper.make_tensor_value_info(f"c{i}", elem, shape))
        names.append(f"c{i}")
        onames.append(f"c{i}p")
        outs.append(helper.make_tensor_value_info(f"c{i}p", elem, None))
    while names and names[-1] == "":
        names.pop()
    attrs = {} if keep_ratio is None else {"keep_ratio": keep_ratio}
    node = helper.make_node("TokenPrune", names, onames, domain=co.DOMAIN, **attrs)
    g = helper.make_graph([node], "tp", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("B,T,D,H", [(1, 12, 8, 0), (2, 9, 4, 3), (3, 2, 5, 0), (2, 1, 3, 2), (1, 30, 16, 4)])
@pytest.mark.parametrize("mode", ["ratio", "count"])
def test_token_prune_matches_reference(lib, B, T, D, H, mode):
    rng = np.random.default_rng(B * 100 + T * 10 + D + H)
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    if H:
        scores = rng.random((B, H, T, T)).astype(np.float32)
        scores[..., 0] = np.round(scores[..., 0] * 4) / 4  # ties across tokens
    else:
        scores = np.round(rng.random((B, T)).astype(np.float32) * 3) / 3
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    cos = rng.standard_normal((B, T, 2, 3)).astype(np.float32)
    comps = [(TP.INT64, list(pos.shape)), (TP.FLOAT, list(cos.shape))]
    feeds = {"h": hidden, "s": scores, "c0": pos, "c1": cos}
    if mode == "ratio":
        m = token_prune_model(list(hidden.shape), list(scores.shape), comps, keep_ratio=0.4)
        ref = co.token_prune_reference(hidden, scores, keep_ratio=0.4, companions=[pos, cos])
    else:
        m = token_prune_model(list(hidden.shape), list(scores.shape), comps, with_count=True)
        feeds["k"] = np.array(5, np.int64)
        ref = co.token_prune_reference(hidden, scores, keep_count=5, companions=[pos, cos])
    out = session(m).run(None, feeds)
    assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1])
    assert np.array_equal(out[2], ref[2][0]) and np.array_equal(out[3], ref[2][1])
    assert out[2].dtype == np.int64 and out[3].dtype == np.float32
    idx = out[1]
    if T > 0:
        assert (idx[:, 0] == 0).all() and (idx[:, -1] == T - 1).all()
        assert (np.diff(idx, axis=1) > 0).all()


def test_token_prune_ties_and_nan(lib):
    hidden = np.arange(8 * 2, dtype=np.float32).reshape(1, 8, 2)
    scores = np.array([[0.0, 5.0, 1.0, 5.0, np.nan, 3.0, 9.0, -1.0]], np.float32)
    m = token_prune_model([1, 8, 2], [1, 8], with_count=True)
    for k, want in [(4, [0, 1, 6, 7]), (7, [0, 1, 2, 3, 5, 6, 7]), (1, [0, 7]), (100, list(range(8)))]:
        out = session(m).run(None, {"h": hidden, "s": scores, "k": np.array(k, np.int64)})
        assert out[1].tolist() == [want]
        assert np.array_equal(out[0][0], hidden[0, want])


def test_token_prune_bad_inputs(lib):
    h = np.zeros((1, 6, 4), np.float32)
    _expect_error(lambda: session(token_prune_model([1, 6, 4], [1, 6], keep_ratio=0.0)), "keep_ratio")
    s = session(token_prune_model([1, 6, 4], [1, 6]))
    _expect_error(lambda: s.run(None, {"h": h, "s": np.zeros((1, 6), np.float32)}), "keep_count")
    s = session(token_prune_model([1, "T", 4], [1, "S"], keep_ratio=0.5))
    _expect_error(lambda: s.run(None, {"h": h, "s": np.zeros((1, 5), np.float32)}), "scores must be")
    s = session(token_prune_model([1, "T", 4], [1, 2, "T", 3], keep_ratio=0.5))
    _expect_error(lambda: s.run(None, {"h": h, "s": np.zeros((1, 2, 5, 3), np.float32)}), "attention scores")
    s = session(token_prune_model(["B", "T"], [1, 6], keep_ratio=0.5))
    _expect_error(lambda: s.run(None, {"h": np.zeros((6, 4), np.float32), "s": np.zeros((1, 6), np.float32)}),
                  "hidden must be")
    s = session(token_prune_model([1, 6, 4], [1, 6], [(TP.INT64, [1, "X"])], keep_ratio=0.5))
    _expect_error(lambda: s.run(None, {"h": h, "s": np.zeros((1, 6), np.float32),
                                       "c0": np.zeros((1, 5), np.int64)}), "companion 0")


def token_prune_qk_model(B, T, H, Hkv, d, D=4, score=None, keep_ratio=0.5, q_type=TP.FLOAT, with_count=False,
                         attrs=None, q_dims=None, k_dims=None, scores_too=False, key=True):
    """TokenPrune fed with query [B,T,H·d] / key [B,T,Hkv·d] (inputs 6, 7) instead of scores."""
    ins = [helper.make_tensor_value_info("h", TP.FLOAT, [B, T, D]),
           helper.make_tensor_value_info("q", q_type, q_dims or [B, T, H * d])]
    if key:
        ins.append(helper.make_tensor_value_info("k", TP.FLOAT, k_dims or [B, T, Hkv * d]))
    names = ["h", "s" if scores_too else "", "n" if with_count else "", "", "", "", "q", "k" if key else ""]
    if scores_too:
        ins.append(helper.make_tensor_value_info("s", TP.FLOAT, [B, T]))
    if with_count:
        ins.append(helper.make_tensor_value_info("n", TP.INT64, []))
    a = {"num_heads": H, "kv_num_heads": Hkv}
    if keep_ratio is not None:
        a["keep_ratio"] = keep_ratio
    if score is not None:
        a["score"] = score
    a.update(attrs or {})
    a = {k: v for k, v in a.items() if v is not None}
    while names[-1] == "":
        names.pop()
    node = helper.make_node("TokenPrune", names, ["hp", "idx"], domain=co.DOMAIN, **a)
    outs = [helper.make_tensor_value_info("hp", TP.FLOAT, None), helper.make_tensor_value_info("idx", TP.INT64, None)]
    g = helper.make_graph([node], "tpqk", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    return m


def _random_qk(rng, B, T, H, Hkv, d, spread=2.0):
    q = (rng.standard_normal((B, T, H * d)) * spread).astype(np.float32)
    k = (rng.standard_normal((B, T, Hkv * d)) * spread).astype(np.float32)
    return q, k


@pytest.mark.parametrize("score", ["first_token", "column_sum"])
@pytest.mark.parametrize("B,T,H,Hkv,d", [(1, 17, 4, 2, 8), (2, 33, 3, 1, 16), (1, 64, 6, 6, 4), (3, 9, 2, 1, 5)])
def test_token_prune_query_key_equals_probabilities(lib, score, B, T, H, Hkv, d):
    """Scores from query/key == scores from the probabilities input (float tolerance); same kept rows."""
    rng = np.random.default_rng(T * 7 + H)
    q, k = _random_qk(rng, B, T, H, Hkv, d)
    hidden = rng.standard_normal((B, T, 4)).astype(np.float32)
    P = co.token_prune_attention_probs(q, k, H, Hkv).astype(np.float32)  # [B,H,T,T]
    s_qk = co.token_prune_qk_scores(q, k, H, Hkv, score=score)
    s_p = co.token_prune_scores(P, score)
    assert np.allclose(s_qk, s_p, rtol=1e-5, atol=1e-6)
    if score == "first_token":  # an independent check of the causal softmax: P[t, 0] for t = 0 is 1
        assert np.allclose(s_qk[:, 0], H)
    for ratio in (0.3, 0.5, 0.8):
        ref = co.token_prune_reference(hidden, None, keep_ratio=ratio, score=score, query=q, key=k, num_heads=H,
                                       kv_num_heads=Hkv)
        out = session(token_prune_qk_model(B, T, H, Hkv, d, score=score, keep_ratio=ratio)).run(
            None, {"h": hidden, "q": q, "k": k})
        pm = token_prune_model([B, T, 4], [B, H, T, T], keep_ratio=ratio)
        if score != "first_token":
            pm.graph.node[0].attribute.append(helper.make_attribute("score", score))
        outp = session(pm).run(None, {"h": hidden, "s": P})
        assert out[1].tolist() == outp[1].tolist() == ref[1].tolist()
        assert np.array_equal(out[0], ref[0])
        assert out[1].shape[1] == co.token_prune_keep(T, keep_ratio=ratio)


def test_token_prune_query_key_threads_and_scale(lib):
    rng = np.random.default_rng(11)
    B, T, H, Hkv, d = 1, 40, 8, 2, 8
    q, k = _random_qk(rng, B, T, H, Hkv, d)
    hidden = rng.standard_normal((B, T, 4)).astype(np.float32)
    m = token_prune_qk_model(B, T, H, Hkv, d, keep_ratio=0.4)
    a = session(m, threads=1).run(None, {"h": hidden, "q": q, "k": k})
    b = session(m, threads=2).run(None, {"h": hidden, "q": q, "k": k})
    assert a[1].tolist() == b[1].tolist()
    m2 = token_prune_qk_model(B, T, H, Hkv, d, keep_ratio=0.4, attrs={"scale": 0.05})
    out = session(m2).run(None, {"h": hidden, "q": q, "k": k})
    ref = co.token_prune_reference(hidden, None, keep_ratio=0.4, query=q, key=k, num_heads=H, kv_num_heads=Hkv,
                                   scale=0.05)
    assert out[1].tolist() == ref[1].tolist()
    # keep >= T (a decode step): nothing computed, every row kept in order
    m3 = token_prune_qk_model(B, 1, H, Hkv, d, keep_ratio=0.4)
    out = session(m3).run(None, {"h": hidden[:, :1], "q": q[:, :1], "k": k[:, :1]})
    assert out[1].tolist() == [[0]]


def test_token_prune_query_key_bad_inputs(lib):
    B, T, H, Hkv, d = 1, 6, 4, 2, 3
    h = np.zeros((B, T, 4), np.float32)
    q, k = np.zeros((B, T, H * d), np.float32), np.zeros((B, T, Hkv * d), np.float32)
    # shapes at run time: symbolic dims so that ORT's own shape checks do not pre-empt ours
    dyn = dict(q_dims=["B", "T", "Q"], k_dims=["B", "T", "K"])
    s = session(token_prune_qk_model(B, T, H, Hkv, d, **dyn))
    assert s.run(None, {"h": h, "q": q, "k": k})[1].shape == (1, 3)
    _expect_error(lambda: s.run(None, {"h": h, "q": np.zeros((B, T, 13), np.float32), "k": k}), "not a positive multiple")
    _expect_error(lambda: s.run(None, {"h": h, "q": q, "k": np.zeros((B, T, 8), np.float32)}), "key must be")
    _expect_error(lambda: s.run(None, {"h": h, "q": q[:, :5], "k": k}), "query must be")
    _expect_error(lambda: s.run(None, {"h": h, "q": q, "k": k[:, :5]}), "key must be")
    _expect_error(lambda: s.run(None, {"h": h, "q": np.zeros((B, T, 0), np.float32), "k": k}), "positive multiple")
    # attributes
    _expect_error(lambda: session(token_prune_qk_model(B, T, H, 3, d, **dyn)), "multiple of kv_num_heads")
    _expect_error(lambda: session(token_prune_qk_model(B, T, H, Hkv, d, attrs={"scale": float("inf")}, **dyn)), "scale")
    _expect_error(lambda: session(token_prune_qk_model(B, T, H, Hkv, d, score="last_token", **dyn)), "score")
    s = session(token_prune_qk_model(B, T, H, Hkv, d, attrs={"num_heads": None, "kv_num_heads": None}, **dyn))
    _expect_error(lambda: s.run(None, {"h": h, "q": q, "k": k}), "num_heads")
    # sources: query without key, scores and query together
    s = session(token_prune_qk_model(B, T, H, Hkv, d, key=False, **dyn))
    _expect_error(lambda: s.run(None, {"h": h, "q": q}), "query and key")
    s = session(token_prune_qk_model(B, T, H, Hkv, d, scores_too=True, **dyn))
    _expect_error(lambda: s.run(None, {"h": h, "q": q, "k": k, "s": np.zeros((B, T), np.float32)}), "not both")
    # dtype: a double query is refused (ORT's kernel type match), never read as float
    _expect_error(lambda: session(token_prune_qk_model(B, T, H, Hkv, d, q_type=TP.DOUBLE, **dyn)).run(
        None, {"h": h, "q": q.astype(np.float64), "k": k}), "")
    # schema: onnx shape inference refuses a node with two score sources
    co.register_schemas()
    with pytest.raises(Exception, match="exactly one source"):
        onnx.shape_inference.infer_shapes(token_prune_qk_model(B, T, H, Hkv, d, scores_too=True), strict_mode=True)
    onnx.shape_inference.infer_shapes(token_prune_qk_model(B, T, H, Hkv, d), strict_mode=True)
    # the process is alive and a good model still runs
    assert session(token_prune_qk_model(B, T, H, Hkv, d)).run(None, {"h": h, "q": q, "k": k})[1].shape == (1, 3)


def test_token_prune_keep_rule():
    """floor(ratio·T): prune-30 on 512 tokens keeps 358 (−30.08 %), never more than ratio·T."""
    assert co.token_prune_keep(512, keep_ratio=0.7) == 358
    assert co.token_prune_keep(10, keep_ratio=0.7) == 7 and co.token_prune_keep(100, keep_ratio=0.29) == 29
    assert co.token_prune_keep(9, keep_ratio=0.5) == 4 and co.token_prune_keep(9, keep_ratio=0.01) == 2
    assert co.token_prune_keep(2, keep_ratio=0.1) == 2 and co.token_prune_keep(37, keep_ratio=1.0) == 37
    for T in range(3, 600, 7):
        for r in (0.1, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99):
            k = co.token_prune_keep(T, keep_ratio=r)
            assert k == max(2, min(T, round(r * T) if abs(r * T - round(r * T)) < 1e-9 else math.floor(r * T)))


# ----------------------------------------------------------------------------------------------
# C++ kernel tests


def _cmake_build(build_dir: Path, extra: list[str]) -> Path:
    if not shutil.which("cmake") or not shutil.which("c++"):
        print("SKIP reason: cmake or a C++ compiler is not installed")
        pytest.skip("cmake or a C++ compiler is not installed")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(REPO / "custom_ops"), "-B", str(build_dir), *gen,
                    "-DLLMFOLD_BUILD_ORT_LIB=OFF", *extra], check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llmfold_kernel_test", "-j", "2"],
                   check=True, capture_output=True, timeout=600)
    return build_dir / "llmfold_kernel_test"


def test_kernel_paths_against_ref():
    exe = REPO / "build" / "custom_ops" / "llmfold_kernel_test"
    if not exe.is_file():
        exe = _cmake_build(REPO / "build" / "custom_ops_kt", [])
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failures" in r.stdout
    # LLMFOLD_KERNELS forces a path; an unknown one falls back to the best with a warning.
    best = r.stdout.split("active kernels: ")[1].split()[0]
    forced = subprocess.run([str(exe), "--path", "none"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, LLMFOLD_KERNELS="ref"))
    assert "active kernels: ref" in forced.stdout
    bogus = subprocess.run([str(exe), "--path", "none"], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, LLMFOLD_KERNELS="bogus"))
    assert f"active kernels: {best}" in bogus.stdout and "LLMFOLD_KERNELS=bogus" in bogus.stderr


def test_kernel_paths_asan_ubsan():
    exe = _cmake_build(REPO / "build" / "custom_ops_asan", ["-DLLMFOLD_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"])
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(exe), "--quick"], capture_output=True, text=True, timeout=600, env=env)
    print(r.stdout[-2000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr


def test_bench_kernels_schema(lib):
    """bench-kernels machinery on a tiny shape: every kernel of every (K, N, M), the JSON schema."""
    from compiler import bench_kernels as bk

    res = bk.measure(2, shapes=[(64, 48)], ms=[1, 3], rounds=1, min_sample_s=0.001)
    assert set(res) == {"read_bandwidth_gb_s", "rows"} and res["read_bandwidth_gb_s"] > 0
    assert {r["kernel"] for r in res["rows"]} == set(bk.KERNELS) and len(res["rows"]) == 2 * len(bk.KERNELS)
    for r in res["rows"]:
        assert set(r) == {"K", "N", "M", "threads", "kernel", "median_us", "weight_gb_s"}
        assert r["threads"] == 2 and r["median_us"] > 0 and r["weight_gb_s"] > 0
