"""The check that tells a right artifact from a wrong one, layer by layer.

A QDQ artifact is right when each quantized layer computes, on the input ONNX Runtime gave it,
what its Q/DQ nodes say: codes = saturate(round_half_even(x / s) + z), then the float op on the
dequantized codes and weight, plus the float bias. So for every layer this check

1. reads ORT's own input x of the layer (the value its activation QuantizeLinear quantizes) and
   its output y (the op's output, after the bias Add), by exposing those values as extra graph
   outputs (a MatMul / Add / Conv output keeps ORT's fusions; a Q/DQ output would not);
2. computes the layer exactly (float64) from x, the stored integer codes and the factors in the
   graph;
3. allows only what float32 arithmetic can explain: a sum of K products in any order is within
   gamma_K = K·u/(1 - K·u) of the exact sum relative to the sum of the products' magnitudes
   (u = 2^-24; Higham, 3.1), plus the rounding of the scaling and the bias add.

A rounding tie moves one activation code, identically in the emulation and in ORT (both round
half to even): it can never make a layer fail. What the check catches: integer kernels that
saturate (the u8s8 pair sums of AVX2 CPUs without VNNI), a bias quantized to int32, a
dequantization that does not match its zero point, any layer whose output is not its Q/DQ
computation. The instrumented run must also give the same final outputs as the plain session
(else ORT chose other kernels for it, and the plain session is judged by its outputs alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .matmulnbits import MATMULNBITS_DYNAMIC_ACCURACY_LEVEL as DYNAMIC_LEVEL, matmulnbits_codes
from .onnx_graph import OnnxGraph, attr
from .ort import autocast_off, flat_outputs, ort_session
from ..blockwise import fake_quant_act_blocks, ort_matmulnbits_level4
from ..convert import quantized_layers
from ..nn.module.quantization.base import QATModuleMixin
from ..saturation import pair_violations

U32 = 2.0**-24  # unit roundoff of float32
# the float ops between quantized layers (LayerNorm, softmax, GELU, residual adds, ...) are compared
# with this tolerance, relative to the tensor's largest magnitude: two float32 kernels of such ops
# differ in the last bits, far below it; a missing, extra or wrong op differs by far more
FLOAT_OPS_RTOL = 1e-4


@dataclass(frozen=True)
class LayerCheck:
    """One quantized layer of the artifact as ONNX Runtime ran it."""

    layer: str  # the module path (from its weight initializer's name)
    op: str  # MatMul, Gemm, Conv, MatMulNBits
    max_abs_diff: float  # ORT vs the exact layer on ORT's own input
    bound: float  # the float32 rounding that can explain a difference, at the element of max_abs_diff
    ok: bool
    worst: tuple[float, float] = (0.0, 0.0)  # (difference, bound) where the difference exceeds its bound most


@dataclass
class _Site:
    layer: str
    node: object  # the op
    x: str  # the float value its activation quantizer reads
    y: str  # the layer's output (after its bias Add, if any)
    q: object  # the activation QuantizeLinear; None: MatMulNBits accuracy_level 4 quantizes x itself
    bias: str | None
    pad: object = None  # a Pad between the activation's DequantizeLinear and a Conv (padding_mode != zeros)


def _producer(proto):
    return {o: n for n in proto.graph.node for o in n.output}


def _layer_name(weight_source: str) -> str:
    return weight_source[: -len(".weight")] if weight_source.endswith(".weight") else weight_source


def _output_and_bias(g: OnnxGraph, op) -> tuple[str, str | None]:
    """The layer's output (after its bias Add, if one follows) and its bias initializer (or None)."""
    y = op.output[0]
    if op.op_type in ("Gemm", "Conv", "ConvTranspose") and len(op.input) > 2 and op.input[2]:
        return y, op.input[2]
    adds = g.consumers.get(y, [])
    if len(adds) == 1 and adds[0].op_type == "Add":
        other = [n for n in adds[0].input if n != y]
        if len(other) == 1 and other[0] in g.consts:
            return adds[0].output[0], other[0]
    return y, None


