"""llmfold's graph transformations, one module per method; importing this package registers them.

    cleanup      constant folding and dead-code removal (onnx_ir's own passes)
    int4         linear layers → QMatMul with 4-bit weights (RTN / clipping search / GPTQ), A16/A8/A4
    tune_scales  QMatMul block scales tuned end to end by distillation from the input model
    svd          SVD-LLM whitened low-rank pairs
    tune_lowrank dense low-rank factors tuned end to end by distillation from the input model
    affine       AffineQuant learned affine transforms folded into the weights
    rotate       residual-stream randomized Hadamard rotation
    token_prune  Agile-Quant token pruning in the prefill
    pack_qkv     one q/k/v linear per block for GroupQueryAttention's packed input (run last)
    silu_op      SiLU as one QuickGelu node (approximate; for quantized recipes, run last)
    swiglu_qmatmul  gate/up QMatMuls + SiLU·up as one QMatMul with a SwiGLU epilogue (after silu_op)
    skip_norm    residual add + RMSNorm as one SkipSimplifiedLayerNormalization node (run last)
    logits_to_keep  optional input: lm_head computes the last n positions only (run last)
    pack_lowrank low-rank pairs reading one input share one first-factor linear, split (run last)
    packed_matmul  float32 MatMuls → llmfold.PackedMatMul, weights in decode's read order (run last)
"""

from __future__ import annotations

import importlib

from passes.base import REGISTRY, CompilerPass, make_params, register_pass

for _module in ("cleanup", "int4", "tune_scales", "svd", "tune_lowrank", "affine", "rotate", "token_prune", "pack", "silu", "swiglu", "skip_norm", "logits", "pack_lowrank", "packed_matmul"):
    try:
        importlib.import_module(f"passes.{_module}")
    except ModuleNotFoundError as e:  # a method not written yet is simply not registered
        if e.name != f"passes.{_module}":
            raise

__all__ = ["REGISTRY", "CompilerPass", "make_params", "register_pass"]
