"""The default calibration / held-out evaluation texts from Debian's fortunes package."""

from __future__ import annotations

import pytest

from compiler import textdata
from compiler.errors import UserError

needs_fortunes = pytest.mark.skipif(not textdata.FORTUNES_DIR.is_dir(), reason="fortunes not installed (make setup)")


@needs_fortunes
def test_split_is_disjoint_and_covers_the_package():
    cal, ev, ex = set(textdata.CALIBRATION_FILES), set(textdata.EVAL_FILES), set(textdata.EXCLUDED_FILES)
    assert not (cal & ev) and not (cal & ex) and not (ev & ex)
    topics = {p.name for p in textdata.FORTUNES_DIR.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat"}
    assert topics == cal | ev | ex  # a new topic file in the package must be placed explicitly


@needs_fortunes
def test_texts_are_built_once_and_hold_their_files_entries():
    cal, ev = textdata.default_calibration_text(), textdata.default_eval_text()
    assert cal != ev and cal.stat().st_size > 1_000_000 and ev.stat().st_size > 200_000
    assert textdata.default_eval_text() == ev  # cached
    text = ev.read_text(encoding="utf-8")
    first = textdata.fortune_entries(textdata.FORTUNES_DIR / textdata.EVAL_FILES[0])[0]
    assert text.startswith(first) and "\n%\n" not in text and "\x08" not in text
    cal_text = cal.read_text(encoding="utf-8")
    assert textdata.fortune_entries(textdata.FORTUNES_DIR / "science")[5] not in cal_text


def test_entries_and_overstriking(tmp_path):
    f = tmp_path / "topic"
    f.write_bytes(b"one\n\tline two\n%\n_\x08b_\x08o_\x08l_\x08d and N\x08No\x08o\n%\n\n%\nlast\n")
    assert textdata.fortune_entries(f) == ["one\n\tline two", "bold and No", "last"]


def test_missing_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(textdata, "FORTUNES_DIR", tmp_path / "nothing")
    with pytest.raises(UserError, match="apt-get install fortunes"):
        textdata.default_eval_text()
