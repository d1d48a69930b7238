"""onnxruntime-genai's genai_config.json for an llmfold model directory.

A model directory follows onnxruntime-genai's I/O names (`input_ids`, `attention_mask`,
`past_key_values.{i}.key/value`, `logits`, `present.{i}.key/value`), so with a genai_config.json
it runs in onnxruntime-genai's generator as is (`og.Model(dir)`), custom ops included:

* model type `llama`, context length / vocab / bos / eos / head counts from llmfold.json's config
  block (generation_config.json's eos ids win, as in genai's own builder);
* `search.past_present_share_buffer`: true when every layer's attention is ORT's
  GroupQueryAttention and the cache is uniform (:func:`shares_kv_buffer`): genai then allocates one
  max-length cache per layer and GQA writes each step's row in place (seqlens_k and
  total_sequence_length come from the attention mask, whose length stays the real token count);
  false for the explicit-attention layout, whose graph concatenates past and new keys;
* when the graph has nodes in the `llmfold` domain, `session_options.custom_ops_library` names the
  op library. onnxruntime-genai only loads a library that lies inside the model folder (it refuses
  `..` and paths outside "an allowed directory"), so the library is copied into the directory as
  `libllmfold_ops.so` and named by that relative path.

Not written for token-pruned models (llmfold.json `"kv_cache": "per-layer"`): their layers hold KV
caches of different lengths, which genai's generator (one past length for all layers) cannot feed;
`llmfold generate` runs them. :func:`genai_files` returns `{}` and :func:`write_genai_config`
returns None (and removes a stale genai_config.json) for those.

Two entry points:
* :func:`genai_files(model, meta, library=None)` → {file name: bytes} for a directory being written
  (pass as `save_model_dir(..., extra_files=...)` — nothing half-written);
* :func:`write_genai_config(model_dir, library=None)` adds the files to an existing directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from compiler.errors import UserError

GENAI_CONFIG = "genai_config.json"
LIBRARY_NAME = "libllmfold_ops.so"
DOMAIN = "llmfold"


def _io_names(model) -> tuple[list[str], list[str], bool]:
    """(input names, output names, uses the llmfold domain) of an onnx_ir Model or ModelProto."""
    if hasattr(model, "graph") and hasattr(model.graph, "inputs"):  # onnx_ir
        import onnx_ir as ir

        ins = [v.name for v in model.graph.inputs]
        outs = [v.name for v in model.graph.outputs]
        custom = any(n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph))
        custom = custom or any(n.domain == DOMAIN for f in model.functions.values() for n in f)
        return ins, outs, custom
    ins = [v.name for v in model.graph.input]
    outs = [v.name for v in model.graph.output]
    custom = any(n.domain == DOMAIN for n in model.graph.node) or any(
        n.domain == DOMAIN for f in model.functions for n in f.node
    )
    return ins, outs, custom


def _eos_ids(meta_config: dict, generation_config: dict | None):
    v = (generation_config or {}).get("eos_token_id")
    if v is None:
        v = meta_config.get("eos_token_id")
    if isinstance(v, (list, tuple)):
        v = [int(x) for x in v]
        return v[0] if len(v) == 1 else v
    return None if v is None else int(v)


def genai_config_dict(
    model,
    meta: dict[str, Any],
    generation_config: dict | None = None,
    library_relpath: str | None = LIBRARY_NAME,
    filename: str = "model.onnx",
) -> dict[str, Any]:
    """The genai_config.json content (a dict) for `model` (onnx_ir Model or ModelProto)."""
    cfg = meta.get("config") or {}
    need = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")
    missing = [k for k in need if cfg.get(k) is None]
    if missing:
        raise UserError(
            f"llmfold.json has no {', '.join(missing)} in its config block; re-export the model with `llmfold export`."
        )
    ins, outs, custom = _io_names(model)
    L = int(cfg["num_layers"])
    want_in = ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    want_out = ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    absent = [n for n in want_in if n not in ins] + [n for n in want_out if n not in outs]
    if absent:
        raise UserError(
            f"the graph lacks onnxruntime-genai I/O {', '.join(absent[:3])}"
            f"{' ...' if len(absent) > 3 else ''}; re-export the model with `llmfold export`."
        )
    inputs = {"input_ids": "input_ids"}
    if "attention_mask" in ins:
        inputs["attention_mask"] = "attention_mask"
    if "position_ids" in ins:
        inputs["position_ids"] = "position_ids"
    inputs["past_key_names"] = "past_key_values.%d.key"
    inputs["past_value_names"] = "past_key_values.%d.value"
    outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom:
        if not library_relpath:
            raise UserError("the model uses llmfold custom ops but no op library was given; build it with `make setup`.")
        session_options["custom_ops_library"] = library_relpath
    context = int(cfg.get("max_position_embeddings") or 4096)
    bos = cfg.get("bos_token_id")
    pad = (generation_config or {}).get("pad_token_id", cfg.get("pad_token_id"))
    eos = _eos_ids(cfg, generation_config)
    return {
        "model": {
            "bos_token_id": None if bos is None else int(bos),
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": filename,
                "head_size": int(cfg["head_dim"]),
                "hidden_size": int(cfg["hidden_size"]),
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": int(cfg["num_heads"]),
                "num_hidden_layers": L,
                "num_key_value_heads": int(cfg["num_kv_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": int(pad) if pad is not None else (eos if isinstance(eos, int) else None),
            "type": "llama",
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_kv_buffer(meta),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def shares_kv_buffer(meta: dict) -> bool:
    """Whether decoding may keep one max-length KV buffer per layer, bound as both past and
    present (every block's attention is GroupQueryAttention, cache uniform)."""
    blocks = (meta.get("structure") or {}).get("blocks") or []
    return (
        meta.get("kv_cache", "uniform") == "uniform"
        and bool(blocks)
        and all(b.get("attention_kind") == "GroupQueryAttention" for b in blocks)
    )


def supports_genai(meta: dict) -> bool:
    """False for token-pruned models (per-layer KV lengths), which only llmfold's runtime runs."""
    return meta.get("kv_cache", "uniform") != "per-layer"


def _library_source(library) -> Path:
    if library is not None:
        p = Path(library)
        if not p.is_file():
            raise UserError(f"custom op library {p} does not exist; build it with `make setup`.")
        return p
    from compiler import custom_ops

    try:
        return custom_ops.library_path()
    except FileNotFoundError as e:
        raise UserError(" ".join(str(e).split())) from e


def genai_files(model, meta: dict, generation_config: dict | None = None, library=None) -> dict[str, bytes]:
    """{file name: content} to add to a model directory being written: genai_config.json and, when
    the graph uses llmfold ops, the op library itself. `{}` for token-pruned models."""
    if not supports_genai(meta):
        return {}
    cfg = genai_config_dict(model, meta, generation_config)
    files = {GENAI_CONFIG: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()}
    if "custom_ops_library" in cfg["model"]["decoder"]["session_options"]:
        files[LIBRARY_NAME] = _library_source(library).read_bytes()
    return files


def write_genai_config(model_dir, library=None) -> Path | None:
    """Write genai_config.json (and copy the op library when needed) into an existing llmfold model
    directory; returns the config path, or None for a token-pruned model (kv_cache per-layer),
    whose stale genai_config.json, if any, is removed."""
    import onnx

    from compiler.modeldir import open_model_dir

    md = open_model_dir(model_dir, require_llmfold=True)
    target = md.path / GENAI_CONFIG
    if not supports_genai(md.meta):
        target.unlink(missing_ok=True)
        return None
    try:
        proto = onnx.load(str(md.onnx_path), load_external_data=False)
    except Exception as e:
        raise UserError(f"cannot read {md.onnx_path}: {' '.join(str(e).split())[:200]}; export the model again.") from e
    gen_path = md.path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    files = genai_files(proto, md.meta, gen, library)
    for name, content in files.items():
        tmp = md.path / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(content)
        if name == LIBRARY_NAME:
            shutil.copymode(_library_source(library), tmp)
        os.replace(tmp, md.path / name)  # atomic per file
    return target


__all__ = ["genai_config_dict", "genai_files", "write_genai_config", "supports_genai", "shares_kv_buffer", "GENAI_CONFIG"]
