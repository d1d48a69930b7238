"""The pass API every llmfold transformation builds on.

A pass is one small class on top of onnx_ir's pass API (`requires` → `call` → `ensures`):

    @register_pass
    class Int4Pass(CompilerPass):
        name = "int4"                      # the key recipes use: [[pass]] name = "int4"
        Params = Int4Params                # a dataclass: recipe keys, types, defaults
        def call(self, model): ...         # rewrite model in place, return PassResult

Parameters are a dataclass; the recipe loader rejects unknown keys and wrong types before any
work, then calls `Params.validate()` for value checks (raise UserError there).

A pass reads the model's structure with `self.ctx.structure(model)` and calibration statistics
of linear-layer inputs with `self.ctx.input_stats(model, [value names])`. When it changes a
layer's input exactly (X' = X·A) it hands the derived statistics on with `ctx.set_stats`;
otherwise it calls `ctx.invalidate_stats` and later passes get them re-collected on the
transformed graph. `ctx.record(...)` adds what the pass did to llmfold.json.

The fused export packs each block's q/k/v into one MatMul, and recipes end with runtime-layout
passes (pack_qkv, skip_norm, silu_op, logits_to_keep, packed_matmul, pack_lowrank). A pass sees the plain layout —
three q/k/v MatMuls, Add + RMSNormalization, lm_head on every position, plain MatMul weights —
unless it sets `needs_plain_layout = False`: before it runs, `to_plain_layout` splits packed q/k/v
(exact: the same dot products) and fused residual norms (same math, float rounding) back, turns
PackedMatMuls back into MatMuls (exact), gives low-rank pairs their own first factors again (exact)
and removes the logits_to_keep slice (passes/pack.py `unpack_qkv`, passes/skip_norm.py,
passes/packed_matmul.py, passes/pack_lowrank.py, passes/logits.py).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import onnx_ir as ir

from compiler.errors import UserError

if typing.TYPE_CHECKING:
    from compiler.driver import CompileContext

REGISTRY: dict[str, type["CompilerPass"]] = {}


@dataclasses.dataclass
class NoParams:
    def validate(self) -> None:
        pass


class CompilerPass(ir.passes.InPlacePass):
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    description: ClassVar[str] = ""
    needs_plain_layout: ClassVar[bool] = True  # see the module docstring

    def __init__(self, ctx: "CompileContext", params: Any = None):
        super().__init__()
        self.ctx = ctx
        self.params = params if params is not None else self.Params()

    def __call__(self, model_or_result, /) -> ir.passes.PassResult:
        model = model_or_result.model if isinstance(model_or_result, ir.passes.PassResult) else model_or_result
        changed = self.needs_plain_layout and to_plain_layout(model, self.ctx)
        result = super().__call__(model)
        return ir.passes.PassResult(result.model, True) if changed else result

    def call(self, model: ir.Model) -> ir.passes.PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def report_blocks(self, key: str, done: int, total: int, what: str, skipped: dict[int, str]) -> None:
        """Record `key` = done and the skip reason of each block; log "<what> of done of total blocks"."""
        self.ctx.record(**{key: done}, skipped={str(k): v for k, v in sorted(skipped.items())})
        self.ctx.log(f"{what} of {done} of {total} blocks"
                     + (f"; skipped {len(skipped)} ({next(iter(skipped.values()))})" if skipped else ""))


def to_plain_layout(model: ir.Model, ctx: "CompileContext") -> bool:
    """Split packed q/k/v and fused residual norms back, PackedMatMuls back to MatMuls, drop the
    logits_to_keep slice; changed?"""
    from passes.logits import drop_logits_slice
    from passes.pack import unpack_qkv
    from passes.pack_lowrank import unpack_first_factors
    from passes.packed_matmul import unpack_packed_matmuls
    from passes.skip_norm import unfuse_skip_norms

    shared = unpack_first_factors(model)  # (first: unpack_packed_matmuls leaves block-diagonal ones alone)
    tiles = unpack_packed_matmuls(model)
    sliced = drop_logits_slice(model.graph)
    norms = unfuse_skip_norms(model.graph)
    if norms or sliced or tiles or shared:
        ctx.invalidate_structure()
    blocks = unpack_qkv(model, ctx.structure(model))
    if blocks:
        ctx.invalidate_structure()
    if norms or blocks or sliced or tiles or shared:
        ctx.log(f"plain layout for the next pass: {blocks} packed q/k/v split, {norms} fused residual norms split"
                + (f", {tiles} PackedMatMuls back to MatMul" if tiles else "")
                + (f", {shared} shared low-rank first factors split" if shared else "")
                + (", the logits_to_keep slice removed" if sliced else ""))
    return bool(norms or blocks or sliced or tiles or shared)


def register_pass(cls: type[CompilerPass]) -> type[CompilerPass]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two passes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def _check_type(value: Any, annotation: Any) -> bool:
    """Is a TOML value acceptable for a Params field annotation (str annotations allowed)?"""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"ir": ir})  # noqa: S307 - our own source
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def make_params(pass_cls: type[CompilerPass], raw: dict[str, Any], where: str) -> Any:
    """Build and validate a pass's Params from a recipe table; UserError on any problem."""
    fields = {f.name: f for f in dataclasses.fields(pass_cls.Params)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(
            f"{where}: unknown parameter(s) {', '.join(unknown)} for pass '{pass_cls.name}'; "
            f"allowed: {', '.join(sorted(fields)) or '(none)'}"
        )
    for key, value in raw.items():
        if not _check_type(value, fields[key].type):
            raise UserError(
                f"{where}: parameter '{key}' of pass '{pass_cls.name}' must be "
                f"{fields[key].type}, got {value!r}"
            )
    raw = {k: float(v) if fields[k].type in (float, "float") else v for k, v in raw.items()}
    params = pass_cls.Params(**raw)
    try:
        params.validate()
    except UserError as e:
        raise UserError(f"{where}: {e.message}") from None
    return params
