"""``llmfold bench-kernels``: QMatMul (A16/A8/A4) against ONNX Runtime's MatMulNBits (block 32,
accuracy_level 4 and 0) and fp32 MatMul on the same weights, and PackedMatMul (float32 tiles)
against that fp32 MatMul, in one process, interleaved, with the same intra-op threads; medians.

The 4-bit weights come from ``MatMulNBitsQuantizer`` (symmetric, block 32); QMatMul runs exactly
those codes repacked into llmfold's layout, with the scales rounded to float16 (the layout's scale
type; MatMulNBits keeps float32 ones). ``weight_gb_s`` counts the weight bytes a kernel must stream:
K*N/2 for the 4-bit kernels (scales excluded, as in the issue's reference numbers), K*N*4 for fp32
and packed-f32.
The read bandwidth is the best of several ORT ReduceSum passes over a 256 MB float tensor with the
same threads.

Clock: with 1 thread (the default) the calling thread's CPU time, which ORT spends entirely in the
op, so other processes sharing the cores do not inflate the numbers; with more threads, wall time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from . import custom_ops as co

SHAPES = [(576, 1536), (1536, 576), (576, 576), (4096, 4096), (4096, 11008)]
MS = [1, 128]
BLOCK = 32
KERNELS = ["qmatmul-a16", "qmatmul-a8", "qmatmul-a4", "matmulnbits-acc4", "matmulnbits-acc0", "fp32", "packed-f32"]


def _model(nodes, inits, K, N):
    from onnx import TensorProto as TP
    from onnx import helper

    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", TP.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, ["M", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    m.ir_version = 10
    return m


def _nbits_models(W: np.ndarray):
    """MatMulNBits models (acc4, acc0) of W and the codes/scales they use."""
    import logging

    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    K, N = W.shape
    fp32 = _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(W, "W")], K, N)
    out = {}
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    for acc in (4, 0):
        cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=acc)
        src = type(fp32)()
        src.CopyFrom(fp32)  # the quantizer rewrites its input model in place
        q = MatMulNBitsQuantizer(src, algo_config=cfg)
        q.process()
        out[acc] = q.model.model
        if [n.op_type for n in out[acc].graph.node] != ["MatMulNBits"]:
            raise RuntimeError("MatMulNBitsQuantizer did not produce one MatMulNBits node")
    # MatMulNBits B: uint8 [N, n_blocks, BLOCK/2], two k per byte (low nibble = even k); scales [N*n_blocks].
    nodes = [n for n in out[4].graph.node if n.op_type == "MatMulNBits"]
    if len(nodes) != 1:
        raise RuntimeError("MatMulNBitsQuantizer did not produce one MatMulNBits node")
    inits = {i.name: numpy_helper.to_array(i) for i in out[4].graph.initializer}
    B = inits[nodes[0].input[1]]
    S = inits[nodes[0].input[2]].reshape(N, -1)
    if len(nodes[0].input) > 3 and nodes[0].input[3]:
        raise RuntimeError("expected symmetric MatMulNBits weights (no zero points)")
    n_blocks = S.shape[1]
    codes = np.stack([B & 15, B >> 4], axis=-1).reshape(N, n_blocks * BLOCK)[:, :K]
    return fp32, out[4], out[0], codes.T.copy(), S.T.astype(np.float32).copy()


def _qmatmul_model(q: np.ndarray, scales: np.ndarray, act_bits: int):
    from onnx import numpy_helper

    K, N = q.shape
    p = co.pack_int4_blocks(q, scales, None, BLOCK)
    inits = [numpy_helper.from_array(p["data"], "B"), numpy_helper.from_array(p["scales"], "S")]
    return _model([co.make_qmatmul_node(["A", "B", "S"], "Y", K, N, BLOCK, act_bits)], inits, K, N)


def _packed_f32_model(W: np.ndarray):
    from onnx import numpy_helper

    K, N = W.shape
    node = co.make_packed_matmul_node(["A", "B"], "Y", K, N)
    return _model([node], [numpy_helper.from_array(co.pack_float_tiles(W), "B")], K, N)


def _clock(threads: int):
    """With one intra-op thread ORT runs the op in the calling thread, so that thread's CPU time is
    the kernel time and does not count time the OS gave to other processes; with more threads the
    work is spread over the pool and only wall time is meaningful."""
    return time.thread_time if threads == 1 else time.perf_counter


class _Runner:
    """One session with bound input/output (IOBinding keeps Python overhead out of the loop)."""

    def __init__(self, model, so, A: np.ndarray, N: int, clock=time.perf_counter):
        self.clock = clock
        import onnxruntime as ort

        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.binding = self.sess.io_binding()
        self.a = ort.OrtValue.ortvalue_from_numpy(A)
        self.y = ort.OrtValue.ortvalue_from_numpy(np.empty((A.shape[0], N), np.float32))
        self.binding.bind_ortvalue_input("A", self.a)
        self.binding.bind_ortvalue_output("Y", self.y)

    def run(self, n: int) -> float:
        t = self.clock()
        for _ in range(n):
            self.sess.run_with_iobinding(self.binding)
        return (self.clock() - t) / n

    def output(self) -> np.ndarray:
        return self.y.numpy()


def read_bandwidth_gb_s(threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper

    n = 64 * 1024 * 1024
    g = helper.make_graph([helper.make_node("ReduceSum", ["X"], ["Y"], keepdims=0)], "bw",
                          [helper.make_tensor_value_info("X", TP.FLOAT, [n])],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = ort.OrtValue.ortvalue_from_numpy(np.ones(n, np.float32))
    b = s.io_binding()
    b.bind_ortvalue_input("X", x)
    b.bind_output("Y")
    best = float("inf")
    clock = _clock(threads)
    for _ in range(6):
        t = clock()
        s.run_with_iobinding(b)
        best = min(best, clock() - t)
    return n * 4 / best / 1e9


def measure(threads: int, shapes=SHAPES, ms=MS, rounds: int = 7, min_sample_s: float = 0.02, log=None) -> dict:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    bw = read_bandwidth_gb_s(threads)
    rows = []
    for K, N in shapes:
        if log:
            log(f"quantizing {K}x{N} ...")
        W = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
        fp32, acc4, acc0, q, scales = _nbits_models(W)
        models = {"qmatmul-a16": _qmatmul_model(q, scales, 16), "qmatmul-a8": _qmatmul_model(q, scales, 8),
                  "qmatmul-a4": _qmatmul_model(q, scales, 4), "matmulnbits-acc4": acc4, "matmulnbits-acc0": acc0,
                  "fp32": fp32, "packed-f32": _packed_f32_model(W)}
        so = co.make_session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for M in ms:
            A = rng.standard_normal((M, K)).astype(np.float32)
            runners = {k: _Runner(m, so, A, N, _clock(threads)) for k, m in models.items()}
            # Sanity: the 4-bit kernels compute the same product (A8/A4 within quantization error).
            runners["qmatmul-a16"].run(1)
            runners["matmulnbits-acc0"].run(1)
            ref, nb = runners["qmatmul-a16"].output(), runners["matmulnbits-acc0"].output()
            if not np.allclose(ref, nb, rtol=1e-3, atol=1e-3 * float(np.abs(nb).max())):
                raise RuntimeError(f"QMatMul A16 and MatMulNBits disagree at K={K} N={N} M={M}")
            runners["fp32"].run(1)
            runners["packed-f32"].run(1)
            f, p = runners["fp32"].output(), runners["packed-f32"].output()
            if not np.allclose(f, p, rtol=1e-5, atol=1e-5 * float(np.abs(f).max())):
                raise RuntimeError(f"PackedMatMul and MatMul disagree at K={K} N={N} M={M}")
            inner = {}
            for k, r in runners.items():  # warm up and size the inner loops
                t = r.run(2)
                inner[k] = max(1, min(2000, int(min_sample_s / max(t, 1e-7))))
            samples = {k: [] for k in runners}
            order = list(runners)
            for i in range(rounds):  # interleaved rounds; the order rotates so that no kernel always
                # runs right after the same one (which leaves its own weights in the caches and
                # the memory controller in its own state: position effects of several percent
                # between kernels that execute the same code, e.g. A8 and A4 at block 32)
                for k in order[i % len(order):] + order[:i % len(order)]:
                    samples[k].append(runners[k].run(inner[k]))
            for k in KERNELS:
                med = statistics.median(samples[k])
                wbytes = K * N * (4 if k in ("fp32", "packed-f32") else 0.5)
                rows.append(dict(K=K, N=N, M=M, threads=threads, kernel=k, median_us=round(med * 1e6, 2),
                                 weight_gb_s=round(wbytes / med / 1e9, 3)))
            del runners
            if log:
                done = {r["kernel"]: r["median_us"] for r in rows if (r["K"], r["N"], r["M"]) == (K, N, M)}
                log(f"  M={M}: qmatmul-a8 {done['qmatmul-a8']} us, matmulnbits-acc4 {done['matmulnbits-acc4']} us")
    return {"read_bandwidth_gb_s": round(bw, 3), "rows": rows}


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(150, Console().width))
    rows = result["rows"]
    bw = result["read_bandwidth_gb_s"]
    by = {(r["K"], r["N"], r["M"], r["kernel"]): r for r in rows}
    threads = rows[0]["threads"] if rows else 0
    t = Table(title=f"bench-kernels: median us per call, {threads} thread(s); read bandwidth {bw:.1f} GB/s")
    for col in ["K x N", "M", "a8", "a4", "a16", "nbits acc4", "nbits acc0", "fp32", "packed", "acc4/a8", "acc4/a4",
                "acc0/a16", "fp32/packed", "a8 GB/s", "a8 % bw"]:
        t.add_column(col, justify="right")
    for K, N, M in sorted({(r["K"], r["N"], r["M"]) for r in rows}, key=lambda x: (x[2], x[0] * x[1], x[0])):
        g = lambda k: by[(K, N, M, k)]["median_us"]
        a8 = by[(K, N, M, "qmatmul-a8")]
        t.add_row(f"{K}x{N}", str(M), f"{g('qmatmul-a8'):.0f}", f"{g('qmatmul-a4'):.0f}", f"{g('qmatmul-a16'):.0f}",
                  f"{g('matmulnbits-acc4'):.0f}", f"{g('matmulnbits-acc0'):.0f}", f"{g('fp32'):.0f}",
                  f"{g('packed-f32'):.0f}",
                  f"{g('matmulnbits-acc4') / g('qmatmul-a8'):.2f}x", f"{g('matmulnbits-acc4') / g('qmatmul-a4'):.2f}x",
                  f"{g('matmulnbits-acc0') / g('qmatmul-a16'):.2f}x", f"{g('fp32') / g('packed-f32'):.2f}x",
                  f"{a8['weight_gb_s']:.2f}",
                  f"{100 * a8['weight_gb_s'] / bw:.0f}%")
    console.print(t)
    console.print("ratios > 1x: QMatMul (PackedMatMul for fp32/packed) faster. GB/s: int4 weight bytes (K*N/2) per "
                  "call time.")


def main(json_output: bool = False, threads: int | None = None) -> int:
    """Runs the benchmark; prints the ratio table, or one JSON object with --json. Returns 0."""
    threads = 1 if threads is None else int(threads)
    if threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        co.library_path()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = None if json_output else (lambda s: print(s, file=sys.stderr, flush=True))
    result = measure(threads, log=log)
    if json_output:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    sys.exit(main(a.json, a.threads))
