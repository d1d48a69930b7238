"""Running a model directory in ONNX Runtime: perplexity (`llmfold eval`) and greedy generation
(`llmfold generate`), with the KV cache of onnxruntime-genai's I/O convention.

Graph I/O: inputs `input_ids` [B,S] int64, `attention_mask` [B,total] int64, optionally
`position_ids` [B,S] int64, `past_key_values.{i}.key/value` [B,kv_heads,past_i,head_dim];
outputs `logits` [B,S,V] and `present.{i}.key/value` [B,kv_heads,total_i,head_dim]. Compiled
models may have the input `logits_to_keep` [1] int64 with a default of 0 (every row;
passes/logits.py): generation feeds 1 and gets the last row only.

The decode loop never assumes that layers hold equally long caches: each layer's present is
fed back as that layer's past (as OrtValues, without a copy through numpy), and the attention
mask is grown by `next_attention_mask`, the one place that defines the mask rule. This is what
lets a token-pruned model ("kv_cache": "per-layer" in llmfold.json) run in the same loop.

Perplexity (the standard definition, as in Hugging Face's perplexity guide with stride =
window): tokenize the whole text once without special tokens, giving t_0 … t_{N-1}; cut
W = min(windows, ⌊N / T⌋) consecutive non-overlapping windows of T = seq_len tokens from token 0;
score each window on its own (empty KV cache), so token j of a window is predicted from tokens
0 … j-1 of the same window only; then
    NLL = (1 / (W·(T-1))) · Σ_w Σ_{j=1}^{T-1} −log softmax(logits_w[j-1])[t_w,j]
    perplexity = exp(NLL).
Every window contributes T-1 predicted tokens (its first token has no context).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from compiler.errors import UserError

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bfloat16)": np.float32,  # not produced by llmfold; numpy has no bfloat16
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------
# ONNX Runtime 1.31's CPU GroupQueryAttention takes a tiled online-softmax ("flash") path for
# prompts of more than one token unless this variable is set. On a 2-vCPU Intel Xeon VM
# (AVX-512) the materialized path it replaces is faster: SmolLM2 prefill of 512 tokens 1365 vs
# 1058 tok/s (w4a8) and 874 vs 747 (fp32 export), 1024 tokens 1153 vs 815, decode 298 vs 272
# tok/s; logits agree to 4e-4 in fp32 (not measured on an AVX2-only machine). ORT reads it when
# a session builds its kernels, so importing this module sets it (unless the user did); it holds
# for the whole process, including onnxruntime-genai sessions created in it. Set it to 0 to get
# ORT's default back.
GQA_FLASH_ENV = "ORT_GQA_DISABLE_FLASH_ATTENTION"
os.environ.setdefault(GQA_FLASH_ENV, "1")


def session_options(threads: int | None = None, custom_ops: bool = False):
    """ORT SessionOptions: intra-op threads = `threads` (ORT's default when None), inter-op 1,
    and llmfold's custom op library registered when `custom_ops` is true."""
    import onnxruntime as ort

    if custom_ops:
        from compiler import custom_ops as cops

        try:
            so = cops.make_session_options(threads)
        except FileNotFoundError as e:  # library not built
            raise UserError(" ".join(str(e).split())) from e
        except Exception as e:  # ORT refused to load it (wrong platform, missing symbols)
            raise UserError(f"cannot load llmfold's custom op library: {' '.join(str(e).split())[:300]}; rebuild it with `make setup`") from e
    else:
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # errors only: ORT warns on every load that an input with a default (logits_to_keep,
    # passes/logits.py) is not a constant, which is the point of it
    so.log_severity_level = 3
    return so


def create_session(model, threads: int | None = None, custom_ops: bool = False, external_data_dir: Path | None = None):
    """An InferenceSession on the CPU for a model path or serialized model bytes.

    `external_data_dir`: where external initializers live when `model` is bytes."""
    import onnxruntime as ort

    so = session_options(threads, custom_ops)
    if external_data_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented…)
        where = "the model" if isinstance(model, bytes) else str(model)
        raise UserError(f"ONNX Runtime cannot load {where}: {' '.join(str(e).split())[:400]}; re-export or recompile it") from e


