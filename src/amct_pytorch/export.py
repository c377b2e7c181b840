"""Deployment: ONNX QDQ export of models holding QAT modules, an ORT parity check, integer weights.

Under `torch.onnx.export` each LinearQAT (conv: the same with Conv/ConvTranspose) becomes

    x -> QuantizeLinear(s_d, o_d) -> DequantizeLinear(s_d, o_d) --\
    W -> QuantizeLinear(s_w, 0)   -> DequantizeLinear(s_w, 0)   ----> Gemm/MatMul(+bias)

`export_onnx` then rewrites that graph for deployment (`fold_weight_quantizers` and friends):
each weight is stored as its integer codes (int8, or packed INT4 behind Cast(to=INT8)) feeding
its DequantizeLinear, a Linear is MatMul + Add, a conv's bias is a separate Add, so that ONNX
Runtime's default session options compute what the eval forward computes (docs/export.md).
`deploy_view` hands out the same integer codes.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from .functional import WeightLayout, act_qparams, arq_scale, int_range, quantize_weight, scale_view, ulq_weight_scale

INT4_OPSET = 21  # first ONNX opset with INT4 QuantizeLinear/DequantizeLinear


class QParams(NamedTuple):
    """The quantization factors one QAT module uses in eval mode (real tensors)."""

    act_scale: torch.Tensor  # 0-d float32
    act_offset: torch.Tensor  # 0-d int32, in [qmin, qmax]
    weight_scale: torch.Tensor  # (1,) or (out_features,) float32
    act_bits: int
    weight_bits: int
    channel_wise: bool


def _qat_modules(model: nn.Module):
    from .nn.module.quantization.base import QATModuleMixin

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, QATModuleMixin) and m.config.retrain_enable]


def weight_axis(module) -> int:
    """The weight dim that holds the output channels in ONNX (DequantizeLinear's axis).

    Linear and conv weights: 0. Transposed conv (in, out/g, *k): 1, which is the output
    channel only with groups=1; per-channel scales of a grouped transposed conv span two dims
    (group, dim 1) and fit no single axis, so export refuses them (see check_exportable).
    """
    return 1 if getattr(module, "transposed", False) else 0


def require_calibrated(module) -> None:
    """Raise a clear error when `module` has no activation factors yet."""
    if not module.is_calibrated:
        data = module.config.retrain_data_config
        raise RuntimeError(
            f"{_describe(module)}: activation calibration has not finished (it needs batch_num="
            f"{data.batch_num} calibration forwards), so there is no activation "
            "scale to export. Run the calibration forwards (train mode, or inside amct_pytorch.calibrating()) "
            "or load a calibrated state_dict / quant record first."
        )


def _per_channel_fits_one_axis(module) -> bool:
    return not (getattr(module, "transposed", False) and module.groups > 1
                and module.config.retrain_weight_config.channel_wise)


def check_exportable(module) -> None:
    """Raise a clear error when `module` cannot be exported as a faithful QDQ graph."""
    require_calibrated(module)
    if module.training:
        raise RuntimeError(
            f"{_describe(module)}: is in training mode; call model.eval() before export "
            "(the exported graph is the eval-mode forward)."
        )
    if not _per_channel_fits_one_axis(module):
        raise RuntimeError(
            f"{_describe(module)}: per-channel weight scales of a grouped transposed conv (groups={module.groups}) "
            "span two weight dims (group, dim 1), which no ONNX DequantizeLinear axis expresses. Use "
            "channel_wise=False for this layer, or groups=1."
        )


def _describe(module) -> str:
    return module._describe()


@torch.no_grad()
def module_qparams(module) -> QParams:
    """The factors the eval forward of `module` uses now (computed; no state change).

    They equal the `acts_scale`/`acts_offset`/`wts_scales` buffers as they stand right after a
    training forward; after an optimizer step those buffers lag until the next training forward,
    so export, quant record and deploy view all use the values computed here.
    """
    require_calibrated(module)
    a_scale, a_offset = module.act_qparams()
    wcfg = module.config.retrain_weight_config
    return QParams(
        act_scale=a_scale.detach().reshape(()).clone(),
        act_offset=a_offset.detach().reshape(()).to(torch.int32),
        weight_scale=module.weight_qparams().detach().reshape(-1).clone(),
        act_bits=module.config.retrain_data_config.num_bits,
        weight_bits=wcfg.num_bits,
        channel_wise=wcfg.channel_wise,
    )


# ---- the export-time forward --------------------------------------------------------
_PINNED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("amct_pinned_qparams", default=None)
_EXPORT_ONNX_ACTIVE = False


@contextlib.contextmanager
def _pinned_qparams(model: nn.Module):
    """Export with the factors as constants computed here, from the real parameters.

    torch.export traces with fake parameters, so without this the factors are computed inside
    the graph from the parameters (the exporter folds them into constants only for small weights).
    """
    from .nn.module.quantization.embedding import EmbeddingQAT

    table = {id(m): _pinned_layout(m, module_qparams(m)) for _, m in _qat_modules(model)}
    table.update({id(m): m.quantized_table() for m in model.modules()
                  if isinstance(m, EmbeddingQAT) and m.config.retrain_enable})
    global _EXPORT_ONNX_ACTIVE
    token, was_active = _PINNED.set(table), _EXPORT_ONNX_ACTIVE
    _EXPORT_ONNX_ACTIVE = True
    try:
        yield
    finally:
        _PINNED.reset(token)
        _EXPORT_ONNX_ACTIVE = was_active


def _pinned_layout(module, q: QParams) -> QParams:
    """Group-wise scales pinned already shaped (rows, blocks): reshaping the constant inside the traced
    graph leaves a Reshape that the exporter does not always fold, and the weight folding needs a
    constant scale."""
    group = module.config.retrain_weight_config.group_size
    if group is None:
        return q
    return q._replace(weight_scale=q.weight_scale.reshape(module.out_features, module.in_features // group).clone())


def export_context_active() -> bool:
    """Whether export_onnx is exporting right now (its factors are pinned). A plain module global
    (not the context variable) so that torch.compile reads it as a guarded constant."""
    return _EXPORT_ONNX_ACTIVE


def pinned_embedding(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales) of an EmbeddingQAT for its export forward: the constants export_onnx
    computed from the real table (written as initializers), else computed now."""
    pinned = _PINNED.get()
    if pinned is not None and id(module) in pinned:
        return pinned[id(module)]
    return module.quantized_table()


def _graph_qparams(module) -> QParams:
    """The same factors as `module_qparams`, as torch ops on the (possibly fake) parameters."""
    data, wcfg = module.config.retrain_data_config, module.config.retrain_weight_config
    # detached: torch's fake-quant ops refuse a scale that requires grad
    a_scale, a_offset = act_qparams(module.acts_clip_max.detach(), module.acts_clip_min.detach(), data.num_bits)
    # a 1-row view keeps the per-tensor reduction on an explicit dim (torchlib needs one)
    if wcfg.channel_wise:
        w_scale = arq_scale(module.weight, wcfg.num_bits, True, module._weight_layout())
    else:
        w_scale = arq_scale(module.weight.reshape(1, -1), wcfg.num_bits, channel_wise=True)
    if wcfg.learnable_scale:
        if wcfg.scale_init != "arq":  # a never-initialised learnable scale: the eval forward's first value
            w_scale = module._initial_weight_scale().reshape(w_scale.shape)
        w_scale = torch.where(module.wts_scale_ready, ulq_weight_scale(module.wts_scales.detach()), w_scale)
    return QParams(a_scale.reshape(()), a_offset.reshape(()).to(torch.int32), w_scale.reshape(-1),
                   data.num_bits, wcfg.num_bits, wcfg.channel_wise)


def _as_constants(q: QParams) -> QParams:
    """Real tensors -> tensors the TorchScript tracer records as constants, not as ops on parameters."""
    def const(t):
        return torch.tensor(t.tolist(), dtype=t.dtype, device=t.device)
    return q._replace(act_scale=const(q.act_scale), act_offset=const(q.act_offset),
                      weight_scale=const(q.weight_scale))


def export_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """What a QAT module's forward becomes under torch.onnx.export: Q/DQ on input and weight, then
    the module's float op (linear, conv, transposed conv)."""
    check_exportable(module)
    pinned = _PINNED.get()
    q = pinned.get(id(module)) if pinned is not None else None
    axis = weight_axis(module)
    group = module.config.retrain_weight_config.group_size
    if q is not None and not torch.jit.is_tracing() and group is not None:
        # group-wise: an opset-21 blocked Q/DQ, one scale per (output row, block of input features)
        xq = quant_dequant(x, q.act_scale, [int(q.act_offset)], -1, q.act_bits)
        w_scale = q.weight_scale  # (rows, blocks), see _pinned_layout
        wq = quant_dequant_blocked(module.weight, w_scale, group, q.weight_bits)
        return module._float_apply(xq, wq, *args, **kwargs)
    if group is not None:
        raise RuntimeError(
            f"{_describe(module)}: group-wise weight scales (group_size={group}) need opset-21 blocked "
            "QuantizeLinear/DequantizeLinear, which plain torch.onnx.export cannot emit. Use "
            "amct_pytorch.export_onnx(model, example_inputs, path)."
        )
    if q is not None and not torch.jit.is_tracing():  # export_onnx, dynamo: our op, translated by us
        w_scale = q.weight_scale if q.channel_wise else q.weight_scale.reshape(())
        xq = quant_dequant(x, q.act_scale, [int(q.act_offset)], -1, q.act_bits)
        wq = quant_dequant(module.weight, w_scale, [0] * q.weight_scale.numel(), axis if q.channel_wise else -1,
                           q.weight_bits)
        return module._float_apply(xq, wq, *args, **kwargs)
    # plain torch.onnx.export: torch's own fake-quant ops, which both exporters map to INT8 Q/DQ
    if 4 in (module.config.retrain_data_config.num_bits, module.config.retrain_weight_config.num_bits):
        raise RuntimeError(
            f"{_describe(module)}: INT4 needs opset-{INT4_OPSET} INT4 QuantizeLinear/DequantizeLinear, which plain "
            "torch.onnx.export cannot emit (torch's fake-quant ops map to INT8 only and the TorchScript exporter "
            "stops at opset 20). Use amct_pytorch.export_onnx(model, example_inputs, path, dynamo=True)."
        )
    if torch.jit.is_tracing():  # TorchScript exporter: parameters are real, freeze the factors
        q = q or _as_constants(module_qparams(module))
    else:
        if any(isinstance(d, torch.SymInt) for d in x.shape):
            raise RuntimeError(
                f"{_describe(module)}: plain torch.onnx.export(dynamo=True) (or torch.export) with dynamic shapes "
                "is not supported "
                "(torch's fake-quant op with tensor scales has no symbolic-shape kernel). Use "
                "amct_pytorch.export_onnx(model, example_inputs, path), whose dims are dynamic by default, "
                "or torch.onnx.export(..., dynamo=False, dynamic_axes=...)."
            )
        q = _graph_qparams(module)
    xq = torch.fake_quantize_per_tensor_affine(x, q.act_scale, q.act_offset, -128, 127)
    if q.channel_wise:
        zeros = torch.zeros_like(q.weight_scale, dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(module.weight, q.weight_scale, zeros, axis, -128, 127)
    else:
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        wq = torch.fake_quantize_per_tensor_affine(module.weight, q.weight_scale.reshape(()), zero, -128, 127)
    return module._float_apply(xq, wq, *args, **kwargs)


# ---- INT4 (and mixed-width) Q/DQ: one custom op with an opset-21 translation --------
@torch.library.custom_op("amct_pytorch::quant_dequant", mutates_args=())
def quant_dequant(x: torch.Tensor, scale: torch.Tensor, zero_point: list[int], axis: int,
                  num_bits: int) -> torch.Tensor:
    """ONNX QuantizeLinear then DequantizeLinear: (clamp(round(x/s) + z) - z) * s; axis -1 = per tensor."""
    qmin, qmax = int_range(num_bits)
    zp = torch.tensor(zero_point, dtype=x.dtype, device=x.device)
    s = scale
    if axis >= 0:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    return ((torch.round(x / s) + zp).clamp(qmin, qmax) - zp) * s


@quant_dequant.register_fake
def _(x, scale, zero_point, axis, num_bits):
    return torch.empty_like(x)


def _quant_dequant_onnx(x, scale, zero_point: list[int], axis: int, num_bits: int):
    from onnxscript import ir, opset18, opset21

    op = opset21 if num_bits == 4 else opset18  # INT8 Q/DQ (per axis too) exists since opset 13
    zp = np.array(zero_point, dtype=np.int8)
    kwargs = {"axis": axis} if axis >= 0 else {}
    if axis < 0:
        zp = zp.reshape(())
    zp = op.Constant(value=ir.tensor(zp, dtype={4: ir.DataType.INT4, 8: ir.DataType.INT8}[num_bits]))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, **kwargs), scale, zp, **kwargs)


