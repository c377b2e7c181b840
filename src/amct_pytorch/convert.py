"""Model-wide conversion: swap every nn.Linear / conv of a model for its QAT module and back.

Selecting layers (for `overrides` and `skip`), a key is one of
- a str: an `fnmatch` shell-style pattern matched case-sensitively against the whole
  qualified module name (`"encoder.layer.*.intermediate.dense"`, `"*.query"`);
- a compiled `re.Pattern`: matched with `fullmatch` against the qualified name;
- an nn.Module object: exactly that layer (wherever it is registered).
Every key must select at least one convertible layer of the model, else ValueError:
a typo must not silently leave a layer at the global config.

Only exact instances of the float classes in `QAT_CLASSES` (nn.Linear, nn.Conv1d/2d/3d,
nn.ConvTranspose1d/2d/3d) are converted. Subclasses (e.g. the
`NonDynamicallyQuantizableLinear` inside nn.MultiheadAttention, whose weight is read
directly by the attention kernel) are left alone and listed in the summary.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from .batchnorm import fold_batchnorm as fold_float_batchnorm
from .config import QATConfig, parse_config
from .nn.module.quantization.base import QATModuleMixin
from .nn.module.quantization.layer import QATLayer
from .nn.module.quantization.conv import (Conv1dQAT, Conv2dQAT, Conv3dQAT, ConvTranspose1dQAT, ConvTranspose2dQAT,
                                          ConvTranspose3dQAT)
from .nn.module.quantization.embedding import EmbeddingQAT
from .nn.module.quantization.linear import LinearQAT
from .nn.module.quantization.transformers_conv1d import Conv1DQAT, transformers_conv1d
from .runtime import calibrating
from .training import qat_parameters, watch_qat_params

class QATClassRegistry(MutableMapping):
    """{float layer class: QAT class}, a dict that also holds the classes of optional libraries once
    they are imported (transformers' Conv1D -> Conv1DQAT while `transformers.pytorch_utils` is in
    sys.modules), without importing them itself."""

    def __init__(self, classes: dict[type, type], optional: tuple = ()):
        self._classes = dict(classes)
        self._optional = list(optional)  # (function returning the float class or None, QAT class)

    def _sync(self) -> dict[type, type]:
        for entry in list(self._optional):  # empty once every optional library was seen
            float_cls = entry[0]()
            if float_cls is not None:
                self._classes.setdefault(float_cls, entry[1])
                self._optional.remove(entry)
        return self._classes

    def __getitem__(self, key):
        return self._sync()[key]

    def __setitem__(self, key, value):
        self._sync()[key] = value

    def __delitem__(self, key):
        del self._sync()[key]

    def __iter__(self):
        return iter(list(self._sync()))

    def __len__(self):
        return len(self._sync())

    def __contains__(self, key):
        return key in self._sync()

    def __repr__(self):
        return repr(self._sync())


_TRANSFORMERS = ((transformers_conv1d, Conv1DQAT),)
# float layer class -> its QAT module; to_qat converts these by default
QAT_CLASSES: QATClassRegistry = QATClassRegistry({
    nn.Linear: LinearQAT, nn.Conv1d: Conv1dQAT, nn.Conv2d: Conv2dQAT, nn.Conv3d: Conv3dQAT,
    nn.ConvTranspose1d: ConvTranspose1dQAT, nn.ConvTranspose2d: ConvTranspose2dQAT,
    nn.ConvTranspose3d: ConvTranspose3dQAT,
}, _TRANSFORMERS)
# converted only when asked for with layer_types (weight-only quantization of embedding tables)
OPTIONAL_QAT_CLASSES: dict[type, type] = {nn.Embedding: EmbeddingQAT}
# the registry: every float class a QAT class exists for (to_qat's layer_types choose among these)
ALL_QAT_CLASSES: QATClassRegistry = QATClassRegistry({**QAT_CLASSES, **OPTIONAL_QAT_CLASSES}, _TRANSFORMERS)


def class_label(cls: type) -> str:
    """A float layer class as messages name it: nn.Linear, transformers.pytorch_utils.Conv1D, ..."""
    if cls.__module__.startswith("torch.nn"):
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class UnconvertedLayerWarning(UserWarning):
    """to_qat met weight-bearing layers of a type no QAT layer exists for: they stay float."""


@dataclass
class ConversionSummary:
    """What `to_qat` did. `converted` maps each qualified name to the config it got.

    `left_float` maps every module that holds parameters of its own and stays float to the reason
    (no QAT layer for its type, skip list, not in layer_types, subclass, ...); `skipped` is the
    part of it among the convertible layer types. `float_params` of the model's `weight_params`
    (parameters of the float model, each shared tensor once) stay float: `float_share`.
    """

    converted: dict[str, QATConfig] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stayed float
    overridden: dict[str, str] = field(default_factory=dict)  # name -> the override key that won
    batchnorm: Any = None  # the BatchNormFolding of to_qat(..., fold_batchnorm=True), else None
    left_float: dict[str, str] = field(default_factory=dict)  # every float module with parameters -> why
    float_params: int = 0
    weight_params: int = 0

    @property
    def float_share(self) -> float:
        """The fraction of the model's weight parameters that stays float (0.0 for a model without any)."""
        return self.float_params / self.weight_params if self.weight_params else 0.0

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) to QAT modules"
                 f" ({len(self.overridden)} with a per-layer override)"]
        for name, cfg in self.converted.items():
            w, d = cfg.retrain_weight_config, cfg.retrain_data_config
            kind = "per-channel" if w.channel_wise else "per-tensor"
            how = f"W:{w.dst_type} {kind} {w.weights_retrain_algo}, A:{d.dst_type}"
            if name in self.overridden:
                how += f"  [override {self.overridden[name]}]"
            lines.append(f"  {name}: {how}")
        for name, why in self.left_float.items():
            lines.append(f"  {name}: left as is ({why})")
        if self.weight_params:
            lines.append(f"left float: {100 * self.float_share:.1f}% of the model's weight parameters "
                         f"({self.float_params} of {self.weight_params})")
        if self.batchnorm is not None:
            lines.append(str(self.batchnorm))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"converted": {n: c.to_dict() for n, c in self.converted.items()},
                "skipped": dict(self.skipped), "overridden": dict(self.overridden),
                "left_float": dict(self.left_float), "float_params": self.float_params,
                "weight_params": self.weight_params}


