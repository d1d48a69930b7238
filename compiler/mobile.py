"""`llmfold export-mobile DIR -o OUTDIR`: a model directory in ONNX Runtime's mobile (ORT) format.

OUTDIR holds
    model.ort                         the graph in ORT format (flatbuffer, weights inside), made by
                                      onnxruntime.tools.convert_onnx_models_to_ort (style Fixed,
                                      level "all", target platform arm: no x86-only NCHWc layouts)
                                      with the llmfold op library registered, so QMatMul/PackedMatMul/TokenPrune
                                      nodes are kept as custom nodes
    required_operators.config         the operators (and opsets) the model needs, for a reduced ORT
                                      build: build.sh --minimal_build --include_ops_by_config FILE
    libllmfold_ops.so                 the op library (only when the graph uses domain llmfold); the
                                      host build unless `library=` names another (e.g. an aarch64
                                      build from custom_ops/tests/arm/build_arm.sh)
    llmfold.json, config.json, generation_config.json, tokenizer files   copied unchanged
    README.txt                        how to run it: library by path, or linked statically
                                      (RegisterLlmfoldOps), and the reduced build

Before OUTDIR appears, the .ort model is run next to the .onnx model on a short prompt (prefill,
then a few KV-cached decode steps) and every logit must agree (|Δ| ≤ 1e-4·max(1, max|logit|));
otherwise nothing is written and a UserError says so. Output is atomic (temporary sibling
directory renamed at the end).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np

from compiler.errors import UserError

ORT_FILE = "model.ort"
OPS_CONFIG = "required_operators.config"
LIBRARY_NAME = "libllmfold_ops.so"
README = "README.txt"
# not carried over: they describe model.onnx, which OUTDIR does not have
_SKIP = {"genai_config.json", LIBRARY_NAME}
VERIFY_TOL = 1e-4
VERIFY_PROMPT = "Once upon a time a small language model lived on a phone."
DECODE_STEPS = 3


def _uses_custom_ops(onnx_path: Path) -> bool:
    import onnx

    from compiler.runtime import uses_custom_domain

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # corrupt or truncated protobuf
        raise UserError(f"cannot read {onnx_path}: {' '.join(str(e).split())[:200]}; export or compile the model again") from e
    return uses_custom_domain(proto)


def _host_library() -> Path:
    from compiler import custom_ops

    try:
        return custom_ops.library_path()
    except FileNotFoundError as e:
        raise UserError(" ".join(str(e).split())) from e


def convert_to_ort(onnx_path: Path, out_dir: Path, custom_op_library: Path | None) -> tuple[Path, Path]:
    """model.ort + required_operators.config in `out_dir` (ORT's converter, quiet)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    import logging

    log = io.StringIO()
    quiet = logging.getLogger("ort_format_model.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log):
            convert_onnx_models_to_ort(
                Path(onnx_path),
                output_dir=Path(out_dir),
                optimization_styles=[OptimizationStyle.Fixed],
                custom_op_library_path=custom_op_library,
                target_platform="arm",
            )
    except Exception as e:
        raise UserError(
            f"ONNX Runtime's converter failed on {onnx_path}: {' '.join(str(e).split())[:300]}; "
            "check that the model runs with `llmfold generate` first"
        ) from e
    finally:
        quiet.setLevel(level)
    ort_path = Path(out_dir) / ORT_FILE
    produced = Path(out_dir) / (Path(onnx_path).stem + ".required_operators.config")
    if not ort_path.is_file() or not produced.is_file():
        raise UserError(f"ONNX Runtime's converter wrote no {ORT_FILE} for {onnx_path}: {log.getvalue()[-300:]}")
    config = Path(out_dir) / OPS_CONFIG
    # the converter names the temporary directory it was given; the shipped file names the model
    text = "".join(
        f"# - {ORT_FILE}\n" if line.startswith("# - ") else line for line in produced.read_text().splitlines(True)
    )
    config.write_text(text)
    produced.unlink()
    return ort_path, config


def _prompt_ids(model_dir: Path, vocab: int) -> np.ndarray:
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(model_dir))(VERIFY_PROMPT)["input_ids"]
    except Exception:  # no usable tokenizer: any in-vocabulary ids do for a logits comparison
        ids = []
    ids = [int(i) for i in ids if 0 <= int(i) < vocab] or [int(i) % vocab for i in range(1, 12)]
    return np.asarray(ids[:16], np.int64)


def run_schedule(session, prompt: np.ndarray, steps: int, kv: dict) -> list[np.ndarray]:
    """Prefill `prompt`, then `steps` greedy decode steps feeding each layer's present back;
    returns the logits of every call (the decoded tokens come from this session's own argmax)."""
    inputs = {i.name for i in session.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    feeds = {"input_ids": prompt[None]}
    mask = np.ones((1, len(prompt)), np.int64)
    for n in past:
        feeds[n] = np.zeros((1, kv["heads"][n], 0, kv["dim"][n]), np.float32)
    out_names = [o.name for o in session.get_outputs()]
    logits = []
    for step in range(steps + 1):
        if "attention_mask" in inputs:
            feeds["attention_mask"] = mask
        if "position_ids" in inputs:
            start = mask.shape[1] - feeds["input_ids"].shape[1]
            feeds["position_ids"] = np.arange(start, mask.shape[1], dtype=np.int64)[None]
        outs = dict(zip(out_names, session.run(None, feeds)))
        logits.append(outs["logits"][0])
        if step == steps:
            break
        tok = int(np.argmax(outs["logits"][0, -1]))
        feeds = {"input_ids": np.array([[tok]], np.int64)}
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        for n in past:
            feeds[n] = outs[n.replace("past_key_values.", "present.")]
    return logits


def _kv_dims(session, model_dir: Path) -> dict:
    from compiler.runtime import dir_kv_dims

    dims = dir_kv_dims(model_dir)
    heads, dim = {}, {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            s = list(i.shape)
            heads[i.name] = s[1] if isinstance(s[1], int) else int(dims["num_kv_heads"])
            dim[i.name] = s[3] if isinstance(s[3], int) else int(dims["head_dim"])
    return {"heads": heads, "dim": dim}


def verify_ort(onnx_path: Path, ort_path: Path, model_dir: Path, custom_ops: bool) -> float:
    """Max |logit difference| (relative to max(1, max|logit|)) of .ort vs .onnx on a short prompt
    and DECODE_STEPS cached steps; UserError when it exceeds VERIFY_TOL or the tokens differ."""
    from compiler.runtime import create_session

    ref = create_session(onnx_path, threads=1, custom_ops=custom_ops)
    got = create_session(ort_path, threads=1, custom_ops=custom_ops)
    vocab = ref.get_outputs()[[o.name for o in ref.get_outputs()].index("logits")].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 32000
    prompt = _prompt_ids(model_dir, vocab)
    kv = _kv_dims(ref, model_dir)
    a = run_schedule(ref, prompt, DECODE_STEPS, kv)
    b = run_schedule(got, prompt, DECODE_STEPS, kv)
    worst = 0.0
    for step, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise UserError(f"{ORT_FILE} gives logits of shape {y.shape} at step {step}, the .onnx model {x.shape}; report this as an llmfold bug")
        scale = max(1.0, float(np.abs(x).max()))
        diff = float(np.abs(x.astype(np.float64) - y).max()) / scale
        if not np.isfinite(diff) or diff > VERIFY_TOL:
            raise UserError(
                f"{ORT_FILE} disagrees with model.onnx at step {step} (max |Δlogit| {diff:.3g} × {scale:.3g} > "
                f"{VERIFY_TOL}); nothing was written — report this as an llmfold bug"
            )
        worst = max(worst, diff)
    return worst


def _readme(meta: dict, custom: bool, library_note: str) -> str:
    kv = meta.get("kv_cache", "uniform")
    lines = [
        "llmfold mobile model directory (written by `llmfold export-mobile`)",
        "",
        "model.ort                  ONNX Runtime format (load it like an .onnx file; ORT >= 1.21)",
        f"{OPS_CONFIG}  operators for a reduced ONNX Runtime build:",
        "    ./build.sh --config MinSizeRel --minimal_build extended --disable_ml_ops \\",
        f"        --include_ops_by_config {OPS_CONFIG} [--android ...|--ios ...]",
        "    (the llmfold domain line is served by the op library, not by ORT's kernels)",
        "tokenizer files            tokenization stays on the host side (or in onnxruntime-extensions);",
        "                           the C++ sample (samples/cpp) takes and prints token ids",
        "",
        "Inputs/outputs (onnxruntime-genai names): input_ids [1,S] int64, attention_mask [1,total] int64,",
        "past_key_values.{i}.key/value [1,kv_heads,past,head_dim] -> logits [1,S,vocab], present.{i}.key/value.",
        "Greedy decoding: prefill the prompt with empty pasts, then feed each present back as the next",
        "past, one token per step, with attention_mask grown by one 1 per token.",
    ]
    if kv == "per-layer":
        lines += [
            "This model prunes tokens (kv_cache per-layer): layers hold caches of different lengths;",
            "feed every layer's own present back (the mask still grows by one per token).",
        ]
    lines.append("")
    if custom:
        lines += [
            "Custom operators (domain llmfold: QMatMul, PackedMatMul, TokenPrune) must be registered before the",
            "session is created, in one of two ways:",
            "",
            f"1. by path: {LIBRARY_NAME} ({library_note})",
            f'     session_options.RegisterCustomOpsLibrary(ORT_TSTR("{LIBRARY_NAME}"));      // C++',
            f'     so.register_custom_ops_library("{LIBRARY_NAME}")                         # Python',
            "",
            "2. linked statically (iOS, or apps that cannot load libraries by path): link",
            "   libllmfold_ops_static.a + libllmfold_kernels.a (cmake target llmfold_ops_static in",
            "   custom_ops/) into the app, keep and export the entry point",
            "     -Wl,--undefined=RegisterLlmfoldOps -rdynamic     (or -Wl,--export-dynamic-symbol=RegisterLlmfoldOps)",
            "   and register it by name; ORT finds the function in the running process:",
            '     session_options.RegisterCustomOpsUsingFunction("RegisterLlmfoldOps");',
            "   samples/cpp/ in the llmfold repository does exactly this (x86-64 and aarch64 builds).",
            "",
            "The kernels pick their path at load time (aarch64: i8mm, dotprod, neon; x86-64: avx512vnni,",
            "avx2); LLMFOLD_KERNELS=<name> forces one.",
        ]
    else:
        lines.append("The graph uses standard ONNX operators only: no op library is needed.")
    return "\n".join(lines) + "\n"


def export_mobile(model_dir, out_dir, library=None) -> Path:
    """Write OUTDIR (see the module docstring) from an llmfold model directory; returns OUTDIR.

    `library`: op library file to ship instead of the host build (e.g. an aarch64 build); the
    verification always uses the host build."""
    from compiler.modeldir import AtomicDir, check_output_dir, open_model_dir, write_meta

    md = open_model_dir(model_dir, require_llmfold=True)
    out = Path(out_dir)
    if out.resolve() == md.path.resolve():
        raise UserError(f"output {out} is the input directory; choose another -o")
    check_output_dir(out)
    custom = _uses_custom_ops(md.onnx_path)
    host_lib = _host_library() if custom else None
    ship_lib = None
    if custom:
        ship_lib = Path(library) if library else host_lib
        if not ship_lib.is_file():
            raise UserError(f"op library {ship_lib} does not exist; build it (make setup, or custom_ops/tests/arm/build_arm.sh for aarch64)")
    elif library:
        raise UserError(f"{md.path} uses no llmfold custom ops; drop --library")

    with AtomicDir(out) as tmp:
        ort_path, _ = convert_to_ort(md.onnx_path, tmp, host_lib)
        verify_ort(md.onnx_path, ort_path, md.path, custom)
        for src in md.extra_files():
            if src.name not in _SKIP:
                shutil.copyfile(src, tmp / src.name)
        meta = dict(md.meta)
        write_meta(tmp / "llmfold.json", meta)
        note = "host build"
        if custom:
            shutil.copy2(ship_lib, tmp / LIBRARY_NAME)
            note = "built for this machine" if ship_lib == host_lib else f"copied from {ship_lib}"
        (tmp / README).write_text(_readme(meta, custom, note))
    return out


def add_export_mobile_arguments(p) -> None:
    p.add_argument("dir", help="model directory (llmfold export / compile output)")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--library",
        default=None,
        help="op library to ship instead of the host build (e.g. build/custom_ops-aarch64/libllmfold_ops.so)",
    )


def mobile_main(args) -> int:
    """`llmfold export-mobile DIR -o OUTDIR [--library LIB]`."""
    out = export_mobile(args.dir, args.output, getattr(args, "library", None))
    print(f"wrote {out}")
    return 0


__all__ = ["export_mobile", "convert_to_ort", "verify_ort", "mobile_main", "add_export_mobile_arguments"]