@torch.library.custom_op("amct_pytorch::quant_dequant_blocked", mutates_args=())
def quant_dequant_blocked(w: torch.Tensor, scale: torch.Tensor, block_size: int, num_bits: int) -> torch.Tensor:
    """Blocked (opset 21) symmetric Q/DQ of a 2-d weight: scale (rows, cols / block_size), one per
    row and block of `block_size` consecutive columns."""
    qmin, qmax = int_range(num_bits)
    s = scale.repeat_interleave(block_size, dim=1)
    return torch.round(w / s).clamp(qmin, qmax) * s


@quant_dequant_blocked.register_fake
def _(w, scale, block_size, num_bits):
    return torch.empty_like(w)


def _quant_dequant_blocked_onnx(w, scale, block_size: int, num_bits: int):
    from onnxscript import ir, opset21

    zp = opset21.Constant(value=ir.tensor(np.zeros(tuple(scale.shape), dtype=np.int8),
                                          dtype={4: ir.DataType.INT4, 8: ir.DataType.INT8}[num_bits]))
    kwargs = {"axis": 1, "block_size": block_size}
    return opset21.DequantizeLinear(opset21.QuantizeLinear(w, scale, zp, **kwargs), scale, zp, **kwargs)


def onnx_translations() -> dict:
    """The custom_translation_table export_onnx passes to torch.onnx.export(dynamo=True)."""
    return {torch.ops.amct_pytorch.quant_dequant.default: _quant_dequant_onnx,
            torch.ops.amct_pytorch.quant_dequant_blocked.default: _quant_dequant_blocked_onnx}


