"""Graph passes over the exported ONNX model that make ONNX Runtime compute what the eval
forward computes and store every quantized weight as integer codes (docs/export.md).
"""
from __future__ import annotations

import copy

import numpy as np

from .matmulnbits import fold_matmulnbits
from .onnx_graph import FoldedWeight, OnnxGraph, attr, blocked_codes, int_grid, set_attr, weight_codes
from .storage import UINT8_ZERO_POINT, as_uint8, check_storage, choose_storage

GROUP_WISE_INT4_FORMS = ("matmulnbits", "qdq")


def keep_relu_before_int4_quantizers(proto) -> int:
    """Write `Relu -> QuantizeLinear(INT4, zero point > -8)` as `Max(x, 0) -> QuantizeLinear`.

    ONNX Runtime's ReluQuantRewrite (onnxruntime 1.32, default options) removes a Relu in front of an
    INT4 QuantizeLinear even when the zero point is above qmin, where the Relu still clips negative
    values (measured: outputs off by 2.3 on a small INT4 MLP). Max(x, 0) computes the same and is not
    matched. Returns how many were rewritten.
    """
    from onnx import TensorProto, helper, numpy_helper  # optional dependency

    g = OnnxGraph(proto.graph)
    zero = None
    count = 0
    for node in proto.graph.node:
        if node.op_type != "Relu":
            continue
        q, name = None, node.output[0]
        for _ in range(4):  # through the shape ops in between (ORT moves them)
            users = g.consumers.get(name, [])
            if len(users) != 1 or name in g.outputs:
                break
            if users[0].op_type == "QuantizeLinear":
                q = users[0]
                break
            if users[0].op_type not in ("Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose"):
                break
            name = users[0].output[0]
        zp = None if q is None or len(q.input) < 3 else g.consts.get(q.input[2])
        if zp is None or zp.data_type != TensorProto.INT4 or np.all(g.array(q.input[2]) == -8):
            continue
        if zero is None:
            zero = g.fresh("relu_zero")
            proto.graph.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), zero))
        node.op_type = "Max"
        node.input.append(zero)
        count += 1
    return count


def unshare_activation_quantizers(proto) -> int:
    """Give each consumer of a shared activation `QuantizeLinear -> DequantizeLinear` its own pair.

    Layers reading the same tensor with equal factors (q/k/v projections calibrated on one input)
    come out of the exporter's common-subexpression pass sharing one pair, which ONNX Runtime (1.32)
    then leaves as float MatMuls. Returns how many pairs were added.
    """
    g = OnnxGraph(proto.graph)
    added: dict[int, list] = {}
    count = 0
    for q in proto.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in g.consts:
            continue
        dq = g.only_consumer(q.output[0], "DequantizeLinear")
        users = g.consumers.get(dq.output[0], []) if dq is not None else []
        if dq is None or len(users) < 2 or dq.output[0] in g.outputs:
            continue
        for user in users[1:]:
            q2, dq2 = copy.deepcopy(q), copy.deepcopy(dq)
            q2.name, dq2.name = g.fresh(f"{q.name}_copy"), g.fresh(f"{dq.name}_copy")
            q2.output[0] = g.fresh(f"{q.output[0]}_copy")
            dq2.input[0] = q2.output[0]
            # its own factor initializers too, else ORT's common-subexpression pass merges the copies again
            for k in (1, 2):
                if q.input[k] in g.consts:
                    const = copy.deepcopy(g.consts[q.input[k]])
                    const.name = g.fresh(f"{q.input[k]}_copy")
                    proto.graph.initializer.append(const)
                    q2.input[k] = dq2.input[k] = const.name
            dq2.output[0] = g.fresh(f"{dq.output[0]}_copy")
            for i, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[i] = dq2.output[0]
            added.setdefault(id(dq), []).extend((q2, dq2))
            count += 1
    if count:
        nodes = []
        for node in proto.graph.node:
            nodes.append(node)
            nodes.extend(added.get(id(node), []))
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return count


def activation_quantizer(g: OnnxGraph, name: str):
    """The QuantizeLinear of `name` = DequantizeLinear(QuantizeLinear(x)) when that pair serves only this use."""
    dq = next((n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name), None)
    if dq is None or len(g.consumers.get(name, [])) != 1 or name in g.outputs:
        return None
    q = next((n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == dq.input[0]), None)
    if q is None or g.only_consumer(q.output[0], "DequantizeLinear") is not dq or q.input[0] in g.consts:
        return None
    return q


