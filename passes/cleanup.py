"""Graph cleanup: remove nodes whose outputs nothing reads and initializers nothing uses.

Exact by construction: only values that cannot reach a graph output are removed.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from passes.base import CompilerPass, register_pass


@register_pass
class CleanupPass(CompilerPass):
    name = "cleanup"
    description = "remove dead nodes and unused initializers"
    needs_plain_layout = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph) + len(model.graph.initializers)
        result = RemoveUnusedNodesPass()(model)
        after = len(model.graph) + len(model.graph.initializers)
        self.ctx.record(removed=before - after)
        return ir.passes.PassResult(model, result.modified)
