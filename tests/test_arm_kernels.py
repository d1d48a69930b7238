"""ARM kernels: cross-built for aarch64 (static) and run under qemu-aarch64-static.

* -cpu cortex-a72 (Raspberry Pi 4: no dotprod, no i8mm): dispatch must pick neon, refuse a forced
  dotprod/i8mm, and dotprod code must really trap there (so the refusal is what keeps us alive).
* -cpu cortex-a76 (dotprod, no i8mm) and -cpu max (both): the better paths get picked.
* Every runnable path, including both A4 multipliers of the v8.0 path (vmull_s8 and Agile-Quant's
  packed 16-bit multiplier), is bit-exact against ref on integers (two test programs).
* The v8.0 path's default A4 variant is the one with fewer dynamic instructions per MAC.
* The common kernel test again with ASan+UBSan (aarch64, dynamic, under qemu).
* QMatMul (A16/A8/A4) through libllmfold_ops.so inside ONNX Runtime's own aarch64 build
  (onnxruntime 1.31.1 manylinux_2_28_aarch64 wheel) against the numpy reference.

Skipped (with the reason printed) only when the cross toolchain is missing and cannot be
installed; the ORT tests also when the aarch64 wheel cannot be downloaded or we are not root
(the mount namespace that hides the host's CPU sysfs from ORT's cpuinfo needs it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.arm

REPO = Path(__file__).resolve().parent.parent
ARM_TESTS = REPO / "custom_ops" / "tests" / "arm"
BUILD = Path(os.environ.get("LLMFOLD_ARM_BUILD", REPO / "build" / "custom_ops-aarch64"))
QEMU = "qemu-aarch64-static"
CXX = "aarch64-linux-gnu-g++"
DEBS = ["g++-aarch64-linux-gnu", "qemu-user-static", "cmake"]


def _toolchain_missing() -> list[str]:
    return [t for t in (CXX, QEMU, "cmake") if shutil.which(t) is None]


def _try_install() -> str | None:
    """Installs the Debian packages when we can (root + apt-get); returns why not otherwise."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root or no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *DEBS]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def arm_build() -> Path:
    missing = _toolchain_missing()
    if missing:
        why = _try_install()
        missing = _toolchain_missing()
        if missing:
            msg = f"aarch64 toolchain unavailable ({', '.join(missing)} missing; install failed: {why})"
            print("SKIP:", msg)
            pytest.skip(msg)
    r = subprocess.run(["sh", str(ARM_TESTS / "build_arm.sh"), str(BUILD)], capture_output=True, text=True)
    assert r.returncode == 0, f"cross build failed:\n{r.stdout}\n{r.stderr}"
    for exe in ("llmfold_kernel_test", "arm_kernel_check", "arm_insn_count"):
        assert (BUILD / exe).is_file(), exe
    return BUILD


