#!/usr/bin/env python3
"""Dynamic aarch64 instruction counts per MAC of the integer kernels, from qemu's TB logs.

qemu-aarch64 -d in_asm,exec,nochain logs every translated block once (its instructions) and every
block execution (nochain: no direct block chaining, so each execution is logged). Running the
driver with 1 and 2 repetitions and subtracting leaves exactly one kernel call. The hottest block
of that call is the inner loop; its size and trip count are reported too.

usage: count_insns.py BUILD_DIR [QEMU] [--show-hot]      (BUILD_DIR holds arm_insn_count, from build_arm.sh)
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

TB_HDR = re.compile(r"^IN:")
INSN = re.compile(r"^0x([0-9a-f]+):\s")
TRACE = re.compile(r"^Trace \d+: \S+ \[[0-9a-f]+/([0-9a-f]+)/")


def run(qemu, exe, args):
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "q.log")
        subprocess.run([qemu, "-cpu", "max", "-d", "in_asm,exec,nochain", "-D", log, exe, *args],
                       check=True, stdout=subprocess.DEVNULL)
        sizes, texts, execs, cur, first = {}, {}, collections.Counter(), None, None
        lines = []
        with open(log, errors="replace") as f:
            for line in f:
                if TB_HDR.match(line):
                    cur, first, lines = 0, None, []
                    continue
                m = INSN.match(line)
                if m and cur is not None:
                    if first is None:
                        first = int(m.group(1), 16)
                    cur += 1
                    lines.append(line.rstrip())
                    continue
                if cur is not None and not line.strip():
                    if first is not None:
                        sizes[first] = cur
                        texts[first] = lines
                    cur = None
                    continue
                m = TRACE.match(line)
                if m:
                    execs[int(m.group(1), 16)] += 1
        if cur and first is not None:
            sizes[first] = cur
            texts[first] = lines
    run.texts = texts
    return sizes, execs


def count(qemu, exe, variant, bits, M, K, N, bs):
    base = [variant, str(bits), str(M), str(K), str(N), str(bs)]
    s1, e1 = run(qemu, exe, base + ["1"])
    s2, e2 = run(qemu, exe, base + ["2"])
    sizes = {**s1, **s2}
    delta = {pc: e2[pc] - e1.get(pc, 0) for pc in e2 if e2[pc] - e1.get(pc, 0) > 0}
    total = sum(sizes.get(pc, 0) * n for pc, n in delta.items())
    hot_pc = max(delta, key=lambda pc: delta[pc] * sizes.get(pc, 0))
    count.hot_text = run.texts.get(hot_pc, [])
    return total, sizes.get(hot_pc, 0), delta[hot_pc]


def main():
    show = "--show-hot" in sys.argv
    argv = [a for a in sys.argv if a != "--show-hot"]
    build = argv[1]
    qemu = argv[2] if len(argv) > 2 else "qemu-aarch64-static"
    exe = os.path.join(build, "arm_insn_count")
    K, N, bs = 512, 64, 128
    rows = []
    for variant, bits in [("vmull", 4), ("agile", 4), ("vmull", 8), ("dotprod", 8), ("i8mm", 8)]:
        for M in (1, 2, 4, 8):
            total, hot_size, hot_n = count(qemu, exe, variant, bits, M, K, N, bs)
            macs = M * K * N
            rows.append((variant, bits, M, total, macs, hot_size, hot_n))
            print(f"{variant:8s} A{bits} M={M}  insns {total:8d}  MACs {macs:8d}  "
                  f"insns/MAC {total / macs:.4f}   hottest block: {hot_size} insns x {hot_n}",
                  flush=True)
            if show:
                print("\n".join("      " + t for t in count.hot_text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
