"""The module-side half of export: the factors a QAT module's eval forward uses (`QParams`),
the checks that it can be exported, the export-time forward (Q/DQ on input and weight, then the
module's float op) and the bias on the int32 grid of integer runtimes.

Everything here reads a module through its public protocol (`config`, `weight`, `bias`,
`act_qparams()`, `weight_qparams()`, `weight_scale_init()`, `weight_layout()`,
`float_forward()`, `describe()`, `is_calibrated`); the ONNX side (`amct_pytorch.export`) calls
it, never the other way round. Under `export_onnx` the factors are constants it computed from
the real parameters (`runtime.pinned_qparams`); under plain `torch.onnx.export` they are
computed here.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ....functional import act_qparams, arq_scale, quantize_weight, ulq_weight_scale
from ....ops import INT4_OPSET, quant_dequant, quant_dequant_blocked
from ....runtime import export_onnx_active, pinned_for
from ....saturation import pair_violation_mask


class QParams(NamedTuple):
    """The quantization factors one QAT module uses in eval mode (real tensors)."""

    act_scale: torch.Tensor  # 0-d float32
    act_offset: torch.Tensor  # 0-d int32, in [qmin, qmax]
    weight_scale: torch.Tensor  # (1,) or (out_features,) float32
    act_bits: int
    weight_bits: int
    channel_wise: bool


def weight_axis(module) -> int:
    """The weight dim that holds the output channels in ONNX (DequantizeLinear's axis).

    Linear and conv weights: 0. A module may name its own (`onnx_weight_axis`, e.g. Conv1DQAT: 1). Transposed conv (in, out/g, *k): 1, which is the output
    channel only with groups=1; per-channel scales of a grouped transposed conv span two dims
    (group, dim 1) and fit no single axis, so export refuses them (see check_exportable).
    """
    axis = getattr(module, "onnx_weight_axis", None)  # a layout of its own (Conv1DQAT's (in, out): 1)
    if axis is not None:
        return axis
    return 1 if getattr(module, "transposed", False) else 0


def require_calibrated(module, name: str | None = None) -> None:
    """Raise a clear error when `module` has no activation factors yet (named `name`, its path in
    the model, when given)."""
    if not module.is_calibrated:
        data = module.config.retrain_data_config
        raise RuntimeError(
            f"{name or module.describe()}: activation calibration has not finished (it needs batch_num="
            f"{data.batch_num} calibration forwards), so there is no activation "
            "scale to export. Run the calibration forwards (train mode, or inside amct_pytorch.calibrating()) "
            "or load a calibrated state_dict / quant record first."
        )


def per_channel_fits_one_axis(module) -> bool:
    return not (getattr(module, "transposed", False) and module.groups > 1
                and module.config.retrain_weight_config.channel_wise)


def check_exportable(module, name: str | None = None) -> None:
    """Raise a clear error when `module` cannot be exported as a faithful QDQ graph (messages name it
    `name`, its path in the model, when given)."""
    require_calibrated(module, name)
    data, wcfg = module.config.retrain_data_config, module.config.retrain_weight_config
    if wcfg.gguf_type is not None or (data.dynamic_act or "").startswith("llama.cpp"):
        raise RuntimeError(
            f"{name or module.describe()}: trained for llama.cpp (gguf_type={wcfg.gguf_type!r}, dynamic_act="
            f"{data.dynamic_act!r}), whose Q8_0/Q4_0 blocks and on-the-fly activation quantizer have no ONNX form; "
            "write it with amct_pytorch.export.export_gguf"
        )
    if module.training:
        raise RuntimeError(
            f"{name or module.describe()}: is in training mode; call model.eval() before export "
            "(the exported graph is the eval-mode forward)."
        )
    if not per_channel_fits_one_axis(module):
        raise RuntimeError(
            f"{name or module.describe()}: per-channel weight scales of a grouped transposed conv (groups={module.groups}) "
            "span two weight dims (group, dim 1), which no ONNX DequantizeLinear axis expresses. Use "
            "channel_wise=False for this layer, or groups=1."
        )


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


def pinned_layout(module, q: QParams) -> QParams:
    """Group-wise scales pinned already shaped (rows, blocks): reshaping the constant inside the traced
    graph leaves a Reshape that the exporter does not always fold, and the weight folding needs a
    constant scale."""
    group = module.config.retrain_weight_config.group_size
    if group is None:
        return q
    return q._replace(weight_scale=q.weight_scale.reshape(module.out_features, module.in_features // group).clone())


def graph_qparams(module) -> QParams:
    """The same factors as `module_qparams`, as torch ops on the (possibly fake) parameters."""
    data, wcfg = module.config.retrain_data_config, module.config.retrain_weight_config
    # detached: torch's fake-quant ops refuse a scale that requires grad
    a_scale, a_offset = act_qparams(module.acts_clip_max.detach(), module.acts_clip_min.detach(), data.num_bits)
    # a 1-row view keeps the per-tensor reduction on an explicit dim (torchlib needs one)
    if wcfg.channel_wise:
        w_scale = arq_scale(module.weight, wcfg.num_bits, True, module.weight_layout())
    else:
        w_scale = arq_scale(module.weight.reshape(1, -1), wcfg.num_bits, channel_wise=True)
    if wcfg.learnable_scale:
        if wcfg.scale_init != "arq":  # a never-initialised learnable scale: the eval forward's first value
            w_scale = module.weight_scale_init().reshape(w_scale.shape)
        w_scale = torch.where(module.wts_scale_ready, ulq_weight_scale(module.wts_scales.detach()), w_scale)
    return QParams(a_scale.reshape(()), a_offset.reshape(()).to(torch.int32), w_scale.reshape(-1),
                   data.num_bits, wcfg.num_bits, wcfg.channel_wise)


def as_constants(q: QParams) -> QParams:
    """Real tensors -> tensors the TorchScript tracer records as constants, not as ops on parameters."""
    def const(t):
        return torch.tensor(t.tolist(), dtype=t.dtype, device=t.device)
    return q._replace(act_scale=const(q.act_scale), act_offset=const(q.act_offset),
                      weight_scale=const(q.weight_scale))


def on_kernel_grid(module) -> bool:
    """Whether `module` trains its weight on a kernel grid (retrain_weight_config.kernel_grid)."""
    return module.config.retrain_enable and module.config.retrain_weight_config.kernel_grid != "full"


@contextlib.contextmanager
def swapped_params(changes):
    """Temporarily give `module.<name>` the value `value` for each (module, name, value) in `changes`
    (in place, under no_grad; restored bit for bit, each module's ŵ cache dropped both ways)."""
    saved = []
    try:
        with torch.no_grad():
            for m, name, value in changes:
                param = getattr(m, name)
                saved.append((m, name, param.detach().clone()))
                param.copy_(value)
                m.clear_weight_cache()
        yield
    finally:
        with torch.no_grad():
            for m, name, old in saved:
                getattr(m, name).copy_(old)
                m.clear_weight_cache()


def kernel_grid_weights(layers):
    """Temporarily give each layer on a kernel grid its eval forward's ŵ as its weight (restored bit
    for bit): the exported float initializer is then the trained ŵ, whose QuantizeLinear (and the
    export's weight folding, round(ŵ / s)) gives exactly the trained pair-capped or 7-bit codes, and
    the integer initializer keeps the layer's weight name. Enter it after the export's factors were
    computed from the real weights (an ARQ scale of ŵ may differ from that of w in the last bit)."""
    return swapped_params([(m, "weight", m.fake_quantized_weight()) for m in layers if on_kernel_grid(m)])


def export_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """What a QAT module's forward becomes under torch.onnx.export: Q/DQ on input and weight, then
    the module's float op (linear, conv, transposed conv)."""
    check_exportable(module)
    q = pinned_for(module)
    if q is None and on_kernel_grid(module):
        raise RuntimeError(
            f"{module.describe()}: retrain_weight_config.kernel_grid="
            f"{module.config.retrain_weight_config.kernel_grid!r} exports its trained codes only through "
            "amct_pytorch.export_onnx(model, example_inputs, path) (plain torch.onnx.export would store "
            "round(w / s), not the kernel grid's codes)"
        )
    axis = weight_axis(module)
    group = module.config.retrain_weight_config.group_size
    if q is not None and not torch.jit.is_tracing() and group is not None:
        # group-wise: an opset-21 blocked Q/DQ, one scale per (output row, block of input features); a
        # dynamic activation (ort-matmulnbits-level4) has no Q/DQ: MatMulNBits' level 4 quantizes x itself
        if module.config.retrain_data_config.dynamic_act is None:
            xq = quant_dequant(x, q.act_scale, [int(q.act_offset)], -1, q.act_bits)
        else:
            xq = x
        w_scale = q.weight_scale  # (rows, blocks), see pinned_layout
        wq = quant_dequant_blocked(module.weight, w_scale, group, q.weight_bits)
        return module.float_forward(xq, wq, *args, **kwargs)
    if group is not None:
        raise RuntimeError(
            f"{module.describe()}: group-wise weight scales (group_size={group}) need opset-21 blocked "
            "QuantizeLinear/DequantizeLinear, which plain torch.onnx.export cannot emit. Use "
            "amct_pytorch.export_onnx(model, example_inputs, path)."
        )
    if q is not None and not torch.jit.is_tracing():  # export_onnx, dynamo: our op, translated by us
        w_scale = q.weight_scale if q.channel_wise else q.weight_scale.reshape(())
        xq = quant_dequant(x, q.act_scale, [int(q.act_offset)], -1, q.act_bits)
        wq = quant_dequant(module.weight, w_scale, [0] * q.weight_scale.numel(), axis if q.channel_wise else -1,
                           q.weight_bits)
        return module.float_forward(xq, wq, *args, **kwargs)
    # plain torch.onnx.export: torch's own fake-quant ops, which both exporters map to INT8 Q/DQ
    if 4 in (module.config.retrain_data_config.num_bits, module.config.retrain_weight_config.num_bits):
        raise RuntimeError(
            f"{module.describe()}: INT4 needs opset-{INT4_OPSET} INT4 QuantizeLinear/DequantizeLinear, which plain "
            "torch.onnx.export cannot emit (torch's fake-quant ops map to INT8 only and the TorchScript exporter "
            "stops at opset 20). Use amct_pytorch.export_onnx(model, example_inputs, path, dynamo=True)."
        )
    if torch.jit.is_tracing():  # TorchScript exporter: parameters are real, freeze the factors
        q = q or as_constants(module_qparams(module))
    else:
        if any(isinstance(d, torch.SymInt) for d in x.shape):
            raise RuntimeError(
                f"{module.describe()}: plain torch.onnx.export(dynamo=True) (or torch.export) with dynamic shapes "
                "is not supported "
                "(torch's fake-quant op with tensor scales has no symbolic-shape kernel). Use "
                "amct_pytorch.export_onnx(model, example_inputs, path), whose dims are dynamic by default, "
                "or torch.onnx.export(..., dynamo=False, dynamic_axes=...)."
            )
        q = graph_qparams(module)
    xq = torch.fake_quantize_per_tensor_affine(x, q.act_scale, q.act_offset, -128, 127)
    # where a pair of the codes could saturate ORT's u8s8 kernel (CPUs without VNNI), the same codes on the
    # uint8 + 128 grid (exact u8u8 kernel; export/storage.py); decidable when the weights are real (tracing)
    # (plain torch.onnx.export only: under export_onnx its weight folding decides, export/storage.py)
    plain = torch.jit.is_tracing() and not export_onnx_active()
    lo, hi, zp = (0, 255, 128) if plain and _codes_can_saturate(module, q) else (-128, 127, 0)
    if q.channel_wise:
        zeros = torch.full_like(q.weight_scale, zp, dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(module.weight, q.weight_scale, zeros, axis, lo, hi)
    else:
        zero = torch.full((), zp, dtype=torch.int32, device=x.device)
        wq = torch.fake_quantize_per_tensor_affine(module.weight, q.weight_scale.reshape(()), zero, lo, hi)
    return module.float_forward(xq, wq, *args, **kwargs)


def _codes_can_saturate(module, q: QParams) -> bool:
    """Whether the module's INT8 weight codes hold a pair that ORT's u8s8 kernel can saturate."""
    order = module.kernel_order() if hasattr(module, "kernel_order") else None
    if order is None or q.weight_bits != 8:
        return False
    with torch.no_grad():
        codes = quantize_weight(module.weight.detach(), q.weight_scale, 8, module.weight_layout())
    return bool(pair_violation_mask(codes.cpu().numpy(), *order).any())


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


def pinned_embedding(module):
    """(int8 codes, scales) of an EmbeddingQAT for its export forward: the constants export_onnx
    computed from the real table, else computed now (`EmbeddingQAT.export_forward` reads them so)."""
    return pinned_for(module) or module.quantized_table()
