"""The compile driver: MODEL DIR --recipe--> MODEL DIR.

    compile_model(in_dir, out_dir, recipe, calib=None, seed=0)

1. parse and validate the recipe (every pass and parameter) before any work;
2. open the input directory, load its graph into onnx_ir;
3. run the recipe's passes in order, each an onnx_ir in-place pass with a CompileContext giving
   the model structure (re-analyzed after every pass), calibration statistics on demand (collected
   on the current graph, cached, handed on analytically by passes where exact), a seeded RNG and
   progress bars;
4. write the result into a temporary sibling directory and rename it into place: the input is
   never modified and a failed compile leaves nothing behind. Same inputs and seed give
   byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from compiler.recipe import CalibrationConfig, Recipe, load_recipe
from compiler.stats import InputStats

CUSTOM_DOMAIN = "llmfold"


class CompileContext:
    """What a pass may use besides the graph: structure, statistics, randomness, progress."""

    def __init__(
        self,
        model_dir,  # compiler.modeldir.ModelDir of the input
        calibration: CalibrationConfig,
        calib_text: Path | None = None,
        seed: int = 0,
        threads: int | None = None,
        progress: bool = True,
    ):
        self.model_dir = model_dir
        self.calibration = calibration
        self.calib_text = Path(calib_text) if calib_text else None
        self.seed = seed
        self.threads = threads
        self.show_progress = progress
        self.records: list[dict] = []
        self._structure = None
        self._stats: dict[str, InputStats] = {}
        self._windows: np.ndarray | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="llmfold-compile-")
        self.current_pass: str | None = None

    # -- structure -------------------------------------------------------------------------
    def structure(self, model: ir.Model, refresh: bool = False):
        """The model's ModelStructure (analysis of the current graph; cached until refresh)."""
        if self._structure is None or refresh:
            from compiler.analyze import analyze

            self._structure = analyze(model)
        return self._structure

    def invalidate_structure(self) -> None:
        self._structure = None

    # -- calibration -----------------------------------------------------------------------
    def calibration_windows(self) -> np.ndarray:
        """Token windows [W, T] of the calibration text (seeded)."""
        if self._windows is None:
            from compiler.calibrate import calibration_windows

            self._windows = calibration_windows(
                self.model_dir.path,
                self.calib_text,
                num_windows=self.calibration.windows,
                seq_len=self.calibration.seq_len,
                seed=self.seed,
            )
        return self._windows

    def input_stats(
        self, model: ir.Model, values: Iterable[str], max_samples: int | None = None
    ) -> dict[str, InputStats]:
        """Statistics of the named graph values, collected on the *current* graph when missing."""
        values = list(dict.fromkeys(values))
        want = self.calibration.max_samples if max_samples is None else max_samples
        missing = [
            v
            for v in values
            if v not in self._stats
            or (want and (self._stats[v].samples is None or self._stats[v].max_samples < want))
        ]
        if missing:
            from compiler.calibrate import collect_input_stats

            path = self.save_temp_model(model)
            got = collect_input_stats(
                path,
                missing,
                self.calibration_windows(),
                max_samples=want,
                threads=self.threads,
                progress=self.show_progress,
            )
            self._stats.update(got)
        return {v: self._stats[v] for v in values}

    def set_stats(self, value: str, stats: InputStats) -> None:
        """Hand on statistics derived exactly by a pass (e.g. X' = X·A ⇒ X'ᵀX' = AᵀXᵀXA)."""
        self._stats[value] = stats

    def invalidate_stats(self, values: Iterable[str] | None = None) -> None:
        """Forget statistics that a pass made stale; they are re-collected when next asked."""
        if values is None:
            self._stats.clear()
        else:
            for v in values:
                self._stats.pop(v, None)

    def save_temp_model(self, model: ir.Model) -> Path:
        """Write the current graph to a scratch file that ONNX Runtime can load."""
        d = Path(tempfile.mkdtemp(dir=self._tmp.name))
        path = d / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return path

    # -- randomness, progress, records -----------------------------------------------------
    def rng(self, *key: str | int) -> np.random.Generator:
        """A generator seeded by the compile seed and a key, so passes are reproducible."""
        words = [self.seed] + [int.from_bytes(str(k).encode()[:8].ljust(8, b"\0"), "little") for k in key]
        return np.random.default_rng(words)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator:
        """A progress bar; `advance(n=1, **fields)` moves it. Silent when progress is off."""
        if not self.show_progress:
            yield lambda n=1, **kw: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, transient=False, console=_stderr_console()) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str = "") -> None:
                bar.update(task, advance=n, info=info)

            yield advance

    def log(self, message: str) -> None:
        if self.show_progress:
            _stderr_console().print(f"[dim]{self.current_pass or 'compile'}:[/] {message}")

    def record(self, **info) -> None:
        """Add facts about what the current pass did (shown by inspect, kept in llmfold.json)."""
        self.records.append({"pass": self.current_pass, **info})

    def close(self) -> None:
        self._tmp.cleanup()