# ---- integer weights on disk: a pass over the exported ONNX graph -------------------------
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


def _int_grid(data_type: int) -> tuple[int, int, int] | None:
    from onnx import TensorProto

    return {TensorProto.INT8: (-128, 127, 8), TensorProto.INT4: (-8, 7, 4)}.get(data_type)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


class _Graph:
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
        from onnx import numpy_helper

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


def keep_relu_before_int4_quantizers(proto) -> int:
    """Write `Relu -> QuantizeLinear(INT4, zero point > -8)` as `Max(x, 0) -> QuantizeLinear`.

    ONNX Runtime's ReluQuantRewrite (onnxruntime 1.32, default options) removes a Relu in front of an
    INT4 QuantizeLinear even when the zero point is above qmin, where the Relu still clips negative
    values (measured: outputs off by 2.3 on a small INT4 MLP). Max(x, 0) computes the same and is not
    matched. Returns how many were rewritten.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(proto.graph)
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
    import copy

    g = _Graph(proto.graph)
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


def _activation_quantizer(g: _Graph, name: str):
    """The QuantizeLinear of `name` = DequantizeLinear(QuantizeLinear(x)) when that pair serves only this use."""
    dq = next((n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name), None)
    if dq is None or len(g.consumers.get(name, [])) != 1 or name in g.outputs:
        return None
    q = next((n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == dq.input[0]), None)
    if q is None or g.only_consumer(q.output[0], "DequantizeLinear") is not dq or q.input[0] in g.consts:
        return None
    return q


def fold_weight_quantizers(proto, *, integer: bool = True, gemm_to_matmul: bool = True,
                           separate_conv_bias: bool = True, group_wise_int4: str = "matmulnbits") -> list[FoldedWeight]:
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
    MatMul / Gemm become one com.microsoft `MatMulNBits` (`_matmulnbits`); otherwise, and for INT8
    blocks, the codes feed the blocked DequantizeLinear (`_fold_blocked`).
    Returns the folded weights (none when `integer=False`).
    """
    from onnx import TensorProto, helper, numpy_helper

    if group_wise_int4 not in GROUP_WISE_INT4_FORMS:
        raise ValueError(f"group_wise_int4: expected one of {GROUP_WISE_INT4_FORMS}, got {group_wise_int4!r}")

    g = _Graph(proto.graph)
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
        if _attr(q, "block_size", 0) or _attr(dq, "block_size", 0):
            if integer:
                f = None
                if group_wise_int4 == "matmulnbits":
                    f = _matmulnbits(g, proto, q, dq, src, drop, before, dead_values)
                f = f or _fold_blocked(g, proto, q, dq, src)
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
        grid = _int_grid(g.consts[q.input[2]].data_type)
        if not same or grid is None:
            continue
        qmin, qmax, bits = grid
        axis = None
        if scale.ndim > 0 and scale.size > 1 or zp.ndim > 0:
            axis = _attr(q, "axis", 1)
            axis = axis + w.ndim if axis < 0 else axis
        codes = weight_codes(w, scale, zp.astype(np.int32), axis, qmin, qmax)
        out_name, perm = dq.output[0], None
        transpose = g.only_consumer(dq.output[0], "Transpose")
        if transpose is not None:
            perm = tuple(_attr(transpose, "perm", list(range(w.ndim))[::-1]))
            drop.add(id(transpose))
            dead_values.add(dq.output[0])
            out_name = transpose.output[0]
        gemm = g.only_consumer(out_name, "Gemm")
        gemm_ok = (gemm_to_matmul and gemm is not None and codes.ndim == 2 and gemm.input[1] == out_name
                   and not _attr(gemm, "transA", 0) and _attr(gemm, "alpha", 1.0) == 1.0
                   and _attr(gemm, "beta", 1.0) == 1.0)
        if gemm_ok and _attr(gemm, "transB", 0):
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
                _set_attr(q, "axis", axis)
                _set_attr(dq, "axis", axis)
                dead_values.update((dq.output[0], q.output[0]))
                dq.output[0] = out_name
        else:
            name = g.fresh(f"{q.input[0]}_quantized")
            if bits == 4:
                import ml_dtypes

                init = numpy_helper.from_array(codes.astype(ml_dtypes.int4), name)
                cast_out = g.fresh(f"{name}_int8")
                zp8 = g.fresh(f"{q.input[2]}_int8")
                proto.graph.initializer.append(numpy_helper.from_array(zp.astype(np.int8), zp8))
                before.setdefault(id(dq), []).append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.INT8,
                                                                      name=g.fresh(f"{name}_cast")))
                dq.input[0], dq.input[2] = cast_out, zp8
            else:
                init = numpy_helper.from_array(codes, name)
                dq.input[0] = name
            proto.graph.initializer.append(init)
            _set_attr(dq, "axis", axis)
            dead_values.add(dq.output[0])  # its shape may change with a folded transpose
            dq.output[0] = out_name
            drop.add(id(q))
            dead_values.add(q.output[0])
        if gemm_ok:
            gemm.op_type = "MatMul"
            bias = list(gemm.input[2:3])
            del gemm.input[2:]
            for a in ("alpha", "beta", "transA", "transB"):
                _set_attr(gemm, a, None)
            after = before.setdefault(("after", id(gemm)), [])
            y = gemm.output[0]
            # A Gemm's input is 2-D. ONNX Runtime fuses a 2-D MatMul + Add back into a Gemm (quantizing
            # its bias to int32) before its QDQ MatMul fusion when the weight passes a Cast (INT4), so
            # the activation goes in as (1, M, K) and the output comes back as (M, N).
            act_q = _activation_quantizer(g, gemm.input[0])
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
            folded.append(FoldedWeight(src.name, name, bits, perm, axis, w.size * 4, len(init.raw_data)))
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


