"""Benchmark llmfold's compiled models against their peers on one machine, in one run.

    .venv/bin/python samples/bench_models.py [--source smollm2-135m] [--threads 2] [--json]

Builds (cached under build/bench/, rebuilt when the recipe or source changes or with --rebuild)
and measures, with the same number of threads for everybody:

  ours fp32        `llmfold export SOURCE`
  ours <recipe>    `llmfold compile` with samples/recipes/<recipe>.toml (default w4a16, w4a8, w4a4)
  genai fp32/int4  onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder
                   -m HF_DIR -i HF_DIR -o OUT -p fp32|int4 -e cpu -c CACHE`), HF_DIR being the
                   source saved with save_pretrained (GGUF quantizer cleared)
  llama.cpp        the original GGUF through llama-cpp-python, only when `llama_cpp` is importable

Columns:
  perplexity   on held-out text (default: the evaluation fortunes, `compiler.textdata`), the same
               token windows for every model: the text is tokenized once with OUR tokenizer, cut
               into `--windows` consecutive non-overlapping windows of `--seq-len` tokens from
               token 0, each scored from an empty cache (the definition in compiler/runtime.py).
               Ours: `compiler.runtime.evaluate`; genai: its ONNX graph run in onnxruntime with the
               same windows; llama.cpp: its logits for the same token ids (same vocabulary).
  ratio        perplexity / ours fp32
  size         bytes on disk of the model files (model.onnx + external data; the .gguf)
  prefill      tokens/s of one 512-token prefill as generation runs it (median of 3 after a
               warm-up): ours `LanguageModel.prefill` (the KV cache and the last position's
               logits; lm_head on that position only in models with `logits_to_keep`), genai's
               Generator.append_tokens, llama.cpp's eval
  decode       tokens/s of KV-cached greedy steps (median of 64 steps after a 16-token prompt)
Ours are timed with llmfold's runtime (ORT + custom op library), genai with onnxruntime_genai's
Generator (its own runtime), llama.cpp with llama-cpp-python's eval. Importing llmfold's runtime
sets ORT_GQA_DISABLE_FLASH_ATTENTION=1 for the process (compiler/runtime.py, GQA_FLASH_ENV: ORT's
tiled attention is slower here), so genai's models run GroupQueryAttention the same way as ours
in this benchmark; out of the box genai uses the tiled path. Our compiled directories
carry a genai_config.json too, so they are also timed through onnxruntime_genai's Generator —
the same generator loop as genai's own models — in the columns "genai-loop prefill/decode"
(not for token-pruned models: genai keeps one KV length for every layer).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.errors import UserError  # noqa: E402
from compiler.runtime import window_nll  # noqa: E402

PROMPT_LEN, DECODE_STEPS, PREFILL_LEN, RUNS = 16, 64, 512, 3


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def dir_size(path: Path, patterns=("*.onnx", "*.onnx.data", "*.onnx_data", "*.gguf")) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for pat in patterns for p in path.glob(pat))


def _stamp_ok(out: Path, key: str) -> bool:
    stamp = out.parent / f"{out.name}.stamp"
    return out.is_dir() and stamp.is_file() and stamp.read_text() == key


def _write_stamp(out: Path, key: str) -> None:
    (out.parent / f"{out.name}.stamp").write_text(key)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# builds
# --------------------------------------------------------------------------------------------
def build_ours_fp32(source: str, root: Path, rebuild: bool, attention: str | None = None) -> Path:
    from compiler.export import DEFAULT_ATTENTION, export

    attention = attention or DEFAULT_ATTENTION
    out = root / "ours-fp32"
    key = _digest("export", source, attention, (REPO / "compiler" / "export.py").read_bytes())
    if rebuild or not _stamp_ok(out, key):
        shutil.rmtree(out, ignore_errors=True)
        log(f"exporting {source} ({attention} attention) -> {out}")
        export(source, out, progress=False, attention=attention)
        _write_stamp(out, key)
    return out


def build_ours_recipe(fp32_dir: Path, recipe: str, root: Path, threads: int, rebuild: bool) -> tuple[Path, float | None]:
    from compiler.driver import compile_model
    from compiler.recipe import resolve_recipe_path

    path = resolve_recipe_path(recipe)
    out = root / f"ours-{path.stem}"
    passes_code = b"".join(p.read_bytes() for p in sorted((REPO / "passes").glob("*.py")))
    packers = (REPO / "compiler" / "custom_ops.py").read_bytes()  # the packed layouts' writers
    key = _digest("compile", path.read_bytes(), passes_code, packers, (fp32_dir / "llmfold.json").read_bytes())
    seconds = None
    if rebuild or not _stamp_ok(out, key):
        shutil.rmtree(out, ignore_errors=True)
        log(f"compiling {fp32_dir.name} with {path.stem} -> {out}")
        t0 = time.perf_counter()
        compile_model(fp32_dir, out, recipe=str(path), threads=threads, progress=False)
        seconds = time.perf_counter() - t0
        (root / f"{out.name}.compile_seconds").write_text(f"{seconds:.1f}")
        _write_stamp(out, key)
    elif (root / f"{out.name}.compile_seconds").is_file():
        seconds = float((root / f"{out.name}.compile_seconds").read_text())
    return out, seconds


def build_hf_dir(source: str, root: Path, rebuild: bool) -> Path:
    """The source as a plain float32 Hugging Face directory (what genai's builder reads)."""
    from compiler.sources import load_source

    out = root / "hf"
    key = _digest("hf", source)
    if rebuild or not _stamp_ok(out, key):
        shutil.rmtree(out, ignore_errors=True)
        log(f"saving {source} as a Hugging Face directory -> {out}")
        loaded = load_source(source)  # clears the GGUF quantizer
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        _write_stamp(out, key)
    return out


def build_genai(hf_dir: Path, precision: str, root: Path, rebuild: bool) -> Path:
    out = root / f"genai-{precision}"
    hf_stamp = hf_dir.parent / f"{hf_dir.name}.stamp"
    key = _digest("genai", precision, hf_stamp.read_text() if hf_stamp.is_file() else "", (hf_dir / "config.json").read_text())
    if rebuild or not _stamp_ok(out, key):
        shutil.rmtree(out, ignore_errors=True)
        cache = root / "genai-cache"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
               "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
        log("running " + " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not (out / "genai_config.json").is_file():
            raise RuntimeError(f"genai builder failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        _write_stamp(out, key)
    return out


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------
def eval_windows(fp32_dir: Path, text: Path, seq_len: int, windows: int) -> list[np.ndarray]:
    """The token windows everybody is scored on (the definition of compiler.runtime.evaluate)."""
    from compiler.runtime import open_session

    ids = open_session(fp32_dir, threads=1).encode(text.read_text(encoding="utf-8", errors="replace"))
    n = min(windows, len(ids) // seq_len)
    if n == 0:
        raise UserError(f"{text} has {len(ids)} tokens, fewer than one window of {seq_len}")
    return [ids[w * seq_len : (w + 1) * seq_len] for w in range(n)], ids


def measure_ours(model_dir: Path, text: Path, seq_len: int, windows: int, threads: int) -> dict:
    from compiler.runtime import evaluate

    r = evaluate(model_dir, text=text, seq_len=seq_len, windows=windows, speed=True, threads=threads, progress=False)
    return {"perplexity": r["perplexity"], "tokens": r["tokens"], "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}


def runs_in_genai(model_dir: Path) -> bool:
    """A directory with genai_config.json whose passes keep one KV length for every layer."""
    meta = model_dir / "llmfold.json"
    if not (model_dir / "genai_config.json").is_file():
        return False
    if meta.is_file():
        passes = json.loads(meta.read_text()).get("passes", [])
        return not any((p.get("name") if isinstance(p, dict) else p) == "token_prune" for p in passes)
    return True


def with_genai_loop(model_dir: Path, m: dict, ids: np.ndarray, threads: int) -> dict:
    """Add prefill/decode tok/s measured through onnxruntime_genai's Generator when it can run the model."""
    if runs_in_genai(model_dir):
        g = genai_speed(model_dir, ids, threads)
        m = m | {"genai_loop_prefill_tok_s": g["prefill_tok_s"], "genai_loop_decode_tok_s": g["decode_tok_s"]}
    return m


def _set_genai_threads(model_dir: Path, threads: int) -> None:
    cfg_path = model_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = int(threads)
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))


def genai_perplexity(model_dir: Path, wins: list[np.ndarray], threads: int) -> float:
    """Score the windows with genai's ONNX graph in onnxruntime (empty cache, prefill)."""
    import onnxruntime as ort

    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / cfg["filename"]), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    kv_dtype = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32
    empty = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]), kv_dtype)
    total, count = 0.0, 0
    for win in wins:
        T = len(win)
        feeds = {"input_ids": win[None].astype(np.int64), "attention_mask": np.ones((1, T), np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(T, dtype=np.int64)[None]
        for i in range(cfg["num_hidden_layers"]):
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        logits = sess.run(["logits"], feeds)[0][0].astype(np.float32)
        nll, n = window_nll(logits, win)
        total, count = total + nll, count + n
    return math.exp(total / count)


def genai_speed(model_dir: Path, ids: np.ndarray, threads: int) -> dict:
    import onnxruntime_genai as og

    _set_genai_threads(model_dir, threads)
    model = og.Model(str(model_dir))
    pool = np.resize(np.asarray(ids, np.int32), PREFILL_LEN)

    def generator(max_length: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(model, params)

    times = []
    for run in range(RUNS + 1):  # first run is the warm-up
        g = generator(PREFILL_LEN + 8)
        t0 = time.perf_counter()
        g.append_tokens(pool[:PREFILL_LEN])
        if run:
            times.append(time.perf_counter() - t0)
        del g
    g = generator(PROMPT_LEN + DECODE_STEPS + 8)
    g.append_tokens(pool[:PROMPT_LEN])
    for _ in range(4):  # warm-up of the cached path
        g.generate_next_token()
    steps = []
    for _ in range(DECODE_STEPS):
        t0 = time.perf_counter()
        g.generate_next_token()
        steps.append(time.perf_counter() - t0)
    return {"prefill_tok_s": PREFILL_LEN / statistics.median(times), "decode_tok_s": 1.0 / statistics.median(steps)}


def llama_cpp_measure(gguf: Path, wins: list[np.ndarray], ids: np.ndarray, threads: int) -> dict:
    from llama_cpp import Llama

    T = len(wins[0])

    def open_llama(logits_all: bool):
        return Llama(model_path=str(gguf), n_ctx=max(T, PREFILL_LEN, PROMPT_LEN + DECODE_STEPS + 8), n_batch=PREFILL_LEN,
                     n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)

    llm = open_llama(logits_all=True)
    total, count = 0.0, 0
    for win in wins:
        llm.reset()
        llm.eval([int(t) for t in win])
        logits = np.asarray(llm.scores[:T], np.float32)
        nll, n = window_nll(logits, win)
        total, count = total + nll, count + n
    # speed as generation runs: logits of the last position of each eval only
    del llm
    llm = open_llama(logits_all=False)
    pool = [int(t) for t in np.resize(ids, PREFILL_LEN)]
    times = []
    for run in range(RUNS + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(pool[:PREFILL_LEN])
        if run:
            times.append(time.perf_counter() - t0)
    llm.reset()
    llm.eval(pool[:PROMPT_LEN])
    steps = []
    for _ in range(DECODE_STEPS):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t0)
    return {"perplexity": math.exp(total / count), "prefill_tok_s": PREFILL_LEN / statistics.median(times),
            "decode_tok_s": 1.0 / statistics.median(steps)}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m", help="HF dir, .gguf, or the alias smollm2-135m")
    ap.add_argument("--recipes", default="w4a16,w4a8,w4a4", help="comma-separated recipe names or .toml files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", choices=("fused", "explicit"), default=None,
                    help="attention layout of our fp32 export (default: the exporter's default)")
    ap.add_argument("--text", type=Path, default=None, help="held-out text (default: evaluation fortunes)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai's models")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    ap.add_argument("--rebuild", action="store_true", help="rebuild every cached model")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    args = ap.parse_args(argv)

    from compiler.sources import resolve_source
    from compiler.textdata import default_eval_text

    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    text = args.text or default_eval_text()
    resolved = resolve_source(args.source)

    fp32 = build_ours_fp32(args.source, root, args.rebuild, args.attention)
    wins, ids = eval_windows(fp32, text, args.seq_len, args.windows)
    rows: list[dict] = []

    def add(name, path, m, compile_s=None):
        row = {"model": name, "size_bytes": dir_size(path), **m}
        if compile_s is not None:
            row["compile_s"] = round(compile_s, 1)
        rows.append(row)
        log(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "model"))

    log(f"measuring ours fp32 ({len(wins)} windows × {args.seq_len} tokens, {args.threads} threads)")
    loop = (lambda d, m: with_genai_loop(d, m, ids, args.threads)) if not args.no_genai else (lambda d, m: m)
    add("llmfold fp32", fp32, loop(fp32, measure_ours(fp32, text, args.seq_len, args.windows, args.threads)))
    for recipe in [r for r in args.recipes.split(",") if r]:
        out, secs = build_ours_recipe(fp32, recipe, root, args.threads, args.rebuild)
        add(f"llmfold {Path(recipe).stem}", out, loop(out, measure_ours(out, text, args.seq_len, args.windows, args.threads)), secs)

    if not args.no_genai:
        hf = build_hf_dir(args.source, root, args.rebuild)
        for precision in ("fp32", "int4"):
            out = build_genai(hf, precision, root, args.rebuild)
            log(f"measuring genai {precision}")
            m = {"perplexity": genai_perplexity(out, wins, args.threads), "tokens": len(wins) * args.seq_len}
            m.update(genai_speed(out, ids, args.threads))
            m["genai_loop_prefill_tok_s"], m["genai_loop_decode_tok_s"] = m["prefill_tok_s"], m["decode_tok_s"]
            add(f"onnxruntime-genai {precision}", out, m)

    if not args.no_llama_cpp and resolved.kind == "gguf":
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama.cpp: llama-cpp-python is not installed; skipped (pip install llama-cpp-python)")
        else:
            log("measuring llama.cpp on the GGUF")
            m = llama_cpp_measure(resolved.path, wins, ids, args.threads)
            add(f"llama.cpp {resolved.path.name}", resolved.path, m | {"tokens": len(wins) * args.seq_len})

    ref = rows[0]["perplexity"]
    for r in rows:
        r["ppl_ratio"] = r["perplexity"] / ref
    if args.json:
        print(json.dumps({"source": args.source, "threads": args.threads, "text": str(text), "seq_len": args.seq_len,
                          "windows": len(wins), "rows": rows}, indent=2))
    else:
        print_table(rows, args, text, len(wins))
    return 0


def print_table(rows, args, text, n_windows) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.source}: {n_windows}×{args.seq_len} tokens of {Path(text).name}, {args.threads} threads")
    for col, just in (("model", "left"), ("perplexity", "right"), ("× fp32", "right"), ("size MB", "right"),
                      ("prefill tok/s", "right"), ("decode tok/s", "right"), ("genai-loop prefill", "right"),
                      ("genai-loop decode", "right"), ("compile s", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(r["model"], f"{r['perplexity']:.3f}", f"{r['ppl_ratio']:.3f}", f"{r['size_bytes'] / 1e6:.1f}",
                  f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                  f"{r['genai_loop_prefill_tok_s']:.0f}" if "genai_loop_prefill_tok_s" in r else "—",
                  f"{r['genai_loop_decode_tok_s']:.1f}" if "genai_loop_decode_tok_s" in r else "—",
                  f"{r['compile_s']:.0f}" if "compile_s" in r else "")
    Console().print(t)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