def fold_weight_quantizers(proto, *, integer: bool = True, gemm_to_matmul: bool = True,
                           separate_conv_bias: bool = True, group_wise_int4: str = "matmulnbits",
                           int8_storage: str = "auto") -> list[FoldedWeight]:
    """Replace every `QuantizeLinear(float initializer) -> DequantizeLinear` by an integer initializer
    feeding the DequantizeLinear (in place on `proto`, a ModelProto).

    The codes are ONNX's own QuantizeLinear of the stored weight (so ONNX Runtime computes the
    same outputs, and they equal `deploy_view`'s codes). INT8 weights become int8 initializers;
    INT4 weights become packed INT4 initializers behind `Cast(to=INT8)` and an int8-zero-point
    DequantizeLinear: the form ONNX Runtime's CPU provider fuses into MatMulIntegerToFloat (an
    INT4 DequantizeLinear is left as float). A Transpose right after the DequantizeLinear is
    folded into the codes. With `gemm_to_matmul`, a `Gemm` (alpha = beta = 1, no transA) fed by a
    folded weight becomes `MatMul` + `Add(bias)` (its 2-D input quantized as (1, M, K)): the MatMul
    form fuses, and the float bias stays float under ONNX Runtime's default options. With
    `separate_conv_bias`, a Conv/ConvTranspose bias becomes an Add after it, for the same reason.
    With `integer=False` the float weight keeps its QuantizeLinear (only laid out for the MatMul).
    Blocked (group-wise) weights: with `group_wise_int4="matmulnbits"` an INT4 linear weight and its
    MatMul / Gemm become one com.microsoft `MatMulNBits` (`matmulnbits.fold_matmulnbits`); otherwise, and for INT8
    blocks, the codes feed the blocked DequantizeLinear (`fold_blocked`).
    INT8 codes are stored as int8, or as uint8 + 128 (zero point 128) where a pair of them could
    saturate ORT's u8s8 kernel on CPUs without VNNI (`int8_storage`, see export/storage.py).
    Returns the folded weights (none when `integer=False`).
    """
    from onnx import TensorProto, helper, numpy_helper  # optional dependency

    if group_wise_int4 not in GROUP_WISE_INT4_FORMS:
        raise ValueError(f"group_wise_int4: expected one of {GROUP_WISE_INT4_FORMS}, got {group_wise_int4!r}")
    check_storage(int8_storage)

    g = OnnxGraph(proto.graph)
    folded: list[FoldedWeight] = []
    drop: set[int] = set()  # ids of nodes to remove
    before: dict[int, list] = {}  # id(node) -> nodes to insert in front of it
    dead_values: set[str] = set()
    for q in list(proto.graph.node):
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[0] not in g.inits:
            continue
        src = g.inits[q.input[0]]
        dq = g.only_consumer(q.output[0], "DequantizeLinear")
        if src.data_type != TensorProto.FLOAT or dq is None:
            continue
        if attr(q, "block_size", 0) or attr(dq, "block_size", 0):
            if integer:
                f = None
                if group_wise_int4 == "matmulnbits":
                    f = fold_matmulnbits(g, proto, q, dq, src, drop, before, dead_values)
                f = f or fold_blocked(g, proto, q, dq, src)
                if f is not None:
                    folded.append(f)
                    drop.add(id(q))
                    dead_values.add(q.output[0])
            continue
        w, scale, zp = g.array(q.input[0]), g.array(q.input[1]), g.array(q.input[2])
        if scale is None or zp is None or len(dq.input) < 3:
            continue
        same = all(a == b or (g.array(a) is not None and np.array_equal(g.array(a), g.array(b)))
                   for a, b in zip(q.input[1:3], dq.input[1:3]))
        grid = int_grid(g.consts[q.input[2]].data_type)
        if not same or grid is None:
            continue
        qmin, qmax, bits = grid
        axis = None
        if scale.ndim > 0 and scale.size > 1 or zp.ndim > 0:
            axis = attr(q, "axis", 1)
            axis = axis + w.ndim if axis < 0 else axis
        codes = weight_codes(w, scale, zp.astype(np.int32), axis, qmin, qmax)
        out_name, perm = dq.output[0], None
        transpose = g.only_consumer(dq.output[0], "Transpose")
        if transpose is not None:
            perm = tuple(attr(transpose, "perm", list(range(w.ndim))[::-1]))
            drop.add(id(transpose))
            dead_values.add(dq.output[0])
            out_name = transpose.output[0]
        gemm = g.only_consumer(out_name, "Gemm")
        gemm_ok = (gemm_to_matmul and gemm is not None and codes.ndim == 2 and gemm.input[1] == out_name
                   and not attr(gemm, "transA", 0) and attr(gemm, "alpha", 1.0) == 1.0
                   and attr(gemm, "beta", 1.0) == 1.0)
        if gemm_ok and attr(gemm, "transB", 0):
            perm = (1, 0) if perm is None else tuple(perm[i] for i in (1, 0))
        if perm is not None:
            codes = np.ascontiguousarray(codes.transpose(perm))
            axis = None if axis is None else perm.index(axis)
        if not integer:  # float weight kept behind its Q/DQ pair, only laid out for the MatMul
            if perm is not None:
                name = g.fresh(f"{q.input[0]}_transposed")
                init = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), name)
                proto.graph.initializer.append(init)
                q.input[0] = name
                set_attr(q, "axis", axis)
                set_attr(dq, "axis", axis)
                dead_values.update((dq.output[0], q.output[0]))
                dq.output[0] = out_name
        else:
            name = g.fresh(f"{q.input[0]}_quantized")
            if bits == 4:
                import ml_dtypes  # comes with onnx

                init = numpy_helper.from_array(codes.astype(ml_dtypes.int4), name)
                cast_out = g.fresh(f"{name}_int8")
                zp8 = g.fresh(f"{q.input[2]}_int8")
                proto.graph.initializer.append(numpy_helper.from_array(zp.astype(np.int8), zp8))
                before.setdefault(id(dq), []).append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.INT8,
                                                                      name=g.fresh(f"{name}_cast")))
                dq.input[0], dq.input[2] = cast_out, zp8
                storage, reason = "int4", "INT4 codes (|q| <= 8) cannot saturate"
            else:
                storage, reason = choose_storage(codes, _reduction_order(g, out_name, gemm_ok, codes),
                                                 _groups(g, out_name), int8_storage)
                if storage == "uint8":
                    init = numpy_helper.from_array(as_uint8(codes), name)
                    zp_u8 = g.fresh(f"{q.input[2]}_uint8")
                    proto.graph.initializer.append(numpy_helper.from_array(
                        np.full(zp.shape, UINT8_ZERO_POINT, dtype=np.uint8), zp_u8))
                    dq.input[2] = zp_u8
                else:
                    init = numpy_helper.from_array(codes, name)
                dq.input[0] = name
            proto.graph.initializer.append(init)
            set_attr(dq, "axis", axis)
            dead_values.add(dq.output[0])  # its shape may change with a folded transpose
            dq.output[0] = out_name
            drop.add(id(q))
            dead_values.add(q.output[0])
        if gemm_ok:
            gemm.op_type = "MatMul"
            bias = list(gemm.input[2:3])
            del gemm.input[2:]
            for a in ("alpha", "beta", "transA", "transB"):
                set_attr(gemm, a, None)
            after = before.setdefault(("after", id(gemm)), [])
            y = gemm.output[0]
            # A Gemm's input is 2-D. ONNX Runtime fuses a 2-D MatMul + Add back into a Gemm (quantizing
            # its bias to int32) before its QDQ MatMul fusion when the weight passes a Cast (INT4), so
            # the activation goes in as (1, M, K) and the output comes back as (M, N).
            act_q = activation_quantizer(g, gemm.input[0])
            if act_q is not None:
                axes = g.fresh(f"{gemm.name}_axes")
                proto.graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
                x3 = g.fresh(f"{act_q.input[0]}_3d")
                before.setdefault(id(act_q), []).append(
                    helper.make_node("Unsqueeze", [act_q.input[0], axes], [x3], name=g.fresh(f"{gemm.name}_unsqueeze")))
                act_q.input[0] = x3
                dead_values.update((act_q.output[0], gemm.input[0]))
            out = g.fresh(f"{y}_3d") if act_q is not None else y
            if bias and bias[0]:
                gemm.output[0] = g.fresh(f"{y}_matmul")
                after.append(helper.make_node("Add", [gemm.output[0], bias[0]], [out],
                                              name=g.fresh(f"{gemm.name}_bias")))
            else:
                gemm.output[0] = out
            if act_q is not None:
                after.append(helper.make_node("Squeeze", [out, axes], [y], name=g.fresh(f"{gemm.name}_squeeze")))
        conv = g.only_consumer(out_name, "Conv") or g.only_consumer(out_name, "ConvTranspose")
        if separate_conv_bias and conv is not None and conv.input[1] == out_name and len(conv.input) > 2 \
                and conv.input[2] in g.consts:
            # ONNX Runtime's WeightBiasQuantization quantizes the bias input of a DequantizeLinear-fed
            # Conv to int32 at s_x*s_w; a separate Add keeps the trained float bias
            b = g.array(conv.input[2]).astype(np.float32)
            b_name = g.fresh(f"{conv.input[2]}_channels")
            proto.graph.initializer.append(numpy_helper.from_array(b.reshape(-1, *([1] * (codes.ndim - 2))), b_name))
            del conv.input[2:]
            y = conv.output[0]
            conv.output[0] = g.fresh(f"{y}_nobias")
            before.setdefault(("after", id(conv)), []).append(
                helper.make_node("Add", [conv.output[0], b_name], [y], name=g.fresh(f"{conv.name}_bias")))
        if integer:
            folded.append(FoldedWeight(src.name, name, bits, perm, axis, w.size * 4, len(init.raw_data),
                                       storage=storage, reason=reason))
    nodes = []
    for node in proto.graph.node:
        if id(node) in drop:
            continue
        nodes.extend(before.get(id(node), []))
        nodes.append(node)
        nodes.extend(before.get(("after", id(node)), []))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    # float weights no longer read by any node go (tied weights read elsewhere stay)
    used = {n for node in proto.graph.node for n in node.input} | g.outputs
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    stale = dead_values | {f.source for f in folded} | {f.name for f in folded}
    keep_vi = [v for v in proto.graph.value_info if v.name not in stale]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep_vi)
    return folded


