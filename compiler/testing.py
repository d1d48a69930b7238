"""Test fixtures: tiny random Llama models with a small real tokenizer, built in-process.

`make_tiny_llama(path)` writes a Hugging Face model directory (config.json, model.safetensors,
generation_config.json, tokenizer files) in about a second, without network access:

* the tokenizer is a byte-level BPE trained with `tokenizers` on a few KB of text generated
  here (so every byte string is encodable), wrapped as a `PreTrainedTokenizerFast` with
  `<s>` (bos), `</s>` (eos) and `<pad>`;
* the model is a `LlamaForCausalLM` whose weights are redrawn so activations are O(1):
  linear weights ~ N(0, 1/K), embeddings ~ N(0, 1), norm weights ~ 1 + N(0, 0.1²). With the
  default init (std 0.02) logits are nearly constant and an exactness test could not tell a
  wrong graph from a right one.

`make_tiny_export(path, attention=...)` also exports it with either attention layout.
`hf_reference_logits` / `onnx_prefill_decode_logits` run the same prefill + greedy-free decode
schedule through transformers and through an exported ONNX model, for exactness tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def _training_text() -> str:
    """A few KB of deterministic English-like text (no files, no network)."""
    prose = (
        "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than "
        "complex. Complex is better than complicated. Flat is better than nested. Sparse is "
        "better than dense. Readability counts. Errors should never pass silently, unless "
        "explicitly silenced. In the face of ambiguity, refuse the temptation to guess.\n"
        "Once upon a time a small language model lived on a phone. It was quantized to four bits "
        "and it still told stories about cats, dogs, rivers and mountains.\n"
    )
    words = (
        "the model reads tokens and writes logits while the cache keeps keys and values for every "
        "layer so decoding one more token costs one row of attention the compiler folds affine "
        "transforms into norms splits weights into low rank pairs and packs four bit blocks "
        "numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 and punctuation , . ; : ! ? ( ) [ ] { } "
        "quotes ' \" and symbols + - * / = < > % & | ^ ~ # @ $ _"
    ).split()
    rng = np.random.default_rng(1234)
    sentences = []
    for _ in range(120):
        n = int(rng.integers(5, 14))
        sentences.append(" ".join(words[int(i)] for i in rng.integers(0, len(words), n)) + ".")
    return prose + "\n".join(sentences)


def make_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with bos/eos/pad, trained in-process (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=False,
    )
    return fast


def make_tiny_llama(
    path,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 384,
    tied: bool = False,
    max_positions: int = 256,
    rope_theta: float = 10000.0,
    architecture: str = "LlamaForCausalLM",
) -> Path:
    """Write a random Llama-family HF model directory at `path` and return it.

    `vocab` is the BPE target size; the model's vocab_size is the tokenizer's actual size.
    `architecture="MistralForCausalLM"` writes the structurally identical Mistral class.
    """
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab)
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
    }[architecture]
    extra = {"sliding_window": None} if architecture == "MistralForCausalLM" else {}
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=[architecture],
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:  # torch Linear weight [N, K]
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_export(path, attention: str | None = None, **llama_kwargs) -> tuple[Path, Path]:
    """A tiny random Llama (`make_tiny_llama(path / "hf", **llama_kwargs)`) exported to
    `path / "fp32"` with the given attention layout ("fused" | "explicit"; default: the
    exporter's). Returns (HF dir, model dir)."""
    from compiler.export import DEFAULT_ATTENTION, export

    path = Path(path)
    hf = make_tiny_llama(path / "hf", **llama_kwargs)
    return hf, export(str(hf), path / "fp32", progress=False, attention=attention or DEFAULT_ATTENTION)


# --------------------------------------------------------------------------------------------
# reference runs for exactness tests


def left_padded_batch(token_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (int64) with left padding to the longest sequence."""
    width = max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), width), pad_id, np.int64)
    mask = np.zeros((len(token_lists), width), np.int64)
    for b, toks in enumerate(token_lists):
        ids[b, width - len(toks) :] = toks
        mask[b, width - len(toks) :] = 1
    return ids, mask


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """cumsum(mask) - 1, with padded positions set to 1 (what HF generate and the graph do)."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def hf_reference_logits(hf_model, ids: np.ndarray, mask: np.ndarray, decode_tokens: np.ndarray):
    """Prefill `ids`, then feed `decode_tokens[:, j]` one at a time with the KV cache.

    Returns a list of float32 logits arrays: [B, T, V] for the prefill, then [B, 1, V] per step.
    """
    import torch

    out_logits = []
    with torch.no_grad():
        m = torch.from_numpy(mask)
        pos = torch.from_numpy(position_ids_from_mask(mask))
        out = hf_model(
            input_ids=torch.from_numpy(ids), attention_mask=m, position_ids=pos, use_cache=True
        )
        out_logits.append(out.logits.float().numpy())
        past = out.past_key_values
        for j in range(decode_tokens.shape[1]):
            m = torch.cat([m, torch.ones((m.shape[0], 1), dtype=m.dtype)], dim=1)
            pos = torch.from_numpy(position_ids_from_mask(m.numpy())[:, -1:])
            out = hf_model(
                input_ids=torch.from_numpy(decode_tokens[:, j : j + 1]),
                attention_mask=m,
                position_ids=pos,
                past_key_values=past,
                use_cache=True,
            )
            out_logits.append(out.logits.float().numpy())
            past = out.past_key_values
    return out_logits


def onnx_session(onnx_path, threads: int = 1, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def onnx_prefill_decode_logits(session, ids: np.ndarray, mask: np.ndarray, decode_tokens: np.ndarray):
    """Same schedule as `hf_reference_logits`, through an llmfold/genai-style ONNX session.

    Also returns the present KV arrays of the last step (dict name → array).
    """
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = sorted(n for n in inputs if n.startswith("past_key_values."))
    B = ids.shape[0]
    feeds = {"input_ids": ids, "attention_mask": mask}
    for n in past_names:
        kv_heads, head_dim = inputs[n].shape[1], inputs[n].shape[3]
        feeds[n] = np.zeros((B, kv_heads, 0, head_dim), np.float32)
    out_names = [o.name for o in session.get_outputs()]
    logits = []
    for j in range(decode_tokens.shape[1] + 1):
        outs = dict(zip(out_names, session.run(None, feeds)))
        logits.append(outs["logits"])
        if j == decode_tokens.shape[1]:
            break
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        feeds = {"input_ids": decode_tokens[:, j : j + 1], "attention_mask": mask}
        for n in past_names:
            feeds[n] = outs[n.replace("past_key_values.", "present.")]
    presents = {n: a for n, a in outs.items() if n.startswith("present.")}
    return logits, presents


def files_digest(directory) -> dict[str, str]:
    """sha256 of every file under `directory` (relative path → hex), for determinism tests."""
    import hashlib

    directory = Path(directory)
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def compile_recipe_text(src, tmp, name: str, text: str, calib=None) -> Path:
    """Compile model directory `src` into tmp/name with the recipe TOML `text` (quietly)."""
    from compiler.driver import compile_model

    recipe = Path(tmp) / f"{name}.toml"
    recipe.write_text(text)
    return compile_model(src, Path(tmp) / name, recipe=str(recipe), calib=str(calib) if calib else None, progress=False)


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def heldout_kl(reference_dir, model_dir, windows) -> float:
    """Mean KL(reference ‖ model) per token over the windows, both run by ONNX Runtime."""
    from compiler.runtime import open_session

    ref, lm = open_session(reference_dir, threads=1), open_session(model_dir, threads=1)
    total = 0.0
    for w in windows:
        a, b = ref.prefill_logits(w).astype(np.float64), lm.prefill_logits(w).astype(np.float64)
        la = a - a.max(-1, keepdims=True)
        la -= np.log(np.exp(la).sum(-1, keepdims=True))
        lb = b - b.max(-1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
        total += float((np.exp(la) * (la - lb)).sum(-1).mean())
    return total / len(windows)


__all__ = [
    "compile_recipe_text",
    "make_tiny_llama",
    "make_tiny_export",
    "make_tiny_tokenizer",
    "left_padded_batch",
    "position_ids_from_mask",
    "hf_reference_logits",
    "onnx_session",
    "onnx_prefill_decode_logits",
    "files_digest",
    "heldout_kl",
]


if __name__ == "__main__":  # pragma: no cover - manual use: python -m compiler.testing DIR
    import sys

    print(make_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else os.path.join("build", "tiny_hf")))
