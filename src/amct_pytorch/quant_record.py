"""Quant-factor record: every QAT module's scales, offsets, bit widths and clip bounds as JSON.

Floats are written with Python's shortest round-trip repr of the float32 value, so a record
read back gives the same float32 bits. Schema: docs/export.md, "Quant record and deploy view". A layer whose input
is quantized on the fly (`retrain_data_config.dynamic_act`) has no activation factors: its record
says `"dynamic_act"` and `"act_block"` and holds null clip/scale/offset; a llama.cpp block-format
layer adds `"gguf_type"` (its `scale_w` are the fp16-stored block scales d, signed for Q4_0).
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

from .convert import quantized_layers
from .functional import act_qparams, int_range
from .nn.module.quantization.qdq import module_qparams

RECORD_FORMAT = "amct-qat quant record"
RECORD_VERSION = 1
_QUANT_KEYS = ("act_bits", "weight_bits", "channel_wise", "weights_retrain_algo", "clip_max_d", "clip_min_d",
               "scale_d", "offset_d", "scale_w", "offset_w")
_ACT_KEYS = ("clip_max_d", "clip_min_d", "scale_d", "offset_d")  # null for a dynamic activation


def _format_record(m) -> dict:
    """The keys a layer with a dynamic activation or a llama.cpp block format adds (none otherwise)."""
    data, wcfg = m.config.retrain_data_config, m.config.retrain_weight_config
    extra = {}
    if data.dynamic_act is not None:
        extra.update(dynamic_act=data.dynamic_act, act_block=m.act_block_spec().block)
    if wcfg.gguf_type is not None:
        extra["gguf_type"] = wcfg.gguf_type
    return extra


def _shape_record(m) -> dict:
    """The layer's identity: in/out features for a linear (the first release's keys; group-wise
    weight scales add `group_size`), for transformers' Conv1D its class, nx and nf, and for a conv its class, channels, kernel size and groups."""
    if hasattr(m, "nf") and hasattr(m, "nx"):  # transformers' Conv1D: weight (nx, nf)
        return {"layer_type": type(m).__name__, "nx": m.nx, "nf": m.nf}
    if hasattr(m, "in_features"):
        group = m.config.retrain_weight_config.group_size
        return {"in_features": m.in_features, "out_features": m.out_features,
                **({} if group is None else {"group_size": group})}
    return {"layer_type": type(m).__name__, "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "groups": m.groups}


def _layer_record(m) -> dict:
    q = module_qparams(m)
    extra = _format_record(m)
    dynamic = "dynamic_act" in extra
    return {
        **_shape_record(m),
        **extra,
        "act_bits": q.act_bits,
        "weight_bits": q.weight_bits,
        "channel_wise": q.channel_wise,
        "weights_retrain_algo": m.config.retrain_weight_config.weights_retrain_algo,
        "clip_max_d": None if dynamic else m.acts_clip_max.detach().item(),
        "clip_min_d": None if dynamic else m.acts_clip_min.detach().item(),
        "scale_d": None if dynamic else float(q.act_scale),
        "offset_d": None if dynamic else int(q.act_offset),
        "scale_w": [float(v) for v in q.weight_scale],
        "offset_w": [0] * q.weight_scale.numel(),
    }


def save_quant_record(model: nn.Module, path) -> dict:
    """Write the record of every calibrated QAT module in `model` to `path` (JSON); returns it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    layers = list(quantized_layers(model).items())
    if not layers:
        raise ValueError("model: holds no QAT module (LinearQAT, Conv2dQAT, ...) with retrain_enable=True, so "
                         "there is nothing to record")
    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION,
              "layers": {name: _layer_record(m) for name, m in layers}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return record


def _read(path) -> dict:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except OSError as err:
        raise ValueError(f"quant record: cannot read {os.fspath(path)!r}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"quant record: {os.fspath(path)!r} is not valid JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"quant record: {os.fspath(path)!r} is not an amct-qat quant record "
                         f"(expected \"format\": {RECORD_FORMAT!r})")
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"quant record: version {record.get('version')!r} is not supported (expected {RECORD_VERSION})")
    if not isinstance(record.get("layers"), dict):
        raise ValueError("quant record: 'layers' must be an object mapping module names to layer records")
    return record


def _number(value, where, *, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{where}: expected {kind}, got {value!r}")
    return value


def _check_layer(name, m, rec) -> dict:
    """Validate one layer record against module `m`; returns the tensors to load."""
    where = f"quant record layer {name!r}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
    shape, extra = _shape_record(m), _format_record(m)
    keys = (*shape, *extra, *_QUANT_KEYS)
    missing = [k for k in keys if k not in rec]
    unknown = [k for k in rec if k not in keys]
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}; expected keys {list(keys)} "
                         "(a record's dynamic_act / act_block / gguf_type keys must match the layer's config)")
    data, wcfg = m.config.retrain_data_config, m.config.retrain_weight_config
    expected = {**shape, **extra, "act_bits": data.num_bits,
                "weight_bits": wcfg.num_bits, "channel_wise": wcfg.channel_wise,
                "weights_retrain_algo": wcfg.weights_retrain_algo}
    for key, want in expected.items():
        if rec[key] != want or type(rec[key]) is not type(want):
            raise ValueError(f"{where}.{key}: the record has {rec[key]!r}, but the model's layer has {want!r}")
    if "dynamic_act" in extra:
        set_keys = [k for k in _ACT_KEYS if rec[k] is not None]
        if set_keys:
            raise ValueError(f"{where}: {set_keys} must be null: the layer quantizes its input on the fly "
                             f"(dynamic_act={data.dynamic_act!r}), it has no static activation factors")
        return _weight_state(where, m, rec, wcfg)
    clip_max = torch.tensor(_number(rec["clip_max_d"], f"{where}.clip_max_d"), dtype=torch.float32)
    clip_min = torch.tensor(_number(rec["clip_min_d"], f"{where}.clip_min_d"), dtype=torch.float32)
    if data.fixed_min and float(clip_min) != 0.0:
        raise ValueError(f"{where}.clip_min_d: the layer has fixed_min=True, so it must be 0, got {rec['clip_min_d']!r}")
    scale_d, offset_d = act_qparams(clip_max, clip_min, data.num_bits)
    got = (_number(rec["scale_d"], f"{where}.scale_d"), _number(rec["offset_d"], f"{where}.offset_d", integer=True))
    if got != (float(scale_d), int(offset_d)):
        raise ValueError(f"{where}: scale_d={got[0]!r}, offset_d={got[1]!r} do not follow from clip_max_d/clip_min_d "
                         f"(expected {float(scale_d)!r}, {int(offset_d)!r})")
    qmin, qmax = int_range(data.num_bits)
    if not qmin <= int(offset_d) <= qmax:
        raise ValueError(f"{where}.offset_d: {int(offset_d)} is outside [{qmin}, {qmax}]")
    state = {"acts_clip_max": clip_max, "acts_clip_min": clip_min, "acts_scale": scale_d.reshape(1),
             "acts_offset": offset_d.reshape(1).to(torch.int8), "calib_done": torch.tensor(True)}
    return {**state, **_weight_state(where, m, rec, wcfg)}


def _weight_state(where, m, rec, wcfg) -> dict:
    n_scales = m.n_weight_scales()
    scale_w, offset_w = rec["scale_w"], rec["offset_w"]
    for key, values in (("scale_w", scale_w), ("offset_w", offset_w)):
        if not isinstance(values, list) or len(values) != n_scales:
            raise ValueError(f"{where}.{key}: expected a list of {n_scales} values for this layer, got "
                             f"{len(values) if isinstance(values, list) else type(values).__name__}")
    for i, v in enumerate(scale_w):
        if _number(v, f"{where}.scale_w[{i}]") == 0:  # learnable (ULQ) scales may have turned negative
            raise ValueError(f"{where}.scale_w[{i}]: expected a nonzero number, got {v!r}")
    if any(_number(v, f"{where}.offset_w", integer=True) != 0 for v in offset_w):
        raise ValueError(f"{where}.offset_w: weights are quantized symmetrically, so every offset must be 0")
    state = {"wts_scales": torch.tensor(scale_w, dtype=torch.float32),
             "wts_offsets": torch.zeros(n_scales, dtype=torch.int8)}
    if wcfg.learnable_scale:
        state["wts_scale_ready"] = torch.tensor(True)
    return state


def load_quant_record(model: nn.Module, path) -> None:
    """Load a record written by `save_quant_record` into `model`'s QAT layers.

    The layer names, shapes, bit widths and weight algorithm must match; the clip bounds, the
    scale/offset buffers and (for `ulq_quantize`) the learnable weight scales are set and the
    layers count as calibrated. Everything is checked before anything changes. ARQ layers
    recompute their weight scale from the weight on every forward, so their `scale_w` is loaded
    into the `wts_scales` buffer only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    record = _read(path)
    layers = dict(list(quantized_layers(model).items()))
    missing = sorted(set(layers) - set(record["layers"]))
    unexpected = sorted(set(record["layers"]) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"quant record {os.fspath(path)!r} does not match the model's QAT layers: missing from the "
            f"record {missing}, in the record but not in the model {unexpected}"
        )
    states = {name: _check_layer(name, layers[name], rec) for name, rec in record["layers"].items()}
    for name, state in states.items():
        m = layers[name]
        state = {k: v.to(getattr(m, k).device) for k, v in state.items()}
        with torch.no_grad():
            m.load_state_dict(state, strict=False)
