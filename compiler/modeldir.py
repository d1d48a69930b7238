"""The model directory: the unit every llmfold command reads and writes.

Layout (like onnxruntime-genai's):

    model.onnx          the graph; tensors larger than 256 bytes live in model.onnx.data
    model.onnx.data     external data, densely packed in graph order
    llmfold.json        source, architecture, config, structure (layer map), passes, custom ops
    config.json, generation_config.json, tokenizer files (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja, ...) copied unchanged from the source

Writes are atomic: everything goes into a temporary sibling directory that is renamed onto the
target at the end, so an interrupted or failed write leaves nothing behind. They are also
deterministic: the same `ir.Model` and meta give byte-identical files (onnx_ir serializes
nodes, initializers and external-data offsets in graph order; JSON is written with sorted keys).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from compiler.errors import UserError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "llmfold.json"
META_FORMAT = "llmfold"
META_VERSION = 1
# files of a model directory that describe the graph; everything else (tokenizer, config) is copied
GRAPH_FILES = (MODEL_FILE, DATA_FILE, META_FILE)
# written anew for each output (they depend on the graph), never copied from the input
DERIVED_FILES = ("genai_config.json", "libllmfold_ops.so")


@dataclass
class ModelDir:
    """An opened model directory (or a plain .onnx file when `is_llmfold` is False)."""

    path: Path  # the directory (for a plain .onnx file: its parent)
    onnx_path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # llmfold.json, {} when absent

    @property
    def is_llmfold(self) -> bool:
        return bool(self.meta)

    @property
    def config(self) -> dict[str, Any]:
        """The llmfold config block (num_layers, hidden_size, ...) or config.json when absent."""
        if "config" in self.meta:
            return self.meta["config"]
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}

    @property
    def custom_ops_library(self) -> str | None:
        return self.meta.get("custom_ops_library")

    @property
    def passes(self) -> list:
        return list(self.meta.get("passes", []))

    def load_model(self) -> ir.Model:
        """The graph as an onnx_ir Model; external tensors are read lazily from the data file."""
        try:
            return ir.load(self.onnx_path)
        except Exception as exc:  # corrupt or truncated protobuf
            raise UserError(
                f"cannot read {self.onnx_path}: {_first_line(exc)}. The file is corrupt or "
                "truncated; export the model again."
            ) from exc

    def structure(self, model: ir.Model | None = None):
        """The layer map: from llmfold.json when present, else analyzed from the graph."""
        from compiler.structure import ModelStructure

        if model is None and self.meta.get("structure"):
            return ModelStructure.from_json(self.meta["structure"])
        from compiler.analyze import analyze

        return analyze(model if model is not None else self.load_model())

    def extra_files(self) -> list[Path]:
        """Tokenizer, config and other files copied along when the graph is rewritten."""
        if not self.is_llmfold and self.onnx_path.parent == self.path and not (
            self.path / MODEL_FILE
        ).is_file():
            return []
        data_names = {self.onnx_path.name, self.onnx_path.name + ".data"}
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and p.name not in GRAPH_FILES + DERIVED_FILES and p.name not in data_names
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_model_dir(path, allow_onnx_file: bool = False, require_llmfold: bool = False) -> ModelDir:
    """Open a model directory; with `allow_onnx_file`, also a plain .onnx file (for inspect)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist: give a model directory written by `llmfold export`.")
    if p.is_file():
        if allow_onnx_file and p.suffix == ".onnx":
            return ModelDir(path=p.parent, onnx_path=p, meta={})
        raise UserError(
            f"{p} is a file, not a model directory: give the directory written by `llmfold export`"
            + (" or an .onnx file." if allow_onnx_file else ".")
        )
    onnx_path = p / MODEL_FILE
    if not onnx_path.is_file():
        raise UserError(
            f"{p} is not a model directory (no {MODEL_FILE}): run `llmfold export SOURCE -o {p}` first."
        )
    meta: dict[str, Any] = {}
    meta_path = p / META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{meta_path} is not valid JSON ({exc}): export the model again.") from exc
        if meta.get("format") != META_FORMAT:
            raise UserError(f"{meta_path} is not an llmfold metadata file: export the model again.")
        if meta.get("version", 0) > META_VERSION:
            raise UserError(
                f"{meta_path} has format version {meta.get('version')}, newer than this llmfold "
                f"({META_VERSION}): upgrade llmfold."
            )
    elif require_llmfold:
        raise UserError(
            f"{p} has no {META_FILE}: it was not written by llmfold; run `llmfold export` first."
        )
    return ModelDir(path=p, onnx_path=onnx_path, meta=meta)


def check_output_dir(out_dir) -> Path:
    """Raise UserError unless `out_dir` is absent or an empty directory."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is a file: choose another -o.")
        if any(out.iterdir()):
            raise UserError(
                f"output directory {out} already exists and is not empty: choose another -o or "
                "remove it."
            )
    return out


class AtomicDir:
    """A temporary sibling directory renamed onto `target` on success, removed on failure.

        with AtomicDir(out) as tmp:
            write files into tmp
    """

    def __init__(self, target):
        self.target = check_output_dir(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        parent = self.target.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = parent / f".{self.target.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            check_output_dir(self.target)  # someone may have written it meanwhile
            if self.target.exists():
                self.target.rmdir()
            os.rename(self.tmp, self.target)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def write_meta(path, meta: dict) -> None:
    Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")


def save_onnx(
    model: ir.Model,
    onnx_path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """model.onnx + model.onnx.data (tensors > 256 bytes), deterministic, densely packed.

    `progress(done_tensors, total_tensors)` is called while external data is written.
    """
    callback = None
    if progress is not None:

        def callback(tensor, info):  # noqa: ARG001 - onnx_ir's callback signature
            progress(info.index + 1, info.total)

    ir.save(
        model,
        onnx_path,
        external_data=Path(onnx_path).name + ".data",
        size_threshold_bytes=256,
        callback=callback,
        max_workers=1,
    )


def save_model_dir(
    model: ir.Model,
    out_dir,
    meta: dict,
    copy_from: ModelDir | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a complete model directory atomically and return its path.

    `meta` is written as llmfold.json (the caller fills format/version/passes/structure...;
    format and version are set here if missing). Tokenizer/config files are copied from
    `copy_from`; `extra_files` (name → content) are written last and win over copied files.
    Raises UserError if `out_dir` exists and is not empty.
    """
    meta = dict(meta)
    meta.setdefault("format", META_FORMAT)
    meta.setdefault("version", META_VERSION)
    with AtomicDir(out_dir) as tmp:
        save_onnx(model, tmp / MODEL_FILE, progress=progress)
        if copy_from is not None:
            for src in copy_from.extra_files():
                shutil.copyfile(src, tmp / src.name)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        write_meta(tmp / META_FILE, meta)
    return Path(out_dir)


__all__ = [
    "ModelDir",
    "open_model_dir",
    "save_model_dir",
    "save_onnx",
    "check_output_dir",
    "AtomicDir",
    "write_meta",
    "MODEL_FILE",
    "DATA_FILE",
    "META_FILE",
]