def _key_text(key) -> str:
    if isinstance(key, re.Pattern):
        return f"re:{key.pattern}"
    if isinstance(key, nn.Module):
        return f"<{type(key).__name__} object>"
    return repr(key)


def _selector(key, arg: str) -> Callable[[str, nn.Module], bool]:
    if isinstance(key, str):
        return lambda name, mod: fnmatch.fnmatchcase(name, key)
    if isinstance(key, re.Pattern):
        return lambda name, mod: key.fullmatch(name) is not None
    if isinstance(key, nn.Module):
        return lambda name, mod: mod is key
    raise TypeError(f"{arg}: each key must be a str (fnmatch pattern), a compiled re.Pattern or an "
                    f"nn.Module layer, got {key!r} ({type(key).__name__})")


def _no_match(key, arg: str, names: list[str]) -> ValueError:
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return ValueError(f"{arg}: {_key_text(key)} matches no convertible layer of the model; "
                      f"layer names look like: {shown or '(the model has none)'}")


def _linear_sites(model: nn.Module):
    """(parent, attribute, qualified name, module) for every registration of every module."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() hides repeats
            if child is None:
                continue
            yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def to_qat(model: nn.Module, config: Any = None, *, overrides: Mapping | None = None,
           skip: Iterable | None = None, layer_types: Iterable[type] | None = None,
           fold_batchnorm: bool = False) -> ConversionSummary:
    """Replace, in place, every exact nn.Linear and conv of `model` by its QAT module
    (`LinearQAT.from_float`, `Conv2dQAT.from_float`, ...; see QAT_CLASSES).

    config: the global config (None, dict, JSON path or QATConfig) for every layer.
    overrides: {key: config}; a matching layer gets that whole config instead of the
        global one (no merging). A layer-object key beats any pattern; among patterns
        the last matching entry wins.
    skip: keys of layers to leave as float layers.
    layer_types: the float classes to convert (default: every key of QAT_CLASSES), e.g.
        (nn.Linear,) to leave convolutions float, or [*QAT_CLASSES, nn.Embedding] to quantize
        embedding tables too (EmbeddingQAT, weight only; give the embeddings a config without
        retrain_data_config through `overrides`).
    fold_batchnorm: first fold every BatchNorm that directly follows a conv into it
        (amct_pytorch.fold_batchnorm; the result is `summary.batchnorm`, BatchNorms left
        float are listed there and warned about).
    Everything is validated before the model is touched (a bf16/fp16 layer, or an existing QAT
    layer with another config, is an error naming it). Weights and biases are shared
    with the original layers (the same Parameter objects), so an optimizer built before
    conversion still sees them, but not the clip bounds and weight scales created here: add
    those with `amct_pytorch.add_qat_params(optimizer, model)` (a warning names them when they
    get gradients over several steps in no optimizer). `summary.left_float` lists every module
    with parameters that stays float and why; weight-bearing layers of types without a QAT
    layer (RNNs, nn.Bilinear, ...) are warned about once (UnconvertedLayerWarning). A layer registered under several names is converted
    once and replaced at every name (it is reported under its first name).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    global_cfg = parse_config(config)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides: expected a dict {{pattern or layer: config}}, got {type(overrides).__name__}")
    if skip is None:
        skip = ()
    if isinstance(skip, (str, re.Pattern, nn.Module)) or not isinstance(skip, Iterable):
        raise TypeError(f"skip: expected a list of patterns or layers, got {skip!r} ({type(skip).__name__})")
    skip = list(skip)
    if layer_types is None:
        layer_types = tuple(QAT_CLASSES)
    else:
        if isinstance(layer_types, type) or not isinstance(layer_types, Iterable):
            raise TypeError(f"layer_types: expected a list of float layer classes, got {layer_types!r}")
        layer_types = tuple(layer_types)
        bad = [t for t in layer_types if t not in ALL_QAT_CLASSES]
        if bad or not layer_types:
            raise ValueError(f"layer_types: {bad or layer_types!r} not supported; allowed: "
                             f"{', '.join(class_label(t) for t in ALL_QAT_CLASSES)}")

    rules = []  # (key, selector, config, is_layer_object)
    for key, cfg in overrides.items():
        sel = _selector(key, "overrides")
        try:
            parsed = parse_config(cfg)
        except (TypeError, ValueError) as err:
            raise type(err)(f"overrides[{_key_text(key)}]: {err}") from None
        rules.append((key, sel, parsed, isinstance(key, nn.Module)))
    skips = [(key, _selector(key, "skip")) for key in skip]

    sites = list(_linear_sites(model))
    first_name: dict[int, str] = {}
    for _, _, name, mod in sites:
        first_name.setdefault(id(mod), name)
    summary = ConversionSummary()
    linear_names = []  # convertible candidates, each once
    already = []  # (name, module) of QAT layers of the chosen types: a second to_qat
    for _, _, name, mod in sites:
        if first_name[id(mod)] != name or not isinstance(mod, layer_types):
            continue
        if isinstance(mod, QATLayer):
            summary.skipped[name] = f"already a {type(mod).__name__}"
            already.append((name, mod))
        elif type(mod) not in layer_types:
            base = next(t for t in layer_types if isinstance(mod, t))
            summary.skipped[name] = f"subclass {type(mod).__name__} of nn.{base.__name__} is not converted"
        else:
            linear_names.append((name, mod))

    used = set()
    plan = {}  # id(module) -> (name, config, winning key text or None)
    for name, mod in linear_names:
        skipped_by = [k for k, sel in skips if sel(name, mod)]
        used.update(id(k) for k in skipped_by)
        matched = [(k, c, is_obj) for k, sel, c, is_obj in rules if sel(name, mod)]
        used.update(id(k) for k, _, _ in matched)
        if skipped_by:
            summary.skipped[name] = f"skip list: {_key_text(skipped_by[0])}"
            continue
        winner = None
        for k, c, is_obj in matched:
            if winner is None or is_obj or not winner[2]:
                winner = (k, c, is_obj)
        cfg = winner[1] if winner else global_cfg
        plan[id(mod)] = (name, cfg, _key_text(winner[0]) if winner else None)
    names = [n for n, _ in linear_names]
    for name, mod in already:  # a second to_qat never reconfigures a layer silently
        matched = [(k, c, is_obj) for k, sel, c, is_obj in rules if sel(name, mod)]
        winner = None
        for k, c, is_obj in matched:
            if winner is None or is_obj or not winner[2]:
                winner = (k, c, is_obj)
        used.update(id(k) for k, _, _ in matched)
        want = winner[1] if winner else global_cfg
        have = mod.config
        if getattr(mod, "_switched_off", False):  # disable_quantization's switch is not a config change
            have = dataclasses.replace(have, retrain_enable=True)
        if have != want and not any(sel(name, mod) for _, sel in skips):
            raise ValueError(f"{name}: is already a {type(mod).__name__} with another config ({have.to_dict()}); "
                             f"a second to_qat does not reconfigure it (asked: {want.to_dict()}). Skip it "
                             "(skip=[...]), or call to_float(model) first and convert again")
    for name, mod in linear_names:
        if mod.weight.dtype != torch.float32:
            raise TypeError(f"{name}: weight dtype {mod.weight.dtype}; QAT layers keep float32 master weights: "
                            "call model.float() before to_qat (train with torch.autocast for "
                            f"{mod.weight.dtype} compute)")
    for key, _ in skips:
        if id(key) not in used:
            raise _no_match(key, "skip", names)
    for key, *_ in rules:
        if id(key) not in used:
            raise _no_match(key, "overrides", names)

    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"fold_batchnorm: expected a bool, got {fold_batchnorm!r}")
    folding = None
    if fold_batchnorm:  # in place on the float convs (same Parameters), before they are wrapped
        folding = fold_float_batchnorm(model)

    # validated: now build every replacement, then swap them in
    built = {}
    for _, _, name, mod in sites:
        if id(mod) in plan and id(mod) not in built:
            _, cfg, _ = plan[id(mod)]
            built[id(mod)] = ALL_QAT_CLASSES[type(mod)].from_float(mod, config=cfg)
    for parent, attr, _, mod in sites:
        if id(mod) in built:
            setattr(parent, attr, built[id(mod)])
    for name, cfg, winner in plan.values():
        summary.converted[name] = cfg
        if winner is not None:
            summary.overridden[name] = winner
    summary.batchnorm = folding
    _account_float_weights(model, summary, layer_types)
    watch_qat_params({n: p for n, p in qat_parameters(model).items() if n.rsplit(".", 1)[0] in summary.converted})
    return summary