def _reduction_order(g: OnnxGraph, out_name: str, gemm_ok: bool, codes) -> str | None:
    """The order in which ORT's fused integer kernel reduces the stored codes feeding `out_name`
    (see saturation.reduction_view), or None when the consumer runs a float kernel."""
    if gemm_ok:
        return "matmul"  # becomes MatMul on (K, N) codes
    user = (g.consumers.get(out_name) or [None])[0]
    if user is None or len(user.input) < 2 or user.input[1] != out_name:
        return None
    if user.op_type == "MatMul" and codes.ndim == 2:
        return "matmul"
    if user.op_type == "Gemm" and codes.ndim == 2:
        return "linear" if attr(user, "transB", 0) else "matmul"
    if user.op_type == "Conv":
        return "conv"
    return None  # ConvTranspose and the rest: float kernels in ORT


def _groups(g: OnnxGraph, out_name: str) -> int:
    user = (g.consumers.get(out_name) or [None])[0]
    return int(attr(user, "group", 1)) if user is not None and user.op_type == "Conv" else 1


def fold_blocked(g, proto, q, dq, src):
    """A blocked (group-wise) weight Q/DQ pair -> integer initializer (packed INT4 or int8) feeding the
    same blocked DequantizeLinear (ONNX Runtime runs it as a float MatMul after dequantizing)."""
    from onnx import numpy_helper  # optional dependency

    found = blocked_codes(g, q, dq)
    if found is None:
        return None
    codes, _, axis, _, bits = found
    name = g.fresh(f"{q.input[0]}_quantized")
    if bits == 4:
        import ml_dtypes  # comes with onnx

        init = numpy_helper.from_array(codes.astype(ml_dtypes.int4), name)
    else:
        init = numpy_helper.from_array(codes, name)
    proto.graph.initializer.append(init)
    dq.input[0] = name
    return FoldedWeight(src.name, name, bits, None, axis, codes.size * 4, len(init.raw_data),
                        storage="int4" if bits == 4 else "int8",
                        reason="blocked codes behind a DequantizeLinear: ORT dequantizes, then a float MatMul")


def static_dim_params(proto) -> None:
    """Write the dims torch.export fixed (their symbol prints as a number, e.g. "16") as fixed dims."""
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param.isdigit():
                dim.dim_value = int(dim.dim_param)