def _fold_blocked(g, proto, q, dq, src):
    """A blocked (group-wise) weight Q/DQ pair -> integer initializer (packed INT4 or int8) feeding the
    same blocked DequantizeLinear (ONNX Runtime runs it as a float MatMul after dequantizing)."""
    from onnx import numpy_helper

    found = _blocked_codes(g, q, dq)
    if found is None:
        return None
    codes, _, axis, _, bits = found
    name = g.fresh(f"{q.input[0]}_quantized")
    if bits == 4:
        import ml_dtypes

        init = numpy_helper.from_array(codes.astype(ml_dtypes.int4), name)
    else:
        init = numpy_helper.from_array(codes, name)
    proto.graph.initializer.append(init)
    dq.input[0] = name
    return FoldedWeight(src.name, name, bits, None, axis, codes.size * 4, len(init.raw_data))


GROUP_WISE_INT4_FORMS = ("matmulnbits", "qdq")
MATMULNBITS_ACCURACY_LEVEL = 1  # float32 compute: exact dequantization, then a float matmul (see _matmulnbits)
MS_DOMAIN = "com.microsoft"


def _blocked_codes(g, q, dq):
    """(codes as int8, scale name, axis, block size, bits) of a blocked weight Q/DQ pair, or None."""
    w, scale, zp = g.array(q.input[0]), g.array(q.input[1]), g.array(q.input[2])
    if scale is None or zp is None or q.input[1:3] != dq.input[1:3]:
        return None
    grid = _int_grid(g.consts[q.input[2]].data_type)
    if grid is None:
        return None
    qmin, qmax, bits = grid
    axis, block = _attr(q, "axis", 1), _attr(q, "block_size", 0)
    axis = axis + w.ndim if axis < 0 else axis
    s = np.repeat(scale.astype(np.float32), block, axis=axis)
    z = np.repeat(zp.astype(np.float32), block, axis=axis)
    codes = np.clip(np.rint(w.astype(np.float32) / s) + z, qmin, qmax).astype(np.int8)
    return codes, zp, axis, block, bits