def _float_reason(mod: nn.Module, layer_types: tuple) -> tuple[str, bool]:
    """(why `mod`, holding parameters, is not converted; whether no QAT layer exists for its type)."""
    family = next((t for t in ALL_QAT_CLASSES if isinstance(mod, t)), None)
    if family is None:
        return f"no QAT layer for {class_label(type(mod))}", True
    if type(mod) is not family:
        return f"subclass {type(mod).__name__} of {class_label(family)} is not converted", False
    return (f"{class_label(family)} is not in layer_types (converted only with "
            f"layer_types=[*QAT_CLASSES, {class_label(family)}])"), False


def _account_float_weights(model: nn.Module, summary: ConversionSummary, layer_types: tuple) -> None:
    """Fill summary.left_float / float_params / weight_params, and warn once about weight-bearing
    layers of types no QAT layer exists for."""
    qat_ids = _qat_param_ids(model)
    weight_params = sum(p.numel() for p in model.parameters() if id(p) not in qat_ids)
    float_params, unconvertible, seen = 0, [], set()
    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        if isinstance(mod, QATLayer) or not list(mod.parameters(recurse=False)):
            seen.update(id(p) for p in mod.parameters(recurse=False))
            continue
        seen.update(id(p) for p in own)
        float_params += sum(p.numel() for p in own)
        if name not in summary.skipped:
            why, unsupported = _float_reason(mod, layer_types)
            summary.left_float[name] = why
            if unsupported and any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
                unconvertible.append((name, mod, sum(p.numel() for p in own)))
        else:
            summary.left_float[name] = summary.skipped[name]
    summary.float_params, summary.weight_params = float_params, weight_params
    if unconvertible:
        shown = ", ".join(f"{class_label(type(m))} ({n})" for n, m, _ in unconvertible[:8])
        more = f", ... ({len(unconvertible)} in all)" if len(unconvertible) > 8 else ""
        share = sum(c for *_, c in unconvertible) / weight_params if weight_params else 0.0
        warnings.warn(f"to_qat: no QAT layer exists for these weight-bearing layers, they stay float: {shown}{more} "
                      f"({100 * share:.1f}% of the model's weight parameters); the summary's left_float lists "
                      "every float layer", UnconvertedLayerWarning, stacklevel=3)