def find_sites(proto, folded) -> list[_Site]:
    """The quantized layers of an export_onnx graph: for each folded weight, its op, the float input
    of its activation quantizer and its output."""
    g = OnnxGraph(proto.graph)
    prod = _producer(proto)
    sites = []
    for f in folded:
        users = g.consumers.get(f.name, [])
        if not users:
            continue
        first = users[0]
        if first.op_type == "Cast":  # packed INT4 codes: Cast(to=INT8) -> DequantizeLinear
            first = (g.consumers.get(first.output[0]) or [None])[0]
        if first is None:
            continue
        if first.op_type == "MatMulNBits":
            op, act = first, first.input[0]
        elif first.op_type == "DequantizeLinear":
            ops = g.consumers.get(first.output[0], [])
            if len(ops) != 1 or ops[0].op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                continue
            op = ops[0]
            act = op.input[0]
        else:
            continue
        src, pad = prod.get(act), None
        if src is not None and src.op_type == "Pad" and op.op_type in ("Conv", "ConvTranspose"):
            pad, src = src, prod.get(src.input[0])
        if (op.op_type == "MatMulNBits" and attr(op, "accuracy_level", 0) == DYNAMIC_LEVEL
                and (src is None or src.op_type != "DequantizeLinear")):
            if act not in g.consts:  # the kernel quantizes its float input per block itself
                y, bias = _output_and_bias(g, op)
                sites.append(_Site(_layer_name(f.source), op, act, y, None, bias))
            continue
        dq = src
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = prod.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        x = q.input[0]
        if x in g.consts:
            continue
        y, bias = _output_and_bias(g, op)
        sites.append(_Site(_layer_name(f.source), op, x, y, q, bias, pad))
    return sites


def instrumented(proto, sites):
    """A copy of `proto` whose outputs also hold every site's x and y."""
    import copy

    from onnx import helper  # optional dependency

    proto = copy.deepcopy(proto)
    have = {o.name for o in proto.graph.output}
    for s in sites:
        for name in (s.x, s.y):
            if name not in have:
                proto.graph.output.append(helper.make_empty_tensor_value_info(name))
                have.add(name)
    return proto


def _dequantized(g: OnnxGraph, dq_node, codes_name=None) -> np.ndarray:
    """DequantizeLinear(codes, scale, zero point) of a constant input, in float64."""
    codes = g.array(codes_name or dq_node.input[0])
    scale = g.array(dq_node.input[1]).astype(np.float64)
    zp = g.array(dq_node.input[2]).astype(np.float64) if len(dq_node.input) > 2 and dq_node.input[2] else 0.0
    codes = codes.astype(np.float64)
    axis, block = attr(dq_node, "axis", 1), attr(dq_node, "block_size", 0)
    if block:
        axis = axis % codes.ndim
        scale = np.repeat(scale, block, axis=axis)
        zp = np.repeat(zp, block, axis=axis) if np.ndim(zp) else zp
    elif np.ndim(scale) and np.size(scale) > 1:
        axis = axis % codes.ndim
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = np.reshape(zp, shape) if np.size(zp) > 1 else zp
    return (codes - zp) * scale


def _weight(g: OnnxGraph, prod, site) -> np.ndarray:
    op = site.node
    if op.op_type == "MatMulNBits":
        n, k, block = attr(op, "N"), attr(op, "K"), attr(op, "block_size")
        codes = matmulnbits_codes(g.array(op.input[1])).astype(np.float64)[:, :k]
        scales = g.array(op.input[2]).astype(np.float64).reshape(n, -1)
        return (codes * np.repeat(scales, block, axis=1)[:, :k]).T  # (K, N)
    dq = prod[op.input[1]]
    src = prod.get(dq.input[0])
    codes_name = src.input[0] if src is not None and src.op_type == "Cast" else None
    return _dequantized(g, dq, codes_name)