def qemu(build: Path, cpu: str, exe: str, *args: str, kernels: str | None = None, timeout: int = 600):
    env = dict(os.environ)
    env.pop("LLMFOLD_KERNELS", None)
    if kernels is not None:
        env["LLMFOLD_KERNELS"] = kernels
    return subprocess.run([QEMU, "-cpu", cpu, str(build / exe), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def active(build: Path, cpu: str, kernels: str | None = None) -> tuple[str, str]:
    r = qemu(build, cpu, "arm_kernel_check", "--active", kernels=kernels)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("active: "), line
    return line.split(": ", 1)[1], r.stderr


def paths(build: Path, cpu: str) -> list[str]:
    r = qemu(build, cpu, "arm_kernel_check", "--paths")
    assert r.returncode == 0, r.stderr
    return r.stdout.split(":", 1)[1].split()


def died_of_sigill(r: subprocess.CompletedProcess) -> bool:
    # qemu-user re-raises the guest's signal on itself (returncode -4); via a shell it is 128 + 4.
    return r.returncode in (-signal.SIGILL, 128 + signal.SIGILL) or "Illegal instruction" in r.stderr


def test_cortex_a72_dispatch_picks_neon(arm_build):
    assert paths(arm_build, "cortex-a72") == ["neon", "neon-agile", "ref"]
    name, _ = active(arm_build, "cortex-a72")
    assert name == "neon"


@pytest.mark.parametrize("forced", ["dotprod", "i8mm"])
def test_cortex_a72_refuses_forced_path(arm_build, forced):
    name, err = active(arm_build, "cortex-a72", kernels=forced)
    assert name == "neon"
    assert f"LLMFOLD_KERNELS={forced}" in err and "using neon" in err


def test_cortex_a72_really_lacks_dotprod(arm_build):
    """Without dispatch the dotprod / i8mm code dies on this CPU model: the checks above matter."""
    for name in ("dotprod", "i8mm"):
        r = qemu(arm_build, "cortex-a72", "arm_kernel_check", "--unsafe-run", name)
        assert died_of_sigill(r), (name, r.returncode, r.stdout, r.stderr)
    r = qemu(arm_build, "cortex-a72", "arm_kernel_check", "--unsafe-run", "neon")
    assert r.returncode == 0 and "ran neon" in r.stdout, r.stderr


def test_cortex_a76_dotprod_without_i8mm(arm_build):
    assert paths(arm_build, "cortex-a76") == ["dotprod", "neon", "neon-agile", "ref"]
    assert active(arm_build, "cortex-a76")[0] == "dotprod"
    name, err = active(arm_build, "cortex-a76", kernels="i8mm")
    assert name == "dotprod" and "LLMFOLD_KERNELS=i8mm" in err
    assert died_of_sigill(qemu(arm_build, "cortex-a76", "arm_kernel_check", "--unsafe-run", "i8mm"))


def test_max_picks_i8mm_and_honours_forcing(arm_build):
    all_paths = paths(arm_build, "max")
    assert all_paths == ["i8mm", "dotprod", "neon", "neon-agile", "ref"]
    assert active(arm_build, "max")[0] == "i8mm"
    for name in all_paths:
        got, err = active(arm_build, "max", kernels=name)
        assert got == name and "LLMFOLD_KERNELS" not in err


EXPECTED_PATHS = {"cortex-a72": ["neon", "neon-agile"], "max": ["i8mm", "dotprod", "neon", "neon-agile"]}


@pytest.mark.parametrize("cpu", ["cortex-a72", "max"])
def test_arm_sweep_bit_exact(arm_build, cpu):
    """ARM sweep: all paths and both A4 multipliers vs ref, guard pages after every input."""
    r = qemu(arm_build, cpu, "arm_kernel_check")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "ALL OK" in r.stdout
    for name in EXPECTED_PATHS[cpu]:
        assert f"path {name} " in r.stdout, r.stdout


@pytest.mark.parametrize("cpu", ["cortex-a72", "max"])
def test_common_kernel_test_under_qemu(arm_build, cpu):
    """The shared kernel test program (also run natively on x86) on the aarch64 paths. -cpu max
    runs every path (neon included) on the full case list; cortex-a72 the quick list."""
    r = qemu(arm_build, cpu, "llmfold_kernel_test", *(["--quick"] if cpu == "cortex-a72" else []))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for name in EXPECTED_PATHS[cpu]:
        assert f"path {name}: ok" in r.stdout, r.stdout
    assert " 0 failures" in r.stdout


def _count_insns_module():
    spec = importlib.util.spec_from_file_location("count_insns", ARM_TESTS / "count_insns.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_a4_variant_has_fewer_instructions_per_mac(arm_build):
    """The "neon" table's A4 multiplier is the one with fewer executed instructions per MAC."""
    ci = _count_insns_module()
    exe = str(arm_build / "arm_insn_count")
    per_mac = {}
    for variant in ("vmull", "agile"):
        for M in (1, 2):
            total, _, _ = ci.count(QEMU, exe, variant, 4, M, 512, 64, 128)
            per_mac[variant, M] = total / (M * 512 * 64)
    alt = paths(arm_build, "cortex-a72")[1]
    default = "vmull" if alt == "neon-agile" else "agile"
    other = "agile" if default == "vmull" else "vmull"
    for M in (1, 2):
        assert per_mac[default, M] < per_mac[other, M], per_mac
    # Sanity: the counts are real (an A4 MAC costs well under one instruction, more than 1/16).
    for v in per_mac.values():
        assert 1 / 16 < v < 1.0, per_mac


# ----------------------------------------------------------------------------------------------
# libllmfold_ops.so for aarch64 inside ONNX Runtime's aarch64 build, under qemu (issue 8 groundwork).
# ORT's cpuinfo reads the host's CPU sysfs under qemu-user and crashes, so qemu_run.sh runs it in a
# private mount namespace with an empty directory over /sys/devices/system/cpu (needs root).

ORT_INCLUDE = REPO / "build" / "ortdev" / "usr" / "include" / "onnxruntime"


@pytest.fixture(scope="session")
def arm_ort(arm_build) -> Path:
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        msg = "ORT under qemu needs root for the mount namespace (unshare -m)"
        print("SKIP:", msg)
        pytest.skip(msg)
    if not (ORT_INCLUDE / "onnxruntime_lite_custom_op.h").is_file():
        r = subprocess.run(["sh", str(REPO / "custom_ops" / "fetch_ort_headers.sh"), str(REPO / "build")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            msg = f"ORT headers unavailable: {r.stderr.strip()[-300:]}"
            print("SKIP:", msg)
            pytest.skip(msg)
    r = subprocess.run(["sh", str(ARM_TESTS / "fetch_ort_aarch64.sh"), str(arm_build)], capture_output=True,
                       text=True, env=dict(os.environ, PYTHON=sys.executable))
    if r.returncode != 0:
        msg = f"onnxruntime aarch64 wheel unavailable: {r.stderr.strip()[-300:]}"
        print("SKIP:", msg)
        pytest.skip(msg)
    rt = arm_build / "ort-aarch64" / "lib"
    r = subprocess.run(["sh", str(ARM_TESTS / "build_arm.sh"), str(arm_build), "--ort-lib", str(ORT_INCLUDE),
                        "--ort-runtime", str(rt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cross build of libllmfold_ops.so / ort_driver failed:\n{r.stdout}\n{r.stderr}"
    assert (arm_build / "libllmfold_ops.so").is_file() and (arm_build / "ort_driver").is_file()
    return rt


def _qmatmul_three_ways(tmp: Path, M: int, K: int, N: int, bs: int):
    """One model, three QMatMul nodes (act_bits 16, 8 with zero points + bias, 4 with TRIP shifts)."""
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import numpy as np
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    from compiler import custom_ops as co

    rng = np.random.default_rng(3)
    nb = -(-K // bs)
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    sc = co.round_scales(rng.uniform(0.01, 0.08, (nb, N)))
    zp = rng.integers(0, 16, (nb, N)).astype(np.uint8)
    bias = rng.uniform(-1, 1, N).astype(np.float32)
    shift = rng.integers(0, 3, K).astype(np.uint8)
    sym = co.pack_int4_blocks(q, sc, None, bs)
    asym = co.pack_int4_blocks(q, sc, zp, bs)
    inits = [numpy_helper.from_array(sym["data"], "B"), numpy_helper.from_array(sym["scales"], "S"),
             numpy_helper.from_array(asym["data"], "Ba"), numpy_helper.from_array(asym["scales"], "Sa"),
             numpy_helper.from_array(asym["zero_points"], "Za"), numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(shift, "shift")]
    nodes = [co.make_qmatmul_node(["A", "B", "S"], "Y16", K, N, bs, 16, name="q16"),
             co.make_qmatmul_node(["A", "Ba", "Sa", "Za", "bias"], "Y8", K, N, bs, 8, name="q8"),
             co.make_qmatmul_node(["A", "B", "S", "", "", "shift"], "Y4", K, N, bs, 4, name="q4")]
    outs = [helper.make_tensor_value_info(n, TP.FLOAT, ["M", N]) for n in ("Y16", "Y8", "Y4")]
    g = helper.make_graph(nodes, "q3", [helper.make_tensor_value_info("A", TP.FLOAT, ["M", K])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    model = tmp / "q3.onnx"
    model.write_bytes(m.SerializeToString())
    A = rng.standard_normal((M, K)).astype(np.float32)
    A[M // 2] *= 1e3  # a row with a different scale
    (tmp / "a.f32").write_bytes(A.tobytes())
    want = [co.qmatmul_reference(A, sym["data"], sym["scales"], None, K, N, bs, 16),
            co.qmatmul_reference(A, asym["data"], asym["scales"], asym["zero_points"], K, N, bs, 8, bias=bias),
            co.qmatmul_reference(A, sym["data"], sym["scales"], None, K, N, bs, 4, channel_shift=shift)]
    return model, want


@pytest.mark.parametrize("cpu,kernels", [("cortex-a72", None), ("cortex-a72", "dotprod"), ("max", None),
                                         ("max", "dotprod"), ("max", "neon-agile")])
def test_qmatmul_in_ort_aarch64(arm_build, arm_ort, tmp_path, cpu, kernels):
    import numpy as np

    M, K, N, bs = 5, 200, 40, 32
    model, want = _qmatmul_three_ways(tmp_path, M, K, N, bs)
    env = dict(os.environ)
    env.pop("LLMFOLD_KERNELS", None)
    if kernels:
        env["LLMFOLD_KERNELS"] = kernels
    r = subprocess.run(["sh", str(ARM_TESTS / "qemu_run.sh"), "--cpu", cpu, "--libdir", str(arm_ort),
                        str(arm_build / "ort_driver"), str(arm_build / "libllmfold_ops.so"), str(model),
                        str(tmp_path / "a.f32"), str(M), str(K), str(tmp_path / "y"), "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    if cpu == "cortex-a72" and kernels == "dotprod":
        assert "LLMFOLD_KERNELS=dotprod is unknown or unsupported on this CPU; using neon" in r.stderr
    elif kernels:
        assert "LLMFOLD_KERNELS" not in r.stderr
    for i, ref in enumerate(want):
        got = np.fromfile(tmp_path / f"y.{i}.f32", dtype=np.float32).reshape(M, N)
        tol = 1e-5 * np.abs(ref).max(axis=1, keepdims=True) + 1e-6  # per row: rows differ in scale
        bad = np.abs(got - ref) > tol
        assert not bad.any(), f"output {i} ({cpu}, {kernels}): {np.argwhere(bad)[:5]} {got[bad][:5]} {ref[bad][:5]}"


@pytest.fixture(scope="session")
def arm_asan_build(arm_build) -> Path:
    build = BUILD.parent / (BUILD.name + "-asan")
    r = subprocess.run(["sh", str(ARM_TESTS / "build_arm.sh"), str(build), "--asan"], capture_output=True, text=True)
    assert r.returncode == 0, f"ASan cross build failed:\n{r.stdout}\n{r.stderr}"
    return build


@pytest.mark.parametrize("cpu", ["cortex-a72", "max"])
def test_kernel_test_asan_ubsan_under_qemu(arm_asan_build, cpu):
    """The common kernel test built with ASan+UBSan for aarch64 (dynamic: ASan needs it)."""
    build = arm_asan_build
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="halt_on_error=1")
    env.pop("LLMFOLD_KERNELS", None)
    r = subprocess.run([QEMU, "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", str(build / "llmfold_kernel_test"),
                        "--quick"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in EXPECTED_PATHS[cpu]:
        assert f"path {name}: ok" in r.stdout, r.stdout
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr[-3000:]
