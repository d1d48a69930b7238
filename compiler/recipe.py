"""Recipes: which passes a compile runs, in order, with which parameters.

A recipe is a TOML file (samples/recipes/NAME.toml, addressable by NAME):

    description = "4-bit weights (GPTQ), 8-bit per-token activations"
    [calibration]            # optional; defaults below
    windows = 32             # number of seeded windows of the calibration text
    seq_len = 512            # tokens per window
    [[pass]]
    name = "int4"
    act_bits = 8

Everything is parsed and validated before any work: an unknown pass, an unknown parameter or a
wrong type is a UserError naming the recipe and the offending key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from compiler.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "samples" / "recipes"


@dataclasses.dataclass
class CalibrationConfig:
    windows: int = 32
    seq_len: int = 512
    max_samples: int = 0  # reservoir rows kept per tapped input (0 = none)


@dataclasses.dataclass
class PassSpec:
    name: str
    params: Any  # the pass's Params dataclass instance
    raw: dict[str, Any]


@dataclasses.dataclass
class Recipe:
    name: str
    path: Path | None
    description: str
    calibration: CalibrationConfig
    passes: list[PassSpec]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "calibration": dataclasses.asdict(self.calibration),
            "passes": [{"name": p.name, "params": p.raw} for p in self.passes],
        }


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def resolve_recipe_path(name_or_file: str) -> Path:
    p = Path(name_or_file)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise UserError(f"recipe file {p} does not exist; pass an existing .toml or a recipe name")
        return p
    candidate = RECIPE_DIR / f"{name_or_file}.toml"
    if not candidate.is_file():
        raise UserError(
            f"unknown recipe {name_or_file!r}; available: {', '.join(available_recipes())} "
            "(or pass a path to a .toml file)"
        )
    return candidate


def load_recipe(name_or_file: str) -> Recipe:
    from passes import REGISTRY, make_params  # registers every pass

    path = resolve_recipe_path(name_or_file)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path}: not valid TOML ({e}); fix the syntax") from None
    allowed = {"description", "calibration", "pass"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(
            f"recipe {path}: unknown top-level key(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    calib_raw = data.get("calibration", {})
    if not isinstance(calib_raw, dict):
        raise UserError(f"recipe {path}: [calibration] must be a table")
    cfields = {f.name for f in dataclasses.fields(CalibrationConfig)}
    bad = sorted(set(calib_raw) - cfields)
    if bad:
        raise UserError(
            f"recipe {path}: unknown [calibration] key(s) {', '.join(bad)}; allowed: "
            f"{', '.join(sorted(cfields))}"
        )
    for k, v in calib_raw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (k != "max_samples" and v == 0):
            raise UserError(f"recipe {path}: [calibration] {k} must be a positive integer, got {v!r}")
    calibration = CalibrationConfig(**calib_raw)

    passes_raw = data.get("pass", [])
    if not isinstance(passes_raw, list):
        raise UserError(f"recipe {path}: passes are written as [[pass]] tables")
    specs = []
    for i, table in enumerate(passes_raw):
        where = f"recipe {path}, pass #{i + 1}"
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str):
            raise UserError(f"{where}: missing 'name'; known passes: {', '.join(sorted(REGISTRY))}")
        if name not in REGISTRY:
            raise UserError(
                f"{where}: unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}"
            )
        specs.append(PassSpec(name, make_params(REGISTRY[name], table, where), table))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"recipe {path}: description must be a string")
    return Recipe(path.stem, path, description, calibration, specs)
