"""Deployment: ONNX QDQ export of models holding QAT modules, an ORT parity check, integer weights.

Under `torch.onnx.export` each LinearQAT (conv: the same with Conv/ConvTranspose) becomes

    x -> QuantizeLinear(s_d, o_d) -> DequantizeLinear(s_d, o_d) --\
    W -> QuantizeLinear(s_w, 0)   -> DequantizeLinear(s_w, 0)   ----> Gemm/MatMul(+bias)

The weight stays a float initializer with its own Q/DQ pair (the explicit-quantization form
TensorRT and most QDQ toolchains expect); `deploy_view` hands out the int8 codes directly.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
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


@contextlib.contextmanager
def _pinned_qparams(model: nn.Module):
    """Export with the factors as constants computed here, from the real parameters.

    torch.export traces with fake parameters, so without this the factors are computed inside
    the graph from the parameters (the exporter folds them into constants only for small weights).
    """
    table = {id(m): module_qparams(m) for _, m in _qat_modules(model)}
    token = _PINNED.set(table)
    try:
        yield
    finally:
        _PINNED.reset(token)


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


def onnx_translations() -> dict:
    """The custom_translation_table export_onnx passes to torch.onnx.export(dynamo=True)."""
    return {torch.ops.amct_pytorch.quant_dequant.default: _quant_dequant_onnx}


# ---- the public helper ----------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float | None  # ORT vs PyTorch eval on the example inputs; None when check=False


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


def export_onnx(model: nn.Module, example_inputs, path, *, dynamo: bool = True, check: bool = True,
                atol: float = 1e-5, dynamic: bool = True) -> ExportResult:
    """Export `model` (eval mode, QAT layers calibrated) to ONNX QDQ and check it in ONNX Runtime.

    The scales and zero points are written as constants computed from the real parameters (the
    values the eval forward uses). With `dynamic`, every input dimension but the last is dynamic.
    With `check`, the file is run in ONNX Runtime's CPU provider on `example_inputs` and compared with
    `model(*example_inputs)`; a max abs difference above `atol` raises. The check session leaves two
    ONNX Runtime rewrites off (`ORT_DISABLED_OPTIMIZERS`) that change what the graph computes.
    INT4 layers need dynamo=True (opset 21, chosen automatically).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_input_tuple(example_inputs)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0 or atol == float("inf"):
        raise ValueError(f"atol: expected a finite number >= 0, got {atol!r}")
    if model.training:
        raise RuntimeError("model: is in training mode; call model.eval() before export_onnx")
    layers = _qat_modules(model)
    for _, m in layers:
        check_exportable(m)
    has_int4 = any(4 in (m.config.retrain_data_config.num_bits, m.config.retrain_weight_config.num_bits)
                   for _, m in layers)
    if has_int4:
        if not dynamo:
            raise ValueError(
                f"dynamo=False: the model has INT4 layers, which need opset-{INT4_OPSET} INT4 QuantizeLinear; "
                "the TorchScript exporter stops at opset 20. Use dynamo=True."
            )
    path = os.fspath(path)
    names = [f"input_{i}" for i in range(len(inputs))]
    kwargs = dict(input_names=names, dynamo=dynamo, opset_version=INT4_OPSET if has_int4 else None)
    if dynamo:
        kwargs.update(verbose=False, external_data=False, custom_translation_table=onnx_translations())
        if dynamic:
            kwargs["dynamic_shapes"] = tuple({d: torch.export.Dim.DYNAMIC for d in range(t.dim() - 1)}
                                             for t in inputs)
    elif dynamic:
        kwargs["dynamic_axes"] = {n: {d: f"{n}_dim{d}" for d in range(t.dim() - 1)} for n, t in zip(names, inputs)}
    with _pinned_qparams(model):
        torch.onnx.export(model, inputs, path, **kwargs)
    if not check:
        return ExportResult(path, None)
    diff = ort_max_abs_diff(model, inputs, path)
    if diff > atol:
        raise RuntimeError(
            f"{path}: ONNX Runtime output differs from the PyTorch eval output by {diff:.3g} (max abs), "
            f"above atol={atol:g}. A difference of one activation step usually means an input fell on a "
            "rounding tie, where ONNX rounds x/scale and then adds the offset (see README, Export and deploy)."
        )
    return ExportResult(path, diff)


# ONNX Runtime rewrites that change what a QDQ graph computes (measured with onnxruntime 1.32):
# WeightBiasQuantization turns the float bias after DequantizeLinear->Gemm into int32 codes at
# scale s_x*s_w (as integer runtimes do), moving outputs by up to s_x*s_w/2; ReluQuantRewrite
# drops a Relu in front of an INT4 QuantizeLinear even when the zero point is not qmin.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "ReluQuantRewrite")


def ort_session(path):
    """An ONNX Runtime CPU session that computes exactly what the exported graph says."""
    import onnxruntime as ort

    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))


def ort_max_abs_diff(model: nn.Module, inputs: tuple[torch.Tensor, ...], path) -> float:
    """Max abs difference between ONNX Runtime (CPU provider) on `path` and `model(*inputs)`."""
    session = ort_session(path)
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    with torch.no_grad():
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
