"""Helpers for the training stack (see docs/training_stack.md).

- `migrate_optimizer_state`: optimizer state saved with 0-d clip bounds (releases before the
  clip bounds became shape (1,)) made to fit the current parameters, in one call.
"""
from __future__ import annotations

import torch


def migrate_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Reshape per-parameter optimizer state (Adam's exp_avg, exp_avg_sq, momentum buffers, ...)
    that holds as many elements as its parameter but another shape (a 0-d clip bound's state
    from an earlier release) to the parameter's shape. Call it after `optimizer.load_state_dict`.
    Returns the number of tensors reshaped."""
    count = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and key != "step" and value.shape != p.shape
                        and value.numel() == p.numel()):
                    state[key] = value.reshape(p.shape)
                    count += 1
    return count


# ---- Hugging Face save_pretrained / from_pretrained ---------------------------------------
AMCT_CONFIG_NAME = "amct_qat_config.json"


def _hf():
    """amct_pytorch.hf (registers the "amct_qat" quantizer with transformers), or None without
    transformers."""
    try:
        from . import hf
    except ImportError:
        return None
    return hf


def save_pretrained(model, path, **kwargs) -> None:
    """model.save_pretrained(path, **kwargs) (its weights file holds every QAT key) with a
    `quantization_config` in config.json naming each QAT layer and its config, so that a plain
    `AutoModel.from_pretrained(path)` after `import amct_pytorch.hf` rebuilds the QAT model;
    also writes the same layers to amct_qat_config.json (read by `from_pretrained` for folders
    saved before the quantization_config existed). model.config is left as it was."""
    import json
    import os

    from .convert import qat_layers

    layers = {name: m.config.to_dict() for name, m in qat_layers(model).items()}
    hf = _hf()
    config = getattr(model, "config", None)
    if hf is None or config is None or not layers:
        model.save_pretrained(path, **kwargs)
    else:
        missing = object()
        previous = getattr(config, "quantization_config", missing)
        config.quantization_config = hf.AmctQATConfig(layers=layers)
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
    import json
    import os

    from .convert import _ALL_CLASSES, to_qat

    hf = _hf()
    model = model_cls.from_pretrained(path, *args, **kwargs)
    quant_config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if hf is not None and getattr(quant_config, "quant_method", None) == hf.QUANT_METHOD:
        return model  # converted and loaded by the registered quantizer
    with open(os.path.join(path, AMCT_CONFIG_NAME)) as f:
        saved = json.load(f)
    layers = saved["layers"]
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"{path}: {AMCT_CONFIG_NAME} names layers the model does not have, e.g. {missing[0]!r}")
    convertible = tuple(_ALL_CLASSES)  # EmbeddingQAT layers too
    skip = [m for n, m in modules.items() if type(m) in convertible and n not in layers]
    to_qat(model, None, overrides={modules[n]: cfg for n, cfg in layers.items()}, skip=skip,
           layer_types=convertible)
    return _load_saved_state(model, path)


def _load_saved_state(model, path):
    import os

    state = {}
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if files:
        from safetensors.torch import load_file
        for f in files:
            state.update(load_file(os.path.join(path, f)))
    else:
        for f in [f for f in os.listdir(path) if f.endswith(".bin")]:
            state.update(__import__("torch").load(os.path.join(path, f), weights_only=True))
    result = model.load_state_dict(state, strict=False)
    from .convert import qat_layers
    qat_keys = [k for k in result.missing_keys
                if any(k.startswith(n + ".") for n in qat_layers(model))]
    if qat_keys:
        raise ValueError(f"{path}: the saved weights lack QAT state, e.g. {qat_keys[0]!r}")
    return model
