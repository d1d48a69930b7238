"""Low-rank factors trained end to end by distillation from the input model (after `svd`).

The svd pass fits each low-rank pair X·W₁·W₂ to its own layer's output in closed form, in model
order; the errors of 210 pairs still compound through the blocks (SmolLM2 svd-10: 1.62× the fp32
perplexity). This pass trains every dense factor W₁ (K×r) and W₂ (r×N) of the low-rank layers
jointly, with the ranks fixed, to minimize the KL from the input model's next-token distribution
over calibration windows (passes/distill.py: teacher = the compile's input run by ONNX Runtime,
student = a torch rebuild of the current graph checked against it, held-out keep-best). It is
the fine-tuning step SVD-LLM's paper applies after truncation (there LoRA on the factors with
next-token labels), here on the factors themselves with the uncompressed model as the teacher.

Adam moves each factor by about lr·rms(factor) per step: one learning rate fits factors whose
scales differ by orders of magnitude (W₁ = S⁻ᵀ·U·Σ^½ carries the inverse whitening). Dense
layers the svd pass left whole, norms, embeddings and QMatMuls stay frozen. What changes in the
graph: only the factor initializers (same shapes), so size and speed are unchanged.

Measured on SmolLM2-135M (8×512 held-out tokens, fp32 export 42.756; `llmfold compile` with the
recipe, then `llmfold eval OUT --json`), one epoch, 2 threads; a step (one 512-token window)
takes about 8 s here:

| recipe before this pass | without | lr 1e-4, 64 windows | 192 windows | 384 windows | lr 2e-4, 192 windows |
|---|---|---|---|---|---|
| svd-10 (uniform ranks, closed-form refits) | 69.23 (1.619×) | 62.78 (1.468×) | 60.47 (1.414×) | 58.79 (1.375×) | 59.25 (1.386×) |
| svd-20 (the same settings) | 84.00 (1.965×) | 74.00 (1.731×) | | | |
| svd-40 (the same settings) | 129.56 (3.030×) | 103.09 (2.411×) | | 86.46 (2.022×)¹ | 96.48 (2.257×) |

¹ lr 3e-4, bfloat16 steps (`precision`), the current svd-40 (2026-12-08, 14 min 26 s).

On svd-10 the held-out KL falls 0.462 → 0.425 → 0.418 → 0.411 → 0.408 at steps 0, 16, 32, 48, 64,
and lr 3e-4 gives the same 0.409 at step 64 (lr 1e-3 raised it, 0.51 at step 32): a larger step
does not move the plateau, more windows do (each is one step). The 192- and 384-window columns
ran on the Zen 5 VM (2026-12-07, 2 threads, ≈ 3.8 s per step; the held-out windows are drawn with
the training ones, so their KL is not comparable across columns): 0.533 → 0.457 and 0.565 → 0.454,
still falling at the last step, −0.04× of perplexity per doubling of the windows; with more steps a
larger one pays again: lr 2e-4 on the same 192 windows 0.533 → 0.449. A cosine schedule from
lr 4e-4 down to 0 over the same 192 windows (tried later that day, not kept) gave 0.533 → 0.454
and 59.24 (1.386×), the same as the constant step; so did the same tokens as 384 windows of 256
(lr 2e-4, twice the steps at half the cost: 59.36, 1.388×). The tokens seen are what counts, and
the starting point: with 128 calibration windows for the svd pass (was 64) the same 192 windows
at lr 2e-4 give 0.523 → 0.432 and 57.83 (1.353×), the current svd-10 (256 windows: 0.612 →
0.444, 60.65, 1.418×; not monotone). The training KL
of each window, measured before its step, does not fall (0.50–0.55). On
svd-40 (63.6 M trained parameters) it falls 1.225 → 1.083 → 1.039 → 1.000 → 0.977, still going
down at step 64.

`precision = "bfloat16"` runs each training step under torch's CPU autocast: the matrix products
in bfloat16, the factors, their gradients, Adam's state and the loss in float32; the held-out
scoring that picks the checkpoint stays float32, so what it records is what ONNX Runtime measures.
On Zen 5 (AVX-512 BF16) a step takes 2.1 s instead of 3.7 s, and 8 steps from the same start
reach the same held-out KL (0.39892 vs 0.39914 in float32). That buys more windows for the same
time. From the current svd pass's output (128 calibration windows), 768 windows of 512 tokens
in bfloat16, the factors at the given step (Zen 5, 2026-12-07, 2 threads, 28 min of training; a
one-off script, not in the repository, ran this pass alone on the svd pass's output and wrote the
factors at steps 192, 384 and 576; the kept checkpoint is what `--recipe svd-10` writes, bit for bit):

| lr | step 192 | step 384 | step 576 | kept checkpoint (step 736) |
|---|---|---|---|---|
| 2e-4 | 58.44 (1.367×) | 56.80 (1.328×) | 55.60 (1.300×) | 55.87 (1.307×), held-out KL 0.556 → 0.385 |
| 3e-4 | 58.08 (1.358×) | 56.58 (1.323×) | 55.24 (1.292×) | 55.44 (1.297×), held-out KL 0.556 → 0.379 |

Past ~600 windows the perplexity no longer falls while the held-out KL (held-out windows of the
calibration topics) still does; the eval text's topics are not among them. The current svd-10 is
the lr 3e-4 row: 55.44 (1.297×) from `llmfold compile --recipe svd-10` (32 min 57 s, 5.8 GB peak).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError
from passes._weights import set_weight
from passes.base import register_pass
from passes.distill import DistillParams, DistillPass, Student


PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass
class TuneLowRankParams(DistillParams):
    pass_name: ClassVar[str] = "tune_lowrank"
    lr: float = 1e-4  # Adam step relative to each factor's rms
    eval_every: int = 16
    precision: str = "float32"  # or "bfloat16": training steps under torch's CPU autocast (scoring stays float32)

    def validate(self) -> None:
        super().validate()
        if self.precision not in PRECISIONS:
            raise UserError(f"tune_lowrank: precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")


@register_pass
class TuneLowRankPass(DistillPass):
    """Dense low-rank factors W₁, W₂ → minimizers of the KL to the input model's next-token distribution."""

    name = "tune_lowrank"
    Params = TuneLowRankParams
    description = "dense low-rank factors tuned end to end (KL to the input model's logits); ranks fixed"

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        low_rank = [lin for lin in self.ctx.structure(model).linears() if lin.kind == "low-rank"]
        if not low_rank:
            raise UserError("tune_lowrank: the graph has no low-rank layers; run the svd pass before tune_lowrank")
        if all(lin.bits for lin in low_rank):
            raise UserError("tune_lowrank: every low-rank factor is already quantized; run tune_lowrank before int4 (tune_scales tunes QMatMuls)")

    def training_precision(self):
        import torch

        if self.params.precision == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().training_precision()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import torch

        has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        if self.params.precision == "bfloat16" and not has_bf16():
            self.ctx.log("tune_lowrank: this CPU has no AVX-512 BF16 instructions; bfloat16 training is emulated and slower than float32")
        return super().call(model)

    @staticmethod
    def _factors(student: Student) -> list:
        return [part for lin in student.linears if lin.kind == "low-rank" for part in lin.parts if part.dense is not None]

    def param_groups(self, student: Student) -> list[dict]:
        groups = []
        for f in self._factors(student):
            if len(list(f.weight_value.uses())) != 1:
                raise UserError(f"tune_lowrank: {f.layer}'s factor {f.weight_value.name} is shared by several nodes")
            rms = float(f.dense.pow(2).mean().sqrt())
            if not np.isfinite(rms) or rms == 0:
                continue  # an all-zero factor has no direction to scale a step by; it stays as it is
            f.dense.requires_grad_(True)
            groups.append({"params": [f.dense], "lr": self.params.lr * rms})
        return groups

    def write(self, model: ir.Model, student: Student) -> None:
        for f in self._factors(student):
            if not f.dense.requires_grad:
                continue
            W = f.dense.detach().numpy()
            if not np.all(np.isfinite(W)):
                raise UserError(f"tune_lowrank: non-finite factor for {f.layer}; lower lr")
            set_weight(model, f.weight_value.name, W)

    def summary(self, student: Student) -> tuple[str, dict]:
        trained = [f for f in self._factors(student) if f.dense.requires_grad]
        fields = {"tuned_factors": len(trained), "tuned_parameters": int(sum(f.dense.numel() for f in trained))}
        return f"{len(trained)} low-rank factors", fields