def _linear_consumer(g, dq):
    """(node, activation input, bias input or None) when the blocked weight `dq` feeds a linear as
    x @ Wᵀ: `Gemm(x, W, b, transB=1)` (alpha = beta = 1, no transA) or `Transpose -> MatMul(x, Wᵀ)`;
    plus the Transpose to drop (or None). None when it feeds anything else."""
    gemm = g.only_consumer(dq.output[0], "Gemm")
    if gemm is not None:
        if (gemm.input[1] == dq.output[0] and gemm.input[0] != dq.output[0] and _attr(gemm, "transB", 0)
                and not _attr(gemm, "transA", 0) and _attr(gemm, "alpha", 1.0) == 1.0
                and _attr(gemm, "beta", 1.0) == 1.0):
            bias = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
            return gemm, gemm.input[0], bias, None
        return None
    transpose = g.only_consumer(dq.output[0], "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [1, 0])) != [1, 0]:
        return None
    matmul = g.only_consumer(transpose.output[0], "MatMul")
    if matmul is None or matmul.input[1] != transpose.output[0] or matmul.input[0] == transpose.output[0]:
        return None
    return matmul, matmul.input[0], None, transpose


def pack_matmulnbits(codes: np.ndarray, block: int) -> np.ndarray:
    """INT4 codes (N, K) in [-8, 7] -> MatMulNBits' B: uint8 (N, K / block, block / 2), each code
    stored as code + 8 (the default zero point), two per byte along K, the first in the low nibble."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // block, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)


def matmulnbits_codes(packed: np.ndarray) -> np.ndarray:
    """`pack_matmulnbits` undone: uint8 (N, blocks, block / 2) -> int8 codes (N, blocks * block)."""
    packed = np.asarray(packed, dtype=np.uint8)
    pairs = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return (pairs.astype(np.int8) - 8).reshape(packed.shape[0], -1)


def _matmulnbits(g, proto, q, dq, src, drop, before, dead_values) -> FoldedWeight | None:
    """A group-wise INT4 linear weight (blocked Q/DQ on a 2-D (N, K) weight, blocks along K) and its
    MatMul / Gemm -> one com.microsoft MatMulNBits(x, B, scales), bias as a separate Add; None (nothing
    changed) when the pattern does not fit, and the caller keeps the blocked DequantizeLinear.

    MatMulNBits dequantizes B as (code - 8)·scale per block (the default zero point 8 for bits=4,
    so symmetric codes c in [-8, 7] are stored as c + 8) and multiplies with x. accuracy_level 1
    (float32) makes ORT's CPU kernel compute exactly that in float32; accuracy_level 4 would
    quantize x again per block to int8 inside the kernel, which our activation Q/DQ already did on
    another grid, so its outputs would differ from the QAT model.
    """
    from onnx import helper, numpy_helper

    found = _blocked_codes(g, q, dq)
    if found is None:
        return None
    codes, zp, axis, block, bits = found
    n, k = codes.shape if codes.ndim == 2 else (0, 0)
    if (bits != 4 or codes.ndim != 2 or axis != 1 or np.any(zp != 0) or block < 16 or block & (block - 1)
            or k % block):
        return None
    use = _linear_consumer(g, dq)
    if use is None:
        return None
    node, x, bias, transpose = use
    name = g.fresh(f"{q.input[0]}_matmulnbits")
    init = numpy_helper.from_array(pack_matmulnbits(codes, block), name)
    proto.graph.initializer.append(init)
    scales = q.input[1]  # (N, K / block) float32, the blocked quantizer's own scale constant
    y = node.output[0]
    out = g.fresh(f"{y}_matmulnbits") if bias else y
    node.op_type, node.domain = "MatMulNBits", MS_DOMAIN
    del node.input[:]
    node.input.extend([x, name, scales])
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n),
                           helper.make_attribute("bits", 4), helper.make_attribute("block_size", block),
                           helper.make_attribute("accuracy_level", MATMULNBITS_ACCURACY_LEVEL)])
    node.output[0] = out
    if bias:
        before.setdefault(("after", id(node)), []).append(
            helper.make_node("Add", [out, bias], [y], name=g.fresh(f"{node.name}_bias")))
    drop.add(id(dq))
    dead_values.add(dq.output[0])
    if transpose is not None:
        drop.add(id(transpose))
        dead_values.add(transpose.output[0])
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return FoldedWeight(src.name, name, 4, None, 1, codes.size * 4, len(init.raw_data), "matmulnbits")


# ---- the bias: float (default) or on the int32 grid of integer runtimes -----------------------
@torch.no_grad()
def int32_bias(module, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """The bias an integer runtime adds: round(b / (s_x·s_w))·(s_x·s_w), per output channel.

    Integer runtimes (and ONNX Runtime's `WeightBiasQuantization` rewrite of `Gemm`/`Conv`)
    accumulate x_q·w_q in int32 and add the bias as int32 codes at scale s_x·s_w, so the
    float bias moves by up to s_x·s_w/2. This is that bias as float32 (no state change);
    `export_onnx(..., bias="int32")` exports it, and a QAT forward that should train against it
    would call this on its bias (see docs/export.md, "The bias").
    """
    bias = module.bias if bias is None else bias
    if bias is None:
        return None
    q = module_qparams(module)
    step = (q.act_scale * q.weight_scale).to(torch.float32)  # float32 product, as ORT computes it
    step = step.expand(bias.shape) if step.numel() == 1 else step
    codes = torch.round(bias.detach().to(torch.float32) / step).clamp(-(2**31), 2**31 - 1)
    return (codes * step).to(bias.dtype)


def simulated_int32_bias(module) -> torch.Tensor | None:
    """For a QAT forward that trains against the int32 bias: `int32_bias` with a straight-through
    gradient to the float bias (the float bias until the activation grid exists).

    The hook a module would need (not wired in): where its float op takes `self.bias`, pass
    `simulated_int32_bias(self)` instead when a config flag asks for it.
    """
    if module.bias is None or not module.is_calibrated:
        return module.bias
    return module.bias + (int32_bias(module) - module.bias).detach()


@contextlib.contextmanager
def _bias_on_int32_grid(layers):
    """Temporarily give each layer's bias its int32-grid value (restored bit for bit)."""
    saved = []
    try:
        with torch.no_grad():
            for _, m in layers:
                if m.bias is not None:
                    saved.append((m, m.bias.detach().clone()))
                    m.bias.copy_(int32_bias(m))
                    m.clear_weight_cache()
        yield
    finally:
        with torch.no_grad():
            for m, b in saved:
                m.bias.copy_(b)
                m.clear_weight_cache()


# ---- shapes -------------------------------------------------------------------------------
def _pinned_dims(inputs, names, static_dims) -> list[set[int]]:
    """static_dims as one set of non-negative dims per input."""
    pinned = [set() for _ in inputs]
    if static_dims is None:
        return pinned
    if isinstance(static_dims, dict):
        items = static_dims.items()
    elif isinstance(static_dims, (list, tuple)):
        items = enumerate(static_dims)
    else:
        raise TypeError("static_dims: expected a dict {input index or name: dims} or a sequence of dims per input, "
                        f"got {type(static_dims).__name__}")
    for key, dims in items:
        index = names.index(key) if isinstance(key, str) and key in names else key
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(inputs):
            raise ValueError(f"static_dims: {key!r} names no input (inputs: {names})")
        rank = inputs[index].dim()
        for d in ([dims] if isinstance(dims, int) else (dims or ())):
            if isinstance(d, bool) or not isinstance(d, int) or not -rank <= d < rank:
                raise ValueError(f"static_dims: input {key!r} has {rank} dims, got dim {d!r}")
            pinned[index].add(d % rank)
    return pinned


def _auto_shapes(inputs, pinned):
    """Dim.AUTO for every dim not pinned: torch.export keeps a dim dynamic unless the model forces it."""
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in range(t.dim()) if d not in pin} for t, pin in zip(inputs, pinned))


