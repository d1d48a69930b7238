"""Recipe parsing and validation happen before any work, with one clear error per problem."""

from __future__ import annotations

import dataclasses

import pytest

from compiler.cli import main
from compiler.errors import UserError
from compiler.recipe import available_recipes, load_recipe
from passes import REGISTRY
from passes.base import CompilerPass, make_params


def write(tmp_path, text: str):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return str(p)


def test_every_shipped_recipe_loads():
    names = available_recipes()
    assert "identity" in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.passes, f"recipe {name} runs no pass"
        assert all(p.name in REGISTRY for p in recipe.passes)


def test_unknown_recipe_name_lists_available():
    with pytest.raises(UserError, match="unknown recipe 'nope'.*identity"):
        load_recipe("nope")


def test_unknown_pass(tmp_path):
    with pytest.raises(UserError, match="unknown pass 'frobnicate'"):
        load_recipe(write(tmp_path, '[[pass]]\nname = "frobnicate"\n'))


def test_unknown_parameter(tmp_path):
    with pytest.raises(UserError, match="unknown parameter.*bits.*cleanup"):
        load_recipe(write(tmp_path, '[[pass]]\nname = "cleanup"\nbits = 4\n'))


def test_bad_toml_and_top_level_keys(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[[pass]\n"))
    with pytest.raises(UserError, match="unknown top-level key.*passes"):
        load_recipe(write(tmp_path, '[[passes]]\nname = "cleanup"\n'))
    with pytest.raises(UserError, match="calibration.*windows must be a positive integer"):
        load_recipe(write(tmp_path, '[calibration]\nwindows = 0\n[[pass]]\nname = "cleanup"\n'))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.toml"))


@dataclasses.dataclass
class _Params:
    bits: int = 4
    ratio: float = 0.5
    mode: str = "a"

    def validate(self):
        if self.bits not in (4, 8):
            raise UserError("bits must be 4 or 8")


class _Fake(CompilerPass):
    name = "fake"
    Params = _Params


def test_parameter_types_and_values_are_checked():
    assert make_params(_Fake, {"ratio": 1}, "w").ratio == 1.0  # int accepted for float
    assert isinstance(make_params(_Fake, {"ratio": 1}, "w").ratio, float)
    with pytest.raises(UserError, match="'bits' of pass 'fake' must be"):
        make_params(_Fake, {"bits": "4"}, "w")
    with pytest.raises(UserError, match="'bits' of pass 'fake' must be"):
        make_params(_Fake, {"bits": True}, "w")
    with pytest.raises(UserError, match="w: bits must be 4 or 8"):
        make_params(_Fake, {"bits": 3}, "w")


def test_cli_reports_user_errors_on_one_line(capsys, tmp_path):
    code = main(["compile", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"), "--recipe", "nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "unknown recipe 'nope'" in err
    assert not (tmp_path / "out").exists()


def test_cli_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err