def _qat_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in qat_parameters(model).values()}


def to_float(model: nn.Module) -> list[str]:
    """Replace, in place, every QAT module of `model` by its plain float layer (nn.Linear,
    nn.Conv2d, ...) with its float master weights (shared Parameters). Returns the
    qualified names restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    sites = [s for s in _linear_sites(model) if isinstance(s[3], QATLayer)]
    restored, done = [], {}
    for parent, attr, name, mod in sites:
        if id(mod) not in done:
            done[id(mod)] = mod.to_float()
            restored.append(name)
        setattr(parent, attr, done[id(mod)])
    return restored


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: QAT module (EmbeddingQAT included)} of the model, each layer once."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLayer)}


def quantized_layers(model: nn.Module) -> dict[str, QATModuleMixin]:
    """{qualified name: QAT module} of the enabled layers that quantize their input activation
    (what export, the quant record and the deploy view describe), each layer once."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QATModuleMixin) and m.config.retrain_enable}


def _require_layers(model: nn.Module, what: str) -> dict[str, QATModuleMixin]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = qat_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no QAT layer (LinearQAT, Conv2dQAT, ...); convert it with "
                         "to_qat first")
    return layers


def freeze_calibration(model: nn.Module) -> int:
    """Stop learning the quantization ranges: activation clip bounds and learnable weight
    scales get requires_grad=False (the float weights keep training). Returns the count
    of layers. Build the optimizer after this, or it still holds the frozen tensors."""
    layers = _require_layers(model, "freeze_calibration")
    for m in layers.values():
        for p in _range_params(m):
            p.requires_grad_(False)
    return len(layers)


