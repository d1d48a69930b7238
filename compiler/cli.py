"""The `llmfold` command line. Each subcommand is a thin adapter over the Python API.

Errors the user can fix print one line on stderr and exit with code 2; nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compiler import __version__
from compiler.errors import UserError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_export(args) -> int:
    from compiler.export import export

    from compiler.export import DEFAULT_ATTENTION

    export(args.source, Path(args.output), progress=not args.quiet, attention=args.attention or DEFAULT_ATTENTION)
    return 0


def _cmd_compile(args) -> int:
    from compiler.driver import compile_model

    compile_model(
        args.model_dir,
        args.output,
        recipe=args.recipe,
        calib=args.calib,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
    )
    return 0


def _cmd_eval(args) -> int:
    from compiler.runtime import eval_main

    return eval_main(args)


def _cmd_generate(args) -> int:
    from compiler.runtime import generate_main

    return generate_main(args)


def _cmd_inspect(args) -> int:
    from compiler.inspect import inspect_path

    return inspect_path(args.path, as_json=args.json, diff=args.diff, svg=args.svg)


def _cmd_bench_kernels(args) -> int:
    from compiler.bench_kernels import main as bench_main

    return bench_main(json_output=args.json, threads=args.threads)


def _cmd_export_mobile(args) -> int:
    from compiler.mobile import mobile_main

    return mobile_main(args)


def _cmd_recipes(args) -> int:
    from compiler.recipe import available_recipes, load_recipe

    rows = []
    for name in available_recipes():
        r = load_recipe(name)
        rows.append({"name": name, "description": r.description, "passes": [p.name for p in r.passes]})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<22} {' → '.join(row['passes']):<24} {row['description']}")
    return 0


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineErrors(
        prog="llmfold",
        description="Compile Llama-family LLMs to small, fast ONNX models with custom CPU kernels.",
    )
    p.add_argument("--version", action="version", version=f"llmfold {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_OneLineErrors)

    s = sub.add_parser(
        "export",
        help="export a model to an llmfold model directory (fp32 ONNX with KV cache)",
        description="SOURCE is a Hugging Face Llama-family directory, a .gguf file, or the alias smollm2-135m.",
    )
    s.add_argument("source", metavar="SOURCE")
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="new model directory")
    s.add_argument("--attention", choices=("fused", "explicit"), default=None,
                   help="attention layout: fused (one com.microsoft GroupQueryAttention per block, fastest in "
                        "ONNX Runtime) or explicit (standard ops with a visible Softmax; token pruning needs it); "
                        "default: compiler.export.DEFAULT_ATTENTION")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("compile", help="run a recipe of compression passes over a model directory")
    s.add_argument("model_dir", metavar="DIR")
    s.add_argument("-o", "--output", required=True, metavar="DIR2", help="new model directory")
    s.add_argument("--recipe", required=True, metavar="NAME|FILE.toml", help="see `llmfold recipes`")
    s.add_argument("--calib", metavar="FILE.txt", help="calibration text (default: Debian fortunes, calibration part)")
    s.add_argument("--seed", type=int, default=0, help="seed for calibration windows and passes (default 0)")
    s.add_argument("--threads", type=_positive_int, help="ONNX Runtime threads for calibration")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=_cmd_compile)

    s = sub.add_parser("eval", help="perplexity (and speed) of a model directory on a text")
    s.add_argument("model_dir", metavar="DIR")
    s.add_argument("--text", metavar="FILE", help="text file (default: Debian fortunes, held-out part)")
    s.add_argument("--seq-len", type=_positive_int, default=512)
    s.add_argument("--windows", type=_positive_int, default=8, help="max windows of --seq-len tokens")
    s.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s")
    s.add_argument("--threads", type=_positive_int)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument(
        "--continuation",
        action="store_true",
        help="token-pruned models: prefill 512 tokens, score the next 64 through the KV cache",
    )
    s.add_argument("--reference", metavar="DIR", help="with --continuation: the same model unpruned")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", help="greedy generation with the KV cache, streaming text")
    s.add_argument("model_dir", metavar="DIR")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=_positive_int, default=64)
    s.add_argument("--threads", type=_positive_int)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("inspect", help="describe an ONNX model or model directory")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--diff", metavar="OTHER", help="per-layer changes from PATH to OTHER")
    s.add_argument("--svg", metavar="OUT.svg", help="draw bytes per block and role")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("bench-kernels", help="QMatMul vs ORT MatMulNBits and fp32 MatMul; PackedMatMul vs fp32 MatMul")
    s.add_argument("--json", action="store_true")
    s.add_argument("--threads", type=_positive_int, default=1)
    s.set_defaults(func=_cmd_bench_kernels)

    s = sub.add_parser(
        "export-mobile",
        help="convert a model directory to ORT format for phones (verified against the .onnx)",
    )
    from compiler.mobile import add_export_mobile_arguments

    add_export_mobile_arguments(s)
    s.set_defaults(func=_cmd_export_mobile)

    s = sub.add_parser("recipes", help="list the shipped recipes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"llmfold {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"llmfold {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
