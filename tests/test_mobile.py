"""`llmfold export-mobile` (compiler/mobile.py): ORT-format conversion with the custom op library,
required-operators config, shipped files, .ort vs .onnx logits, atomic output and user errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from compiler.errors import UserError


@pytest.fixture(scope="module")
def tiny_w4a8(tiny_model_dir, tmp_path_factory):
    if importlib.util.find_spec("passes.int4") is None:
        pytest.skip("passes/int4.py is not there yet")
    from compiler.driver import compile_model

    tmp = tmp_path_factory.mktemp("mobile_w4a8")
    recipe = tmp / "w4a8.toml"
    recipe.write_text('[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nsymmetric = true\nact_bits = 8\n')
    return compile_model(tiny_model_dir, tmp / "w4a8", recipe=str(recipe), progress=False)


def _ort_logits(ort_path: Path, model_dir: Path, custom: bool):
    from compiler.mobile import _kv_dims, _prompt_ids, run_schedule
    from compiler.runtime import create_session

    sess = create_session(ort_path, threads=1, custom_ops=custom)
    return run_schedule(sess, _prompt_ids(model_dir, 10**9), 2, _kv_dims(sess, model_dir))


def test_export_mobile_fp32(tiny_model_dir, tmp_path):
    from compiler.mobile import export_mobile

    out = export_mobile(tiny_model_dir, tmp_path / "m")
    names = {p.name for p in out.iterdir()}
    assert {"model.ort", "required_operators.config", "llmfold.json", "tokenizer.json", "README.txt"} <= names
    assert "model.onnx" not in names and "libllmfold_ops.so" not in names  # no custom ops: no library
    cfg = (out / "required_operators.config").read_text()
    assert "ai.onnx;" in cfg and "llmfold;" not in cfg
    assert "standard ONNX operators only" in (out / "README.txt").read_text()
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_export_mobile_w4a8_keeps_custom_ops(tiny_w4a8, tmp_path):
    from compiler.mobile import export_mobile, mobile_main

    assert mobile_main(SimpleNamespace(dir=str(tiny_w4a8), output=str(tmp_path / "m"), library=None)) == 0
    out = tmp_path / "m"
    assert (out / "libllmfold_ops.so").is_file()
    cfg = (out / "required_operators.config").read_text().splitlines()
    assert "llmfold;1;QMatMul" in cfg
    assert "# - model.ort" in cfg  # not the temporary directory's name
    readme = (out / "README.txt").read_text()
    assert 'RegisterCustomOpsUsingFunction("RegisterLlmfoldOps")' in readme and "--include_ops_by_config" in readme
    assert json.loads((out / "llmfold.json").read_text()) == json.loads((tiny_w4a8 / "llmfold.json").read_text())
    # the .ort model needs the op library and gives the .onnx model's logits (checked independently)
    got = _ort_logits(out / "model.ort", tiny_w4a8, True)
    ref = _ort_logits(tiny_w4a8 / "model.onnx", tiny_w4a8, True)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    with pytest.raises(UserError):
        _ort_logits(out / "model.ort", tiny_w4a8, False)
    # shipping another library (e.g. an aarch64 build) copies that file
    other = tmp_path / "libother.so"
    other.write_bytes(b"\x7fELF not really")
    out2 = export_mobile(tiny_w4a8, tmp_path / "m2", library=other)
    assert (out2 / "libllmfold_ops.so").read_bytes() == other.read_bytes()


def test_export_mobile_keeps_packed_matmul(tiny_model_dir, tmp_path):
    """A float model whose MatMuls became PackedMatMul (packed_matmul pass) ships the op library and
    its .ort file gives the .onnx file's logits."""
    from compiler.mobile import export_mobile
    from compiler.testing import compile_recipe_text

    packed = compile_recipe_text(tiny_model_dir, tmp_path, "packed", '[[pass]]\nname = "packed_matmul"\n')
    out = export_mobile(packed, tmp_path / "m")
    assert (out / "libllmfold_ops.so").is_file()
    assert "llmfold;1;PackedMatMul" in (out / "required_operators.config").read_text().splitlines()
    for a, b in zip(_ort_logits(out / "model.ort", packed, True), _ort_logits(packed / "model.onnx", packed, True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_export_mobile_keeps_block_diagonal_low_rank_pairs(tiny_model_dir, tmp_path):
    """svd + packed_matmul + pack_lowrank (shared first factors, block-diagonal PackedMatMuls with one
    output per pair): the .ort file gives the .onnx file's logits."""
    from compiler.mobile import export_mobile
    from compiler.testing import _training_text, compile_recipe_text

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join([_training_text()] * 3))
    recipe = ('[calibration]\nwindows = 8\nseq_len = 64\n[[pass]]\nname = "svd"\nratio = 0.3\nupdate = false\n'
              '[[pass]]\nname = "packed_matmul"\n[[pass]]\nname = "pack_lowrank"\n')
    packed = compile_recipe_text(tiny_model_dir, tmp_path, "svd", recipe, calib=calib)
    assert json.loads((packed / "llmfold.json").read_text())["passes"][-1]["records"][0]["shared_first_factors"] == 4
    out = export_mobile(packed, tmp_path / "m")
    for a, b in zip(_ort_logits(out / "model.ort", packed, True), _ort_logits(packed / "model.onnx", packed, True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_verify_detects_a_different_model(tiny_model_dir, tiny_w4a8, tmp_path):
    """The verification is not vacuous: the w4a8 .ort model against the fp32 .onnx one fails."""
    from compiler.mobile import export_mobile, verify_ort

    out = export_mobile(tiny_w4a8, tmp_path / "m")
    assert verify_ort(tiny_w4a8 / "model.onnx", out / "model.ort", tiny_w4a8, True) <= 1e-4
    with pytest.raises(UserError, match="disagrees"):
        verify_ort(tiny_model_dir / "model.onnx", out / "model.ort", tiny_model_dir, True)


def test_export_mobile_user_errors(tiny_model_dir, tmp_path):
    from compiler.mobile import export_mobile

    with pytest.raises(UserError, match="does not exist"):
        export_mobile(tmp_path / "nope", tmp_path / "o1")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_mobile(tiny_model_dir, busy)
    with pytest.raises(UserError, match="no llmfold custom ops"):
        export_mobile(tiny_model_dir, tmp_path / "o2", library=tmp_path / "busy" / "x")
    with pytest.raises(UserError, match="input directory"):
        export_mobile(tiny_model_dir, tiny_model_dir)
    # a corrupt graph: a one-line error, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(UserError):
        export_mobile(bad, tmp_path / "o3")
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob(".o3.tmp-*"))
