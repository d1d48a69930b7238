"""tune_lowrank: dense low-rank factors trained by distillation; only the factors change, the
held-out KL it records is the one ONNX Runtime measures on the written model, never worse than the
svd pass's, and graphs it cannot train are refused with a message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.errors import UserError
from compiler.testing import compile_recipe_text, files_digest, heldout_kl

CALIB_TEXT = (
    "The factors of every layer were two thin matrices now; the model still had to tell the same "
    "stories about lighthouses, foxes and trains, and it learned to agree with the model it came "
    "from one window of text at a time, never forgetting which windows it had held out. "
) * 40

SVD = '[calibration]\nwindows = 4\nseq_len = 64\n\n[[pass]]\nname = "svd"\nratio = 0.3\n'
TUNE = '\n[[pass]]\nname = "tune_lowrank"\nwindows = 6\nval_windows = 2\nseq_len = 64\nepochs = 2\nlr = 0.01\neval_every = 4\n'


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lowrankcalib") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return p


def _initializers(directory) -> dict:
    import onnx_ir as ir

    model = ir.load(str(directory / "model.onnx"))
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def _factor_names(directory) -> set[str]:
    """Initializer names of the low-rank factors, from the structure recorded in llmfold.json."""
    import onnx_ir as ir

    meta = json.loads((directory / "llmfold.json").read_text())
    model = ir.load(str(directory / "model.onnx"))
    low_rank = {n for block in meta["structure"]["blocks"] for r in ("q", "k", "v", "o", "gate", "up", "down")
                if block[r]["kind"] == "low-rank" for n in block[r]["nodes"]}  # fmt: skip
    return {node.inputs[1].name for node in model.graph if node.name in low_rank}


def test_factors_tuned_rest_kept_and_recorded_kl_is_what_ort_measures(tiny_model_dir, tmp_path, calib_file):
    from compiler.calibrate import calibration_windows

    base = compile_recipe_text(tiny_model_dir, tmp_path, "base", SVD, calib_file)
    tuned = compile_recipe_text(tiny_model_dir, tmp_path, "tuned", SVD + TUNE, calib_file)
    before, after = _initializers(base), _initializers(tuned)
    factors = _factor_names(tuned)
    assert before.keys() == after.keys() and len(factors) == 2 * 14  # a pair per decoder linear
    for name in before:
        assert before[name].shape == after[name].shape, name
        if name in factors:
            assert not np.array_equal(before[name], after[name]) and np.all(np.isfinite(after[name])), name
        else:  # norms, embedding, lm_head, RoPE tables: untouched
            assert np.array_equal(before[name], after[name]), name
    record = json.loads((tuned / "llmfold.json").read_text())["passes"][-1]["records"][0]
    assert record["tuned_factors"] == 28 and record["reconstruction_kl"] < 1e-4
    assert record["checkpoint_steps"] == [0, 4, 6, 8, 12]  # every 4th step and each epoch's end (6 steps each)
    val = record["val_kl"]
    assert record["kept_checkpoint"] == int(np.argmin(val)) and val[record["kept_checkpoint"]] < val[0]
    # the held-out windows are the last val_windows of the disjoint draw (seed 0)
    windows = calibration_windows(tiny_model_dir, calib_file, num_windows=8, seq_len=64, seed=0, disjoint=True)[6:]
    assert heldout_kl(tiny_model_dir, base, windows) == pytest.approx(val[0], rel=1e-3)
    assert heldout_kl(tiny_model_dir, tuned, windows) == pytest.approx(val[record["kept_checkpoint"]], rel=1e-3)


def test_bfloat16_training_steps_are_scored_in_float32(tiny_model_dir, tmp_path, calib_file):
    """precision = "bfloat16" trains under autocast; the held-out KLs it records and keeps the best
    of are still the float32 ones ONNX Runtime measures on the written model."""
    from compiler.calibrate import calibration_windows

    base = compile_recipe_text(tiny_model_dir, tmp_path, "base", SVD, calib_file)
    tuned = compile_recipe_text(tiny_model_dir, tmp_path, "bf16", SVD + TUNE + 'precision = "bfloat16"\n', calib_file)
    f32 = compile_recipe_text(tiny_model_dir, tmp_path, "f32", SVD + TUNE, calib_file)
    record = json.loads((tuned / "llmfold.json").read_text())["passes"][-1]["records"][0]
    val = record["val_kl"]
    assert record["kept_checkpoint"] == int(np.argmin(val)) and val[record["kept_checkpoint"]] < val[0]
    windows = calibration_windows(tiny_model_dir, calib_file, num_windows=8, seq_len=64, seed=0, disjoint=True)[6:]
    assert heldout_kl(tiny_model_dir, base, windows) == pytest.approx(val[0], rel=1e-3)
    assert heldout_kl(tiny_model_dir, tuned, windows) == pytest.approx(val[record["kept_checkpoint"]], rel=1e-3)
    # the steps themselves ran in bfloat16: other factors than the float32 run's, close to them
    a, b = _initializers(tuned), _initializers(f32)
    factors = _factor_names(tuned)
    assert any(not np.array_equal(a[n], b[n]) for n in factors)
    rel = max(float(np.linalg.norm(a[n] - b[n]) / np.linalg.norm(b[n])) for n in factors)
    assert rel < 0.05, rel


def test_same_seed_same_files(tiny_model_dir, tmp_path, calib_file):
    tune = '\n[[pass]]\nname = "tune_lowrank"\nwindows = 3\nval_windows = 1\nseq_len = 32\n'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = compile_recipe_text(tiny_model_dir, tmp_path / "a", "m", SVD + tune, calib_file)
    b = compile_recipe_text(tiny_model_dir, tmp_path / "b", "m", SVD + tune, calib_file)
    assert files_digest(a) == files_digest(b)


def test_refuses_graphs_it_cannot_train(tiny_model_dir, tmp_path, calib_file, monkeypatch):
    from compiler import custom_ops

    tune = '\n[[pass]]\nname = "tune_lowrank"\nwindows = 2\nval_windows = 1\nseq_len = 32\n'
    with pytest.raises(UserError, match="tune_lowrank: the graph has no low-rank layers; run the svd pass before tune_lowrank"):
        compile_recipe_text(tiny_model_dir, tmp_path, "dense", tune, calib_file)
    try:
        custom_ops.library_path()
        quantized = SVD + '\n[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 16\n' + tune
        with pytest.raises(UserError, match="already quantized; run tune_lowrank before int4"):
            compile_recipe_text(tiny_model_dir, tmp_path, "quantized", quantized, calib_file)
    except FileNotFoundError:
        pass  # no op library: the int4 pass cannot run; the other refusals still do
    # a model the torch reconstruction does not describe (simulated by scaling its logits) is
    # caught by the check against ONNX Runtime before any step
    from passes.distill import Student

    logits = Student.logits
    monkeypatch.setattr(Student, "logits", lambda self, ids: 1.5 * logits(self, ids))
    with pytest.raises(UserError, match="tune_lowrank: the torch reconstruction of this graph differs from ONNX Runtime"):
        compile_recipe_text(tiny_model_dir, tmp_path, "mismatch", SVD + tune, calib_file)
    assert not any((tmp_path / n).exists() for n in ("dense", "quantized", "mismatch"))


@pytest.mark.parametrize(
    "line, key",
    [("windows = 0", "windows"), ("epochs = 0", "epochs"), ("lr = 0.5", "lr"), ("eval_every = -1", "eval_every"),
     ("seq_len = 1", "seq_len"), ("lr = \"slow\"", "lr"), ("rank = 8", "rank"), ("precision = \"fp8\"", "precision")],
)  # fmt: skip
def test_bad_recipe_values_are_user_errors(tmp_path, line, key):
    from compiler.recipe import load_recipe

    p = tmp_path / "bad.toml"
    p.write_text(f'[[pass]]\nname = "tune_lowrank"\n{line}\n')
    with pytest.raises(UserError, match=key):
        load_recipe(str(p))