def _torch_export(model, inputs, shapes):
    """torch.export of the export-time forward (non-strict, as torch.onnx.export's first try), or None."""
    try:
        return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
    except Exception:  # noqa: BLE001 - torch.onnx.export then tries its own ways (and reports)
        return None


def _dynamic_dims(program) -> list[list[int]] | None:
    """Per user input of an ExportedProgram, the dims it keeps dynamic."""
    user = set(program.graph_signature.user_inputs)
    dims = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            shape = getattr(node.meta.get("val"), "shape", ())
            dims.append([d for d, size in enumerate(shape) if not _is_static(size)])
    return dims


def _is_static(size) -> bool:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return isinstance(size, int) or is_concrete_int(size)


def static_dim_params(proto) -> None:
    """Write the dims torch.export fixed (their symbol prints as a number, e.g. "16") as fixed dims."""
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param.isdigit():
                dim.dim_value = int(dim.dim_param)


def _warn_size_one(inputs, shapes) -> None:
    """torch.export specializes a dim of size 1 in the example to 1: say so."""
    if shapes is None or not isinstance(shapes, (tuple, list)):
        return
    ones = [f"input_{i} dim {d}" for i, (t, spec) in enumerate(zip(inputs, shapes)) if isinstance(spec, dict)
            for d in spec if t.shape[d] == 1]
    if ones:
        warnings.warn(f"export_onnx: {', '.join(ones)} has size 1 in the example, so torch.export fixes it to 1; "
                      "use an example with size >= 2 there to keep it dynamic", stacklevel=3)


