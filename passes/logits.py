"""An optional graph input `logits_to_keep`: lm_head reads only the last n positions.

Generation needs the next-token logits of the last prompt position only, yet a prefill of T
tokens computes lm_head for all T: on SmolLM2-135M that is T × 576 × 49152 multiply-adds (21 %
of the model's) and a T × 49152 float output (100 MB for T = 512). llama.cpp computes the last
row only; transformers' models take `logits_to_keep`. This pass puts

    h_kept = Slice(h, starts = −logits_to_keep, ends = +∞, axes = 1)

between the final RMSNorm (h, [B, T, D]) and lm_head, with `logits_to_keep` an int64 [1] graph
input that is also an initializer holding 0 — an input with a default (ONNX "overridable
initializer"). 0 keeps every row (starts = −0 = 0): a caller that does not know the input
(onnxruntime-genai, perplexity evaluation) gets the [B, T, V] logits bit for bit as before; 1
gives [B, 1, V]. The norm and lm_head act on each position alone, so the kept rows are exactly
the rows the unsliced graph computes.

Run it last (a runtime-layout pass, like skip_norm). Every other pass first removes the slice
(`drop_logits_slice`, via passes/base.py `to_plain_layout`) and sees the plain export layout;
compiler/analyze.py looks through it so `inspect` and the driver recognize the lm_head.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.analyze import LOGITS_TO_KEEP, logits_slice_of
from compiler.errors import UserError
from passes.base import CompilerPass, register_pass

_SLICE_NAME = "/logits_to_keep/Slice"
_ENDS, _AXES = "/logits_to_keep/ends", "/logits_to_keep/axes"  # the Slice's constant inputs


def _int64_value(name: str, values: list[int]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(values)]),
                    const_value=ir.tensor(np.array(values, np.int64), name=name))


def _lm_head_input(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    """(h, logits): the input of the node writing the `logits` output, and that output."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    node = logits.producer() if logits is not None else None
    lm_head_ops = ("MatMul", "QMatMul", "PackedMatMul")
    if node is None or node.op_type not in lm_head_ops or not node.inputs or node.inputs[0] is None:
        raise UserError("logits_to_keep: the graph has no `logits` output written by an lm_head MatMul, QMatMul or "
                        "PackedMatMul; it is not a model exported by `llmfold export`")
    return node.inputs[0], logits


def insert_logits_slice(graph: ir.Graph) -> bool:
    """Insert the Slice and the `logits_to_keep` input; False when the graph already has them."""
    if any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
        return False
    h, logits = _lm_head_input(graph)
    keep = _int64_value(LOGITS_TO_KEEP, [0])
    ends, axes = _int64_value(_ENDS, [np.iinfo(np.int64).max]), _int64_value(_AXES, [1])
    neg = ir.Node("", "Neg", [keep], name="/logits_to_keep/Neg")
    sl = ir.Node("", "Slice", [h, neg.outputs[0], ends, axes], name=_SLICE_NAME)
    neg.outputs[0].name = "/logits_to_keep/Neg/output_0"
    sl.outputs[0].name = "/logits_to_keep/Slice/output_0"
    sl.outputs[0].type = h.type
    if h.shape is not None and len(h.shape) == 3:
        sl.outputs[0].shape = ir.Shape([h.shape[0], "logits_length", h.shape[2]])
    head = logits.producer()
    graph.insert_before(head, [neg, sl])
    head.replace_input_with(0, sl.outputs[0])
    graph.inputs.append(keep)
    for v in (keep, ends, axes):
        graph.register_initializer(v)
    if logits.shape is not None and len(logits.shape) == 3:
        logits.shape = ir.Shape([logits.shape[0], "logits_length", logits.shape[2]])
    return True


def drop_logits_slice(graph: ir.Graph) -> bool:
    """The inverse: lm_head reads the final norm's output again, the input goes; removed any?"""
    keep = next((v for v in graph.inputs if v.name == LOGITS_TO_KEEP), None)
    if keep is None:
        return False
    h, logits = _lm_head_input(graph)
    sl = h.producer()
    if sl is None or sl.name != _SLICE_NAME or logits_slice_of(sl.inputs[0]) is not sl:
        raise UserError("the graph has a `logits_to_keep` input but no logits_to_keep Slice in front of lm_head; "
                        "re-export the model or compile it without the logits_to_keep pass")
    neg = sl.inputs[1].producer()
    logits.producer().replace_input_with(0, sl.inputs[0])
    graph.remove([sl, neg], safe=True)
    graph.inputs.remove(keep)
    for name in (LOGITS_TO_KEEP, _ENDS, _AXES):
        graph.initializers.pop(name, None)
    if logits.shape is not None and len(logits.shape) == 3:
        logits.shape = ir.Shape([logits.shape[0], "sequence_length", logits.shape[2]])
    return True


@register_pass
class LogitsToKeepPass(CompilerPass):
    name = "logits_to_keep"
    description = "optional input logits_to_keep (default 0 = all): lm_head computes the last n positions only (exact)"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        added = insert_logits_slice(model.graph)
        self.ctx.record(added=added)
        self.ctx.log("lm_head reads the last `logits_to_keep` positions (input default 0: all)" if added
                     else "the graph already has the logits_to_keep input")
        return ir.passes.PassResult(model, added)
