"""QMatMul block scales tuned end to end by distillation from the input model (after `int4`).

The int4 pass fixes every layer's 4-bit codes q and integer zero points z one layer at a time:
GPTQ and the scale refit minimize that layer's own output error ‖X·W − X·Ŵ‖ on calibration
inputs. The model is judged by its next-token distribution, and the layers' errors compound
through the blocks. This pass keeps q and z and moves only the float block scales s of
Ŵ[k, n] = s[k // g, n] · (q[k, n] − z[k // g, n]) to minimize, over calibration windows,

    L(s) = 1/T · Σ_t KL( p_ref(· | x_<t) ‖ p_s(· | x_<t) )

p_ref is the next-token distribution of the model the compile started from (its directory run by
ONNX Runtime: the reference every earlier exact pass preserved), p_s the current graph's. p_s comes
from a torch reconstruction of the graph: Llama blocks whose QMatMuls are their dequantized
weights, with each node's input transform as the op applies it (Hadamard blocks, TRIP divisions,
per-token int8/int4 rounding with straight-through gradients); dense MatMuls stay frozen. Before
any step the reconstruction is checked against ONNX Runtime on the current graph (activation
rounding off on both sides; see `_check_reconstruction` for why), so the pass never optimizes a
model that is not the one it writes. Memory: the student holds the codes and the dequantized
weights in float32 (about twice the fp32 model) plus one window's activations for the backward.

The scales are parametrized relatively, s = s₀ · (1 + δ) with δ = 0 at the start, so one Adam
learning rate fits layers of any magnitude; an all-zero block (s₀ = 0) stays zero. Held-out windows
of the calibration text (disjoint from the training windows) are scored before training and after
every epoch and the best scales are written — possibly the int4 pass's own — so the pass never
raises the held-out KL. The idea is EfficientQAT's end-to-end training of quantization parameters
(Chen et al. 2024) with the labels replaced by the reference model's distribution.

What changes in the graph: only the QMatMul `scales` initializers (same shapes, same packed layout);
the op, the codes and the zero points stay, so the compiled model's size and speed are unchanged.

Measured on SmolLM2-135M (8×512 held-out tokens, fp32 export 42.756; `llmfold compile` with the
recipe, then `llmfold eval OUT --json`), one epoch, lr 1e-3, 2 threads:

| recipe before this pass | without | 16 windows | 64 windows |
|---|---|---|---|
| w4a16 (rotate, GPTQ, scale refit) | 45.93 (1.074×) | | 44.12 (1.032×) |
| w4a8 (+ int8 activations, Hadamard-64 on down_proj) | 46.08 (1.078×) | 45.59 (1.066×) | 44.46 (1.040×) |
| w4a4 (+ int4 activations, Hadamard-512, TRIP) | 86.75 (2.029×) | | 60.01 (1.404×) |

A step (one 512-token window: ONNX Runtime for the reference, torch forward and backward of the
student) takes about 7 s here, so 64 windows add about 8 minutes. With lr 3e-3 and 16 windows the
held-out KL rose (0.118 → 0.177) and keep-best wrote the int4 pass's scales unchanged. Which
windows are drawn matters at this size: another draw of 16 (with 4 held out, not 2) gave 45.05 on w4a8.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from passes._weights import get_weight, initializer, node_by_name
from passes.base import CompilerPass, register_pass

# Largest mean KL(ONNX Runtime ‖ torch) per token, in nats, accepted between the graph and its torch
# reconstruction with float activations (see _check_reconstruction). Measured ~1e-8 on SmolLM2
# and the tiny test models; a structural mismatch (an attention or norm variant the student does
# not model) shows as 0.1 or more.
RECONSTRUCTION_TOLERANCE = 1e-4


@dataclasses.dataclass
class TuneScalesParams:
    windows: int = 64  # training windows of the calibration text
    val_windows: int = 4  # held-out windows (disjoint from the training ones) for keep-best
    seq_len: int = 512
    epochs: int = 1
    lr: float = 1e-3  # Adam step on the relative scale change δ
    lm_head: bool = True  # tune lm_head's scales too (when it is a QMatMul)

    def validate(self) -> None:
        if self.windows < 1 or self.val_windows < 1:
            raise UserError(f"tune_scales: windows and val_windows must be ≥ 1 (got {self.windows}, {self.val_windows})")
        if self.seq_len < 2:
            raise UserError(f"tune_scales: seq_len must be ≥ 2 (got {self.seq_len})")
        if self.epochs < 1:
            raise UserError(f"tune_scales: epochs must be ≥ 1 (got {self.epochs}); drop the pass to skip tuning")
        if not 0 < self.lr <= 0.1:
            raise UserError(f"tune_scales: lr must be in (0, 0.1] (got {self.lr}); 1e-3 is the measured default")


class _Linear:
    """One linear layer in torch: a frozen dense weight, or a QMatMul with trainable scales."""

    def __init__(self, model: ir.Model, lin, trainable: bool):
        import torch

        self.name = lin.name
        self.act_bits, self.hadamard, self.inv_shift, self.bias = 16, 0, None, None
        self.q = None
        if lin.kind == "dense":
            W = get_weight(model, lin.weight)
            if W.shape != (lin.K, lin.N):
                raise UserError(f"tune_scales: {lin.name}'s weight is {W.shape}, expected [{lin.K}, {lin.N}]; re-export the model")
            self.dense = torch.from_numpy(W.astype(np.float32))
            return
        from compiler.custom_ops import unpack_int4_blocks

        node = node_by_name(model, lin.node)
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
                raise UserError(f"tune_scales: {lin.name}'s QMatMul input {what} is not an initializer; re-run the int4 pass")
            arrays[what] = v.const_value.numpy()
        if "data" not in arrays or "scales" not in arrays:
            raise UserError(f"tune_scales: {lin.name}'s QMatMul has no packed weights or scales; re-run the int4 pass")
        self.scales_value = ins[2]
        if len(list(self.scales_value.uses())) != 1:
            raise UserError(f"tune_scales: {lin.name}'s scales initializer {self.scales_value.name} is shared by several nodes")
        u = unpack_int4_blocks(arrays["data"], arrays["scales"], arrays.get("zero_points"), K, N, bs)
        self.q, self.zero_points, self.block_size, self.K = u["q"], u["zero_points"], bs, K
        zp = u["zero_points"] if u["zero_points"] is not None else np.full(u["scales"].shape, 8, np.uint8)
        rows = np.arange(K) // bs
        self.qz = torch.from_numpy(u["q"].astype(np.float32) - zp[rows].astype(np.float32))
        self.s0 = torch.from_numpy(u["scales"].astype(np.float32))
        self.delta = torch.zeros_like(self.s0, requires_grad=trainable)
        if "bias" in arrays:
            self.bias = torch.from_numpy(np.asarray(arrays["bias"], np.float32))
        if "channel_shift" in arrays:
            self.inv_shift = torch.from_numpy(np.exp2(-np.asarray(arrays["channel_shift"], np.float32)))

    @property
    def trainable(self) -> bool:
        return self.q is not None and self.delta.requires_grad

    def scales(self):
        return self.s0 * (1 + self.delta)

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


@functools.lru_cache(maxsize=None)
def _sylvester(h: int):
    import torch

    from compiler.custom_ops import sylvester_hadamard

    return torch.from_numpy(sylvester_hadamard(h))


class _Student:
    """The current graph as a torch Llama: embedding, blocks of RMSNorm → attention (RoPE, GQA,
    causal softmax) and RMSNorm → SwiGLU MLP, final norm, lm_head."""

    def __init__(self, model: ir.Model, structure, seq_len: int, tune_lm_head: bool):
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
                **{r: _Linear(model, getattr(b, r), True) for r in ("q", "k", "v", "o", "gate", "up", "down")},
            })  # fmt: skip
        self.final_norm = norm(s.final_norm)
        self.lm_head = _Linear(model, s.lm_head, tune_lm_head)
        self.linears = [lin for blk in self.blocks for lin in blk.values() if isinstance(lin, _Linear)] + [self.lm_head]

    def parameters(self) -> list:
        return [lin.delta for lin in self.linears if lin.trainable]

    def logits(self, ids: np.ndarray):
        import torch

        from passes.affine import _rms, block_forward

        ids = torch.from_numpy(np.asarray(ids, np.int64).reshape(1, -1))
        cfg = {"H": self.H, "KV": self.KV, "hd": self.hd, "cos": self.cos, "sin": self.sin}
        x = self.embedding[ids]
        for blk in self.blocks:  # each _Linear applies its own QMatMul input transform
            x = block_forward(x, blk, cfg)
        g, e = self.final_norm
        return self.lm_head(_rms(x, e) * g)[0]


def _log_probs(logits: np.ndarray):
    """torch log-softmax [T, V] of ONNX Runtime logits."""
    import torch

    return torch.from_numpy(np.asarray(logits, np.float32)).log_softmax(-1)


def _kl(ref_logp, logits):
    """Mean over tokens of KL(ref ‖ softmax(logits)), ref given as log-probabilities [T, V]."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(logits, -1), ref_logp, log_target=True, reduction="sum") / logits.shape[0]