_CONSOLE = None


def _stderr_console():
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def _check_output_dir(in_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == in_dir.resolve():
        raise UserError(f"output {out_dir} is the input directory; choose another -o (the input is never modified)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output {out_dir} already exists and is not empty; choose another -o or remove it")


def _uses_custom_ops(model: ir.Model) -> bool:
    return any(node.domain == CUSTOM_DOMAIN for node in ir.traversal.RecursiveGraphIterator(model.graph))


def compile_model(
    in_dir,
    out_dir,
    recipe: str | Recipe = "identity",
    calib: str | Path | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Compile a model directory with a recipe; returns the output directory."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)  # validated first

    from compiler.modeldir import open_model_dir, save_model_dir
    from passes import REGISTRY

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    src = open_model_dir(in_dir)
    _check_output_dir(in_dir, out_dir)
    if calib is not None and not Path(calib).is_file():
        raise UserError(f"calibration text {calib} does not exist; pass an existing text file to --calib")

    np.random.seed(seed)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)

    t_start = time.perf_counter()
    model = src.load_model()
    ctx = CompileContext(src, recipe.calibration, calib, seed=seed, threads=threads, progress=progress)
    timings = []
    try:
        for spec in recipe.passes:
            p = REGISTRY[spec.name](ctx, spec.params)
            ctx.current_pass = spec.name
            t0 = time.perf_counter()
            try:
                result = p(model)
            except (ir.passes.PreconditionError, ir.passes.PostconditionError) as e:
                # onnx_ir wraps whatever requires()/ensures() raise; a UserError stays one line
                if isinstance(e.__cause__, UserError):
                    raise e.__cause__ from None
                raise
            model = result.model
            ctx.invalidate_structure()
            timings.append((spec.name, time.perf_counter() - t0, result.modified))
        ctx.current_pass = None
        structure = ctx.structure(model)  # the output must still be a recognizable decoder

        uses_custom_ops = _uses_custom_ops(model)
        if uses_custom_ops:
            model.opset_imports[CUSTOM_DOMAIN] = 1
        meta = dict(src.meta)
        meta["structure"] = structure.to_json()
        # no timings in llmfold.json: the same inputs and seed must give byte-identical files
        meta["passes"] = list(src.meta.get("passes", [])) + [
            {
                "name": spec.name,
                "params": spec.raw,
                "modified": modified,
                "records": [r for r in ctx.records if r["pass"] == spec.name],
            }
            for spec, (_, _t, modified) in zip(recipe.passes, timings)
        ]
        meta["recipe"] = recipe.to_json() | {"seed": seed, "calibration_text": str(calib) if calib else None}
        meta["custom_ops_library"] = "libllmfold_ops.so" if uses_custom_ops else None
        meta.pop("packed_layout", None)
        if uses_custom_ops:
            from compiler.custom_ops import PACKED_LAYOUT

            meta["packed_layout"] = PACKED_LAYOUT
        if any(r.get("kv_cache") == "per-layer" for r in ctx.records):
            meta["kv_cache"] = "per-layer"
        from compiler.genai_config import genai_files

        gen_path = Path(src.path) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        # onnxruntime-genai config (+ the op library it loads); none for per-layer KV models
        save_model_dir(model, out_dir, meta, copy_from=src, extra_files=genai_files(model, meta, gen))
    finally:
        ctx.close()

    if progress:
        _print_summary(recipe, timings, time.perf_counter() - t_start, out_dir)
    return out_dir


def _print_summary(recipe: Recipe, timings, total: float, out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"llmfold compile: recipe {recipe.name}")
    table.add_column("pass")
    table.add_column("seconds", justify="right")
    table.add_column("changed")
    for name, t, modified in timings:
        table.add_row(name, f"{t:.1f}", "yes" if modified else "no")
    table.add_row("[bold]total (incl. load/save)", f"{total:.1f}", "")
    _stderr_console().print(table)
    _stderr_console().print(f"wrote {out_dir}")


__all__ = ["CompileContext", "compile_model"]
