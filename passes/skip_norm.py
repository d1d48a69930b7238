"""Residual add + RMSNorm as one com.microsoft.SkipSimplifiedLayerNormalization node, and back.

In a Llama block every RMSNorm but the first reads the residual stream right after a residual
add:  r = x + s;  n = r / sqrt(mean(r²) + eps) · w.  ORT's SkipSimplifiedLayerNormalization
computes both in one node (inputs x, s, w; output 0 = n, output 3 = r). Same math, different
rounding: r is the same single fp32 addition, but the kernel sums r² sequentially in float and
divides by the root where RMSNormalization has its own reduction. Measured on SmolLM2 fp32:
the fused form moves logits by up to 5e-5 and to 2.4e-4 from float64 transformers on one of four
prompts (2.9× transformers' own fp32 error), so the fp32 export keeps the pair apart; for a
quantized model that is far below the quantization error. One node instead of two per norm is
what a decode step pays for (ORT costs a few µs per node); onnxruntime-genai's models use it.

`fuse_skip_norms` rewrites every Add → RMSNormalization pair whose sum feeds the norm (pass
`skip_norm`, last in quantized recipes). `unfuse_skip_norms` is the inverse (one Add, one
RMSNormalization, the export's names), run before every pass that rewrites the graph around
norms and linears (CompilerPass.needs_plain_layout), e.g. when a compiled model is compiled again.
"""

from __future__ import annotations

import onnx_ir as ir

from compiler.analyze import SKIP_NORM, const_array, is_onnx_op
from passes.base import CompilerPass, register_pass

MS_DOMAIN = "com.microsoft"


def _fusable(add: ir.Node) -> ir.Node | None:
    """The RMSNormalization reading `add`'s sum, when the pair can become one node."""
    if not is_onnx_op(add, "Add") or len(add.inputs) != 2 or any(v is None or const_array(v) is not None for v in add.inputs):
        return None
    r = add.outputs[0]
    norms = [u.node for u in r.uses() if is_onnx_op(u.node, "RMSNormalization") and u.idx == 0]
    if len(norms) != 1 or r.is_graph_output():
        return None
    norm = norms[0]
    a = norm.attributes
    weight = norm.inputs[1] if len(norm.inputs) > 1 else None
    w = const_array(weight)
    if a.get_int("axis", -1) != -1 or a.get_int("stash_type", 1) != 1 or w is None or w.ndim != 1:
        return None
    if norm.outputs[0].is_graph_output():
        return None
    return norm


def fuse_skip_norms(graph: ir.Graph) -> int:
    """Add + RMSNormalization → SkipSimplifiedLayerNormalization; returns how many were fused."""
    fused = 0
    for add in [n for n in graph if is_onnx_op(n, "Add")]:
        norm = _fusable(add)
        if norm is None:
            continue
        r = add.outputs[0]
        keep_sum = any(u.node is not norm for u in r.uses())
        name = norm.name.rsplit("/", 1)[0] + f"/{SKIP_NORM}" if "/" in norm.name else f"{norm.name}_{SKIP_NORM}"
        eps = norm.attributes.get_float("epsilon", 1e-5)
        node = ir.Node(MS_DOMAIN, SKIP_NORM, [add.inputs[0], add.inputs[1], norm.inputs[1]],
                       attributes=[ir.AttrFloat32("epsilon", eps)], num_outputs=4 if keep_sum else 1, name=name)
        graph.insert_before(norm, node)
        normed = norm.outputs[0]
        node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = normed.name, normed.type, normed.shape
        normed.name = None
        normed.replace_all_uses_with(node.outputs[0])
        if keep_sum:
            node.outputs[1].name, node.outputs[2].name = "", ""
            node.outputs[3].type, node.outputs[3].shape = r.type, r.shape
            old_name = r.name
            r.name = None
            r.replace_all_uses_with(node.outputs[3])
            node.outputs[3].name = old_name
        graph.remove([norm, add], safe=True)
        fused += 1
    return fused


def unfuse_skip_norms(graph: ir.Graph) -> int:
    """SkipSimplifiedLayerNormalization (no bias) → Add + RMSNormalization; returns how many."""
    count = 0
    for node in [n for n in graph if n.op_type == SKIP_NORM and n.domain == MS_DOMAIN]:
        ins = list(node.inputs)
        if len(ins) > 3 and ins[3] is not None:
            continue  # a bias input: not what our export writes; left as it is
        prefix = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        summed = node.outputs[3].name if len(node.outputs) > 3 else None
        # the export's Add name survives in its output's name ("{node}/output_0")
        add_name = summed[: -len("/output_0")] if summed and summed.endswith("/output_0") else f"{prefix}/residual/Add"
        add = ir.Node("", "Add", ins[:2], name=add_name)
        eps = node.attributes.get_float("epsilon", 1e-5)
        norm = ir.Node("", "RMSNormalization", [add.outputs[0], ins[2]], name=f"{prefix}/RMSNormalization",
                       attributes=[ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps), ir.AttrInt64("stash_type", 1)])
        graph.insert_before(node, [add, norm])
        for new, old in ((norm.outputs[0], node.outputs[0]), (add.outputs[0], node.outputs[3] if len(node.outputs) > 3 else None)):
            if old is None or not old.name:
                new.name = f"{new.producer().name}/output_0"
                continue
            new.type, new.shape = old.type, old.shape
            name = old.name
            old.name = None
            old.replace_all_uses_with(new)
            new.name = name
        graph.remove(node, safe=True)
        count += 1
    return count


@register_pass
class SkipNormPass(CompilerPass):
    name = "skip_norm"
    description = "residual add + RMSNorm as one SkipSimplifiedLayerNormalization node (same math, float rounding)"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = fuse_skip_norms(model.graph)
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        self.ctx.record(fused=count)
        self.ctx.log(f"fused {count} residual adds into their norms")
        return ir.passes.PassResult(model, count > 0)
