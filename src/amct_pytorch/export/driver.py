"""`export_onnx`: a model holding QAT modules -> QDQ ONNX with integer weights and dynamic shapes,
checked in ONNX Runtime.

Under `torch.onnx.export` each LinearQAT (conv: the same with Conv/ConvTranspose) becomes

    x -> QuantizeLinear(s_d, o_d) -> DequantizeLinear(s_d, o_d) --\
    W -> QuantizeLinear(s_w, 0)   -> DequantizeLinear(s_w, 0)   ----> Gemm/MatMul(+bias)

(the module-side half: `nn/module/quantization/qdq.py`). `export_onnx` then rewrites that graph
for deployment (`passes.fold_weight_quantizers` and friends): each weight is stored as its
integer codes (int8, or packed INT4 behind Cast(to=INT8)) feeding its DequantizeLinear, a Linear
is MatMul + Add, a conv's bias is a separate Add, so that ONNX Runtime's default session options
compute what the eval forward computes (docs/export.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..convert import qat_layers, quantized_layers
from ..nn.module.quantization.base import CalibrationSkippedWarning
from ..nn.module.quantization.qdq import swapped_params, check_exportable, int32_bias, kernel_grid_weights
from ..ops import INT4_OPSET, onnx_translations
from ..runtime import pinned_qparams
from .onnx_graph import FoldedWeight
from .check import LayerCheck, check_artifact
from .storage import check_storage
from .ort import autocast_off
from .passes import (GROUP_WISE_INT4_FORMS, fold_weight_quantizers, keep_relu_before_int4_quantizers,
                     static_dim_params, unshare_activation_quantizers)


def _pinned(model: nn.Module, used: set[int]):
    """Export with the factors as constants computed here, from the real parameters, for the QAT
    layers the exported forward calls (`used`: their ids).

    torch.export traces with fake parameters, so without this the factors are computed inside
    the graph from the parameters (the exporter folds them into constants only for small weights).
    """
    layers = [m for m in qat_layers(model).values() if m.config.retrain_enable and id(m) in used]
    return _pinned_then_kernel_grid(pinned_qparams({id(m): m.export_constants() for m in layers}), layers)


@contextlib.contextmanager
def _pinned_then_kernel_grid(pinned, layers):
    """The pinned factors (computed from the real weights), then the kernel-grid layers' weights
    replaced by their trained ŵ for the export (qdq.kernel_grid_weights)."""
    with pinned, kernel_grid_weights(layers):
        yield


def _called_layers(model: nn.Module, inputs) -> set[int]:
    """The ids of the QAT layers one eval forward on `inputs` calls (forward pre-hooks; eval mode and
    no_grad change no state). Export needs only these calibrated."""
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in qat_layers(model).values()]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationSkippedWarning)
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return called


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a `torch.compile`d one wraps (`OptimizedModule._orig_mod`), else `model` itself:
    export traces the plain module, never the compiled wrapper."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return model


def _bias_on_int32_grid(layers):
    """Temporarily give each layer's bias its int32-grid value (restored bit for bit)."""
    return swapped_params([(m, "bias", int32_bias(m)) for _, m in layers if m.bias is not None])


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


def _trace_errors() -> tuple[type[BaseException], ...]:
    """What non-strict torch.export raises when it cannot trace a model (unsupported Python, data-dependent
    shapes or control flow, ops without a fake kernel): the cases torch.onnx.export's own fallbacks
    (strict export, draft export, TorchScript) are for. A model's own error is not among them."""
    from torch._dynamo import exc  # torch internals, loaded on use
    from torch._subclasses import fake_tensor
    from torch.fx.experimental import symbolic_shapes

    return (exc.Unsupported, exc.UserError, exc.TorchRuntimeError, symbolic_shapes.GuardOnDataDependentSymNode,
            fake_tensor.DataDependentOutputException, fake_tensor.DynamicOutputShapeException,
            fake_tensor.UnsupportedOperatorException)


def _torch_export(model, inputs, shapes, explicit: bool = False):
    """torch.export of the export-time forward (non-strict, as torch.onnx.export's first try), or None
    when it cannot trace the model (torch.onnx.export then tries its own ways, and reports).

    explicit: `shapes` is the user's dynamic_shapes: torch.export not honouring them is an error
    carrying torch's reason, never a silent fallback to other shapes."""
    try:
        return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
    except _trace_errors() as err:
        if explicit:
            raise ValueError(f"dynamic_shapes: torch.export cannot keep them: {_reason(err)}") from err
        return None


