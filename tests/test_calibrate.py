"""Calibration: seeded windows and streamed statistics of tapped linear-layer inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compiler.calibrate import calibration_windows, collect_input_stats, memory_bound
from compiler.errors import UserError
from compiler.structure import ModelStructure


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    from compiler.textdata import default_calibration_text

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(default_calibration_text().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return p


def _tokens(model_dir, path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return np.asarray(tok(Path(path).read_text(), add_special_tokens=False)["input_ids"])


def test_windows_are_seeded_slices_of_the_text(tiny_model_dir, calib_text):
    w = calibration_windows(tiny_model_dir, calib_text, num_windows=5, seq_len=48, seed=3)
    assert w.shape == (5, 48) and w.dtype == np.int64
    assert np.array_equal(w, calibration_windows(tiny_model_dir, calib_text, num_windows=5, seq_len=48, seed=3))
    assert not np.array_equal(w, calibration_windows(tiny_model_dir, calib_text, num_windows=5, seq_len=48, seed=4))
    ids = _tokens(tiny_model_dir, calib_text)
    starts = np.random.default_rng(3).integers(0, len(ids) - 48 + 1, size=5)
    for row, s in zip(w, starts):
        assert np.array_equal(row, ids[s : s + 48])


def test_disjoint_windows_share_no_token(tiny_model_dir, calib_text):
    """disjoint = True: distinct slots of a seq_len grid (tune_scales holds some of them out)."""
    ids = _tokens(tiny_model_dir, calib_text)
    slots = len(ids) // 48
    w = calibration_windows(tiny_model_dir, calib_text, num_windows=slots, seq_len=48, seed=3, disjoint=True)
    starts = []
    for row in w:
        s = next(s for s in range(0, slots * 48, 48) if np.array_equal(ids[s : s + 48], row))
        starts.append(s)
    assert sorted(starts) == list(range(0, slots * 48, 48))  # every slot exactly once
    with pytest.raises(UserError, match=rf"{slots} disjoint windows of 48, {slots + 1} needed"):
        calibration_windows(tiny_model_dir, calib_text, num_windows=slots + 1, seq_len=48, disjoint=True)


def test_text_too_short_says_how_many_tokens(tiny_model_dir, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("Flat is better than nested.")
    n = len(_tokens(tiny_model_dir, p))
    with pytest.raises(UserError, match=rf"has {n} tokens but one window needs 512"):
        calibration_windows(tiny_model_dir, p, num_windows=2, seq_len=512)
    with pytest.raises(UserError, match="does not exist"):
        calibration_windows(tiny_model_dir, tmp_path / "missing.txt")


def _hf_inputs(hf_dir, windows, modules):
    """Inputs of the named torch modules over all windows, each run on its own: name → [W·T, K]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    got = {k: [] for k in modules}
    hooks = [
        model.get_submodule(path).register_forward_pre_hook(lambda m, a, k=key: got[k].append(a[0].reshape(-1, a[0].shape[-1]).numpy().copy()))
        for key, path in modules.items()
    ]
    with torch.no_grad():
        for row in windows:
            model(input_ids=torch.from_numpy(row[None]))
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v).astype(np.float64) for k, v in got.items()}


def test_streamed_stats_equal_one_shot_numpy(tiny_model_dir, tiny_hf_dir, calib_text, capsys):
    meta = json.loads((Path(tiny_model_dir) / "llmfold.json").read_text())
    st = ModelStructure.from_json(meta["structure"])
    last = len(st.blocks) - 1
    pick = {  # structure layer → the transformers module reading the same X
        "layers.0.q": "model.layers.0.self_attn.q_proj",
        "layers.0.o": "model.layers.0.self_attn.o_proj",
        f"layers.{last}.gate": f"model.layers.{last}.mlp.gate_proj",
        f"layers.{last}.down": f"model.layers.{last}.mlp.down_proj",
        "lm_head": "lm_head",
    }
    values = {name: st.linear(name).input for name in pick}
    windows = calibration_windows(tiny_model_dir, calib_text, num_windows=3, seq_len=40, seed=0)
    stats = collect_input_stats(
        Path(tiny_model_dir) / "model.onnx", list(values.values()), windows, max_samples=16, threads=1, progress=True
    )
    err = capsys.readouterr().err
    Ks = {v: st.linear(n).K for n, v in values.items()}
    stats_b, acts_b = memory_bound(Ks, 16, 40)
    assert stats_b == sum(8 * K * K + 12 * K + 64 * K for K in Ks.values())
    assert "memory bound" in err and f"{stats_b / 1024:.1f} KiB" in err

    ref = _hf_inputs(tiny_hf_dir, windows, {values[n]: m for n, m in pick.items()})
    for name, v in values.items():
        s, x = stats[v], ref[v]
        assert s.K == st.linear(name).K == x.shape[1]
        assert s.count == 3 * 40
        scale = np.abs(x).max() ** 2 * len(x)
        np.testing.assert_allclose(s.xtx, x.T @ x, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-4, atol=1e-5 * np.abs(x).max())
        np.testing.assert_allclose(s.absmax, np.abs(x).max(0), rtol=1e-4, atol=1e-6)
        assert s.samples.shape == (16, s.K)
        # every reservoir sample is one of the rows of X
        d = np.abs(s.samples[:, None, :].astype(np.float64) - x[None]).max(-1).min(-1)
        assert d.max() < 1e-3 * max(1.0, np.abs(x).max())


def test_stats_of_the_same_value_are_shared_and_bad_taps_rejected(tiny_model_dir, calib_text):
    meta = json.loads((Path(tiny_model_dir) / "llmfold.json").read_text())
    st = ModelStructure.from_json(meta["structure"])
    q, k = st.blocks[0].q.input, st.blocks[0].k.input
    windows = calibration_windows(tiny_model_dir, calib_text, num_windows=1, seq_len=16)
    stats = collect_input_stats(Path(tiny_model_dir) / "model.onnx", [q, k, q], windows, threads=1, progress=False)
    assert set(stats) == {q, k}
    with pytest.raises(ValueError, match="no node"):
        collect_input_stats(Path(tiny_model_dir) / "model.onnx", ["not/a/value"], windows, threads=1, progress=False)
