"""transformers integration: a QAT model saved with `amct_pytorch.save_pretrained` loads back
with a plain `AutoModel.from_pretrained(path)` (QAT layers, learned clip bounds, scales and
calibration state) once this module is imported:

    import amct_pytorch.hf  # registers the "amct_qat" quantization method with transformers
    model = AutoModel.from_pretrained(path)

Importing it imports transformers (an optional dependency; `import amct_pytorch` alone does not).
`amct_pytorch.save_pretrained` and `amct_pytorch.from_pretrained` (defined here) import it on first use.

How: `save_pretrained` writes `"quantization_config": {"quant_method": "amct_qat", "format": 1,
"layers": {name: QAT config}}` into config.json. transformers builds the float model on the meta
device and hands it to `AmctQATQuantizer`, which converts exactly the listed layers with
`amct_pytorch.to_qat` (each with its saved config) before the weights are read, so every QAT
tensor of the checkpoint loads as an ordinary parameter or buffer.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import transformers

if int(transformers.__version__.split(".")[0]) < 5:
    # transformers 4 builds and loads quantized models differently (not tested); the two-call
    # amct_pytorch.save_pretrained / from_pretrained path works there without this module
    raise ImportError(f"amct_pytorch.hf needs transformers >= 5, found {transformers.__version__}; use "
                      "amct_pytorch.save_pretrained / amct_pytorch.from_pretrained(AutoModel, path)")

from transformers.quantizers import HfQuantizer  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING  # noqa: E402
from transformers.quantizers.auto import register_quantization_config, register_quantizer  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from .config import parse_config  # noqa: E402
from .convert import ALL_QAT_CLASSES, class_label, qat_layers, to_qat  # noqa: E402
from .nn.module.quantization.base import QATModuleMixin  # noqa: E402

QUANT_METHOD = "amct_qat"
FORMAT = 1
_FLOAT_KEYS = ("weight", "bias")  # state a QAT layer shares with its float layer


class AmctQATConfig(QuantizationConfigMixin):
    """The `quantization_config` of a saved QAT model: `layers` maps each QAT layer's qualified
    name to its QAT config dict (the content of amct_qat_config.json). Every config is parsed
    here, so a damaged entry fails before any model is built."""

    def __init__(self, layers: dict[str, dict] | None = None, format: int = FORMAT, **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"quantization_config ({QUANT_METHOD}): unknown keys {sorted(kwargs)}")
        if format != FORMAT:
            raise ValueError(f"quantization_config ({QUANT_METHOD}): format {format!r} is not supported by this "
                             f"amct_pytorch (it reads format {FORMAT}); upgrade amct_pytorch")
        if layers is None:
            layers = {}
        if not isinstance(layers, dict) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"quantization_config ({QUANT_METHOD}).layers: expected a dict {{layer name: config}}, "
                            f"got {type(layers).__name__}")
        for name, cfg in layers.items():
            try:
                parse_config(cfg)
            except (TypeError, ValueError) as err:
                raise type(err)(f"quantization_config ({QUANT_METHOD}).layers[{name!r}]: {err}") from None
        self.quant_method = QUANT_METHOD
        self.format = format
        self.layers = {n: dict(c) for n, c in layers.items()}


class AmctQATQuantizer(HfQuantizer):
    """Rebuilds the QAT layers named by an `AmctQATConfig` before transformers loads the weights.
    Loading only (the checkpoint must hold the QAT state): `requires_calibration` makes
    transformers refuse `quantization_config=AmctQATConfig(...)` on a float checkpoint."""

    requires_calibration = True

    def update_dtype(self, dtype):
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"{QUANT_METHOD}: QAT layers keep float32 master weights; load with the default "
                             f"dtype (float32), not {dtype} (train with autocast / Trainer(bf16=True) instead)")
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = _resolve_layers(model, self.quantization_config.layers)
        stored = _checkpoint_shapes(checkpoint_files)
        modules = dict(model.named_modules())
        skip = [m for n, m in modules.items() if type(m) in ALL_QAT_CLASSES and n not in layers]
        # model is a meta-device skeleton here: conversion only builds (meta) QAT tensors
        to_qat(model, None, overrides={modules[n]: cfg for n, cfg in layers.items()}, skip=skip,
               layer_types=tuple(ALL_QAT_CLASSES))
        if stored is not None:
            _check_and_size_qat_state(model, layers, stored)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers assigned each tensor with setattr: refresh what load_state_dict would have
        for m in qat_layers(model).values():
            m.sync_host_state()
            if isinstance(m, QATModuleMixin):
                m.acts_clip_min.requires_grad_(not m.config.retrain_data_config.fixed_min)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _prefix_variants(model: nn.Module, name: str) -> list[str]:
    """`name` as saved, then with the base model's prefix added or removed (a BertModel's layers
    inside a BertForSequenceClassification are "bert.<name>", and the other way round)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [name]
    if prefix:
        names.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
    return names


def _resolve_layers(model: nn.Module, saved: dict[str, dict]) -> dict[str, dict]:
    """{name in `model`: config} for the saved layer names; every name must be a convertible layer."""
    modules = dict(model.named_modules())
    resolved, missing, wrong = {}, [], []
    for name, cfg in saved.items():
        found = next((n for n in _prefix_variants(model, name) if n in modules), None)
        if found is None:
            missing.append(name)
        elif type(modules[found]) not in ALL_QAT_CLASSES:
            wrong.append(f"{name!r} is a {type(modules[found]).__name__}")
        else:
            resolved[found] = cfg
    if missing:
        raise ValueError(f"{QUANT_METHOD}: the quantization_config lists {len(missing)} layer(s) the model does not "
                         f"have, e.g. {missing[0]!r}; was it saved from another architecture?")
    if wrong:
        allowed = ", ".join(class_label(t) for t in ALL_QAT_CLASSES)
        raise ValueError(f"{QUANT_METHOD}: the quantization_config lists layer(s) that cannot be converted: "
                         f"{'; '.join(wrong)} (convertible: exact {allowed})")
    return resolved


