"""The compile driver: atomic output, input untouched, determinism, pass context services."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler.driver import compile_model
from compiler.errors import UserError
from passes.base import REGISTRY, CompilerPass


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_identity_compile_is_deterministic_and_leaves_input_alone(tiny_model_dir, tmp_path):
    before = tree_digest(tiny_model_dir)
    a = compile_model(tiny_model_dir, tmp_path / "a", recipe="identity", seed=3, progress=False)
    b = compile_model(tiny_model_dir, tmp_path / "b", recipe="identity", seed=3, progress=False)
    assert tree_digest(tiny_model_dir) == before
    da, db = tree_digest(a), tree_digest(b)
    assert da == db
    assert "model.onnx" in da and "llmfold.json" in da


def test_identity_compile_keeps_logits(tiny_model_dir, tmp_path):
    from compiler.runtime import evaluate

    out = compile_model(tiny_model_dir, tmp_path / "id", recipe="identity", progress=False)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    r0 = evaluate(tiny_model_dir, text=text, seq_len=64, windows=2, progress=False)
    r1 = evaluate(out, text=text, seq_len=64, windows=2, progress=False)
    assert r0["tokens"] == r1["tokens"] > 0
    assert abs(r0["perplexity"] - r1["perplexity"]) <= 1e-6 * r0["perplexity"]


def test_existing_output_and_same_dir_are_refused(tiny_model_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not empty"):
        compile_model(tiny_model_dir, tmp_path / "busy", recipe="identity", progress=False)
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="is the input directory"):
        compile_model(tiny_model_dir, tiny_model_dir, recipe="identity", progress=False)


def test_missing_calibration_text_is_refused_before_work(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="calibration text .* does not exist"):
        compile_model(tiny_model_dir, tmp_path / "o", recipe="identity", calib=tmp_path / "none.txt", progress=False)
    assert not (tmp_path / "o").exists()


class _Boom(CompilerPass):
    name = "test-boom"

    def call(self, model: ir.Model):
        # a pass that reads statistics, then fails half-way: nothing may be left behind
        s = self.ctx.structure(model)
        stats = self.ctx.input_stats(model, [s.blocks[0].q.input])
        self.ctx.record(rows=next(iter(stats.values())).count)
        raise RuntimeError("boom")


def test_failed_compile_leaves_nothing(tiny_model_dir, tmp_path):
    from compiler.recipe import CalibrationConfig, PassSpec, Recipe

    REGISTRY[_Boom.name] = _Boom
    try:
        recipe = Recipe("boom", None, "", CalibrationConfig(windows=2, seq_len=16), [PassSpec("test-boom", _Boom.Params(), {})])
        text = tmp_path / "calib.txt"
        text.write_text(" ".join(f"token{i % 53} sample words" for i in range(600)))
        with pytest.raises(RuntimeError, match="boom"):
            compile_model(tiny_model_dir, tmp_path / "out", recipe=recipe, calib=text, progress=False)
    finally:
        del REGISTRY[_Boom.name]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["calib.txt"]


def test_context_statistics_match_direct_computation(tiny_model_dir, tmp_path):
    """ctx.input_stats taps the current graph: XᵀX of q's input equals a direct computation."""
    from compiler.driver import CompileContext
    from compiler.modeldir import open_model_dir
    from compiler.recipe import CalibrationConfig

    src = open_model_dir(tiny_model_dir)
    model = src.load_model()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i % 53} sample words" for i in range(600)))
    ctx = CompileContext(src, CalibrationConfig(windows=3, seq_len=16), text, seed=1, progress=False)
    try:
        s = ctx.structure(model)
        name = s.blocks[1].down.input
        stats = ctx.input_stats(model, [name])[name]
        assert stats.count == 3 * 16
        # the same windows again through a second context: identical numbers (seeded)
        ctx2 = CompileContext(src, CalibrationConfig(windows=3, seq_len=16), text, seed=1, progress=False)
        again = ctx2.input_stats(model, [name])[name]
        ctx2.close()
        np.testing.assert_array_equal(stats.xtx, again.xtx)
        assert np.all(np.diag(stats.xtx) >= 0) and stats.xtx.shape == (s.intermediate_size,) * 2
    finally:
        ctx.close()