def _autocast_off():
    """Exports and reference outputs run in float32 even inside torch.autocast."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        except (RuntimeError, ValueError):  # a device type this build does not know
            continue
    return stack


# ---- the public helper ----------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float | None  # ORT vs PyTorch eval on the checked inputs; None when check=False
    folded_weights: tuple[FoldedWeight, ...] = ()  # the weights stored as integer codes
    dynamic_dims: tuple[tuple[str | int, ...], ...] = ()  # per ONNX input: dim_param names / fixed sizes


def _as_input_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(
            "example_inputs: expected a torch.Tensor or a non-empty tuple of torch.Tensor, "
            f"got {type(example_inputs).__name__}"
        )
    return tuple(inputs)


def _flat_outputs(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat_outputs(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _flat_outputs(o)]
    raise TypeError(f"model output: cannot compare a {type(out).__name__} with the ONNX outputs")


BIAS_MODES = ("float", "int32")


def export_onnx(model: nn.Module, example_inputs, path, *, dynamo: bool = True, check: bool = True,
                atol: float = 1e-5, dynamic: bool = True, static_dims=None, dynamic_shapes=None,
                integer_weights: bool = True, bias: str = "float", session_options=None,
                check_inputs=None, group_wise_int4: str = "matmulnbits") -> ExportResult:
    """Export `model` (eval mode, QAT layers calibrated) to ONNX QDQ and check it in ONNX Runtime.

    Shapes: with `dynamic`, every input dimension the model lets vary is dynamic (batch,
    sequence, spatial); the dims the model fixes (features, channels) stay static. `static_dims`
    pins more: {input index or name: dims} (or one sequence of dims per input). `dynamic_shapes`
    (dynamo only) is passed to torch.export as is, e.g. to bound a dim with
    `torch.export.Dim("seq", min=1, max=512)`; it replaces the automatic choice.
    Weights: with `integer_weights`, each quantized weight is stored as int8 codes (INT4: packed
    4-bit, opset 21) feeding its DequantizeLinear, and a Gemm fed by one becomes MatMul + Add (see
    `fold_weight_quantizers`). `group_wise_int4`: the form of a group-wise INT4 linear (`group_size`):
    "matmulnbits" (default) one com.microsoft `MatMulNBits` (packed 4-bit weight, per-block scales,
    accuracy_level 1: float32 compute) behind the activation Q/DQ, bias as an Add; "qdq" the
    standard-ONNX opset-21 blocked `DequantizeLinear` of INT4 codes feeding a float MatMul, for
    toolchains without the com.microsoft domain (and the form kept with `integer_weights=False`).
    `bias`: "float" keeps the trained float bias; "int32" exports the bias
    on the int32 grid integer runtimes use (`int32_bias`), and checks against that.
    With `check`, the file runs in ONNX Runtime's CPU provider with default session options (or
    `session_options`, an onnxruntime.SessionOptions) on `example_inputs` and on each tuple in
    `check_inputs`, and is compared with the model's output; a max abs difference above `atol` raises.
    INT4 layers need dynamo=True (opset 21, chosen automatically). Autocast is off during export.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_input_tuple(example_inputs)
    extra = [_as_input_tuple(c) for c in (check_inputs or ())]
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0 or atol == float("inf"):
        raise ValueError(f"atol: expected a finite number >= 0, got {atol!r}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}")
    if group_wise_int4 not in GROUP_WISE_INT4_FORMS:
        raise ValueError(f"group_wise_int4: expected one of {GROUP_WISE_INT4_FORMS}, got {group_wise_int4!r}")
    if dynamic_shapes is not None and not dynamo:
        raise ValueError("dynamic_shapes: is torch.export's argument (dynamo=True); with dynamo=False use "
                         "static_dims, or torch.onnx.export(..., dynamic_axes=...) directly")
    if model.training:
        raise RuntimeError("model: is in training mode; call model.eval() before export_onnx")
    layers = _qat_modules(model)
    for _, m in layers:
        check_exportable(m)
    has_int4 = any(4 in (m.config.retrain_data_config.num_bits, m.config.retrain_weight_config.num_bits)
                   for _, m in layers)
    has_blocks = any(m.config.retrain_weight_config.group_size is not None for _, m in layers)
    if (has_int4 or has_blocks) and not dynamo:
        what = "INT4 layers" if has_int4 else "group-wise weight scales (blocked Q/DQ)"
        raise ValueError(
            f"dynamo=False: the model has {what}, which need opset-{INT4_OPSET} QuantizeLinear; "
            "the TorchScript exporter stops at opset 20. Use dynamo=True."
        )
    has_int4 = has_int4 or has_blocks  # both need opset 21
    path = os.fspath(path)
    names = [f"input_{i}" for i in range(len(inputs))]
    pinned = _pinned_dims(inputs, names, static_dims)
    kwargs = dict(input_names=names, dynamo=dynamo, opset_version=INT4_OPSET if has_int4 else None)
    with _autocast_off(), (_bias_on_int32_grid(layers) if bias == "int32" else contextlib.nullcontext()):
        shapes = dynamic_shapes if dynamic_shapes is not None else _auto_shapes(inputs, pinned) if dynamic else None
        _warn_size_one(inputs, shapes)
        program = None
        if dynamo or shapes is not None:
            with _pinned_qparams(model):
                program = _torch_export(model, inputs, shapes)
        if dynamo:
            kwargs.update(verbose=False, external_data=False, custom_translation_table=onnx_translations())
            target, args = (program, ()) if program is not None else (model, inputs)
            if program is None and shapes is not None:  # torch.onnx.export's own fallbacks get the shapes
                kwargs["dynamic_shapes"] = shapes
        else:
            target, args = model, inputs
            if shapes is not None:
                dims = _dynamic_dims(program) if program is not None else None
                if dims is None:  # torch.export cannot trace it: the first release's rule, every dim but the last
                    dims = [[d for d in range(t.dim() - 1) if d not in pin] for t, pin in zip(inputs, pinned)]
                kwargs["dynamic_axes"] = {n: {d: f"{n}_dim{d}" for d in ds} for n, ds in zip(names, dims)}
        with _pinned_qparams(model):
            torch.onnx.export(target, args, path, **kwargs)
        import onnx

        proto = onnx.load(path)
        static_dim_params(proto)
        unshare_activation_quantizers(proto)
        folded = tuple(fold_weight_quantizers(proto, integer=integer_weights, group_wise_int4=group_wise_int4))
        keep_relu_before_int4_quantizers(proto)
        onnx.save(proto, path)
        result = ExportResult(path, None, folded, _onnx_input_dims(path))
        if not check:
            return result
        diff = max(ort_max_abs_diff(model, x, path, session_options=session_options) for x in [inputs, *extra])
    if diff > atol:
        raise RuntimeError(
            f"{path}: ONNX Runtime output differs from the PyTorch eval output by {diff:.3g} (max abs), "
            f"above atol={atol:g}. A difference of one activation step usually means an input fell on a "
            "rounding tie, where ONNX rounds x/scale and then adds the offset (see docs/export.md)."
        )
    return dataclasses.replace(result, max_abs_diff=diff)