def uses_custom_domain(model_proto) -> bool:
    """True when any node (main graph or functions) is in the `llmfold` domain."""
    if any(n.domain == "llmfold" for n in model_proto.graph.node):
        return True
    return any(n.domain == "llmfold" for f in model_proto.functions for n in f.node)


@dataclass
class KVLayout:
    """Where the KV cache goes in and out of a session, read from its I/O signature."""

    layers: int
    past: list[tuple[str, str]]  # per layer: (key input, value input)
    present: list[tuple[str, str]]  # per layer: (key output, value output)
    kv_heads: list[int]
    head_dim: list[int]
    dtype: type = np.float32
    has_position_ids: bool = False
    inputs: list[str] = field(default_factory=list)

    @staticmethod
    def from_session(sess, config: dict | None = None) -> "KVLayout":
        config = config or {}
        ins = {i.name: i for i in sess.get_inputs()}
        outs = {o.name for o in sess.get_outputs()}
        for need in ("input_ids",):
            if need not in ins:
                raise UserError(f"the model has no `{need}` input; it is not a decoder exported with llmfold/onnxruntime-genai names — re-export it with `llmfold export`")
        if "logits" not in outs:
            raise UserError("the model has no `logits` output; re-export it with `llmfold export`")
        layers = {}
        for name, info in ins.items():
            m = _PAST_RE.match(name)
            if m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = info
        n = len(layers)
        if sorted(layers) != list(range(n)) or any(len(v) != 2 for v in layers.values()):
            raise UserError("the model's past_key_values.{i}.key/value inputs are incomplete; re-export it with `llmfold export`")
        past, present, kvh, hd = [], [], [], []
        dtype = np.float32
        for i in range(n):
            k = layers[i]["key"]
            past.append((f"past_key_values.{i}.key", f"past_key_values.{i}.value"))
            pk, pv = f"present.{i}.key", f"present.{i}.value"
            if pk not in outs or pv not in outs:
                raise UserError(f"the model has no {pk}/{pv} outputs; re-export it with `llmfold export`")
            present.append((pk, pv))
            shape = list(k.shape)
            heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else config.get("num_kv_heads")
            dim = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else config.get("head_dim")
            if heads is None or dim is None:
                raise UserError(f"cannot tell the KV cache shape of layer {i} (symbolic dims {shape}); add num_kv_heads/head_dim to llmfold.json")
            kvh.append(int(heads))
            hd.append(int(dim))
            dtype = _ORT_DTYPES.get(k.type, np.float32)
        return KVLayout(n, past, present, kvh, hd, dtype, "position_ids" in ins, list(ins))

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        feeds = {}
        for i, (k, v) in enumerate(self.past):
            z = np.zeros((batch, self.kv_heads[i], 0, self.head_dim[i]), self.dtype)
            feeds[k] = z
            feeds[v] = z
        return feeds


def prefill_feeds(layout: KVLayout, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs scoring one token window [T] (or [1, T]) from an empty cache."""
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    T = ids.shape[1]
    feeds = {"input_ids": ids}
    if "attention_mask" in layout.inputs:
        feeds["attention_mask"] = next_attention_mask(None, T)
    if layout.has_position_ids:
        feeds["position_ids"] = np.arange(T, dtype=np.int64)[None]
    feeds.update(layout.empty_past(1))
    return feeds


def kv_dims(config: dict | None, hf_config: dict | None) -> dict:
    """num_kv_heads / head_dim from llmfold.json's config, else from config.json (used when the
    graph's KV inputs have symbolic dims, as onnxruntime-genai's builder writes them)."""
    dims = dict(config or {})
    hf = hf_config or {}
    if dims.get("num_kv_heads") is None and hf.get("num_key_value_heads"):
        dims["num_kv_heads"] = hf["num_key_value_heads"]
    if dims.get("head_dim") is None and (hf.get("head_dim") or hf.get("num_attention_heads")):
        dims["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return dims


def _genai_as_hf_config(path: Path) -> dict:
    """The config.json keys the runtime uses, read from onnxruntime-genai's genai_config.json."""
    try:
        m = json.loads(path.read_text())["model"]
    except (OSError, json.JSONDecodeError, KeyError):
        return {}
    d = m.get("decoder", {})
    return {
        "num_key_value_heads": d.get("num_key_value_heads"),
        "head_dim": d.get("head_size"),
        "max_position_embeddings": m.get("context_length"),
        "eos_token_id": m.get("eos_token_id"),
        "bos_token_id": m.get("bos_token_id"),
    }


