"""Interleaved speed A/B of model directories in llmfold's runtime (one process, same threads).

    python samples/ab_speed.py DIR_A DIR_B [...] [--rounds 7] [--threads 2]

Single benchmark runs on a shared or throttling machine swing by ±15 %; alternating the models
round by round exposes them to the same conditions, and the median of the per-round ratios
(each against the last directory) is what to compare. Prefill: one 512-token prompt as generation
runs it (`LanguageModel.prefill`: the cache and the last position's logits); decode: the median
step time of 32 greedy steps after a 16-token prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="model directories; ratios are against the last one")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from compiler.runtime import open_session

    sessions = [open_session(d, threads=args.threads) for d in args.dirs]
    prompt = np.random.default_rng(0).integers(100, 40000, 512)
    short = prompt[:16]
    for s in sessions:  # warm-up: first-run allocations and thread start-up
        s.prefill(prompt)
        s.greedy(short, 4)
    prefill = [[] for _ in sessions]
    decode = [[] for _ in sessions]
    for _ in range(args.rounds):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.prefill(prompt)
            prefill[i].append(len(prompt) / (time.perf_counter() - t0))
            decode[i].append(1.0 / float(np.median(s.greedy(short, 33)["step_s"])))
    for name, rows in (("prefill", prefill), ("decode", decode)):
        base = np.array(rows[-1])
        for d, r in zip(args.dirs, rows):
            r = np.array(r)
            print(f"{name:8s} {str(d):40s} {np.median(r):8.1f} tok/s   ×last (per-round median) {np.median(r / base):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