def _activation(g: OnnxGraph, q, x: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear then DequantizeLinear of x, exactly as ONNX defines them."""
    from onnx import TensorProto  # optional dependency

    s = g.array(q.input[1]).astype(np.float32)
    zp_proto = g.consts[q.input[2]]
    z = g.array(q.input[2]).astype(np.float32)
    lo, hi = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7),
              TensorProto.UINT4: (0, 15)}[zp_proto.data_type]
    codes = np.clip(np.rint(x.astype(np.float32) / s) + z, lo, hi)
    return (codes.astype(np.float64) - z.astype(np.float64)) * s.astype(np.float64)


def _dynamic_activation(op, x: np.ndarray) -> np.ndarray:
    """MatMulNBits accuracy_level 4's own quantization of its input: symmetric int8 per block of
    block_size along K (amax/127 in float32, codes round-half-even(x·127/amax)), as trained
    (retrain_data_config.dynamic_act='ort-matmulnbits-level4', amct_pytorch.blockwise)."""
    import torch

    spec = ort_matmulnbits_level4(int(attr(op, "block_size")))
    xq = fake_quant_act_blocks(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), spec)
    return xq.numpy().astype(np.float64)


_PAD_MODES = ("constant", "reflect", "edge", "wrap")  # ONNX Pad's modes; NumPy's np.pad names them alike


def _pad(g: OnnxGraph, node, x: np.ndarray):
    """ONNX Pad of x (constant pads only; None when the pads are computed or crop)."""
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if node.input[1] not in g.consts or mode not in _PAD_MODES:
        return None
    pads = [int(v) for v in g.array(node.input[1]).reshape(-1)]
    has = lambda i: len(node.input) > i and node.input[i]  # noqa: E731
    if (has(2) and node.input[2] not in g.consts) or (has(3) and node.input[3] not in g.consts):
        return None
    axes = [int(a) % x.ndim for a in g.array(node.input[3]).reshape(-1)] if has(3) else list(range(x.ndim))
    if min(pads, default=0) < 0 or len(pads) != 2 * len(axes):
        return None
    width = [(0, 0)] * x.ndim
    for i, a in enumerate(axes):
        width[a] = (pads[i], pads[i + len(axes)])
    if mode == "constant":
        value = float(g.array(node.input[2]).reshape(-1)[0]) if has(2) else 0.0
        return np.pad(x, width, mode="constant", constant_values=value)
    return np.pad(x, width, mode=mode)


def _conv(op, x, w, transposed):
    import torch  # the float64 reference of the conv

    dims = w.ndim - 2
    strides = attr(op, "strides", [1] * dims)
    pads = attr(op, "pads", [0] * (2 * dims))
    dil = attr(op, "dilations", [1] * dims)
    group = attr(op, "group", 1)
    if attr(op, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None  # automatic padding: not emulated here
    if list(pads[:dims]) != list(pads[dims:]):  # asymmetric (e.g. padding="same", even kernel): pad x first
        if transposed:
            return None  # asymmetric pads of a transposed conv crop its output: not emulated here
        x = np.pad(x, [(0, 0), (0, 0)] + [(int(pads[i]), int(pads[i + dims])) for i in range(dims)])
        pads = [0] * (2 * dims)
    xt, wt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(w))
    if transposed:
        out_pad = attr(op, "output_padding", [0] * dims)
        fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
              3: torch.nn.functional.conv_transpose3d}[dims]
        return fn(xt, wt, None, strides, list(pads[:dims]), list(out_pad), group, dil).numpy()
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    return fn(xt, wt, None, strides, list(pads[:dims]), dil, group).numpy()


def _apply(op, x, w):
    """(y, |x| op |w|, K) in float64: the op, the magnitudes its sums add up, and the terms per sum."""
    if op.op_type == "Gemm":
        w = w.T if attr(op, "transB", 0) else w
    if op.op_type in ("MatMul", "Gemm", "MatMulNBits"):
        return x @ w, np.abs(x) @ np.abs(w), w.shape[0]
    transposed = op.op_type == "ConvTranspose"
    y = _conv(op, x, w, transposed)
    if y is None:
        return None
    mag = _conv(op, np.abs(x), np.abs(w), transposed)
    k = int(np.prod(w.shape[1:])) if not transposed else int(w.shape[0] * np.prod(w.shape[2:]))
    return y, mag, k


def check_layers(proto, sites, values: dict[str, np.ndarray]) -> list[LayerCheck]:
    """Each site's ORT output against its exact computation on ORT's own input (`values`: the
    instrumented run's outputs by name)."""
    g = OnnxGraph(proto.graph)
    prod = _producer(proto)
    results = []
    for s in sites:
        x, y = values[s.x], values[s.y].astype(np.float64)
        xq = _dynamic_activation(s.node, x) if s.q is None else _activation(g, s.q, x)
        if s.pad is not None:
            xq = _pad(g, s.pad, xq)
            if xq is None:
                continue
        w = _weight(g, prod, s)
        out = _apply(s.node, xq, w)
        if out is None:
            continue
        ref, mag, k = out
        if s.bias is not None:
            b = g.array(s.bias).astype(np.float64)
            if s.node.op_type in ("Conv", "ConvTranspose") and b.ndim == 1:
                b = b.reshape(-1, *([1] * (ref.ndim - 2)))
            ref = ref + b
            mag = mag + np.abs(b)
        gamma = (k + 4) * U32 / (1 - (k + 4) * U32)  # the K-term sum, the scaling, the bias add
        bound = gamma * mag + 2 * U32 * np.abs(ref) + np.finfo(np.float32).tiny
        if ref.shape != y.shape:
            ref = ref.reshape(y.shape)
            bound = bound.reshape(y.shape)
        diff = np.abs(y - ref)
        at_max = int(np.argmax(diff))
        worst = int(np.argmax(diff / bound))
        results.append(LayerCheck(s.layer, s.node.op_type, float(diff.max()), float(bound.reshape(-1)[at_max]),
                                  bool(np.all(diff <= bound)),
                                  (float(diff.reshape(-1)[worst]), float(bound.reshape(-1)[worst]))))
    return results


def saturating_pairs(proto, sites) -> None:
    """Raise ArtifactCheckError naming the first layer whose stored int8 weight codes hold a pair
    that ORT's u8s8 kernel can saturate on x86 CPUs without VNNI (amct_pytorch.saturation): such an
    artifact is wrong there even when it is right on this CPU, so this part of the check does not
    depend on the CPU it runs on."""
    from onnx import TensorProto  # optional dependency

    g = OnnxGraph(proto.graph)
    prod = _producer(proto)
    for s in sites:
        op = s.node
        if op.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        dq = prod.get(op.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.consts:
            continue
        if g.consts[dq.input[0]].data_type != TensorProto.INT8 or attr(dq, "block_size", 0):
            continue  # uint8 (exact u8u8), INT4, or blocked codes (dequantized, then a float MatMul)
        codes = g.array(dq.input[0])
        order = {"MatMul": "matmul", "Conv": "conv"}.get(op.op_type)
        if op.op_type == "Gemm":
            order = "linear" if attr(op, "transB", 0) else "matmul"
        groups = int(attr(op, "group", 1)) if op.op_type == "Conv" else 1
        where = pair_violations(codes, order, groups)
        if len(where):
            k, k1, n = (int(v) for v in where[0])
            raise ArtifactCheckError(
                f"layer {s.layer!r} ({op.op_type}) stores int8 weight codes with {len(where)} pair(s) that saturate "
                f"ONNX Runtime's u8s8 kernel on x86 CPUs without VNNI (first: positions {k}, {k1} of output {n} in "
                "the kernel's reduction order): the artifact computes wrong values there, whatever this CPU shows. "
                "Export with int8_storage='auto' (the default: such layers are stored as uint8 + 128), or train "
                "with retrain_weight_config.kernel_grid (docs/export.md, \"Exact on every CPU\").")


class ArtifactCheckError(RuntimeError):
    """The exported artifact does not compute what the model computes (the message names the layer)."""


def _run(session, inputs):
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


def check_artifact(model, path, folded, input_sets, *, session_options=None, atol=None):
    """Run `path` in ONNX Runtime on every tuple of `input_sets` and judge it (see the module doc).

    Returns (max abs difference of the final outputs from `model`, per-layer results of the worst
    input set). Raises ArtifactCheckError naming the first layer (in graph order) whose output is
    not its Q/DQ computation, or when the instrumented run's final outputs differ from the plain
    run's, or (with `atol`) when a final output differs from the model's by more than `atol`.
    """
    import onnx  # optional dependency

    proto = onnx.load(path)
    sites = find_sites(proto, folded)
    original = {id(s): s.layer for s in sites}  # the float-ops replay renames them to module paths
    saturating_pairs(proto, sites)
    plain = ort_session(path, session_options)
    probe_proto = instrumented(proto, sites)
    probe = ort_session_from_proto(probe_proto, session_options)
    final_names = [o.name for o in proto.graph.output]
    worst_diff, layers = 0.0, []
    import torch

    for inputs in input_sets:
        got = _run(plain, inputs)
        with torch.no_grad(), autocast_off():
            want = flat_outputs(model(*inputs))
        if len(want) != len(final_names):
            raise RuntimeError(f"{path}: ONNX model has {len(final_names)} outputs, the PyTorch model {len(want)}")
        diff = max(float(np.max(np.abs(got[n].astype(np.float64) - w.astype(np.float64))))
                   for n, w in zip(final_names, want))
        values = _run(probe, inputs)
        for n in final_names:
            a, b = got[n].astype(np.float64), values[n].astype(np.float64)
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            if not np.all(np.abs(a - b) <= 8 * U32 * scale):
                raise ArtifactCheckError(
                    f"{path}: ONNX Runtime's plain session computes output {n!r} differently from the same graph "
                    f"with its layers' intermediate values read out (max abs {float(np.max(np.abs(a - b))):.3g}): "
                    "its optimizer rewrote the plain graph (e.g. dropped an op, or chose kernels that compute "
                    "otherwise), so the artifact does not compute what the model computes")
        _check_float_segments(model, path, sites, values, inputs, final_names)
        checks = check_layers(proto, sites, values)
        bad = next((c for c in checks if not c.ok), None)
        if bad is not None:
            raise ArtifactCheckError(
                f"{path}: layer {bad.layer!r} ({bad.op}) computes wrong values in ONNX Runtime: its output differs "
                f"from the exact computation of its Q/DQ nodes on the same input by {bad.worst[0]:.3g} where "
                f"float32 rounding explains at most {bad.worst[1]:.3g} (docs/export.md, \"The check\"). Rounding "
                "ties cannot cause this; a saturating integer kernel, a quantized bias or a rewritten graph can.")
        if diff >= worst_diff:
            worst_diff, layers = diff, checks
    checked = {c.layer for c in layers}
    unchecked = ([original[id(s)] for s in sites if s.layer not in checked]
                 + [n for n in (_layer_name(f.source) for f in folded) if n not in original.values()])
    if unchecked:  # say so once: these layers were judged by the whole-model comparison only
        import warnings

        warnings.warn(f"export_onnx: {len(unchecked)} quantized layer(s) not checked layer by layer, their graph "
                      f"form is not one the check emulates (e.g. a Conv with asymmetric or automatic padding): "
                      f"{unchecked[:8]}{' ...' if len(unchecked) > 8 else ''}; the artifact's outputs were still "
                      "compared with the model's (ExportResult.max_abs_diff)", stacklevel=3)
    if atol is not None and worst_diff > atol:
        raise ArtifactCheckError(
            f"{path}: ONNX Runtime output differs from the PyTorch eval output by {worst_diff:.3g} (max abs), above "
            f"atol={atol:g}; every quantized layer computes its Q/DQ nodes exactly, so the difference comes from "
            "rounding ties propagated through the model (docs/export.md, \"Rounding ties\") or from float ops "
            "outside the quantized layers")
    return worst_diff, tuple(layers)


def _check_float_segments(model, path, sites, values, inputs, final_names) -> None:
    """The model's float parts against ORT's: run the PyTorch model with every quantized layer's output
    replaced by ORT's (forward hooks), so that everything between quantized layers, and after the last,
    is computed by PyTorch from ORT's own values; then each layer's input and the final outputs must
    agree with ORT's to FLOAT_OPS_RTOL. Skipped when a layer cannot be matched to one module call
    (e.g. the TorchScript exporter's initializer names, or a module called twice)."""
    import torch

    modules = dict(model.named_modules())
    named = [modules.get(s.layer) for s in sites]
    by_name = all(isinstance(m, QATModuleMixin) for m in named) and len({id(m) for m in named}) == len(named)
    site_of = {id(m): s for m, s in zip(named, sites)} if by_name else {}
    calls: list = []  # (module, its input, the site it was matched to)
    failed = []

    def hook(mod, args, out):
        # by name (dynamo's initializer names are module paths), else by call order = graph order
        site = site_of.get(id(mod)) if by_name else (sites[len(calls)] if len(calls) < len(sites) else None)
        if site is None and by_name:
            return out  # a layer whose output the exported graph does not use (pruned), e.g. an unused pooler
        if site is None or values[site.y].size != out.numel():
            failed.append(mod)
            return out
        calls.append((mod, args[0].detach(), site))
        return torch.from_numpy(np.ascontiguousarray(values[site.y])).reshape(out.shape).to(out.dtype)

    names = {id(m): n for n, m in quantized_layers(model).items()}
    handles = [m.register_forward_hook(hook) for m in quantized_layers(model).values()]
    try:
        with torch.no_grad(), autocast_off():
            replay = flat_outputs(model(*inputs))
    finally:
        for h in handles:
            h.remove()
    if failed or len(calls) != len(sites) or len({id(s) for _, _, s in calls}) != len(sites):
        return  # a layer called twice, or one that the graph does not show as one site: cannot replay
    for mod, x, s in calls:
        s.layer = names[id(mod)]  # messages name the module (TorchScript's initializer names do not)
    for mod, x, s in calls:
        _same_float(x.cpu().numpy(), values[s.x],
                    f"the input of layer {s.layer!r} (the float ops before it, computed from ORT's values)", path)
    for name, want in zip(final_names, replay):
        _same_float(want, values[name], f"output {name!r} (the float ops after the last quantized layer)", path)


def _same_float(torch_value, ort_value, what, path) -> None:
    a, b = np.asarray(torch_value, dtype=np.float64), np.asarray(ort_value, dtype=np.float64)
    if a.size != b.size:
        raise ArtifactCheckError(f"{path}: {what} has {b.size} values in ONNX Runtime, {a.size} in PyTorch")
    a, b = a.reshape(-1), b.reshape(-1)
    tol = FLOAT_OPS_RTOL * max(float(np.max(np.abs(a))) if a.size else 0.0, np.finfo(np.float32).tiny)
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not diff <= tol:
        raise ArtifactCheckError(
            f"{path}: {what} differs between ONNX Runtime and PyTorch by {diff:.3g} (max abs), above "
            f"{FLOAT_OPS_RTOL:g} of its largest magnitude ({tol:.3g}): the exported graph does not compute the "
            "model's float ops there (a dropped or rewritten op, or a forward that differs under export)")


def ort_session_from_proto(proto, session_options=None):
    import onnxruntime as ort  # optional dependency

    return ort.InferenceSession(proto.SerializeToString(), sess_options=session_options,
                                providers=["CPUExecutionProvider"])


def int8_saturation_report(path) -> dict:
    """For any ONNX model (ours or another quantizer's): its int8 weights that ORT's x86 integer
    kernels reduce in u8s8 pairs (MatMulInteger, QLinearMatMul, ConvInteger, QLinearConv, and
    DequantizeLinear-fed MatMul / Gemm / Conv, which ORT fuses into them), and whether any holds a
    pair that saturates on CPUs without VNNI. CPU-independent: the same answer on every machine."""
    import onnx  # optional dependency
    from onnx import TensorProto

    proto = onnx.load(str(path), load_external_data=False)
    g = OnnxGraph(proto.graph)
    checked, bad = [], []

    def judge(node, name, order, groups=1):
        if name not in g.consts or g.consts[name].data_type != TensorProto.INT8:
            return
        checked.append(node.name or name)
        if len(pair_violations(g.array(name), order, groups)):
            bad.append(node.name or name)

    for node in proto.graph.node:
        groups = int(attr(node, "group", 1))
        if node.op_type == "MatMulInteger" and len(node.input) > 1:
            judge(node, node.input[1], "matmul")
        elif node.op_type == "QLinearMatMul":
            judge(node, node.input[3], "matmul")
        elif node.op_type == "ConvInteger" and len(node.input) > 1:
            judge(node, node.input[1], "conv", groups)
        elif node.op_type == "QLinearConv":
            judge(node, node.input[3], "conv", groups)
        elif node.op_type == "DequantizeLinear" and not attr(node, "block_size", 0):
            user = (g.consumers.get(node.output[0]) or [None])[0]
            if user is None or len(user.input) < 2 or user.input[1] != node.output[0]:
                continue
            if user.op_type == "MatMul":
                judge(user, node.input[0], "matmul")
            elif user.op_type == "Gemm":
                judge(user, node.input[0], "linear" if attr(user, "transB", 0) else "matmul")
            elif user.op_type == "Conv":
                judge(user, node.input[0], "conv", int(attr(user, "group", 1)))
    return {"int8_layers": len(checked), "saturating_layers": len(bad), "exact_on_every_cpu": not bad,
            "first_saturating": bad[0] if bad else None}