def dir_kv_dims(directory: Path) -> dict:
    """kv_dims of the llmfold.json / config.json found in `directory` (empty when neither)."""
    out = []
    for name in ("llmfold.json", "config.json"):
        f = Path(directory) / name
        try:
            d = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, json.JSONDecodeError):
            d = {}
        out.append(d.get("config", {}) if name == "llmfold.json" else d)
    return kv_dims(*out)


def next_attention_mask(mask: np.ndarray | None, new_tokens: int, kv_cache: str = "uniform") -> np.ndarray:
    """The attention_mask to feed with `new_tokens` more tokens, given the previous step's mask.

    The mask covers every token position the model has seen (past + new): for a uniform cache
    its length equals each layer's total KV length; for a per-layer (token-pruned) cache it is
    the logical sequence length, from which the model derives positions, while each layer's KV
    length is whatever its present holds. In both cases the rule is: append `new_tokens` ones.
    """
    batch = 1 if mask is None else mask.shape[0]
    ones = np.ones((batch, new_tokens), np.int64)
    if mask is None:
        return ones
    if kv_cache not in ("uniform", "per-layer"):
        raise UserError(f"llmfold.json has kv_cache={kv_cache!r}; this llmfold knows 'uniform' and 'per-layer' — upgrade llmfold")
    return np.concatenate([mask, ones], axis=1)