def _checkpoint_shapes(files) -> dict[str, tuple] | None:
    """{key: shape} over the checkpoint files (safetensors headers, or .bin loaded onto meta)."""
    if not files:
        return None
    shapes = {}
    for f in files:
        f = os.fspath(f)
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as sf:
                shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
        elif f.endswith((".bin", ".pt", ".pth")):
            state = torch.load(f, map_location="meta", weights_only=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
        else:
            return None  # a format we cannot list (gguf, ...): leave the checks to transformers
    return shapes


def _check_and_size_qat_state(model: nn.Module, layers: dict[str, dict], stored: dict[str, tuple]) -> None:
    """Every QAT tensor must be in the checkpoint (else transformers would initialise it at
    random, an uncalibrated layer passing for a trained one). A calibration-sample buffer is
    resized to the saved length (it grows while calibrating)."""
    absent = []
    for name in layers:
        module = model.get_submodule(name)
        for key in module.state_dict(keep_vars=True):
            if key in _FLOAT_KEYS:
                continue
            saved = next((stored[k] for k in _prefix_variants(model, f"{name}.{key}") if k in stored), None)
            if saved is None:
                absent.append(f"{name}.{key}")
            elif key == "calib_samples":
                module.resize_calibration_samples(saved[0] if saved else 0)
    if absent:
        raise ValueError(f"{QUANT_METHOD}: the checkpoint lacks the QAT state of {len(absent)} tensor(s), e.g. "
                         f"{absent[0]!r}; it was not saved by amct_pytorch.save_pretrained from this model")


# ---- save_pretrained / from_pretrained -------------------------------------------------------
AMCT_CONFIG_NAME = "amct_qat_config.json"


def save_pretrained(model, path, **kwargs) -> None:
    """model.save_pretrained(path, **kwargs) (its weights file holds every QAT key) with a
    `quantization_config` in config.json naming each QAT layer and its config, so that a plain
    `AutoModel.from_pretrained(path)` after `import amct_pytorch.hf` rebuilds the QAT model;
    also writes the same layers to amct_qat_config.json (read by `from_pretrained` for folders
    saved before the quantization_config existed). model.config is left as it was."""
    layers = {name: m.config.to_dict() for name, m in qat_layers(model).items()}
    config = getattr(model, "config", None)
    if config is None or not layers:
        model.save_pretrained(path, **kwargs)
    else:
        missing = object()
        previous = getattr(config, "quantization_config", missing)
        config.quantization_config = AmctQATConfig(layers=layers)
        try:
            model.save_pretrained(path, **kwargs)
        finally:
            if previous is missing:
                del config.quantization_config
            else:
                config.quantization_config = previous
    with open(os.path.join(path, AMCT_CONFIG_NAME), "w") as f:
        json.dump({"format": 1, "layers": layers}, f, indent=1)


def from_pretrained(model_cls, path, *args, **kwargs):
    """`model_cls.from_pretrained(path, ...)` (e.g. transformers.AutoModel) with its QAT layers and
    their learned state. A folder whose config.json has the amct_qat quantization_config (saved
    by this release) loads in that one call; for an older folder it loads the float model
    (transformers drops the QAT keys it does not know), converts the layers listed in
    amct_qat_config.json with their saved configs, then loads the saved state dict again, QAT
    keys included (every key must be used)."""
    model = model_cls.from_pretrained(path, *args, **kwargs)
    quant_config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if getattr(quant_config, "quant_method", None) == QUANT_METHOD:
        return model  # converted and loaded by the registered quantizer
    with open(os.path.join(path, AMCT_CONFIG_NAME)) as f:
        saved = json.load(f)
    layers = saved["layers"]
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"{path}: {AMCT_CONFIG_NAME} names layers the model does not have, e.g. {missing[0]!r}")
    convertible = tuple(ALL_QAT_CLASSES)  # EmbeddingQAT layers too
    skip = [m for n, m in modules.items() if type(m) in convertible and n not in layers]
    to_qat(model, None, overrides={modules[n]: cfg for n, cfg in layers.items()}, skip=skip,
           layer_types=convertible)
    return _load_saved_state(model, path)


def _load_saved_state(model, path):
    state = {}
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if files:
        from safetensors.torch import load_file  # comes with transformers
        for f in files:
            state.update(load_file(os.path.join(path, f)))
    else:
        for f in [f for f in os.listdir(path) if f.endswith(".bin")]:
            state.update(torch.load(os.path.join(path, f), weights_only=True))
    result = model.load_state_dict(state, strict=False)
    qat_keys = [k for k in result.missing_keys
                if any(k.startswith(n + ".") for n in qat_layers(model))]
    if qat_keys:
        raise ValueError(f"{path}: the saved weights lack QAT state, e.g. {qat_keys[0]!r}")
    return model


def _register() -> None:
    # idempotent: importlib.reload(amct_pytorch.hf) must not raise "already registered"
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AmctQATConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AmctQATQuantizer)


_register()

