"""Where a decode step's time goes: the whole step against its linear nodes alone and the read bandwidth.

    python samples/decode_breakdown.py MODEL_DIR [--threads 2] [--rounds 5]

Builds one ONNX graph holding every linear node of the model — QMatMul and PackedMatMul with their
packed initializers, and MatMul reading an initializer (fp32 layers, both factors of low-rank pairs,
lm_head) — each fed a random activation row (M = 1, as in decode), and times it next to a real
KV-cached decode step of the model (llmfold's runtime, median of 64 steps after a 16-token prompt)
and ORT's ReduceSum over 256 MB (the machine's read bandwidth). Rounds alternate the three, so they
see the same conditions; medians over rounds are printed. The weights of all the linears together
exceed the last-level cache on a small machine, so "linears alone" is the weight stream, and
bytes / time against the read bandwidth says whether decode is bound by memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def linear_stack(model_dir: Path):
    """(ModelProto with only the linear nodes, input feeds, weight bytes, node count per op type)."""
    import onnx
    from onnx import TensorProto, helper

    from compiler import custom_ops as co

    m = onnx.load(str(model_dir / "model.onnx"))  # external data loaded
    inits = {i.name: i for i in m.graph.initializer}
    nodes, used, inputs, outputs, feeds, nbytes, kinds = [], {}, [], [], {}, 0, {}
    rng = np.random.default_rng(0)
    for n in m.graph.node:
        if n.op_type in ("QMatMul", "PackedMatMul") and n.domain == co.DOMAIN:
            K = next(a.i for a in n.attribute if a.name == "K")
            N = next(a.i for a in n.attribute if a.name == "N")
            if any(a.name == "swiglu" and a.i for a in n.attribute):
                N //= 2  # QMatMul's SwiGLU epilogue halves the output (gate | up → silu(gate)·up)
            widths = next((list(a.ints) for a in n.attribute if a.name == "group_n"), [N])  # block-diagonal: one output per group
        elif n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            K, N = inits[n.input[1]].dims
            widths = [N]
        else:
            continue
        kinds[n.op_type] = kinds.get(n.op_type, 0) + 1
        x = f"x{len(nodes)}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, K]))
        feeds[x] = rng.standard_normal((1, K)).astype(np.float32)
        names = [f"y{len(nodes)}_{g}" for g in range(len(widths))]
        outputs += [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, w]) for y, w in zip(names, widths)]
        node = onnx.NodeProto()
        node.CopyFrom(n)
        node.input[0] = x
        del node.output[:]
        node.output.extend(names)
        for name in n.input[1:]:
            if name and name not in used:
                if name not in inits:
                    raise SystemExit(f"{n.name}: input {name} is not an initializer; not a model written by llmfold?")
                used[name] = inits[name]
                nbytes += len(inits[name].raw_data) or onnx.numpy_helper.to_array(inits[name]).nbytes
        nodes.append(node)
    if not nodes:
        raise SystemExit(f"{model_dir}: no linear node (QMatMul, PackedMatMul, or MatMul with an initializer weight)")
    g = helper.make_graph(nodes, "linears", inputs, outputs, list(used.values()))
    stack = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(co.DOMAIN, 1)])
    stack.ir_version = 10
    return stack, feeds, nbytes, kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="a model directory (export or compile output)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if not (args.dir / "model.onnx").is_file():
        print(f"error: {args.dir} has no model.onnx; pass a directory written by `llmfold export` or `llmfold compile`", file=sys.stderr)
        return 2

    import onnxruntime as ort

    from compiler import custom_ops as co
    from compiler.bench_kernels import read_bandwidth_gb_s
    from compiler.runtime import open_session

    stack, feeds, nbytes, kinds = linear_stack(args.dir)
    so = co.make_session_options(args.threads)
    sess = ort.InferenceSession(stack.SerializeToString(), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
    for o in sess.get_outputs():
        binding.bind_output(o.name)
    lm = open_session(args.dir, threads=args.threads)
    prompt = np.random.default_rng(0).integers(100, 40000, 16)
    for _ in range(3):  # warm-up
        sess.run_with_iobinding(binding)
    lm.greedy(prompt, 4)
    stack_ms, step_ms, bw = [], [], []
    for _ in range(args.rounds):
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            ts.append(time.perf_counter() - t0)
        stack_ms.append(1e3 * float(np.median(ts)))
        step_ms.append(1e3 * float(np.median(lm.greedy(prompt, 65)["step_s"])))
        bw.append(read_bandwidth_gb_s(args.threads))
    s, d, b = (float(np.median(v)) for v in (stack_ms, step_ms, bw))
    print(f"{args.dir}: {args.threads} threads, {args.rounds} rounds (medians)")
    print(f"  decode step            {d:8.3f} ms   ({1e3 / d:.1f} tok/s)")
    counts = " + ".join(f"{c} {op}" for op, c in sorted(kinds.items()))
    print(f"  its linears alone      {s:8.3f} ms   ({counts} nodes, {nbytes / 1e6:.1f} MB of weights: "
          f"{nbytes / s / 1e6:.1f} GB/s)")
    print(f"  everything else        {d - s:8.3f} ms")
    print(f"  read bandwidth         {b:8.1f} GB/s  (ReduceSum over 256 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
