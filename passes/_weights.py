"""Small helpers shared by the folding passes (rotate, affine): read and rewrite initializers.

Every fold computes in float64 and stores float32, so an exact fold only adds fp32 rounding of
the stored weights (≈1e-7 relative), far below the 1e-4 logits tolerance the tests check.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.errors import UserError


def initializer(model: ir.Model, name: str) -> ir.Value:
    try:
        return model.graph.initializers[name]
    except KeyError:
        raise UserError(f"initializer {name!r} named by the structure analysis is not in the graph; re-export the model") from None


def get_weight(model: ir.Model, name: str) -> np.ndarray:
    """The initializer as a float64 array (a copy)."""
    value = initializer(model, name)
    if value.const_value is None:
        raise UserError(f"initializer {name!r} has no data; re-export the model")
    arr = value.const_value.numpy()
    if arr.dtype not in (np.float32, np.float16, np.float64):
        raise UserError(f"initializer {name!r} is {arr.dtype}, not a float weight; run this pass before quantization")
    return np.array(arr, dtype=np.float64)


def set_weight(model: ir.Model, name: str, arr: np.ndarray) -> None:
    """Replace an initializer's data with `arr` (same shape), stored in the initializer's dtype."""
    value = initializer(model, name)
    old = value.const_value.numpy()
    arr = np.asarray(arr)
    if arr.shape != old.shape:
        raise ValueError(f"{name}: new shape {arr.shape} != {old.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: refusing to write non-finite weights")
    value.const_value = ir.Tensor(np.ascontiguousarray(arr.astype(old.dtype)), name=name)


def add_weight(model: ir.Model, name: str, arr: np.ndarray, dtype=np.float32) -> ir.Value:
    """A new initializer `name` (made unique) holding `arr`."""
    base, i = name, 1
    while name in model.graph.initializers:
        name = f"{base}_{i}"
        i += 1
    arr = np.ascontiguousarray(np.asarray(arr).astype(dtype))
    tensor = ir.Tensor(arr, name=name)
    value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    model.graph.register_initializer(value)
    return value


def node_by_name(model: ir.Model, name: str) -> ir.Node:
    for node in model.graph:
        if node.name == name:
            return node
    raise UserError(f"node {name!r} named by the structure analysis is not in the graph; re-export the model")


def shared_weight_users(structure) -> dict[str, list[str]]:
    """weight initializer → linear names using it (more than one means a fused/shared weight)."""
    users: dict[str, list[str]] = {}
    for lin in structure.linears():
        if lin.weight is not None:
            users.setdefault(lin.weight, []).append(lin.name)
    return users
