"""onnxruntime-genai runs llmfold model directories: genai_config.json (compiler/genai_config.py)
and the same greedy tokens as llmfold's own runtime (`compiler.runtime.generate`), for the fp32
export and for a w4a8 compile whose QMatMul nodes come from the op library named by
`session_options.custom_ops_library`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import UserError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai is not installed (make setup)"
)

PROMPT = "the model reads tokens and writes logits"
NEW_TOKENS = 24


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def genai_greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt_ids], np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def llmfold_greedy(model_dir: Path) -> dict:
    from compiler.runtime import generate

    return generate(str(model_dir), PROMPT, max_new_tokens=NEW_TOKENS, threads=1, stream=None)


def check_same_tokens(model_dir: Path) -> list[int]:
    ours = llmfold_greedy(model_dir)
    theirs = genai_greedy(model_dir, ours["prompt_tokens"], NEW_TOKENS)
    assert len(ours["tokens"]) >= 8
    assert theirs == ours["tokens"], (theirs, ours["tokens"])
    return theirs


def test_genai_config_fp32(tiny_layout_dir, tmp_path):
    from compiler.genai_config import write_genai_config

    d = _copy(tiny_layout_dir, tmp_path / "fp32")
    path = write_genai_config(d)
    cfg = json.loads(path.read_text())
    meta = json.loads((d / "llmfold.json").read_text())["config"]
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "llama"
    assert dec["num_hidden_layers"] == meta["num_layers"]
    assert dec["num_key_value_heads"] == meta["num_kv_heads"]
    assert dec["head_size"] == meta["head_dim"]
    assert cfg["model"]["vocab_size"] == meta["vocab_size"]
    assert cfg["model"]["context_length"] == meta["max_position_embeddings"]
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert "custom_ops_library" not in dec["session_options"]  # plain ONNX ops only
    assert not (d / "libllmfold_ops.so").exists()
    # GroupQueryAttention writes each step's row into genai's max-length buffer in place
    assert cfg["search"]["past_present_share_buffer"] is (json.loads((d / "llmfold.json").read_text())["attention"] == "fused")
    check_same_tokens(d)


def _w4a8_recipe(path: Path) -> Path:
    path.write_text(
        '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\nsymmetric = true\nact_bits = 8\n'
        '[[pass]]\nname = "logits_to_keep"\n'  # an input with a default: genai never feeds it
    )
    return path


@pytest.fixture(scope="module")
def tiny_w4a8_dir(tiny_model_dir, tmp_path_factory):
    if importlib.util.find_spec("passes.int4") is None:
        pytest.skip("passes/int4.py is not there yet")
    from compiler.driver import compile_model

    tmp = tmp_path_factory.mktemp("genai_w4a8")
    return compile_model(tiny_model_dir, tmp / "w4a8", recipe=str(_w4a8_recipe(tmp / "w4a8.toml")), progress=False)


def test_compiled_model_records_its_packed_layout(tiny_w4a8_dir, tmp_path):
    """A compile with QMatMul records packed_layout 2 (fp16 scales); a model without it (compiled
    with float32 scales before) is refused when opened, with the fix, not at the first op run."""
    from compiler import runtime
    from compiler.custom_ops import PACKED_LAYOUT
    from compiler.errors import UserError

    meta = json.loads((tiny_w4a8_dir / "llmfold.json").read_text())
    assert meta["packed_layout"] == PACKED_LAYOUT == 2
    d = _copy(tiny_w4a8_dir, tmp_path / "old")
    del meta["packed_layout"]
    (d / "llmfold.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="compiled with packed layout 1 .float32 block scales.*compile it again"):
        runtime.open_session(d, threads=1)


def test_genai_w4a8_custom_ops(tiny_w4a8_dir, tmp_path):
    from compiler.genai_config import write_genai_config

    d = _copy(tiny_w4a8_dir, tmp_path / "w4a8")
    # leave no library from elsewhere: genai must load the one the config names
    (d / "libllmfold_ops.so").unlink(missing_ok=True)
    cfg = json.loads(write_genai_config(d).read_text())
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == "libllmfold_ops.so"
    assert (d / "libllmfold_ops.so").is_file()
    check_same_tokens(d)
    # and the op library really is needed: without it genai cannot build the session (a fresh
    # process: this one has the library loaded already and the loader would reuse it)
    (d / "libllmfold_ops.so").unlink()
    r = subprocess.run(
        [sys.executable, "-c", "import sys, onnxruntime_genai as og; og.Model(sys.argv[1])", str(d)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0 and "libllmfold_ops.so" in r.stderr, r.stderr[-2000:]


def test_genai_skipped_for_per_layer_kv(tiny_model_dir, tmp_path):
    from compiler.genai_config import genai_files, write_genai_config

    d = _copy(tiny_model_dir, tmp_path / "pruned")
    meta = json.loads((d / "llmfold.json").read_text())
    meta["kv_cache"] = "per-layer"
    (d / "llmfold.json").write_text(json.dumps(meta))
    (d / "genai_config.json").write_text("{}")  # stale, e.g. copied from the source dir
    assert write_genai_config(d) is None
    assert not (d / "genai_config.json").exists()
    assert genai_files(None, meta) == {}


def test_genai_config_bad_input(tmp_path):
    from compiler.genai_config import write_genai_config

    with pytest.raises(UserError, match="does not exist"):
        write_genai_config(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        write_genai_config(tmp_path / "empty")