@register_pass
class TuneScalesPass(CompilerPass):
    """QMatMul block scales → minimizers of the KL to the input model's next-token distribution."""

    name = "tune_scales"
    Params = TuneScalesParams
    description = "QMatMul block scales tuned end to end (KL to the input model's logits); codes fixed"

    def requires(self, model: ir.Model) -> None:
        s = self.ctx.structure(model)
        if not s.blocks or s.lm_head is None or s.final_norm is None or s.embedding is None:
            raise UserError("tune_scales: the model's decoder blocks, final norm, lm_head or embedding were not recognized; export it with `llmfold export`")
        pruned = [n.name for n in model.graph if n.op_type == "TokenPrune"]
        if pruned:
            raise UserError(f"tune_scales: the graph prunes tokens ({pruned[0]}); run tune_scales before token_prune")
        for lin in s.linears():
            if lin.kind not in ("dense", "int4") or lin.columns is not None:
                raise UserError(
                    f"tune_scales: {lin.name} is {'a fused column slice' if lin.columns is not None else lin.kind}; "
                    "it supports one MatMul or QMatMul per linear layer (run it right after int4, before svd/pack_qkv)"
                )
        if not any(lin.kind == "int4" for lin in s.linears()):
            raise UserError("tune_scales: the graph has no QMatMul; run the int4 pass before tune_scales")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import torch

        p = self.params
        ctx = self.ctx
        t_start = time.perf_counter()
        threads_before = torch.get_num_threads()
        if ctx.threads:
            torch.set_num_threads(int(ctx.threads))
        try:
            student = _Student(model, ctx.structure(model), p.seq_len, p.lm_head)
            windows = self._windows()
            train, val = windows[: p.windows], windows[p.windows :]
            teacher = self._teacher()
            with torch.no_grad():
                val_ref = [_log_probs(teacher.prefill_logits(w)) for w in val]
                mismatch = self._check_reconstruction(model, student, val[0])
                history = self._train(student, train, val, val_ref, teacher)
        finally:
            torch.set_num_threads(threads_before)
        best = min(range(len(history)), key=lambda e: history[e]["val_kl"])
        tuned = [lin for lin in student.linears if lin.trainable]
        with torch.no_grad():
            for lin, delta in zip(tuned, history[best]["deltas"]):
                lin.delta.copy_(delta)
        self._write_scales(model, tuned)
        ctx.record(
            windows=p.windows, val_windows=p.val_windows, seq_len=p.seq_len, epochs=p.epochs, lr=p.lr,
            tuned_layers=len(tuned), reconstruction_kl=float(f"{mismatch:.3g}"),
            val_kl=[round(h["val_kl"], 6) for h in history], train_kl=[round(h["train_kl"], 6) for h in history[1:]],
            kept_epoch=best,
        )  # fmt: skip
        ctx.log(
            f"{len(tuned)} layers' scales, {p.epochs} epoch(s) × {p.windows} windows × {p.seq_len} tokens in "
            f"{time.perf_counter() - t_start:.0f} s: held-out KL {history[0]['val_kl']:.5f} → {history[best]['val_kl']:.5f} "
            f"({'epoch ' + str(best) if best else 'the int4 pass scales kept'})"
        )
        return ir.passes.PassResult(model, best > 0)

    # -- pieces -----------------------------------------------------------------------------------
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

    def _check_reconstruction(self, model: ir.Model, student: _Student, ids) -> float:
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
        saved = [(lin, lin.act_bits, lin.inv_shift) for lin in student.linears]
        try:
            for lin in student.linears:
                lin.act_bits, lin.inv_shift = 16, None
            ref = _log_probs(graph_logits)
            mismatch = float(_kl(ref, student.logits(ids)))
        finally:
            for lin, bits, shift in saved:
                lin.act_bits, lin.inv_shift = bits, shift
        if not mismatch <= RECONSTRUCTION_TOLERANCE:
            raise UserError(
                f"tune_scales: the torch reconstruction of this graph differs from ONNX Runtime (KL {mismatch:.3g} nats/token "
                f"> {RECONSTRUCTION_TOLERANCE}); the architecture is not a plain Llama block — drop tune_scales from the recipe"
            )
        return mismatch

    def _train(self, student: _Student, train, val, val_ref, teacher) -> list[dict]:
        import torch

        p = self.params
        params = student.parameters()
        opt = torch.optim.Adam(params, lr=p.lr)
        rng = self.ctx.rng("tune_scales")

        def val_kl() -> float:
            return float(np.mean([float(_kl(r, student.logits(w))) for w, r in zip(val, val_ref)]))

        history = [{"val_kl": val_kl(), "train_kl": float("nan"), "deltas": [d.detach().clone() for d in params]}]
        with self.ctx.progress("tune_scales", total=p.epochs * len(train)) as advance:
            for epoch in range(1, p.epochs + 1):
                losses = []
                for i in rng.permutation(len(train)):
                    ref = _log_probs(teacher.prefill_logits(train[i]))
                    with torch.enable_grad():
                        opt.zero_grad(set_to_none=True)
                        loss = _kl(ref, student.logits(train[i]))
                        loss.backward()
                    if not torch.isfinite(loss):
                        self.ctx.log(f"epoch {epoch}: non-finite KL; stopping with the best scales so far")
                        return history
                    opt.step()
                    losses.append(float(loss))
                    advance(1, info=f"epoch {epoch} KL {np.mean(losses[-8:]):.4f}")
                v = val_kl()
                history.append({"val_kl": v, "train_kl": float(np.mean(losses)), "deltas": [d.detach().clone() for d in params]})
                self.ctx.log(f"epoch {epoch}: training KL {np.mean(losses):.5f}, held-out KL {v:.5f}")
        return history

    @staticmethod
    def _write_scales(model: ir.Model, tuned: list[_Linear]) -> None:
        from compiler.custom_ops import pack_int4_blocks

        for lin in tuned:
            scales = lin.scales().detach().numpy().astype(np.float32)
            if not np.all(np.isfinite(scales)):
                raise UserError(f"tune_scales: non-finite scales for {lin.name}; lower lr")
            packed = pack_int4_blocks(lin.q, scales, lin.zero_points, lin.block_size)["scales"]
            value = initializer(model, lin.scales_value.name)
            value.const_value = ir.Tensor(np.ascontiguousarray(packed), name=value.name)
