"""Calibration: seeded token windows of a text, and streamed statistics of graph values
(the inputs X of linear layers) collected by running the model in ONNX Runtime.

Windows. The text is tokenized once with the model's tokenizer, no special tokens added, giving
t_0 … t_{N-1}. With rng = numpy.random.default_rng(seed), W start offsets s_w are drawn uniformly
from {0, …, N−T} (rng.integers(0, N−T+1, W)) and window w is t_{s_w} … t_{s_w+T−1}. Same text,
tokenizer, W, T and seed ⇒ the same windows.

Taps. The requested values are added as extra graph outputs of a copy of the model (the copy
holds no weights: it is serialized without its external data and ORT reads the initializers
from the original model's folder), and only those outputs are requested, so ORT runs just the
part of the graph they depend on. Each window runs on its own as a prefill with an empty KV
cache (batch 1, attention_mask all ones), and each tapped value of shape [1, T, K] (or [T, K])
is streamed into an `InputStats`: XᵀX (float64 [K,K]), Σx, per-channel absmax and optional
reservoir samples. Memory is bounded by Σ_values (8K² + 12K + 4·max_samples·K) bytes for the
statistics plus one window's tapped activations (Σ_values 4·T·K bytes), whatever the text size;
the bound is printed before running.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from compiler.errors import UserError
from compiler.stats import InputStats


def calibration_windows(model_dir, text_path=None, num_windows: int = 32, seq_len: int = 512, seed: int = 0,
                        disjoint: bool = False) -> np.ndarray:
    """[num_windows, seq_len] int64 token windows of the text (default: the calibration fortunes).

    disjoint: no two windows share a token (they are distinct slots of a seq_len grid), so some of
    them can serve as held-out windows for the others."""
    if num_windows < 1 or seq_len < 1:
        raise UserError(f"calibration needs at least one window of at least one token (got {num_windows} windows of {seq_len})")
    if text_path is None:
        from compiler.textdata import default_calibration_text

        text_path = default_calibration_text()
    text_path = Path(text_path)
    if not text_path.is_file():
        raise UserError(f"calibration text {text_path} does not exist; pass an existing text file to --calib")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise UserError(f"cannot load the tokenizer of {model_dir}: {' '.join(str(e).split())[:200]}; re-export the model directory") from e
    tok.model_max_length = 1 << 60  # the whole text is tokenized at once, then windowed
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    if len(ids) < seq_len:
        raise UserError(
            f"calibration text {text_path} has {len(ids)} tokens but one window needs {seq_len}; "
            "pass a longer text with --calib or lower the recipe's calibration seq_len"
        )
    rng = np.random.default_rng(seed)
    if disjoint:
        slots = len(ids) // seq_len
        if slots < num_windows:
            raise UserError(
                f"calibration text {text_path} has {len(ids)} tokens: {slots} disjoint windows of {seq_len}, "
                f"{num_windows} needed; pass a longer text with --calib or ask for fewer windows"
            )
        starts = rng.choice(slots, size=num_windows, replace=False) * seq_len
    else:
        starts = rng.integers(0, len(ids) - seq_len + 1, size=num_windows)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int64)


def _value_types(model) -> dict[str, tuple[int, list]]:
    """name → (elem_type, dims) for values whose type is known (graph I/O, value_info, inference)."""
    import onnx

    known = {}

    def take(vis):
        for vi in vis:
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] if t.HasField("shape") else None
                known[vi.name] = (t.elem_type, dims)

    take(model.graph.input)
    take(model.graph.output)
    take(model.graph.value_info)
    try:
        try:
            from compiler.custom_ops import register_schemas

            register_schemas()
        except Exception:
            pass  # schemas only matter for graphs with llmfold ops; inference then just knows less
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
        take(inferred.graph.value_info)
    except Exception:
        pass
    return known


def _consumer_K(model, name: str) -> int | None:
    """K of a value read as the A input of a MatMul/Gemm whose B is an initializer [K, N]."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx") and len(n.input) > 1 and n.input[0] == name:
            dims = inits.get(n.input[1])
            if dims and len(dims) == 2:
                trans = any(a.name == "transB" and a.i for a in n.attribute)
                return dims[1] if trans else dims[0]
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def memory_bound(Ks: dict[str, int], max_samples: int, seq_len: int) -> tuple[int, int]:
    """(statistics bytes, one window's tapped activations bytes) for tapped widths K."""
    stats = sum(8 * K * K + 8 * K + 4 * K + 4 * max_samples * K for K in Ks.values())
    acts = sum(4 * seq_len * K for K in Ks.values())
    return stats, acts