def _onnx_input_dims(path) -> tuple[tuple[str | int, ...], ...]:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return tuple(tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim) for i in proto.graph.input)


# ONNX Runtime rewrites that change what a QDQ graph computes (measured with onnxruntime 1.32)
# when a graph has the forms export_onnx avoids: WeightBiasQuantization turns the float bias of
# DequantizeLinear->Gemm/Conv into int32 codes at scale s_x*s_w (as integer runtimes do), moving
# outputs by up to s_x*s_w/2; ReluQuantRewrite drops a Relu in front of an INT4 QuantizeLinear
# even when the zero point is not qmin. Kept for callers that run other QDQ graphs exactly.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "ReluQuantRewrite")


def ort_session(path, session_options=None, *, disabled_optimizers=()):
    """An ONNX Runtime CPU session on `path` (default session options unless given)."""
    import onnxruntime as ort

    kwargs = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(os.fspath(path), sess_options=session_options, providers=["CPUExecutionProvider"],
                                **kwargs)


def ort_max_abs_diff(model: nn.Module, inputs: tuple[torch.Tensor, ...], path, *, session_options=None) -> float:
    """Max abs difference between ONNX Runtime (CPU provider) on `path` and `model(*inputs)`."""
    session = ort_session(path, session_options)
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    with torch.no_grad(), _autocast_off():
        want = _flat_outputs(model(*inputs))
    if len(got) != len(want):
        raise RuntimeError(f"{path}: ONNX model has {len(got)} outputs, the PyTorch model {len(want)}")
    return max(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) for g, w in zip(got, want))


# ---- deploy view: the integer weights --------------------------------------------------
@dataclass(frozen=True)
class DeployedLayer:
    """One QAT module as an integer runtime sees it, e.g. for a linear:
    y = (x_q - act_offset)·act_scale @ (weight·weight_scale)ᵀ + bias (a conv: the same codes in its op).

    `weight` holds the integer codes as int8 (INT4 codes, in [-8, 7], also live in int8), shaped
    like the float weight; the weight zero point is 0. `weight_scale` has shape (1,) or
    (out_channels,); `layout` says how it maps onto the weight (None: rows, dim 0).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_bits: int
    act_scale: float
    act_offset: int
    act_bits: int
    bias: torch.Tensor | None
    layout: WeightLayout | None = None

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.weight.to(torch.float32)
        if self.weight_scale.numel() == 1:
            return codes * self.weight_scale.reshape(())
        view = codes.reshape(self.layout.view) if self.layout is not None else codes.reshape(codes.shape[0], -1)
        return (view * scale_view(self.weight_scale, self.layout)).reshape(codes.shape)


DeployedLinear = DeployedLayer  # the name of the first release


@torch.no_grad()
def deploy_view(model: nn.Module) -> dict[str, DeployedLayer]:
    """The integer weights and factors of every calibrated QAT module in `model`, by module name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    view = {}
    for name, m in _qat_modules(model):
        q = module_qparams(m)
        layout = m._weight_layout()
        view[name] = DeployedLayer(
            weight=quantize_weight(m.weight.detach(), q.weight_scale, q.weight_bits, layout),
            weight_scale=q.weight_scale,
            weight_bits=q.weight_bits,
            act_scale=float(q.act_scale),
            act_offset=int(q.act_offset),
            act_bits=q.act_bits,
            bias=None if m.bias is None else m.bias.detach().clone(),
            layout=layout,
        )
    return view
