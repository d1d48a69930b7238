"""ARM end to end: compiled models run in ONNX Runtime's aarch64 build under qemu-aarch64-static.

The C++ sample (samples/cpp, ops linked statically, RegisterLlmfoldOps) is cross-built for aarch64
together with the op library's kernels and ORT glue, linked against libonnxruntime.so from the
onnxruntime 1.31.1 manylinux aarch64 wheel, and run under qemu with the mount-namespace runner
(custom_ops/tests/arm/qemu_run.sh) once with -cpu cortex-a72 (ARMv8.0: `neon` path) and once with
-cpu max (dotprod + i8mm: `i8mm` path). On tiny compiled models (w4a16; w4a8 with zero points;
w4a4 with TRIP channel shifts; SVD low-rank; token-pruned (TokenPrune op, per-layer KV)) the aarch64 logits of a
prefill and of KV-cached decode steps (the same tokens fed on both machines) equal the x86-64
build's (avx2 here):
  * A16: |Δ| ≤ 1e-4 (only float rounding order differs);
  * A8/A4: the integer block dots are exact on every path and only float epilogues (and ORT's
    own fp32 kernels) round differently; that last-ulp noise can move an activation across a
    quantization rounding boundary in a later layer, which changes that output by at most one
    quantization step of one channel (measured: it does not happen on these inputs; tiny models
    differ by < 1e-6). Tolerance: |Δ| ≤ 1e-4·max(1, max|logit|), and the greedy
    tokens are identical.
Plus a few decode steps of SmolLM2-135M compiled w4a8 (slow; see its docstring for what is bounded). Skipped, with the reason printed,
only when the cross toolchain / qemu cannot be installed or we are not root.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sample_helpers import REPO, RECIPES, arm_unavailable, build_sample, calib_text, compile_recipe, run_sample

pytestmark = pytest.mark.arm

ORT_AARCH64 = REPO / "build" / "custom_ops-aarch64" / "ort-aarch64" / "lib"
CPUS = {"cortex-a72": "neon", "max": "i8mm"}  # qemu CPU -> the kernel path dispatch must pick
PROMPT = [1, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]
NEW = 6
A16_TOL = 1e-4
INT_TOL = 1e-4


@pytest.fixture(scope="module")
def samples():
    why = arm_unavailable()
    if why:
        print("SKIP:", why)
        pytest.skip(why)
    return {"x86": build_sample("x86"), "aarch64": build_sample("aarch64")}


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir, tmp_path_factory):
    """name -> compiled tiny model directory (each recipe whose passes exist)."""
    root = tmp_path_factory.mktemp("arm_e2e")
    calib = calib_text(root / "calib.txt")
    out = {"fp32": tiny_model_dir}
    for name, (body, _) in RECIPES.items():
        needed = {"int4": "passes.int4", "svd": "passes.svd", "token_prune": "passes.token_prune"}
        if any(f'name = "{p}"' in body and importlib.util.find_spec(m) is None for p, m in needed.items()):
            continue
        out[name] = compile_recipe(tiny_model_dir, root, name, calib)  # the default (fused) layout, pruned too
    return out


_X86: dict = {}


def x86_reference(samples, model_dir, name):
    if name not in _X86:
        _X86[name] = run_sample(samples["x86"], model_dir, PROMPT, NEW)
    return _X86[name]


def _tolerance(name: str, ref: np.ndarray) -> float:
    act_bits = RECIPES[name][1] if name in RECIPES else 16
    return A16_TOL if act_bits == 16 else INT_TOL * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("cpu", list(CPUS))
@pytest.mark.parametrize("name", ["fp32", *RECIPES])
def test_aarch64_logits_equal_x86(samples, tiny_models, name, cpu):
    if name not in tiny_models:
        pytest.skip(f"the passes of recipe {name} are not there yet")
    model = tiny_models[name]
    ref = x86_reference(samples, model, name)
    got = run_sample(samples["aarch64"], model, PROMPT, NEW, decode_ids=ref.tokens[:-1], cpu=cpu, libdir=ORT_AARCH64)
    diff = float(np.abs(got.logits.astype(np.float64) - ref.logits).max())
    tol = _tolerance(name, ref.logits)
    print(f"\n[{name} on -cpu {cpu}] aarch64 QMatMul path {got.kernel_path} vs x86 {ref.kernel_path}: "
          f"max |Δlogit| {diff:.3g} (tol {tol:.3g}); tokens {got.tokens}")  # fmt: skip
    assert got.kernel_path == CPUS[cpu], got.stderr[-1500:]
    assert got.logits.shape == ref.logits.shape
    assert diff <= tol, f"{name} on {cpu}: max |Δlogit| {diff} > {tol}"
    assert got.tokens == ref.tokens


def test_aarch64_mobile_ort_model(samples, tiny_models, tmp_path):
    """An export-mobile directory (.ort, with the aarch64 op library shipped) runs on aarch64."""
    if "w4a8" not in tiny_models:
        pytest.skip("passes/int4.py is not there yet")
    from compiler.mobile import export_mobile

    lib = REPO / "build" / "custom_ops-aarch64" / "libllmfold_ops.so"
    mobile = export_mobile(tiny_models["w4a8"], tmp_path / "mobile", library=lib if lib.is_file() else None)
    ref = x86_reference(samples, tiny_models["w4a8"], "w4a8")
    got = run_sample(samples["aarch64"], mobile, PROMPT, NEW, cpu="max", libdir=ORT_AARCH64)
    assert "model.ort" in got.stderr and got.kernel_path == "i8mm"
    assert got.tokens == ref.tokens
    assert float(np.abs(got.logits - ref.logits).max()) <= _tolerance("w4a8", ref.logits)


@pytest.mark.slow
def test_smollm2_w4a8_decode_on_aarch64(samples, smollm2_dir, tmp_path_factory, monkeypatch):
    """SmolLM2-135M, int4 RTN weights with zero points and per-token int8 activations (no smoothing,
    tests/sample_helpers.py's "w4a8"): the greedy decode
    gives the same tokens on x86-64 and on both emulated ARM cores, and the prompt's logits stay
    within 15 % of the largest logit (prefill and decode steps).

    Why not the integer-exact tolerance of the tiny models: this model is ill-conditioned under
    per-token int8 (massive activations set each token's scale), so a last-ulp difference before
    a quantizer moves an activation across a rounding boundary and changes later logits by O(1) —
    measured on x86 alone, LLMFOLD_KERNELS=ref vs avx2 (both exact in integers, bit-identical per
    op at M=1,2) differ by up to 2.3 (of max |logit| 28) at some positions. The float ops before
    the first quantizer are such a source across ISAs: since the export's RMSNorm is ORT's float
    RMSNormalization (no longer a float64 chain), x86 and aarch64 builds round differently in the
    last ulp (the fp32 model's prefill logits agree within 5e-5), and the w4a8 prefill differs by
    up to 2.2 (-cpu max) and 2.6 (cortex-a72) of max |logit| 28.5. Decode steps are printed."""
    if importlib.util.find_spec("passes.int4") is None:
        pytest.skip("passes/int4.py is not there yet")
    # The first greedy token here is a near-tie (25.06 vs 24.98 on x86 with ORT's materialized
    # attention, which llmfold selects: compiler/runtime.py GQA_FLASH_ENV); the ISAs' last-ulp
    # differences flip it (x86 905, aarch64 1345). With ORT's default tiled attention the margin was
    # wider and both agreed, so this ISA comparison pins that path on both sides. Since the fp16
    # block scales (2026-12-07) it is a near tie again (x86 6412, aarch64 -cpu max 1345), hence the
    # near-tie rule below rather than equal tokens.
    monkeypatch.setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "0")
    model = compile_recipe(smollm2_dir, tmp_path_factory.mktemp("smollm2_arm"), "w4a8")
    prompt = [1, 504, 3458, 282, 253, 1345, 28]  # bos + six in-vocabulary ids
    new = 4
    ref = run_sample(samples["x86"], model, prompt, new)
    P = len(prompt)
    for cpu in ("max", "cortex-a72"):
        got = run_sample(samples["aarch64"], model, prompt, new, decode_ids=ref.tokens[:-1], cpu=cpu,
                         libdir=ORT_AARCH64, timeout=1800)  # fmt: skip
        d = np.abs(got.logits.astype(np.float64) - ref.logits).max(axis=1)
        print(f"\n[SmolLM2 w4a8 on -cpu {cpu}] path {got.kernel_path} (x86 {ref.kernel_path}): tokens {got.tokens} "
              f"(x86 {ref.tokens}); prefill max |Δlogit| {d[:P].max():.3g} (max |logit| {np.abs(ref.logits[:P]).max():.3g}); decode steps "
              f"max |Δlogit| {np.round(d[P:], 3).tolist()}")  # fmt: skip
        assert got.kernel_path == CPUS[cpu]
        bound = 0.15 * float(np.abs(ref.logits[:P]).max())
        assert d[:P].max() <= bound and d[P:].max() <= bound
        # Greedy tokens agree except at a near tie: x86's own margin between the two picks below
        # the cross-ISA deviation the prompt's rows showed (rows P-1+i chose token i; the ARM run is
        # fed x86's tokens, so every step is compared on the same context).
        for i, (mine, theirs) in enumerate(zip(got.tokens, ref.tokens)):
            margin = float(ref.logits[P - 1 + i, theirs] - ref.logits[P - 1 + i, mine])
            print(f"  step {i}: aarch64 {mine}, x86 {theirs}, x86 margin {margin:.3f}")
            assert mine == theirs or margin <= d[:P].max(), f"step {i}: {mine} != {theirs}, x86 margin {margin:.3f}"