class LanguageModel:
    """A model directory opened for inference: session, KV layout, tokenizer, config."""

    def __init__(self, model_dir, threads: int | None = None):
        from compiler.modeldir import open_model_dir

        self.dir = open_model_dir(model_dir)
        self.meta = self.dir.meta or {}
        self.config = dict(self.meta.get("config") or {})
        self.kv_cache = self.meta.get("kv_cache", "uniform")
        self.threads = threads
        self.custom_ops = bool(self.meta.get("custom_ops_library"))
        check_packed_layout(self.meta, self.dir.path)
        self.session = create_session(self.dir.onnx_path, threads, self.custom_ops)
        hf = {}
        cfg = Path(self.dir.path) / "config.json"
        if cfg.is_file():
            hf = json.loads(cfg.read_text())
        elif (Path(self.dir.path) / "genai_config.json").is_file():  # an onnxruntime-genai folder
            hf = _genai_as_hf_config(Path(self.dir.path) / "genai_config.json")
        self.hf_config = hf
        self.layout = KVLayout.from_session(self.session, kv_dims(self.config, hf))
        # passes/logits.py: an input with a default; 1 = lm_head on the last position only. One
        # OrtValue for every call (the per-layer-cache decode feeds it at each step).
        self._keep_last = None
        if any(i.name == "logits_to_keep" for i in self.session.get_overridable_initializers()):
            import onnxruntime as ort

            self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self.shared_kv = self._supports_shared_kv()
        self._tokenizer = None
        self.max_positions = int(self.config.get("max_position_embeddings") or hf.get("max_position_embeddings") or 1 << 30)

    def _supports_shared_kv(self) -> bool:
        """Whether decoding may write each step's keys/values in place into one max-length buffer
        per layer (ORT's GroupQueryAttention with past and present bound to the same memory).

        True when every layer's attention is GroupQueryAttention and all layers keep the same
        cache length: llmfold.json's structure says so, or onnxruntime-genai's genai_config.json
        of a foreign folder asks for `past_present_share_buffer`. A token-pruned model keeps
        per-layer caches and decodes with the growing (copying) cache."""
        from compiler.genai_config import shares_kv_buffer

        if self.meta:
            return shares_kv_buffer(self.meta)
        genai = Path(self.dir.path) / "genai_config.json"
        if genai.is_file():
            try:
                return bool(json.loads(genai.read_text())["search"]["past_present_share_buffer"])
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                return False
        return False

    @property
    def keeps_logits(self) -> bool:
        """Whether the model has the `logits_to_keep` input (generation then feeds 1)."""
        return self._keep_last is not None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.dir.path))
            except Exception as e:
                raise UserError(f"cannot load the tokenizer of {self.dir.path}: {' '.join(str(e).split())[:200]}; re-export the model directory") from e
            self._tokenizer.model_max_length = 1 << 60  # whole texts are tokenized at once, then windowed
        return self._tokenizer

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.config, self.hf_config):
            for key in ("eos_token_id", "eos_token_ids", "eos_id", "eos_ids"):
                v = src.get(key)
                if v is None:
                    continue
                ids.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        gen = Path(self.dir.path) / "generation_config.json"
        if gen.is_file():
            v = json.loads(gen.read_text()).get("eos_token_id")
            if v is not None:
                ids.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        if not ids and self._tokenizer is not None and self._tokenizer.eos_token_id is not None:
            ids.add(int(self._tokenizer.eos_token_id))
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], np.int64)

    # -- plain (numpy) calls ------------------------------------------------------------------
    def feeds(self, ids: np.ndarray, mask: np.ndarray, past: dict | None = None, position_start: int = 0) -> dict:
        ids = np.asarray(ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        feeds = {"input_ids": ids}
        if "attention_mask" in self.layout.inputs:
            feeds["attention_mask"] = mask
        if self.layout.has_position_ids:
            pos = np.arange(position_start, position_start + ids.shape[1], dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(pos, ids.shape).copy()
        feeds.update(past if past is not None else self.layout.empty_past(ids.shape[0]))
        return feeds

    def prefill_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [S, V] of one sequence scored from an empty cache."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        mask = next_attention_mask(None, ids.shape[1], self.kv_cache)
        return self.session.run(["logits"], self.feeds(ids, mask))[0][0]

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict]:
        """What generation runs first: the last position's logits [V] and the KV cache of one
        sequence from an empty cache (lm_head on that position only when the model has
        `logits_to_keep`)."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        return self._run_ortvalues(ids, next_attention_mask(None, ids.shape[1], self.kv_cache), self._empty_past(), 0)

    def _empty_past(self) -> dict:
        import onnxruntime as ort

        return {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.layout.empty_past(1).items()}

    # -- KV-cached decoding with OrtValues ----------------------------------------------------
    def _run_ortvalues(self, ids: np.ndarray, mask: np.ndarray, past: dict, position_start: int):
        import onnxruntime as ort

        feeds = {}
        for name, arr in self.feeds(ids, mask, past={}, position_start=position_start).items():
            feeds[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        if self._keep_last is not None:  # only the last row is read below
            feeds["logits_to_keep"] = self._keep_last
        feeds.update(past)
        names = ["logits"] + [n for pair in self.layout.present for n in pair]
        outs = self.session.run_with_ort_values(names, feeds)
        logits = outs[0].numpy()[0, -1]
        new_past = {}
        for i, (k, v) in enumerate(self.layout.past):
            new_past[k] = outs[1 + 2 * i]
            new_past[v] = outs[2 + 2 * i]
        return logits, new_past

    def _shared_kv_buffers(self, present: dict, capacity: int) -> dict:
        """One [1, kv_heads, capacity, head_dim] OrtValue per past input, holding the prefill's
        present in its first rows (the rest zero: GQA reads only the first seqlens_k + 1 rows)."""
        import onnxruntime as ort

        buffers = {}
        for i, pair in enumerate(self.layout.past):
            for name in pair:
                rows = present[name].numpy()
                buf = np.zeros((1, self.layout.kv_heads[i], capacity, self.layout.head_dim[i]), self.layout.dtype)
                buf[:, :, : rows.shape[2]] = rows
                buffers[name] = ort.OrtValue.ortvalue_from_numpy(buf)
        return buffers

    def _shared_binding(self, buffers: dict, logits_out):
        """An IOBinding with every past bound to its buffer and every present to the same memory;
        each step only rebinds the token, mask and position inputs."""
        b = self.session.io_binding()
        for name, buf in buffers.items():
            b.bind_ortvalue_input(name, buf)
        b.bind_ortvalue_output("logits", logits_out)
        for (pk, pv), (ok, ov) in zip(self.layout.past, self.layout.present):
            b.bind_ortvalue_output(ok, buffers[pk])
            b.bind_ortvalue_output(ov, buffers[pv])
        return b

    def _run_shared(self, binding, tok: int, mask: np.ndarray, position: int, logits_out) -> np.ndarray:
        """One decode step writing the new keys/values in place (present bound to the past buffer)."""
        for name, arr in self.feeds(np.array([[tok]], np.int64), mask, past={}, position_start=position).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        self.session.run_with_iobinding(binding)
        return logits_out.numpy()[0, -1]

    def greedy(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        eos_ids: set[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        keep_logits: bool = False,
    ) -> dict:
        """Greedy decoding with the KV cache: prefill the prompt, then one token per step.

        When `self.shared_kv` (see `_supports_shared_kv`), the prefill's cache is copied once into
        buffers sized for the whole generation and every step appends its row in place, as
        onnxruntime-genai's `past_present_share_buffer` does; otherwise each step's present (past
        + one row) becomes the next past. Both give the same logits.

        Returns {"tokens": generated ids (eos included when hit), "prefill_s", "step_s": [seconds
        of each decode step], "stopped_at_eos"} (+ "logits": the [V] logits behind each token
        when `keep_logits`). Timing covers the ORT call and argmax only."""
        import onnxruntime as ort

        prompt_ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
        eos_ids = eos_ids or set()
        past = self._empty_past()
        mask = next_attention_mask(None, prompt_ids.shape[1], self.kv_cache)
        t0 = time.perf_counter()
        logits, past = self._run_ortvalues(prompt_ids, mask, past, 0)
        tok = int(np.argmax(logits))
        prefill_s = time.perf_counter() - t0
        tokens, steps = [tok], []
        kept = [logits.copy()] if keep_logits else None
        seen = prompt_ids.shape[1]
        stopped = tok in eos_ids
        if on_token:
            on_token(tok)
        shared = self.shared_kv and not stopped and max_new_tokens > 1
        if shared:
            past = self._shared_kv_buffers(past, seen + max_new_tokens)
            out_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
            logits_out = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, logits.shape[-1]), _ORT_DTYPES.get(out_type, np.float32)))
            binding = self._shared_binding(past, logits_out)
        while not stopped and len(tokens) < max_new_tokens:
            t0 = time.perf_counter()
            mask = next_attention_mask(mask, 1, self.kv_cache)
            if shared:
                logits = self._run_shared(binding, tok, mask, seen, logits_out)
            else:
                logits, past = self._run_ortvalues(np.array([[tok]], np.int64), mask, past, seen)
            tok = int(np.argmax(logits))
            steps.append(time.perf_counter() - t0)
            if keep_logits:
                kept.append(logits.copy())
            seen += 1
            tokens.append(tok)
            stopped = tok in eos_ids
            if on_token:
                on_token(tok)
        out = {"tokens": tokens, "prefill_s": prefill_s, "step_s": steps, "stopped_at_eos": stopped}
        if keep_logits:
            out["logits"] = np.stack(kept)
        return out


def stale_packed_layout(meta: dict) -> bool:
    """Whether a compiled model's QMatMul weights use a packed layout this llmfold's op library no
    longer reads (before fp16 block scales: no "packed_layout" in llmfold.json)."""
    from compiler.custom_ops import PACKED_LAYOUT

    return bool(meta.get("custom_ops_library") and meta.get("passes")
                and meta.get("packed_layout", 1) != PACKED_LAYOUT)


def check_packed_layout(meta: dict, where) -> None:
    """UserError naming the fix when :func:`stale_packed_layout`."""
    from compiler.custom_ops import PACKED_LAYOUT

    if stale_packed_layout(meta):
        raise UserError(f"{where} was compiled with packed layout {meta.get('packed_layout', 1)} (float32 block scales); "
                        f"this llmfold reads layout {PACKED_LAYOUT} (float16 scales): compile it again with llmfold compile")


def open_session(model_dir, threads: int | None = None) -> LanguageModel:
    """Open a model directory for inference (custom op library loaded when llmfold.json names one)."""
    return LanguageModel(model_dir, threads)


# --------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------
def window_nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 128) -> tuple[float, int]:
    """Σ_{j≥1} −log softmax(logits[j-1])[ids[j]] in float64, and the count (len(ids) − 1)."""
    logits = np.asarray(logits)
    ids = np.asarray(ids, np.int64).reshape(-1)
    total = 0.0
    for s in range(0, len(ids) - 1, chunk):
        e = min(s + chunk, len(ids) - 1)
        z = logits[s:e].astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
        total += float((lse - z[np.arange(e - s), ids[s + 1 : e + 1]]).sum())
    return total, len(ids) - 1


def _read_text(text) -> tuple[str, str]:
    """(content, label) for a path, a str path, or None (the default held-out fortunes)."""
    if text is None:
        from compiler.textdata import default_eval_text

        p = default_eval_text()
        return p.read_text(encoding="utf-8"), str(p)
    p = Path(text)
    if not p.is_file():
        raise UserError(f"evaluation text {p} does not exist; pass an existing text file to --text")
    return p.read_text(encoding="utf-8", errors="replace"), str(p)


def evaluate(
    model_dir,
    text=None,
    seq_len: int = 512,
    windows: int = 8,
    speed: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of the model on `text` (a file path; default: the held-out fortunes), see the
    module docstring for the definition; with `speed`, also prefill and decode throughput.

    Returns {"perplexity", "nll", "tokens" (scored window tokens W·T), "predicted_tokens"
    (W·(T−1)), "text_tokens", "windows", "seq_len", "text"} and, with speed, "prefill_tok_s"
    (tokens / median time of a prefill of min(512, max positions) tokens, 3 runs after a warm-up)
    and "decode_tok_s" (1 / median time of 64 greedy KV-cached steps after a 16-token prompt)."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too short; use at least 2 tokens per window")
    if windows < 1:
        raise UserError(f"--windows {windows} must be at least 1")
    content, label = _read_text(text)
    lm = open_session(model_dir, threads)
    if lm.kv_cache == "per-layer":
        raise UserError(
            f"{model_dir} prunes prompt tokens, so plain perplexity is not defined on it; "
            "use --continuation --reference UNPRUNED_DIR"
        )
    if seq_len > lm.max_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's {lm.max_positions} positions; use --seq-len {lm.max_positions} or less")
    ids = lm.encode(content)
    n_win = min(windows, len(ids) // seq_len)
    if n_win == 0:
        raise UserError(
            f"the text {label} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
            "pass a longer text or a smaller --seq-len"
        )
    total, count = 0.0, 0
    with _progress(progress) as bar:
        task = bar.add_task("perplexity", total=n_win) if bar else None
        for w in range(n_win):
            win = ids[w * seq_len : (w + 1) * seq_len]
            nll, n = window_nll(lm.prefill_logits(win), win)
            total += nll
            count += n
            if bar:
                bar.advance(task)
    mean = total / count
    result = {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": n_win * seq_len,
        "predicted_tokens": count,
        "text_tokens": int(len(ids)),
        "windows": n_win,
        "seq_len": seq_len,
        "text": label,
    }
    if speed:
        result.update(measure_speed(lm, ids))
    return result


def measure_speed(lm: LanguageModel, ids: np.ndarray, prefill_len: int = 512, prompt_len: int = 16, steps: int = 64, runs: int = 3) -> dict:
    """prefill_tok_s = P / median(prefill seconds) over `runs` after one warm-up, P = min(512,
    max positions), a prefill being what generation runs first (`LanguageModel.prefill`: the
    cache and the last position's logits); decode_tok_s = 1 / median(step seconds) over `steps`
    greedy cached steps."""
    P = min(prefill_len, lm.max_positions)
    pool = np.resize(np.asarray(ids, np.int64), max(P, prompt_len))  # repeats a short text
    lm.prefill(pool[:P])  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        lm.prefill(pool[:P])
        times.append(time.perf_counter() - t0)
    steps = max(1, min(steps, lm.max_positions - prompt_len))
    lm.greedy(pool[:prompt_len], 4)  # warm-up of the cached path
    g = lm.greedy(pool[:prompt_len], steps + 1)  # +1: the first token comes from the prefill
    return {
        "prefill_tok_s": P / statistics.median(times),
        "prefill_tokens": P,
        "decode_tok_s": 1.0 / statistics.median(g["step_s"]),
        "decode_steps": len(g["step_s"]),
    }


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
class _TextStreamer:
    """Writes the decoded continuation as it grows (holding back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer, stream):
        self.tok, self.stream, self.ids, self.printed = tokenizer, stream, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.stream is None:
            return
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.printed):
            self.stream.write(text[len(self.printed) :])
            self.stream.flush()
            self.printed = text

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


def generate(
    model_dir,
    prompt: str,
    max_new_tokens: int = 64,
    threads: int | None = None,
    stream=sys.stdout,
    chat: bool = False,
) -> dict:
    """Greedy generation with the KV cache, streaming the decoded text to `stream` (None: quiet).

    The prompt is tokenized as the tokenizer does by default (its special tokens, e.g. BOS,
    included), or with the model's chat template when `chat`. Stops at an eos id or after
    `max_new_tokens`. Returns {"prompt_tokens", "tokens", "text", "stopped_at_eos",
    "prefill_tok_s" (prompt tokens / prefill seconds), "decode_tok_s" (decode steps / their
    seconds)} and prints the speeds on stderr."""
    if not prompt:
        raise UserError("the prompt is empty; pass some text with --prompt")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    lm = open_session(model_dir, threads)
    tok = lm.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise UserError(f"the tokenizer of {lm.dir.path} has no chat template; drop --chat")
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        prompt_ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    else:
        prompt_ids = tok(prompt)["input_ids"]
    prompt_ids = np.asarray(prompt_ids, np.int64).reshape(-1)
    if len(prompt_ids) + max_new_tokens > lm.max_positions:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"{lm.max_positions} positions; shorten the prompt or lower --max-new-tokens"
        )
    streamer = _TextStreamer(tok, stream)
    g = lm.greedy(prompt_ids, max_new_tokens, lm.eos_ids(), streamer)
    steps = g["step_s"]
    out = {
        "prompt_tokens": prompt_ids.tolist(),
        "tokens": g["tokens"],
        "text": streamer.text(),
        "stopped_at_eos": g["stopped_at_eos"],
        "prefill_tok_s": len(prompt_ids) / g["prefill_s"],
        "decode_tok_s": (len(steps) / sum(steps)) if steps else None,
    }
    if stream is not None:
        stream.write("\n")
        stream.flush()
    dec = f"{out['decode_tok_s']:.1f} tok/s decode" if steps else "no decode steps"
    print(
        f"[{len(g['tokens'])} new tokens; prefill {len(prompt_ids)} tokens at {out['prefill_tok_s']:.1f} tok/s; {dec}]",
        file=sys.stderr,
    )
    return out