def collect_input_stats(
    onnx_path,
    value_names,
    windows: np.ndarray,
    max_samples: int = 0,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, InputStats]:
    """Run the model on each window (prefill, empty cache) and stream the named values into
    InputStats. Values must be float tensors shaped [B, T, K] or [T, K]; returns name → stats."""
    import onnx

    from compiler.runtime import KVLayout, create_session, dir_kv_dims, prefill_feeds, uses_custom_domain

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"model file {onnx_path} does not exist")
    names = list(dict.fromkeys(value_names))
    windows = np.asarray(windows, np.int64)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be [W, T] with W ≥ 1, got shape {windows.shape}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    unknown = [v for v in names if v not in produced]
    if unknown:
        raise ValueError(f"cannot tap {unknown[:5]}: no node of {onnx_path.name} produces them")

    types = _value_types(model)
    graph_inputs = {i.name for i in model.graph.input}
    existing = {o.name for o in model.graph.output}
    Ks: dict[str, int] = {}
    for v in names:
        elem, dims = types.get(v, (onnx.TensorProto.FLOAT, None))
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.UNDEFINED):
            raise ValueError(f"cannot collect statistics of {v}: it is not a float tensor (elem type {elem})")
        if dims and isinstance(dims[-1], int) and dims[-1] > 0:
            Ks[v] = dims[-1]
        else:
            k = _consumer_K(model, v)
            if k:
                Ks[v] = k
        if v not in existing and v not in graph_inputs:
            vi = onnx.ValueInfoProto()
            vi.name = v
            vi.type.tensor_type.elem_type = elem or onnx.TensorProto.FLOAT
            model.graph.output.append(vi)

    W, T = windows.shape

    def print_bound():
        stats_b, acts_b = memory_bound(Ks, max_samples, T)
        print(
            f"calibration: {len(names)} tapped values, {W} windows × {T} tokens; statistics memory bound "
            f"{_fmt_bytes(stats_b)} (Σ 8·K² Gram + 12·K sums/absmax + 4·{max_samples}·K samples, bytes per value) "
            f"+ {_fmt_bytes(acts_b)} of tapped activations per window",
            file=sys.stderr,
        )

    if len(Ks) == len(names):
        print_bound()

    sess = create_session(model.SerializeToString(), threads, uses_custom_domain(model), external_data_dir=onnx_path.parent.resolve())
    layout = KVLayout.from_session(sess, dir_kv_dims(onnx_path.parent))
    fetch = [v for v in names if v not in graph_inputs]
    stats: dict[str, InputStats] = {}

    from compiler.runtime import _progress

    with _progress(progress) as bar:
        task = bar.add_task("calibration", total=W) if bar else None
        for w in range(W):
            feeds = prefill_feeds(layout, windows[w])
            outs = dict(zip(fetch, sess.run(fetch, feeds))) if fetch else {}
            if w == 0 and len(Ks) < len(names):  # widths only known now: print the bound before streaming
                for v in names:
                    Ks.setdefault(v, int(np.asarray(outs[v] if v in outs else feeds[v]).shape[-1]))
                print_bound()
            for v in names:
                x = outs[v] if v in outs else feeds[v]
                x = np.asarray(x)
                if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[0] != 1):
                    raise ValueError(f"tapped value {v} has shape {x.shape}; expected [1, T, K] or [T, K]")
                if v not in stats:
                    st = InputStats(K=x.shape[-1], max_samples=max_samples)
                    st._rng = np.random.default_rng(seed)
                    stats[v] = st
                stats[v].update(x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False))
            if bar:
                bar.advance(task)
    return stats
