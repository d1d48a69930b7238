"""Helpers shared by the pass tests: run an in-memory graph or a model directory, compare logits."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

TOL = 1e-4  # fp32 logits before vs after an exact transformation


# ----------------------------------------------------------------------------------------------
def graph_logits(model: ir.Model, tmp_path, ids: np.ndarray, decode: int = 4):
    """Prefill + `decode` cached decode steps of an in-memory model through ONNX Runtime."""
    from compiler.testing import onnx_prefill_decode_logits, onnx_session

    d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    ir.save(model, d / "model.onnx", external_data="model.onnx.data")
    sess = onnx_session(d / "model.onnx")
    logits, _ = onnx_prefill_decode_logits(sess, ids, np.ones_like(ids), ids[:, :decode])
    return logits


def max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def make_ctx(model_dir, windows: int = 4, seq_len: int = 32):
    from compiler.driver import CompileContext
    from compiler.modeldir import open_model_dir
    from compiler.recipe import CalibrationConfig

    return CompileContext(open_model_dir(model_dir), CalibrationConfig(windows=windows, seq_len=seq_len), threads=1, progress=False)


def sample_ids(vocab: int = 300, shape=(2, 20), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)


def op_types(d) -> list[str]:
    """The op types of a model directory's graph, in order."""
    return [n.op_type for n in ir.load(d / "model.onnx").graph]


def runtime_outputs(d):
    """(prefill logits, 8 greedy tokens, their logits) of a model directory in llmfold's runtime, 1 thread."""
    from compiler import runtime

    lm = runtime.open_session(d, threads=1)
    ids = np.arange(5, 45)
    g = lm.greedy(ids, 8, keep_logits=True)
    return lm.prefill_logits(ids), g["tokens"], g["logits"]


def compile_with_pass(pass_cls, sources: dict, tmp_path) -> dict:
    """Compile each source model directory with a one-pass recipe running the test pass `pass_cls`
    (registered for the duration); {name: output directory tmp_path/name}."""
    from compiler.driver import compile_model
    from compiler.recipe import CalibrationConfig, PassSpec, Recipe
    from passes.base import REGISTRY

    REGISTRY[pass_cls.name] = pass_cls
    try:
        recipe = Recipe("reads", None, "", CalibrationConfig(windows=2, seq_len=16), [PassSpec(pass_cls.name, pass_cls.Params(), {})])
        return {name: compile_model(src, tmp_path / name, recipe=recipe, progress=False) for name, src in sources.items()}
    finally:
        del REGISTRY[pass_cls.name]
