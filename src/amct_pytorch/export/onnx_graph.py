"""Reading and editing an exported ONNX graph: the constants and consumers of a graph
(`OnnxGraph`), node attributes, and the integer codes of a weight QuantizeLinear (`weight_codes`,
`blocked_codes`) with the record of each weight stored as codes (`FoldedWeight`).
onnx is imported only inside these functions (an optional dependency).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FoldedWeight:
    """One weight `QuantizeLinear(W)` of the export, replaced by its integer codes.

    `source`: the float initializer's name (e.g. "fc1.weight"); `name`: the integer initializer
    (int8, or packed INT4); `perm`: the transpose folded into the codes (None: the float
    weight's layout); `axis`: DequantizeLinear's axis on the stored codes (None: per tensor).
    """

    source: str
    name: str
    bits: int
    perm: tuple[int, ...] | None
    axis: int | None
    float_bytes: int
    int_bytes: int
    # "qdq": `name` holds the codes (int8 / INT4) feeding a DequantizeLinear; "matmulnbits": `name`
    # is the B input of a com.microsoft MatMulNBits, uint8 (N, K / block, block / 2), code + 8 per
    # nibble, low nibble first (`matmulnbits_codes` unpacks it)
    format: str = "qdq"
    # how the codes are stored: "int8" (zero point 0), "uint8" (code + 128, zero point 128: exact on every
    # CPU, see export/storage.py), "int4" (packed), "matmulnbits"; and why
    storage: str = "int8"
    reason: str = ""


def int_grid(data_type: int) -> tuple[int, int, int] | None:
    from onnx import TensorProto  # optional dependency

    return {TensorProto.INT8: (-128, 127, 8), TensorProto.INT4: (-8, 7, 4)}.get(data_type)


def attr(node, name, default=None):
    from onnx import helper  # optional dependency

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node, name, value) -> None:
    from onnx import helper  # optional dependency

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


class OnnxGraph:
    """Constants and consumers of an ONNX graph, for the rewrites below."""

    def __init__(self, graph):
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.consts = dict(self.inits)
        for node in graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.consts[node.output[0]] = node.attribute[0].t
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.names = {n for node in graph.node for n in (*node.input, *node.output)} | set(self.inits)

    def array(self, name) -> np.ndarray | None:
        from onnx import numpy_helper  # optional dependency

        proto = self.consts.get(name)
        return None if proto is None else numpy_helper.to_array(proto)

    def only_consumer(self, name, op_type):
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and name not in self.outputs:
            return users[0]
        return None

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name


def weight_codes(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, qmin: int,
                 qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear on a float32 weight: saturate(round_half_even(w / scale) + zero_point), as int8."""
    s, z = scale.astype(np.float32), zero_point.astype(np.float32)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return np.clip(np.rint(w.astype(np.float32) / s) + z, qmin, qmax).astype(np.int8)


def blocked_codes(g, q, dq):
    """(codes as int8, scale name, axis, block size, bits) of a blocked weight Q/DQ pair, or None."""
    w, scale, zp = g.array(q.input[0]), g.array(q.input[1]), g.array(q.input[2])
    if scale is None or zp is None or q.input[1:3] != dq.input[1:3]:
        return None
    grid = int_grid(g.consts[q.input[2]].data_type)
    if grid is None:
        return None
    qmin, qmax, bits = grid
    axis, block = attr(q, "axis", 1), attr(q, "block_size", 0)
    axis = axis + w.ndim if axis < 0 else axis
    s = np.repeat(scale.astype(np.float32), block, axis=axis)
    z = np.repeat(zp.astype(np.float32), block, axis=axis)
    codes = np.clip(np.rint(w.astype(np.float32) / s) + z, qmin, qmax).astype(np.int8)
    return codes, zp, axis, block, bits
