"""Helpers for the C++ sample tests (test_sample_cpp.py, test_arm_e2e.py): building the sample with
samples/cpp/build.sh, running it natively or under qemu-aarch64 (custom_ops/tests/arm/qemu_run.sh,
the mount-namespace runner ORT needs under qemu-user), reading its logits dump, and compiling tiny
models with the recipes the end-to-end tests use."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BUILD_SH = REPO / "samples" / "cpp" / "build.sh"
QEMU_RUN = REPO / "custom_ops" / "tests" / "arm" / "qemu_run.sh"

# recipes (tiny models): name -> (toml body, act_bits of the QMatMuls, needs calibration text)
CALIB = "[calibration]\nwindows = 4\nseq_len = 64\n\n"
INT4 = '[[pass]]\nname = "int4"\nalgorithm = "rtn"\nblock_size = 32\n'
RECIPES = {
    "w4a16": (INT4 + "symmetric = true\nact_bits = 16\n", 16),
    # zero points; lm_head of the prefill on the last position only unless --logits
    "w4a8": (INT4 + "symmetric = false\nact_bits = 8\n" + '[[pass]]\nname = "logits_to_keep"\n', 8),
    "w4a4": (CALIB + INT4 + "symmetric = true\nact_bits = 4\ntrip = true\n", 4),  # channel shifts
    # SVD-LLM low-rank pairs (fp32 MatMuls) and Agile-Quant token pruning (TokenPrune op, per-layer
    # KV cache). Composed with int4 they do not compile yet (structure analysis does not recognize
    # the rewritten block; reported to the lead), so they run on their own here.
    "lowrank": (CALIB + '[[pass]]\nname = "svd"\nratio = 0.3\n', 16),
    "pruned": ('[[pass]]\nname = "token_prune"\nstart_layer = 1\nkeep_ratios = [0.5]\n', 16),
}


def calib_text(path: Path) -> Path:
    from compiler.testing import _training_text

    path.write_text(_training_text() * 20)
    return path


def compile_recipe(src: Path, out_root: Path, name: str, calib: Path | None = None) -> Path:
    from compiler.driver import compile_model

    body, _ = RECIPES[name]
    recipe = out_root / f"{name}.toml"
    recipe.write_text(body)
    return compile_model(src, out_root / name, recipe=str(recipe), calib=calib, progress=False)


def build_sample(arch: str) -> Path:
    """Builds (incrementally) and returns the sample binary; AssertionError with the log on failure."""
    r = subprocess.run(["sh", str(BUILD_SH), arch], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"samples/cpp/build.sh {arch} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    exe = Path(r.stdout.strip().splitlines()[-1])
    assert exe.is_file(), exe
    return exe


@dataclass
class SampleRun:
    tokens: list[int]
    logits: np.ndarray | None  # [S + steps, V]: prefill rows, then one row per decode step
    kernel_path: str | None
    stderr: str


def run_sample(
    exe: Path,
    model: Path,
    prompt: list[int],
    new_tokens: int,
    decode_ids: list[int] | None = None,
    cpu: str | None = None,
    libdir: Path | None = None,
    kernels: str | None = None,
    timeout: int = 900,
    dump_logits: bool = True,
) -> SampleRun:
    """Runs llmfold_generate (natively, or under qemu with `cpu`) and returns its tokens, logits
    (None without `dump_logits`) and the kernel path it reported."""
    dump = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmfold-sample-{os.getpid()}-{abs(hash((str(model), cpu)))}.f32"
    args = [str(exe), str(model), "--ids", " ".join(map(str, prompt)), "--max-new-tokens", str(new_tokens)]
    if dump_logits:
        args += ["--logits", str(dump)]
    if decode_ids is not None:
        args += ["--decode-ids", " ".join(map(str, decode_ids))]
    if cpu is not None:
        args = ["sh", str(QEMU_RUN), "--cpu", cpu, "--libdir", str(libdir)] + args
    env = dict(os.environ)
    env.pop("LLMFOLD_KERNELS", None)
    if kernels:
        env["LLMFOLD_KERNELS"] = kernels
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
        assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
        raw = np.fromfile(dump, np.float32) if dump_logits else None
    finally:
        dump.unlink(missing_ok=True)
    tokens = [int(t) for t in r.stdout.split()]
    m = re.search(r"kernel path: QMatMul=(\S+)", r.stderr)
    if raw is None:
        return SampleRun(tokens, None, m.group(1) if m else None, r.stderr)
    # rows: the prefill's (all prompt tokens, or the kept ones of a token-pruned model) + one per step
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    assert raw.size % vocab == 0, (raw.size, vocab)
    rows = raw.size // vocab
    return SampleRun(tokens, raw.reshape(rows, -1), m.group(1) if m else None, r.stderr)


def arm_unavailable() -> str | None:
    """Why the aarch64 end-to-end tests cannot run here (None when they can); tries to install
    the Debian packages when root."""
    need = ["aarch64-linux-gnu-g++", "qemu-aarch64-static", "cmake", "unshare"]
    missing = [t for t in need if shutil.which(t) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "g++-aarch64-linux-gnu", "qemu-user-static", "cmake"],
                       env=env, capture_output=True)  # fmt: skip
        missing = [t for t in need if shutil.which(t) is None]
    if missing:
        return f"aarch64 toolchain unavailable ({', '.join(missing)} missing and not installable here)"
    if os.geteuid() != 0:
        return "not root: ORT under qemu-user needs a private mount namespace (custom_ops/tests/arm/qemu_run.sh)"
    return None
