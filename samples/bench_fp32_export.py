"""Prefill and decode speed: llmfold's fp32 export (plain onnxruntime) vs onnxruntime-genai's fp32.

    python samples/bench_fp32_export.py OUR_MODEL_DIR GENAI_MODEL_DIR [--threads 2] [--prompt 512]
        [--decode 64] [--rounds 3]

Both models get the same prompt (the first N tokens of /usr/share/common-licenses/GPL-3, or
--text FILE) and decode greedily. Rounds alternate between the two so that load from other
processes on the machine hits both alike; the best round of each is reported (the least
disturbed one), with all rounds printed.

Ours runs through onnxruntime with IO binding: the present.* outputs stay OrtValues and are
bound as the next step's past_key_values.* (no copies through numpy). genai runs through its
Generator (append_tokens = prefill, generate_next_token = one decode step); its thread count is
set in a temporary copy of genai_config.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def prompt_tokens(model_dir: Path, text_file: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"{text_file} has only {len(ids)} tokens, need {n}")
    return ids[:n]


class OursRunner:
    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.ort = ort
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        shape = next(i.shape for i in self.sess.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def run(self, prompt: list[int], decode: int):
        ort = self.ort
        io = self.sess.io_binding()
        ids = np.array([prompt], np.int64)
        mask = np.ones_like(ids)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        for n in self.past_names:
            io.bind_cpu_input(n, empty)
        for n in self.out_names:
            io.bind_output(n, "cpu")
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(io)
        outs = dict(zip(self.out_names, io.get_outputs()))
        token = int(outs["logits"].numpy()[0, -1].argmax())
        t1 = time.perf_counter()
        generated = [token]
        total = len(prompt)
        for _ in range(decode):
            total += 1
            io = self.sess.io_binding()
            io.bind_cpu_input("input_ids", np.array([[token]], np.int64))
            io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            for n in self.past_names:
                io.bind_ortvalue_input(n, outs[n.replace("past_key_values.", "present.")])
            for n in self.out_names:
                io.bind_output(n, "cpu")
            self.sess.run_with_iobinding(io)
            outs = dict(zip(self.out_names, io.get_outputs()))
            token = int(outs["logits"].numpy()[0, -1].argmax())
            generated.append(token)
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), decode / (t2 - t1), generated


class GenaiRunner:
    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        self.tmp = Path(tempfile.mkdtemp(prefix="genai_bench_"))
        for p in model_dir.iterdir():
            target = self.tmp / p.name
            if p.name == "genai_config.json":
                cfg = json.loads(p.read_text())
                opts = cfg["model"]["decoder"].setdefault("session_options", {})
                opts["intra_op_num_threads"] = threads
                opts["inter_op_num_threads"] = 1
                target.write_text(json.dumps(cfg, indent=2))
            else:
                target.symlink_to(p.resolve())
        self.og = og
        self.model = og.Model(str(self.tmp))

    def run(self, prompt: list[int], decode: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + decode + 1, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompt, np.int32))
        t1 = time.perf_counter()
        for _ in range(decode):
            gen.generate_next_token()
        t2 = time.perf_counter()
        tokens = list(gen.get_sequence(0))[len(prompt):]
        return len(prompt) / (t1 - t0), decode / (t2 - t1), tokens

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("genai", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    args = ap.parse_args()
    prompt = prompt_tokens(args.ours, args.text, args.prompt)
    ours, genai = OursRunner(args.ours, args.threads), GenaiRunner(args.genai, args.threads)
    runners = [("llmfold fp32", ours), ("genai fp32", genai)]
    for _, runner in runners:
        runner.run(prompt[:32], 4)  # warm-up (allocations, first-run kernels)
    results = {name: [] for name, _ in runners}
    for r in range(args.rounds):
        for name, runner in runners:
            pre, dec, toks = runner.run(prompt, args.decode)
            results[name].append((pre, dec, toks))
            print(f"round {r}: {name:13s} prefill {pre:7.1f} tok/s   decode {dec:6.2f} tok/s", flush=True)
    genai.close()
    same = results["llmfold fp32"][0][2][: args.decode] == results["genai fp32"][0][2][: args.decode]
    print(f"\nthreads {args.threads}, prompt {args.prompt} tokens, {args.decode} decode steps, best of {args.rounds}:")
    for name, rows in results.items():
        print(f"  {name:13s} prefill {max(r[0] for r in rows):7.1f} tok/s   decode {max(r[1] for r in rows):6.2f} tok/s")
    print(f"  greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
