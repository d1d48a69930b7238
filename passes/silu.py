"""SiLU as one node: z / (1 + exp(−z)) (Neg, Exp, Add, Div) → com.microsoft.QuickGelu(z, alpha=1).

QuickGelu computes z·σ(α·z); with α = 1 that is SiLU. It is not bit-exact: ORT evaluates σ with
a polynomial whose absolute error is ~1e-7, so for z ≪ 0 the relative error of σ(z) is large,
and SmolLM2's massive-activation tokens multiply SiLU's output by "up" values in the hundreds —
the reason the fp32 export keeps transformers' exp form (measured on SmolLM2: QuickGelu moves
the fp32 logits up to 2.3e-4 from transformers, the exp form 1.2e-4). For a quantized model that
error is far below the quantization error, and three nodes fewer per block is what a decode step
pays per node (a few µs each). Run it last in quantized recipes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.analyze import const_array, is_onnx_op
from passes.base import CompilerPass, register_pass


def _is_one(value: ir.Value) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1 and float(np.asarray(arr).reshape(-1)[0]) == 1.0


def _silu_nodes(div: ir.Node) -> list[ir.Node] | None:
    """[Neg, Exp, Add, Div] when `div` computes z / (1 + exp(−z)) with private intermediates."""
    if not is_onnx_op(div, "Div"):
        return None
    z, denom = div.inputs
    add = denom.producer() if denom is not None else None
    if add is None or add.op_type != "Add":
        return None
    a, b = add.inputs
    exp_value = a if _is_one(b) else b if _is_one(a) else None
    exp = exp_value.producer() if exp_value is not None else None
    if exp is None or exp.op_type != "Exp":
        return None
    neg = exp.inputs[0].producer()
    if neg is None or neg.op_type != "Neg" or neg.inputs[0] is not z:
        return None
    nodes = [neg, exp, add, div]
    for n in nodes[:-1]:  # intermediates read only by the next node of the pattern
        if len(list(n.outputs[0].uses())) != 1 or n.outputs[0].is_graph_output():
            return None
    return nodes


@register_pass
class QuickGeluSiluPass(CompilerPass):
    name = "silu_op"
    description = "SiLU z/(1+exp(−z)) as one com.microsoft.QuickGelu(alpha=1) node (≈1e-7 abs error on σ)"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for div in [n for n in graph if n.op_type == "Div"]:
            nodes = _silu_nodes(div)
            if nodes is None or div.outputs[0].is_graph_output():
                continue
            neg = nodes[0]
            name = div.name[: -len("/Div")] + "/QuickGelu" if div.name.endswith("/Div") else f"{div.name}/QuickGelu"
            node = ir.Node("com.microsoft", "QuickGelu", [neg.inputs[0]], attributes=[ir.AttrFloat32("alpha", 1.0)], name=name)
            graph.insert_before(neg, node)
            ir.convenience.replace_all_uses_with(div.outputs[0], node.outputs[0])
            graph.remove(list(reversed(nodes)), safe=True)
            count += 1
        if count:
            model.opset_imports.setdefault("com.microsoft", 1)
        RemoveUnusedNodesPass()(model)  # the weights the replaced nodes read
        self.ctx.record(silu_nodes=count)
        self.ctx.log(f"{count} SiLUs became QuickGelu nodes")
        return ir.passes.PassResult(model, count > 0)