# --------------------------------------------------------------------------------------------
# CLI adapters (compiler/cli.py builds the parsers with add_*_arguments and calls *_main)
# --------------------------------------------------------------------------------------------
def _progress(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip


def add_eval_arguments(p) -> None:
    p.add_argument("dir", help="model directory")
    p.add_argument("--text", default=None, help="text file (default: held-out Debian fortunes, see compiler/textdata.py)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=8, help="at most this many windows (default 8)")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tok/s")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_generate_arguments(p) -> None:
    p.add_argument("dir", help="model directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")


def _dir_arg(args):
    for name in ("dir", "model_dir", "path"):
        v = getattr(args, name, None)
        if v is not None:
            return v
    raise UserError("no model directory given")


def eval_main(args) -> int:
    """`llmfold eval DIR [--text FILE] [--seq-len N] [--windows N] [--speed] [--threads N] [--json]`."""
    as_json = bool(getattr(args, "json", False))
    if getattr(args, "continuation", False):
        return _continuation_main(args, as_json)
    if getattr(args, "reference", None):
        raise UserError("--reference is only used with --continuation; add --continuation or drop --reference")
    r = evaluate(
        _dir_arg(args),
        text=getattr(args, "text", None),
        seq_len=getattr(args, "seq_len", 512),
        windows=getattr(args, "windows", 8),
        speed=bool(getattr(args, "speed", False)),
        threads=getattr(args, "threads", None),
        progress=not as_json and sys.stderr.isatty(),
    )
    if as_json:
        print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"llmfold eval {_dir_arg(args)}"), show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right", overflow="fold")
    t.add_row("perplexity", f"{r['perplexity']:.4f}")
    t.add_row("mean NLL (nats)", f"{r['nll']:.5f}")
    t.add_row("windows × seq_len", f"{r['windows']} × {r['seq_len']}")
    t.add_row("tokens scored / in text", f"{r['tokens']} / {r['text_tokens']}")
    if "prefill_tok_s" in r:
        t.add_row(f"prefill tok/s ({r['prefill_tokens']} tokens)", f"{r['prefill_tok_s']:.1f}")
        t.add_row("decode tok/s", f"{r['decode_tok_s']:.1f}")
    t.add_row("text", escape(r["text"]))
    Console().print(t)
    return 0


