"""Default calibration and evaluation texts, from Debian's `fortunes` package.

`apt-get install fortunes` (done by `make setup` when running as root) puts ~2.8 MB of English
text under /usr/share/games/fortunes/, one file per topic, entries separated by lines holding
only `%`. llmfold splits the topic files into two disjoint sets so that a model is never
evaluated on the text it was calibrated on:

* evaluation (held out), `EVAL_FILES`:
  education, humorists, law, literature, science, wisdom  (~0.36 MB)
* calibration, `CALIBRATION_FILES`: every other topic file of the package, i.e.
  art, computers, cookie, debian, definitions, disclaimer, drugs, ethnic, food, fortunes, goedel,
  kids, knghtbrd, linux, linuxcookie, love, magic, medicine, men-women, miscellaneous, news,
  paradoxum, people, perl, pets, platitudes, politics, pratchett, riddles, songs-poems, sports,
  startrek, tao, work, zippy  (~2.1 MB)
* excluded from both: ascii-art (drawings, not prose) and translate-me (not English).

Each text is the concatenation, in the order listed, of the files' entries: the `%` separator
lines are dropped, entries are joined by one blank line, terminal overstriking (`c\\bc`, `_\\bc`)
is resolved to the plain character, and other control characters except tab and newline are
removed. The result is written once to `build/textdata/` in the repository (or
`~/.cache/llmfold/textdata/` when the repository directory is not writable) and the path returned;
it is rewritten whenever the source files change size or time.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from compiler.errors import UserError

FORTUNES_DIR = Path("/usr/share/games/fortunes")

EVAL_FILES = ("education", "humorists", "law", "literature", "science", "wisdom")
EXCLUDED_FILES = ("ascii-art", "translate-me")
CALIBRATION_FILES = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "ethnic",
    "food", "fortunes", "goedel", "kids", "knghtbrd", "linux", "linuxcookie", "love", "magic",
    "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets",
    "platitudes", "politics", "pratchett", "riddles", "songs-poems", "sports", "startrek", "tao",
    "work", "zippy",
)  # fmt: skip

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _cache_dir() -> Path:
    repo_build = Path(__file__).resolve().parent.parent / "build" / "textdata"
    for d in (repo_build, Path.home() / ".cache" / "llmfold" / "textdata"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise UserError("cannot create a cache directory for the default texts (build/textdata or ~/.cache/llmfold); make one of them writable")


def fortune_entries(path: Path) -> list[str]:
    """The entries of one fortune file: text between `%` lines, overstriking resolved."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n")
    while _OVERSTRIKE.search(text):  # "a\bb" prints as b; repeated for stacked strikes
        text = _OVERSTRIKE.sub("", text)
    text = _CONTROL.sub("", text)
    entries = re.split(r"(?m)^%\s*$", text)
    return [e.strip("\n") for e in entries if e.strip()]


def _source_files(names: tuple[str, ...]) -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        raise UserError(
            f"the default calibration/evaluation text needs Debian's fortunes package ({FORTUNES_DIR} is missing); "
            "run `apt-get install fortunes` (or `make setup` as root), or pass your own text file"
        )
    files = [FORTUNES_DIR / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"the fortunes package is incomplete ({', '.join(missing)} missing under {FORTUNES_DIR}); "
            "run `apt-get install --reinstall fortunes` (or `make setup` as root), or pass your own text file"
        )
    return files


def _build(kind: str, names: tuple[str, ...]) -> Path:
    files = _source_files(names)
    key = hashlib.sha256()
    for f in files:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    out = _cache_dir() / f"fortunes-{kind}-{key.hexdigest()[:12]}.txt"
    if out.is_file():
        return out
    text = "\n\n".join(e for f in files for e in fortune_entries(f)) + "\n"
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)  # atomic: concurrent callers never see half a file
    return out


def default_calibration_text() -> Path:
    """Path of the default calibration text: the `CALIBRATION_FILES` fortunes, concatenated."""
    return _build("calibration", CALIBRATION_FILES)


def default_eval_text() -> Path:
    """Path of the default held-out evaluation text: the `EVAL_FILES` fortunes, concatenated."""
    return _build("eval", EVAL_FILES)
