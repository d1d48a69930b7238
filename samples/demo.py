"""`make demo`: SmolLM2-135M from nothing to a compiled model, compared with its fp32 export.

    export smollm2-135m → fp32 model dir → compile --recipe R → eval both on held-out text

Artifacts are cached under build/demo/ and rebuilt when stale (an export from another attention
layout or graph version, a compile from another recipe text); delete the directory to start over. Prints one table:
perplexity on the held-out fortunes text, size on disk, prefill and decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.recipe import available_recipes  # noqa: E402

# Best first: the demo compiles with the first recipe that this checkout ships.
PREFERRED_RECIPES = ["w4a8", "w4a16", "identity"]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="recipe to compile with (default: the best one shipped)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "build" / "demo"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import shutil

    from compiler.driver import compile_model
    from compiler.export import DEFAULT_ATTENTION, GRAPH_VERSION, export
    from compiler.recipe import load_recipe
    from compiler.runtime import evaluate, generate, stale_packed_layout
    from compiler.textdata import default_eval_text

    console = Console()
    recipe = args.recipe or next(r for r in PREFERRED_RECIPES if r in available_recipes())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "smollm2-135m-fp32"
    compiled = out / f"smollm2-135m-{recipe}"

    def meta(d: Path) -> dict:
        return json.loads((d / "llmfold.json").read_text()) if (d / "llmfold.json").is_file() else {}

    if meta(fp32) and (meta(fp32).get("attention", "explicit"), meta(fp32).get("graph_version")) != (DEFAULT_ATTENTION, GRAPH_VERSION):
        shutil.rmtree(fp32)
        shutil.rmtree(compiled, ignore_errors=True)
    want = json.loads(json.dumps(load_recipe(recipe).to_json()))
    if meta(compiled) and ({k: v for k, v in meta(compiled).get("recipe", {}).items() if k in want} != want
                           or stale_packed_layout(meta(compiled))):
        shutil.rmtree(compiled)
    if not (fp32 / "llmfold.json").exists():
        console.rule("export smollm2-135m")
        t = time.perf_counter()
        export("smollm2-135m", fp32)
        console.print(f"export took {time.perf_counter() - t:.0f} s")
    if not (compiled / "llmfold.json").exists():
        console.rule(f"compile --recipe {recipe}")
        t = time.perf_counter()
        compile_model(fp32, compiled, recipe=recipe, seed=0, threads=args.threads)
        console.print(f"compile took {time.perf_counter() - t:.0f} s")

    text = default_eval_text()
    rows = []
    for name, path in (("fp32 export", fp32), (f"compiled ({recipe})", compiled)):
        console.rule(f"eval {name}")
        r = evaluate(path, text=text, seq_len=512, windows=args.windows, speed=True, threads=args.threads)
        rows.append((name, path, r))

    console.rule("generate (compiled)")
    generate(compiled, "The three laws of robotics are", max_new_tokens=32, threads=args.threads)

    ref = rows[0][2]["perplexity"]
    table = Table(title=f"SmolLM2-135M on held-out text ({rows[0][2]['tokens']} tokens), {args.threads} threads")
    for col in ("model", "perplexity", "× fp32", "size MB", "prefill tok/s", "decode tok/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, path, r in rows:
        table.add_row(
            name,
            f"{r['perplexity']:.3f}",
            f"{r['perplexity'] / ref:.3f}",
            f"{dir_size(path) / 1e6:.1f}",
            f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f}",
        )
    console.print(table)
    (out / "demo_results.json").write_text(
        json.dumps({name: r for name, _, r in rows} | {"recipe": recipe}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