def _continuation_main(args, as_json: bool) -> int:
    """`llmfold eval PRUNED --continuation --reference DIR`: see compiler.continuation."""
    from compiler.continuation import evaluate_continuation

    if not getattr(args, "reference", None):
        raise UserError("--continuation needs --reference DIR: the same model without token pruning")
    r = evaluate_continuation(
        _dir_arg(args),
        args.reference,
        text=getattr(args, "text", None),
        windows=getattr(args, "windows", 4),
        threads=getattr(args, "threads", None),
        progress=not as_json and sys.stderr.isatty(),
    )
    if as_json:
        print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"llmfold eval --continuation {_dir_arg(args)} vs {args.reference}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in (
        "continuation_perplexity",
        "reference_continuation_perplexity",
        "top1_agreement",
        "prefill_speedup",
        "kv_bytes_saved_fraction",
    ):
        t.add_row(key, f"{r[key]:.4f}")
    Console().print(t)
    return 0


def generate_main(args) -> int:
    """`llmfold generate DIR --prompt TEXT [--max-new-tokens N] [--threads N] [--chat]`."""
    generate(
        _dir_arg(args),
        args.prompt,
        max_new_tokens=getattr(args, "max_new_tokens", 64),
        threads=getattr(args, "threads", None),
        chat=bool(getattr(args, "chat", False)),
    )
    return 0