def _reason(err: BaseException, limit: int = 1200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _static_dims_that_vary(model, inputs, program, pinned) -> list[tuple[int, int]]:
    """(input, dim) of every dim the automatic shapes left to torch.export that came out static although
    the model also runs with another size there (one eval forward per such dim, that dim grown by one)."""
    dims = _dynamic_dims(program)
    found = []
    for i, (t, pin) in enumerate(zip(inputs, pinned)):
        for d in range(t.dim()):
            if d in pin or d in dims[i] or t.shape[d] < 2:  # size 1: _warn_size_one already said so
                continue
            grown = torch.cat([t, t.narrow(d, t.shape[d] - 1, 1)], dim=d)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model(*inputs[:i], grown, *inputs[i + 1:])
            except Exception:  # noqa: BLE001 - any error means the model pins this dim (a feature dim)
                continue
            found.append((i, d))
    return found


def _specialization_reason(model, inputs, pinned, dims) -> str:
    """torch.export's own account of why these dims became static: the same export with Dim.DYNAMIC
    there, which raises instead of specializing."""
    shapes = _auto_shapes(inputs, pinned)
    for i, d in dims:
        shapes[i][d] = torch.export.Dim.DYNAMIC
    try:
        torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
    except _trace_errors() as err:
        return _reason(err, 600)
    return "torch.export specialized it"


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
    from torch.fx.experimental.symbolic_shapes import is_concrete_int  # torch internals, loaded on use

    return isinstance(size, int) or is_concrete_int(size)


def _warn_size_one(inputs, shapes) -> None:
    """torch.export specializes a dim of size 1 in the example to 1: say so."""
    if shapes is None or not isinstance(shapes, (tuple, list)):
        return
    ones = [f"input_{i} dim {d}" for i, (t, spec) in enumerate(zip(inputs, shapes)) if isinstance(spec, dict)
            for d in spec if t.shape[d] == 1]
    if ones:
        warnings.warn(f"export_onnx: {', '.join(ones)} has size 1 in the example, so torch.export fixes it to 1; "
                      "use an example with size >= 2 there to keep it dynamic", stacklevel=3)


# ---- the public helper ----------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float | None  # ORT vs PyTorch eval on the checked inputs; None when check=False
    folded_weights: tuple[FoldedWeight, ...] = ()  # the weights stored as integer codes
    dynamic_dims: tuple[tuple[str | int, ...], ...] = ()  # per ONNX input: dim_param names / fixed sizes
    dynamic_axes: tuple[tuple[int, ...], ...] = ()  # per ONNX input: the indices of its dynamic dims
    layer_checks: tuple[LayerCheck, ...] = ()  # each quantized layer as ORT ran it (check=True)


def _as_input_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(
            "example_inputs: expected a torch.Tensor or a non-empty tuple of torch.Tensor, "
            f"got {type(example_inputs).__name__}"
        )
    return tuple(inputs)


BIAS_MODES = ("float", "int32")


def export_onnx(model: nn.Module, example_inputs, path, *, dynamo: bool = True, check: bool = True,
                atol: float | None = None, dynamic: bool = True, static_dims=None, dynamic_shapes=None,
                integer_weights: bool = True, bias: str = "float", session_options=None,
                check_inputs=None, group_wise_int4: str = "matmulnbits",
                int8_storage: str = "auto") -> ExportResult:
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
    model = unwrap_compiled(model)
    inputs = _as_input_tuple(example_inputs)
    extra = [_as_input_tuple(c) for c in (check_inputs or ())]
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0
                             or atol == float("inf")):
        raise ValueError(f"atol: expected None or a finite number >= 0, got {atol!r}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}")
    if group_wise_int4 not in GROUP_WISE_INT4_FORMS:
        raise ValueError(f"group_wise_int4: expected one of {GROUP_WISE_INT4_FORMS}, got {group_wise_int4!r}")
    check_storage(int8_storage)
    if dynamic_shapes is not None and not dynamo:
        raise ValueError("dynamic_shapes: is torch.export's argument (dynamo=True); with dynamo=False use "
                         "static_dims, or torch.onnx.export(..., dynamic_axes=...) directly")
    if model.training:
        raise RuntimeError("model: is in training mode; call model.eval() before export_onnx")
    layers = list(quantized_layers(model).items())
    used = _called_layers(model, inputs)  # an uncalibrated layer the exported forward never calls is no obstacle
    layers = [(n, m) for n, m in layers if id(m) in used]
    for name, m in layers:
        check_exportable(m, name)
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
    with autocast_off(), (_bias_on_int32_grid(layers) if bias == "int32" else contextlib.nullcontext()):
        shapes = dynamic_shapes if dynamic_shapes is not None else _auto_shapes(inputs, pinned) if dynamic else None
        _warn_size_one(inputs, shapes)
        program = None
        if dynamo or shapes is not None:
            with _pinned(model, used):
                program = _torch_export(model, inputs, shapes, explicit=dynamic_shapes is not None)
                if program is not None and dynamic_shapes is None and shapes is not None:
                    fixed = _static_dims_that_vary(model, inputs, program, pinned)
                    if fixed:
                        where = ", ".join(f"{names[i]} dim {d} (size {inputs[i].shape[d]} in the example)"
                                          for i, d in fixed)
                        warnings.warn(
                            f"export_onnx: {where} became static in the exported graph although the model runs "
                            f"with other sizes there; ONNX Runtime will refuse other sizes. torch.export's reason: "
                            f"{_specialization_reason(model, inputs, pinned, fixed)}. Pin it knowingly with "
                            "static_dims, or export another size as the example", UserWarning, stacklevel=2)
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
        with _pinned(model, used):
            torch.onnx.export(target, args, path, **kwargs)
        import onnx  # optional dependency

        proto = onnx.load(path)
        static_dim_params(proto)
        unshare_activation_quantizers(proto)
        folded = tuple(fold_weight_quantizers(proto, integer=integer_weights, group_wise_int4=group_wise_int4,
                                              int8_storage=int8_storage))
        keep_relu_before_int4_quantizers(proto)
        onnx.save(proto, path)
        dims = _onnx_input_dims(path)
        result = ExportResult(path, None, folded, dims,
                              tuple(tuple(d for d, v in enumerate(ds) if isinstance(v, str)) for ds in dims))
        if not check:
            return result
        diff, layer_checks = check_artifact(model, path, folded, [inputs, *extra], session_options=session_options,
                                            atol=atol)
    return dataclasses.replace(result, max_abs_diff=diff, layer_checks=layer_checks)


def _onnx_input_dims(path) -> tuple[tuple[str | int, ...], ...]:
    import onnx  # optional dependency

    proto = onnx.load(path, load_external_data=False)
    return tuple(tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim) for i in proto.graph.input)
