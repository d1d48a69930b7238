"""A fair metric for token pruning: score a continuation through the (pruned) KV cache.

Agile-Quant's paper reports perplexity with the labels of pruned tokens dropped, i.e. on fewer and
easier tokens, which is not comparable with the unpruned model. Here the pruned model is used the
way it is deployed: it prefills a context (pruning it), and the tokens that follow are scored
teacher-forced, one decode step at a time through the per-layer KV cache (decode steps prune
nothing). The same schedule runs on the reference (the same model unpruned), so both models are
scored on exactly the same tokens.

    evaluate_continuation(pruned_dir, reference_dir, text, context_len=512, continuation_len=64,
                          windows=4, threads=None) -> dict

Tokenize the whole text once (no special tokens, the pruned model's tokenizer); cut W = min(windows,
⌊N / (C + M)⌋) consecutive non-overlapping windows of C + M tokens from token 0 (C = context_len,
M = continuation_len). In each window the first C tokens are the context c, the next M the
continuation u_0 … u_{M−1}:

    prefill c                      → logits of the last context row predict u_0
    decode u_0, …, u_{M−2} (1 each) → their logits predict u_1 … u_{M−1}

    continuation_perplexity = exp(mean over all W·M scored tokens of −log p(u_j | c, u_<j))
    top1_agreement          = fraction of the W·M positions where argmax(pruned) = argmax(reference)
    prefill_speedup         = median(reference prefill s) / median(pruned prefill s), prefill of the
                              first window's context, `speed_runs` interleaved runs after a warm-up
    kv_bytes_saved_fraction = 1 − (KV bytes of all layers after the pruned prefill) / (reference's)
    kv_bytes_saved_fraction_pruned_layers = the same over the layers whose cache the pass pruned

Each layer's present is fed back as that layer's past (KV lengths may differ per layer); the
attention_mask covers the logical sequence (every token seen), see runtime.next_attention_mask.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from compiler.errors import UserError


class _CachedRunner:
    """Prefill + one-token decode steps of one model directory, with per-layer KV lengths."""

    def __init__(self, lm):
        self.lm = lm
        self.layout = lm.layout
        self.out_names = ["logits"] + [n for pair in self.layout.present for n in pair]
        self.itemsize = np.dtype(self.layout.dtype).itemsize

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: dict, position_start: int):
        import onnxruntime as ort

        feeds = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
            for name, arr in self.lm.feeds(ids, mask, past={}, position_start=position_start).items()
        }
        feeds.update(past)
        outs = self.lm.session.run_with_ort_values(self.out_names, feeds)
        logits = outs[0].numpy()[0, -1].astype(np.float64)
        new_past = {}
        for i, (k, v) in enumerate(self.layout.past):
            new_past[k] = outs[1 + 2 * i]
            new_past[v] = outs[2 + 2 * i]
        return logits, new_past

    def empty_past(self) -> dict:
        import onnxruntime as ort

        return {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.layout.empty_past(1).items()}

    def prefill(self, context: np.ndarray):
        from compiler.runtime import next_attention_mask

        context = np.asarray(context, np.int64).reshape(1, -1)
        mask = next_attention_mask(None, context.shape[1], self.lm.kv_cache)
        logits, past = self._run(context, mask, self.empty_past(), 0)
        return logits, past, mask

    def kv_lengths(self, past: dict) -> list[int]:
        return [int(past[k].shape()[2]) for k, _ in self.layout.past]

    def kv_bytes(self, past: dict) -> list[int]:
        out = []
        for k, v in self.layout.past:
            out.append(sum(int(np.prod(past[n].shape())) * self.itemsize for n in (k, v)))
        return out

    def teacher_forced(self, context: np.ndarray, continuation: np.ndarray):
        """Log-probabilities of each continuation token and the argmax at each position."""
        from compiler.runtime import next_attention_mask

        logits, past, mask = self.prefill(context)
        kv = self.kv_bytes(past), self.kv_lengths(past)
        logps, argmax = [], []
        seen = len(context)
        for j, tok in enumerate(continuation):
            m = logits.max()
            lse = m + math.log(np.exp(logits - m).sum())
            logps.append(float(logits[tok] - lse))
            argmax.append(int(np.argmax(logits)))
            if j + 1 == len(continuation):
                break
            mask = next_attention_mask(mask, 1, self.lm.kv_cache)
            logits, past = self._run(np.array([[tok]], np.int64), mask, past, seen)
            seen += 1
        return np.array(logps), np.array(argmax), kv


def _pruned_layers(meta: dict) -> list[int] | None:
    for p in meta.get("passes", []) or []:
        for rec in p.get("records", []) or []:
            if "layers_with_pruned_kv" in rec:
                return [int(i) for i in rec["layers_with_pruned_kv"]]
    return None


def evaluate_continuation(
    pruned_dir,
    reference_dir,
    text=None,
    context_len: int = 512,
    continuation_len: int = 64,
    windows: int = 4,
    threads: int | None = None,
    speed_runs: int = 5,
    progress: bool = False,
) -> dict:
    """Continuation metrics of `pruned_dir` against `reference_dir` (see the module docstring).

    Returns {"continuation_perplexity", "reference_continuation_perplexity", "perplexity_ratio",
    "top1_agreement", "prefill_speedup", "kv_bytes_saved_fraction",
    "kv_bytes_saved_fraction_pruned_layers", "pruned_prefill_s", "reference_prefill_s",
    "kv_lengths", "reference_kv_lengths", "scored_tokens", "windows", "context_len",
    "continuation_len", "text"}."""
    from compiler.runtime import _progress, _read_text, open_session

    if context_len < 3:
        raise UserError(f"context length {context_len} is too short; use at least 3 tokens (pruning keeps 2 always)")
    if continuation_len < 1:
        raise UserError(f"continuation length {continuation_len} must be at least 1")
    if windows < 1:
        raise UserError(f"--windows {windows} must be at least 1")
    if speed_runs < 1:
        raise UserError(f"speed_runs {speed_runs} must be at least 1")
    content, label = _read_text(text)
    pruned = open_session(pruned_dir, threads)
    reference = open_session(reference_dir, threads)
    if pruned.layout.layers != reference.layout.layers:
        raise UserError(
            f"{pruned_dir} has {pruned.layout.layers} layers and the reference {reference_dir} "
            f"{reference.layout.layers}; pass the unpruned model the pruned one was compiled from as --reference"
        )
    span = context_len + continuation_len
    for lm, d in ((pruned, pruned_dir), (reference, reference_dir)):
        if span > lm.max_positions:
            raise UserError(f"context + continuation ({span} tokens) exceeds the {lm.max_positions} positions of {d}; use a shorter context")
    ids = pruned.encode(content)
    ref_ids = reference.encode(content)
    if not np.array_equal(ids, ref_ids):
        raise UserError(f"{pruned_dir} and the reference {reference_dir} tokenize the text differently; pass the model it was compiled from")
    n_win = min(windows, len(ids) // span)
    if n_win == 0:
        raise UserError(
            f"the text {label} has {len(ids)} tokens, fewer than one window of {context_len} context + "
            f"{continuation_len} continuation tokens; pass a longer text or shorter lengths"
        )
    runners = _CachedRunner(pruned), _CachedRunner(reference)
    logp = ([], [])
    top = ([], [])
    kv = [None, None]
    with _progress(progress) as bar:
        task = bar.add_task("continuation", total=n_win) if bar else None
        for w in range(n_win):
            win = ids[w * span : (w + 1) * span]
            ctx, cont = win[:context_len], win[context_len:]
            for m, runner in enumerate(runners):
                lp, am, kvinfo = runner.teacher_forced(ctx, cont)
                logp[m].append(lp)
                top[m].append(am)
                if kv[m] is None:
                    kv[m] = kvinfo
            if bar:
                bar.advance(task)

    # prefill speed: the first window's context, interleaved, after one warm-up each
    ctx0 = ids[:context_len]
    times = ([], [])
    for runner in runners:
        runner.prefill(ctx0)
    for _ in range(speed_runs):
        for m, runner in enumerate(runners):
            t0 = time.perf_counter()
            runner.prefill(ctx0)
            times[m].append(time.perf_counter() - t0)

    nll = [-float(np.concatenate(lp).mean()) for lp in logp]
    agree = float(np.mean(np.concatenate(top[0]) == np.concatenate(top[1])))
    (p_bytes, p_len), (r_bytes, r_len) = kv
    layers = _pruned_layers(pruned.meta)
    if layers is None:
        layers = [i for i, (a, b) in enumerate(zip(p_len, r_len)) if a != b]
    pruned_layer_fraction = (
        1.0 - sum(p_bytes[i] for i in layers) / sum(r_bytes[i] for i in layers) if layers else 0.0
    )
    return {
        "continuation_perplexity": math.exp(nll[0]),
        "reference_continuation_perplexity": math.exp(nll[1]),
        "perplexity_ratio": math.exp(nll[0] - nll[1]),
        "top1_agreement": agree,
        "prefill_speedup": statistics.median(times[1]) / statistics.median(times[0]),
        "kv_bytes_saved_fraction": 1.0 - sum(p_bytes) / sum(r_bytes),
        "kv_bytes_saved_fraction_pruned_layers": pruned_layer_fraction,
        "pruned_prefill_s": statistics.median(times[0]),
        "reference_prefill_s": statistics.median(times[1]),
        "kv_lengths": p_len,
        "reference_kv_lengths": r_len,
        "scored_tokens": n_win * continuation_len,
        "windows": n_win,
        "context_len": context_len,
        "continuation_len": continuation_len,
        "text": label,
    }


__all__ = ["evaluate_continuation"]
