"""The C++ sample (samples/cpp, x86-64 build): ops registered statically via
RegisterCustomOpsUsingFunction("RegisterLlmfoldOps"), greedy KV-cached generation from token ids
equal to llmfold's Python runtime, on .onnx and .ort (export-mobile) models; user errors."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import numpy as np
import pytest

from sample_helpers import build_sample, compile_recipe, run_sample

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed (make setup)")

PROMPT = [1, 50, 60, 70, 80, 90, 100, 110]
NEW = 12


@pytest.fixture(scope="module")
def sample_x86():
    return build_sample("x86")


@pytest.fixture(scope="module")
def tiny_w4a8_mobile(tiny_model_dir, tmp_path_factory):
    if importlib.util.find_spec("passes.int4") is None:
        pytest.skip("passes/int4.py is not there yet")
    from compiler.mobile import export_mobile

    root = tmp_path_factory.mktemp("sample_w4a8")
    d = compile_recipe(tiny_model_dir, root, "w4a8")
    return d, export_mobile(d, root / "mobile")


def python_greedy(model_dir):
    from compiler.runtime import open_session

    lm = open_session(model_dir, threads=1)
    return lm.greedy(np.asarray(PROMPT), NEW)["tokens"], lm.prefill_logits(np.asarray(PROMPT))


def test_sample_exports_static_entry_point(sample_x86):
    nm = subprocess.run(["nm", "-D", "--defined-only", str(sample_x86)], capture_output=True, text=True)
    assert " T RegisterLlmfoldOps" in nm.stdout
    ldd = subprocess.run(["ldd", str(sample_x86)], capture_output=True, text=True).stdout
    assert "libllmfold_ops" not in ldd and "libonnxruntime.so" in ldd


def test_sample_fp32_matches_runtime(sample_x86, tiny_model_dir):
    tokens, prefill = python_greedy(tiny_model_dir)
    run = run_sample(sample_x86, tiny_model_dir, PROMPT, NEW)
    assert run.tokens == tokens
    np.testing.assert_allclose(run.logits[: len(PROMPT)], prefill, rtol=0, atol=1e-4)
    assert "decode:" in run.stderr and "tok/s" in run.stderr


def test_sample_w4a8_onnx_and_ort(sample_x86, tiny_w4a8_mobile):
    onnx_dir, mobile_dir = tiny_w4a8_mobile
    tokens, prefill = python_greedy(onnx_dir)
    a = run_sample(sample_x86, onnx_dir, PROMPT, NEW)
    b = run_sample(sample_x86, mobile_dir, PROMPT, NEW)  # picks model.ort
    assert "model.ort" in b.stderr and "model.onnx" in a.stderr
    assert a.tokens == tokens == b.tokens
    np.testing.assert_array_equal(a.logits, b.logits)
    # without --logits the prefill feeds logits_to_keep = 1 (the recipe's last pass): same tokens
    c = run_sample(sample_x86, mobile_dir, PROMPT, NEW, dump_logits=False)
    assert c.tokens == tokens and "logits of the last position only" in c.stderr
    assert "last position" not in b.stderr
    np.testing.assert_allclose(a.logits[: len(PROMPT)], prefill, rtol=0, atol=1e-4)
    assert a.kernel_path in {"avx2", "avx512vnni", "ref"}
    forced = run_sample(sample_x86, mobile_dir, PROMPT, NEW, kernels="ref", decode_ids=a.tokens[:-1])
    assert forced.kernel_path == "ref"
    print(f"\nx86 sample: QMatMul path {a.kernel_path}; forced ref max |Δlogit| "
          f"{np.abs(forced.logits - a.logits).max():.2e}")


def test_sample_user_errors(sample_x86, tmp_path):
    r = subprocess.run([str(sample_x86), str(tmp_path / "nope"), "--ids", "1 2"], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = subprocess.run([str(sample_x86), str(tmp_path / "empty"), "--ids", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "neither model.ort nor model.onnx" in r.stderr
    r = subprocess.run([str(sample_x86), str(tmp_path / "empty"), "--ids", "1 x"], capture_output=True, text=True)
    assert r.returncode == 2 and "bad token id" in r.stderr