def unfreeze_calibration(model: nn.Module) -> int:
    """Undo freeze_calibration (clip_min stays frozen where the config has fixed_min)."""
    layers = _require_layers(model, "unfreeze_calibration")
    for m in layers.values():
        fixed_min = m.config.retrain_data_config.fixed_min
        for p in _range_params(m):
            p.requires_grad_(not (fixed_min and p is m.acts_clip_min))
    return len(layers)


def _range_params(m: nn.Module):
    params = [m.acts_clip_max, m.acts_clip_min] if isinstance(m, QATModuleMixin) else []
    if isinstance(m.wts_scales, nn.Parameter):
        params.append(m.wts_scales)
    return params


def disable_quantization(model: nn.Module) -> int:
    """Make every QAT layer compute its plain float op (retrain_enable=False) while
    keeping all its quantization state; enable_quantization restores exactly the layers
    disabled here. Returns the count of layers switched off."""
    count = 0
    for m in _require_layers(model, "disable_quantization").values():
        count += m.switch_off()
    return count


def enable_quantization(model: nn.Module) -> int:
    count = 0
    for m in _require_layers(model, "enable_quantization").values():
        count += m.switch_on()
    return count


def _call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(model: nn.Module, data: Iterable, *, num_batches: int | None = None,
              forward: Callable | None = None, progress: bool = True) -> int:
    """Calibrate every QAT layer of `model` in one call (eval mode, no grad, inside
    `amct_pytorch.calibrating()`), with a tqdm progress bar.

    data: an iterable of batches (e.g. a DataLoader); a batch is passed as model(**batch)
        for a dict, model(*batch) for a tuple/list, else model(batch), unless `forward`
        (a callable forward(model, batch)) is given.
    num_batches: how many batches to run; default: the largest `batch_num` among the
        layers still calibrating (at least 1). Running more just repeats no-op updates.
    The model's train/eval modes are restored afterwards. Returns the batches run.
    Raises ValueError if the data ran out before every layer the forward called finished
    calibrating; layers the forward never called are named in a warning. A tuple batch the
    model does not take as positional arguments is a TypeError pointing to `forward=`.
    """
    layers = _require_layers(model, "calibrate")
    if num_batches is None:
        pending = [m.config.retrain_data_config.batch_num for m in layers.values()
                   if m.config.retrain_enable and not m.is_calibrated]
        num_batches = max(pending, default=1)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: expected an int >= 1, got {num_batches!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward: expected a callable forward(model, batch), got {type(forward).__name__}")
    run = forward or _call
    modes = {m: m.training for m in model.modules()}
    model.eval()
    done = 0
    reached: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: reached.add(name))
             for name, m in layers.items()]
    try:
        bar = _progress(total=num_batches, desc="calibrating", unit="batch", disable=not progress)
        with bar, torch.no_grad(), calibrating():
            for batch in data:
                if done == 0 and forward is None:
                    _first_call(model, batch)
                else:
                    run(model, batch)
                done += 1
                bar.update(1)
                if done >= num_batches:
                    break
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    missing = [n for n, m in layers.items() if m.config.retrain_enable and not m.is_calibrated]
    never = [n for n in missing if n not in reached]
    short = [n for n in missing if n in reached]
    if never and done:
        warnings.warn(f"calibrate: {len(never)} QAT layer(s) were never called by the model's forward on these "
                      f"{done} batch(es), so they stay uncalibrated: {', '.join(never[:8])}"
                      f"{', ...' if len(never) > 8 else ''}. Calibrate them with data (or a forward=) that reaches "
                      "them, or skip them in to_qat; export_onnx needs only the layers its forward uses",
                      UserWarning, stacklevel=2)
    if short or (missing and not done):
        first = (short or missing)[0]
        raise ValueError(f"data: ran out after {done} batch(es) but {len(short or missing)} layer(s) still need "
                         f"calibration batches (e.g. {first}, batch_num="
                         f"{layers[first].config.retrain_data_config.batch_num})")
    return done


def _first_call(model, batch):
    """The first batch: a tuple/list batch the model does not take as positional arguments points to `forward=`."""
    try:
        _call(model, batch)
    except TypeError as err:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise
        raise TypeError(f"calibrate: model(*batch) failed for a batch of {len(batch)} items "
                        f"({type(batch).__name__}): {err}. A DataLoader of (inputs, labels) needs "
                        "forward=lambda model, batch: model(batch[0])") from err


def _progress(**kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional; calibration is not
        import contextlib

        class _Silent(contextlib.nullcontext):
            def update(self, n=1):
                pass
        return _Silent()
    return tqdm(**kwargs)
