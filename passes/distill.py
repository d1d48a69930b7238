"""End-to-end distillation from the input model: what tune_scales and tune_lowrank share.

Earlier passes fit each layer to its own output error ‖X·W − X·Ŵ‖ on calibration inputs; the
model is judged by its next-token distribution, and the layers' errors compound through the
blocks. A distillation pass moves some of the graph's numbers θ (the concrete pass chooses which)
to minimize, over calibration windows,

    L(θ) = 1/T · Σ_t KL( p_ref(· | x_<t) ‖ p_θ(· | x_<t) )

p_ref is the next-token distribution of the model the compile started from (its directory run by
ONNX Runtime: the reference every earlier exact pass preserved), p_θ the current graph's. p_θ comes
from a torch reconstruction of the graph (`Student`): Llama blocks whose linear layers are chains
of their nodes — a MatMul is its weight, a QMatMul its dequantized weight with its input
transform as the op applies it (Hadamard blocks, TRIP divisions, per-token int8/int4 rounding
with straight-through gradients); a low-rank layer is its two nodes in a row. Before any step the
reconstruction is checked against ONNX Runtime on the current graph (activation rounding off on
both sides; see `DistillPass._check_reconstruction`), so a pass never optimizes a model that is
not the one it writes. Memory: the student holds every weight in float32 (QMatMuls dequantized,
plus their codes) and one window's activations for the backward; Adam adds two copies of the
trained tensors and keep-best one more (SmolLM2 svd-10: 6.1 GB peak for the whole compile).

Training (`DistillPass`): Adam over the trained tensors, one window per step, windows disjoint;
held-out windows (disjoint from the training ones) are scored before the first step and at every
checkpoint (each `eval_every` steps and each epoch's end), and the best checkpoint is written —
possibly the starting values — so a pass never raises the held-out KL. The idea is EfficientQAT's
end-to-end training (Chen et al. 2024) with the labels replaced by the reference model's
distribution, i.e. knowledge distillation from the uncompressed model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from passes._weights import get_weight, node_by_name
from passes.base import CompilerPass
from passes.int4 import stored_scales

# Largest mean KL(ONNX Runtime ‖ torch) per token, in nats, accepted between the graph and its torch
# reconstruction with float activations (see DistillPass._check_reconstruction). Measured ~1e-8 on SmolLM2
# and the tiny test models; a structural mismatch (an attention or norm variant the student does
# not model) shows as 0.1 or more.
RECONSTRUCTION_TOLERANCE = 1e-4


class NodeLinear:
    """One node computing X·W in torch: a MatMul's weight, or a QMatMul's dequantized weight
    Ŵ[k, n] = s₀[k // g, n]·(1 + δ[k // g, n])·(q[k, n] − z[k // g, n]) with its input transform.

    Everything is frozen until a pass marks a tensor trainable: `delta` (QMatMul scales, relative)
    or `dense` (a MatMul's weight)."""

    def __init__(self, model: ir.Model, node: ir.Node, layer: str, pass_name: str):
        import torch

        self.layer, self.node = layer, node
        self.act_bits, self.hadamard, self.inv_shift, self.bias = 16, 0, None, None
        self.q = self.delta = self.dense = None
        if node.op_type == "MatMul":
            self.weight_value = node.inputs[1]
            W = get_weight(model, self.weight_value.name)
            if W.ndim != 2:
                raise UserError(f"{pass_name}: {layer}'s weight is {W.shape}, expected a matrix; re-export the model")
            self.dense = torch.from_numpy(W.astype(np.float32))
            return
        from compiler.custom_ops import unpack_int4_blocks

        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        K, N, bs = (int(node.attributes[a].value) for a in ("K", "N", "block_size"))
        self.act_bits = int(node.attributes["act_bits"].value) if "act_bits" in node.attributes else 16
        self.hadamard = int(node.attributes["hadamard"].value) if "hadamard" in node.attributes else 0
        arrays = {}
        for i, what in ((1, "data"), (2, "scales"), (3, "zero_points"), (4, "bias"), (5, "channel_shift")):
            v = ins[i]
            if v is None:
                continue
            if v.const_value is None:
                raise UserError(f"{pass_name}: {layer}'s QMatMul input {what} is not an initializer; re-run the int4 pass")
            arrays[what] = v.const_value.numpy()
        if "data" not in arrays or "scales" not in arrays:
            raise UserError(f"{pass_name}: {layer}'s QMatMul has no packed weights or scales; re-run the int4 pass")
        self.scales_value = ins[2]
        u = unpack_int4_blocks(arrays["data"], arrays["scales"], arrays.get("zero_points"), K, N, bs)
        self.q, self.zero_points, self.block_size, self.K = u["q"], u["zero_points"], bs, K
        zp = u["zero_points"] if u["zero_points"] is not None else np.full(u["scales"].shape, 8, np.uint8)
        rows = np.arange(K) // bs
        self.qz = torch.from_numpy(u["q"].astype(np.float32) - zp[rows].astype(np.float32))
        self.s0 = torch.from_numpy(u["scales"].astype(np.float32))
        self.delta = torch.zeros_like(self.s0)
        if "bias" in arrays:
            self.bias = torch.from_numpy(np.asarray(arrays["bias"], np.float32))
        if "channel_shift" in arrays:
            self.inv_shift = torch.from_numpy(np.exp2(-np.asarray(arrays["channel_shift"], np.float32)))

    def scales(self):
        # the values QMatMul will store (float16), with straight-through gradients, so training and
        # the held-out choice see the deployed weights
        s = self.s0 * (1 + self.delta)
        return s + (stored_scales(s.detach()) - s.detach())

    def weight(self):
        if self.q is None:
            return self.dense
        return self.qz * self.scales().repeat_interleave(self.block_size, 0)[: self.K]

    def input(self, x):
        """The op's input transform: Hadamard blocks, then TRIP division and per-token rounding."""
        from passes.affine import fake_quant_act

        if self.hadamard:
            x = (x.reshape(*x.shape[:-1], -1, self.hadamard) @ _sylvester(self.hadamard)).reshape(x.shape)
        if self.act_bits < 16:
            if self.inv_shift is not None:
                x = x * self.inv_shift
            x = fake_quant_act(x, self.act_bits)
        return x

    def __call__(self, x):
        y = self.input(x) @ self.weight()
        return y + self.bias if self.bias is not None else y


class StudentLinear:
    """One linear layer: its nodes applied in a row (one, or two for a low-rank pair)."""

    def __init__(self, model: ir.Model, lin, pass_name: str):
        if lin.columns is not None:
            raise UserError(
                f"{pass_name}: {lin.name} is a fused column slice; it supports one MatMul/QMatMul or a low-rank pair per "
                "linear layer (run it before pack_qkv)"
            )
        self.name, self.kind = lin.name, lin.kind
        self.parts = [NodeLinear(model, node_by_name(model, n), lin.name, pass_name) for n in (lin.nodes or [lin.node])]
        if self.parts[0].q is None and self.parts[0].dense.shape[0] != lin.K:
            raise UserError(f"{pass_name}: {lin.name}'s weight has {self.parts[0].dense.shape[0]} rows, expected {lin.K}; re-export the model")

    def __call__(self, x):
        for part in self.parts:
            x = part(x)
        return x


@functools.lru_cache(maxsize=None)
def _sylvester(h: int):
    import torch

    from compiler.custom_ops import sylvester_hadamard

    return torch.from_numpy(sylvester_hadamard(h))


class Student:
    """The current graph as a torch Llama: embedding, blocks of RMSNorm → attention (RoPE, GQA,
    causal softmax) and RMSNorm → SwiGLU MLP, final norm, lm_head."""

    def __init__(self, model: ir.Model, structure, seq_len: int, pass_name: str):
        import torch

        from passes.affine import rope_tables

        s = structure
        self.H, self.KV, self.hd = s.num_heads, s.num_kv_heads, s.head_dim
        self.cos, self.sin = rope_tables(model, s, seq_len)
        self.embedding = torch.from_numpy(get_weight(model, s.embedding).astype(np.float32))

        def norm(n):
            return torch.from_numpy(get_weight(model, n.weight).astype(np.float32)), float(n.epsilon)

        self.blocks = []
        for b in s.blocks:
            (g1, eps1), (g2, eps2) = norm(b.input_norm), norm(b.post_attention_norm)
            self.blocks.append({
                "g1": g1, "eps1": eps1, "g2": g2, "eps2": eps2,
                **{r: StudentLinear(model, getattr(b, r), pass_name) for r in ("q", "k", "v", "o", "gate", "up", "down")},
            })  # fmt: skip
        self.final_norm = norm(s.final_norm)
        self.lm_head = StudentLinear(model, s.lm_head, pass_name)
        self.linears = [lin for blk in self.blocks for lin in blk.values() if isinstance(lin, StudentLinear)] + [self.lm_head]

    def nodes(self) -> list[NodeLinear]:
        return [part for lin in self.linears for part in lin.parts]

    def logits(self, ids: np.ndarray):
        import torch

        from passes.affine import _rms, block_forward

        ids = torch.from_numpy(np.asarray(ids, np.int64).reshape(1, -1))
        cfg = {"H": self.H, "KV": self.KV, "hd": self.hd, "cos": self.cos, "sin": self.sin}
        x = self.embedding[ids]
        for blk in self.blocks:  # each StudentLinear applies its nodes' own input transforms
            x = block_forward(x, blk, cfg)
        g, e = self.final_norm
        return self.lm_head(_rms(x, e) * g)[0]


def log_probs(logits: np.ndarray):
    """torch log-softmax [T, V] of ONNX Runtime logits."""
    import torch

    return torch.from_numpy(np.asarray(logits, np.float32)).log_softmax(-1)


def kl_from(ref_logp, logits):
    """Mean over tokens of KL(ref ‖ softmax(logits)), ref given as log-probabilities [T, V]."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(logits, -1), ref_logp, log_target=True, reduction="sum") / logits.shape[0]


@dataclasses.dataclass
class DistillParams:
    """The recipe keys every distillation pass shares (subclasses change defaults, add keys)."""

    pass_name: ClassVar[str] = "distill"  # for messages
    windows: int = 64  # training windows of the calibration text
    val_windows: int = 4  # held-out windows (disjoint from the training ones) for keep-best
    seq_len: int = 512
    epochs: int = 1
    lr: float = 1e-3
    eval_every: int = 0  # also score the held-out windows every this many steps (0: at epoch ends only)

    def validate(self) -> None:
        name, default = self.pass_name, type(self).lr
        if self.windows < 1 or self.val_windows < 1:
            raise UserError(f"{name}: windows and val_windows must be ≥ 1 (got {self.windows}, {self.val_windows})")
        if self.seq_len < 2:
            raise UserError(f"{name}: seq_len must be ≥ 2 (got {self.seq_len})")
        if self.epochs < 1:
            raise UserError(f"{name}: epochs must be ≥ 1 (got {self.epochs}); drop the pass to skip tuning")
        if not 0 < self.lr <= 0.1:
            raise UserError(f"{name}: lr must be in (0, 0.1] (got {self.lr}); {default:g} is the measured default")
        if self.eval_every < 0:
            raise UserError(f"{name}: eval_every must be ≥ 0 (got {self.eval_every}); 0 scores the held-out windows at epoch ends only")


class DistillPass(CompilerPass):
    """Base of the distillation passes. A subclass has Params derived from DistillParams and
    implements `param_groups(student)` (the Adam groups of trained tensors, each marked
    requires_grad), `write(model, student)` (the trained values into the graph's initializers)
    and `summary(student)`; it extends `requires` with what it needs."""

    def param_groups(self, student: Student) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, model: ir.Model, student: Student) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self, student: Student) -> tuple[str, dict]:  # pragma: no cover - abstract
        """→ (what was trained, for the log line; the pass's own record fields)."""
        raise NotImplementedError

    def training_precision(self):
        """Context for a training step's forward (and so its backward): float32 unless a pass says
        otherwise. Held-out scoring and the written values are always float32."""
        return contextlib.nullcontext()

    def requires(self, model: ir.Model) -> None:
        s = self.ctx.structure(model)
        if not s.blocks or s.lm_head is None or s.final_norm is None or s.embedding is None:
            raise UserError(
                f"{self.name}: the model's decoder blocks, final norm, lm_head or embedding were not recognized; "
                "export it with `llmfold export`"
            )
        pruned = [n.name for n in model.graph if n.op_type == "TokenPrune"]
        if pruned:
            raise UserError(f"{self.name}: the graph prunes tokens ({pruned[0]}); run {self.name} before token_prune")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        p = self.params
        t_start = time.perf_counter()
        student, history, best, mismatch = self.distill(model)
        self.write(model, student)
        what, fields = self.summary(student)
        self.ctx.record(
            windows=p.windows, val_windows=p.val_windows, seq_len=p.seq_len, epochs=p.epochs, lr=p.lr, **fields,
            reconstruction_kl=float(f"{mismatch:.3g}"),
            val_kl=[round(h["val_kl"], 6) for h in history], train_kl=[round(h["train_kl"], 6) for h in history[1:]],
            checkpoint_steps=[h["step"] for h in history], kept_checkpoint=best,
        )  # fmt: skip
        self.ctx.log(
            f"{what}, {p.epochs} epoch(s) × {p.windows} windows × {p.seq_len} tokens in {time.perf_counter() - t_start:.0f} s: "
            f"held-out KL {history[0]['val_kl']:.5f} → {history[best]['val_kl']:.5f} "
            f"({'step ' + str(history[best]['step']) if best else 'starting values kept'})"
        )
        return ir.passes.PassResult(model, best > 0)

    def distill(self, model: ir.Model) -> tuple[Student, list[dict], int, float]:
        """Train; the student holds the best checkpoint's values. → (student, history, best, reconstruction KL)."""
        import torch

        p = self.params
        ctx = self.ctx
        threads_before = torch.get_num_threads()
        if ctx.threads:
            torch.set_num_threads(int(ctx.threads))
        try:
            student = Student(model, ctx.structure(model), p.seq_len, self.name)
            groups = self.param_groups(student)
            tensors = [t for g in groups for t in g["params"]]
            if not tensors:
                raise UserError(f"{self.name}: nothing to train in this graph")
            windows = self._windows()
            train, val = windows[: p.windows], windows[p.windows :]
            teacher = self._teacher()
            with torch.no_grad():
                val_ref = [log_probs(teacher.prefill_logits(w)) for w in val]
                mismatch = self._check_reconstruction(model, student, val[0])
                history, best = self._train(student, groups, tensors, train, val, val_ref, teacher)
                for t, saved in zip(tensors, best["values"]):
                    t.copy_(saved)
        finally:
            torch.set_num_threads(threads_before)
        return student, history, best["index"], mismatch

    def _windows(self) -> np.ndarray:
        from compiler.calibrate import calibration_windows

        p = self.params
        return calibration_windows(
            self.ctx.model_dir.path, self.ctx.calib_text, num_windows=p.windows + p.val_windows, seq_len=p.seq_len,
            seed=self.ctx.seed, disjoint=True,
        )  # fmt: skip

    def _teacher(self):
        from compiler.runtime import LanguageModel

        return LanguageModel(self.ctx.model_dir.path, self.ctx.threads)

    def _check_reconstruction(self, model: ir.Model, student: Student, ids) -> float:
        """KL(ONNX Runtime ‖ torch student) on one window, activation rounding off on both sides.

        With int8/int4 activations the comparison would not be meaningful: each node matches the
        op to float rounding (tests/test_tune_scales.py), but on SmolLM2 a last-bit difference
        flips an occasional per-token rounding of a massive-activation token, and that moves every
        later token (measured: KL 0.004–0.012 between ORT and torch, either of them a faithful
        evaluation). So the check is structural: the copy run by ORT has act_bits = 16 and no TRIP
        input on every QMatMul, the student the same for this one forward."""
        import onnx

        from compiler.runtime import KVLayout, create_session, dir_kv_dims, prefill_feeds

        path = self.ctx.save_temp_model(model)
        proto = onnx.load(str(path), load_external_data=False)
        dropped = set()
        for node in proto.graph.node:
            if node.op_type == "QMatMul":
                for a in node.attribute:
                    if a.name == "act_bits":
                        a.i = 16
                dropped.update(node.input[5:])
                del node.input[5:]  # channel_shift: only with quantized activations
        used = {name for node in proto.graph.node for name in node.input}
        kept = [t for t in proto.graph.initializer if t.name not in dropped or t.name in used]
        if len(kept) < len(proto.graph.initializer):  # ORT warns about every unused initializer
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(kept)
        sess = create_session(proto.SerializeToString(), self.ctx.threads, custom_ops=True, external_data_dir=path.parent.resolve())
        layout = KVLayout.from_session(sess, dir_kv_dims(self.ctx.model_dir.path))
        graph_logits = sess.run(["logits"], prefill_feeds(layout, ids))[0][0]
        del sess
        saved = [(n, n.act_bits, n.inv_shift) for n in student.nodes()]
        try:
            for n in student.nodes():
                n.act_bits, n.inv_shift = 16, None
            mismatch = float(kl_from(log_probs(graph_logits), student.logits(ids)))
        finally:
            for n, bits, shift in saved:
                n.act_bits, n.inv_shift = bits, shift
        if not mismatch <= RECONSTRUCTION_TOLERANCE:
            raise UserError(
                f"{self.name}: the torch reconstruction of this graph differs from ONNX Runtime (KL {mismatch:.3g} nats/token "
                f"> {RECONSTRUCTION_TOLERANCE}); the architecture is not a plain Llama block — drop {self.name} from the recipe"
            )
        return mismatch

    def _train(self, student: Student, groups, tensors, train, val, val_ref, teacher) -> tuple[list[dict], dict]:
        """→ (checkpoints: step, held-out and training KL; the best one: index and trained tensors)."""
        import torch

        p = self.params
        opt = torch.optim.Adam(groups)
        rng = self.ctx.rng(self.name)
        best = {"val_kl": float("inf"), "values": None}

        def checkpoint(step: int, losses: list[float]) -> dict:  # losses: the steps since the last one
            v = float(np.mean([float(kl_from(r, student.logits(w))) for w, r in zip(val, val_ref)]))
            if best["values"] is None or v < best["val_kl"]:  # one copy of the trained tensors, not one per checkpoint
                best.update(val_kl=v, values=[t.detach().clone() for t in tensors], index=len(history))
            train_kl = float(np.mean(losses)) if losses else float("nan")
            return {"step": step, "val_kl": v, "train_kl": train_kl}

        history: list[dict] = []
        history.append(checkpoint(0, []))
        step, t0 = 0, time.perf_counter()
        with self.ctx.progress(self.name, total=p.epochs * len(train)) as advance:
            for epoch in range(1, p.epochs + 1):
                losses, since = [], 0  # this epoch's training KLs; where the last checkpoint was
                for i in rng.permutation(len(train)):
                    ref = log_probs(teacher.prefill_logits(train[i]))
                    with torch.enable_grad():
                        opt.zero_grad(set_to_none=True)
                        with self.training_precision():
                            logits = student.logits(train[i])
                        loss = kl_from(ref, logits.float())
                        loss.backward()
                    if not torch.isfinite(loss):
                        self.ctx.log(f"step {step + 1}: non-finite KL; stopping with the best checkpoint so far")
                        return history, best
                    opt.step()
                    step += 1
                    losses.append(float(loss))
                    advance(1, info=f"epoch {epoch} KL {np.mean(losses[-8:]):.4f}")
                    if p.eval_every and step % p.eval_every == 0 and len(losses) < len(train):
                        history.append(checkpoint(step, losses[since:]))
                        since = len(losses)
                        self.ctx.log(f"step {step}: held-out KL {history[-1]['val_kl']:.5f} ({time.perf_counter() - t0:.0f} s)")
                history.append(checkpoint(step, losses[since:]))
                self.ctx.log(f"epoch {epoch}: training KL {np.mean(losses):.5f}, held-out KL {history[-1]['val_kl']:.5f}")
        return history, best
