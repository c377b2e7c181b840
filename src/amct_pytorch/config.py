"""Config layer: parse the AMCT config dict into validated, frozen dataclasses.

Every error names the key path, the offending value and what is allowed. The caller's
dict is never mutated (we only read it).
"""
from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DST_TYPES = {"INT8": 8, "INT4": 4}
WEIGHT_ALGOS = {"arq_retrain": "arq_retrain", "ulq_quantize": "ulq_quantize", "ulq_retrain": "ulq_quantize"}
IFMR_SEARCHES = ("exact", "histogram")
# Extension (issues 19, 20): activations quantized on the fly per block of K, as a runtime's kernel does
# (blockwise.dynamic_act_spec maps each name to its numerics)
DYNAMIC_ACTS = ("llama.cpp-x86", "llama.cpp-neon", "llama.cpp-reference", "ort-matmulnbits-level4")
LLAMA_CPP_ACTS = DYNAMIC_ACTS[:3]
# Extension (issue 20): llama.cpp's block-32 weight formats -> the integer type their codes fit
GGUF_TYPES = {"Q8_0": "INT8", "Q4_0": "INT4"}
GGUF_BLOCK = 32
CLIP_LIMIT = 1e38  # |clip| bound: keeps clip_max - clip_min finite in float32
GRID_EPS = 1.1920929e-07  # a grid step below this is degenerate (functional.act_qparams)


@dataclass(frozen=True)
class DataQuantConfig:
    """Activation (input) quantization: IFMR calibration, then ULQ with learnable clips."""

    dst_type: str = "INT8"
    batch_num: int = 1
    fixed_min: bool = False
    clip_min: float | None = None
    clip_max: float | None = None
    # Extension: "exact" is the spec's search over every calibration value; "histogram"
    # streams a fixed-size histogram (memory independent of batch_num, result within
    # one candidate step of the exact search).
    ifmr_search: str = "exact"
    # Extension: None (IFMR + ULQ, the spec) or one of DYNAMIC_ACTS: symmetric int8 per block of the
    # input's last dim, scale from the block's own max|x| at every call (nothing to calibrate or learn)
    dynamic_act: str | None = None

    @property
    def num_bits(self) -> int:
        return DST_TYPES[self.dst_type]

    @property
    def needs_calibration(self) -> bool:
        if self.dynamic_act is not None:
            return False
        has_min = self.clip_min is not None or self.fixed_min
        return self.clip_max is None or not has_min


@dataclass(frozen=True)
class WeightQuantConfig:
    dst_type: str = "INT8"
    weights_retrain_algo: str = "arq_retrain"
    channel_wise: bool = False
    # Extension: one scale per output channel and group of `group_size` consecutive input
    # features (LinearQAT only; needs channel_wise=True; a power of two >= 16 dividing in_features)
    group_size: int | None = None
    # Extension: a learnable (ULQ) scale's first value: "arq" (the spec: max|w| / qmax) or "mse"
    # (the clipped step r * ARQ, r in [0.5, 1], minimising the weight's squared rounding error)
    scale_init: str = "arq"
    # Extension: None, or "Q8_0" / "Q4_0": llama.cpp's block formats (blocks of 32 along K, one fp16 scale
    # each, the format's code range; implies channel_wise=True, group_size=32 and the dst_type)
    gguf_type: str | None = None
    # Extension (issue 19): the weight grid the codes live on. "full": every INT8 code (the seed's
    # numerics); "pair_cap": INT8 codes whose same-sign adjacent pairs along the kernel's reduction
    # order have |q_a| + |q_b| <= 128 (exact in ONNX Runtime's u8s8 kernel on every CPU); "int7":
    # codes in [-64, 63]. LinearQAT and Conv1d/2d/3dQAT only; see docs/numerics.md
    kernel_grid: str = "full"
    # the straight-through weight gradient of a kernel grid: "identity" (as every other weight
    # quantizer) or "projected" (the grid's Jacobian: inside a capped pair the common mode is cut)
    kernel_grid_grad: str = "identity"

    @property
    def num_bits(self) -> int:
        return DST_TYPES[self.dst_type]

    @property
    def block_format(self) -> str | None:
        """blockwise's name of the GGUF format ("q8_0" / "q4_0"), or None."""
        return None if self.gguf_type is None else self.gguf_type.lower()

    @property
    def grid_bits(self) -> int:
        """The bits of the weight's code range: 7 on the int7 kernel grid, else num_bits."""
        return 7 if self.kernel_grid == "int7" else self.num_bits

    @property
    def learnable_scale(self) -> bool:
        return self.weights_retrain_algo == "ulq_quantize"


@dataclass(frozen=True)
class QATConfig:
    retrain_enable: bool = True
    retrain_data_config: DataQuantConfig = field(default_factory=DataQuantConfig)
    retrain_weight_config: WeightQuantConfig = field(default_factory=WeightQuantConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict that `parse_config` accepts back."""
        data = {k: v for k, v in vars(self.retrain_data_config).items() if v is not None}
        return {
            "retrain_enable": self.retrain_enable,
            "retrain_data_config": data,
            # the defaults of extensions (group_size None, scale_init "arq", gguf_type None) are left out
            "retrain_weight_config": {k: v for k, v in vars(self.retrain_weight_config).items()
                                      if v is not None and _WEIGHT_DEFAULTS.get(k, object()) != v},
        }


_TOP_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
_DATA_KEYS = ("dst_type", "batch_num", "fixed_min", "clip_min", "clip_max", "ifmr_search", "dynamic_act")
_WEIGHT_KEYS = ("dst_type", "weights_retrain_algo", "channel_wise", "group_size", "scale_init", "gguf_type",
                "kernel_grid", "kernel_grid_grad")
SCALE_INITS = ("arq", "mse", "pair_mse")
KERNEL_GRIDS = ("full", "pair_cap", "int7")
KERNEL_GRID_GRADS = ("identity", "projected")
# extensions left out of to_dict() at their defaults (AMCT's keys only)
_WEIGHT_DEFAULTS = {"scale_init": "arq", "kernel_grid": "full", "kernel_grid_grad": "identity"}


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _check_keys(section: Mapping, allowed: tuple[str, ...], path: str) -> None:
    for key in section:
        where = f"{path}.{key}" if path else repr(key)
        if not isinstance(key, str):
            raise TypeError(f"config key {where}: keys must be str, got {_describe(key)}")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            name = f"{path}.{key}" if path else key
            raise ValueError(f"unknown config key '{name}'.{hint} Allowed keys: {', '.join(allowed)}")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{path}: expected a bool (True or False), got {_describe(value)}")
    return value


def _choice(value: Any, allowed, path: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{path}: expected one of {sorted(allowed)} as a str, got {_describe(value)}")
    if value not in allowed:
        raise ValueError(f"{path}: got {value!r}; allowed values: {', '.join(sorted(allowed))}")
    return value


def _clip(value: Any, path: str, sign: int) -> float | None:
    if value is None:
        return None
    rule = f"a real number in (0, {CLIP_LIMIT:g}]" if sign > 0 else f"a real number in [-{CLIP_LIMIT:g}, 0)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{path}: expected {rule} (int or float), got {_describe(value)}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"{path}: expected {rule}, got {_describe(value)}") from None
    if not math.isfinite(as_float) or as_float * sign <= 0 or abs(as_float) > CLIP_LIMIT:
        raise ValueError(f"{path}: expected {rule}, got {as_float!r}")
    return as_float


def _section(raw: Any, path: str) -> Mapping:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"{path}: expected a dict, got {_describe(raw)}")
    return raw


def _parse_data(raw: Any) -> DataQuantConfig:
    path = "retrain_data_config"
    sec = _section(raw, path)
    _check_keys(sec, _DATA_KEYS, path)
    batch_num = sec.get("batch_num", 1)
    if isinstance(batch_num, bool) or not isinstance(batch_num, int):
        raise TypeError(f"{path}.batch_num: expected an int >= 1, got {_describe(batch_num)}")
    if batch_num < 1:
        raise ValueError(f"{path}.batch_num: expected an int >= 1, got {batch_num!r}")
    cfg = DataQuantConfig(
        dst_type=_choice(sec.get("dst_type", "INT8"), DST_TYPES, f"{path}.dst_type"),
        batch_num=batch_num,
        fixed_min=_bool(sec.get("fixed_min", False), f"{path}.fixed_min"),
        clip_min=_clip(sec.get("clip_min"), f"{path}.clip_min", -1),
        clip_max=_clip(sec.get("clip_max"), f"{path}.clip_max", +1),
        ifmr_search=_choice(sec.get("ifmr_search", "exact"), IFMR_SEARCHES, f"{path}.ifmr_search"),
        dynamic_act=None if sec.get("dynamic_act") is None else _choice(sec["dynamic_act"], DYNAMIC_ACTS,
                                                                         f"{path}.dynamic_act"),
    )
    if cfg.dynamic_act is not None:
        given = [k for k in ("clip_min", "clip_max") if sec.get(k) is not None]
        given += ["fixed_min"] if cfg.fixed_min else []
        given += [] if cfg.dst_type == "INT8" else [f"dst_type={cfg.dst_type!r}"]
        if given:
            raise ValueError(
                f"{path}.dynamic_act={cfg.dynamic_act!r}: the activation is quantized to symmetric INT8 per block "
                f"with a scale from each block's own max|x|, so {', '.join(given)} cannot apply; leave them out"
            )
    if cfg.fixed_min and cfg.clip_min is not None:
        raise ValueError(
            f"{path}: fixed_min=True pins clip_min at 0, so clip_min={cfg.clip_min!r} contradicts it; "
            "give one or the other"
        )
    if cfg.clip_max is not None and (cfg.clip_min is not None or cfg.fixed_min):
        lo = cfg.clip_min or 0.0
        step = (cfg.clip_max - lo) / (2**cfg.num_bits - 1)
        if step < GRID_EPS:
            raise ValueError(
                f"{path}.clip_max/clip_min: the bounds [{lo!r}, {cfg.clip_max!r}] give a {cfg.dst_type} grid step "
                f"of {step:.3g}, below {GRID_EPS:.3g} (a degenerate grid); widen them"
            )
    return cfg


def _parse_weight(raw: Any) -> WeightQuantConfig:
    path = "retrain_weight_config"
    sec = _section(raw, path)
    _check_keys(sec, _WEIGHT_KEYS, path)
    algo = _choice(sec.get("weights_retrain_algo", "arq_retrain"), WEIGHT_ALGOS, f"{path}.weights_retrain_algo")
    gguf_type = sec.get("gguf_type")
    if gguf_type is not None:
        gguf_type = _choice(gguf_type, GGUF_TYPES, f"{path}.gguf_type")
    cfg = WeightQuantConfig(
        dst_type=_choice(sec.get("dst_type", GGUF_TYPES.get(gguf_type, "INT8")), DST_TYPES, f"{path}.dst_type"),
        weights_retrain_algo=WEIGHT_ALGOS[algo],
        channel_wise=_bool(sec.get("channel_wise", gguf_type is not None), f"{path}.channel_wise"),
        group_size=_group_size(sec.get("group_size", GGUF_BLOCK if gguf_type else None), f"{path}.group_size"),
        scale_init=_choice(sec.get("scale_init", "arq"), SCALE_INITS, f"{path}.scale_init"),
        gguf_type=gguf_type,
        kernel_grid=_choice(sec.get("kernel_grid", "full"), KERNEL_GRIDS, f"{path}.kernel_grid"),
        kernel_grid_grad=_choice(sec.get("kernel_grid_grad", "identity"), KERNEL_GRID_GRADS,
                                 f"{path}.kernel_grid_grad"),
    )
    if gguf_type is not None:
        clash = []
        if cfg.dst_type != GGUF_TYPES[gguf_type]:
            clash.append(f"dst_type={cfg.dst_type!r} (its codes are {GGUF_TYPES[gguf_type]})")
        if not cfg.channel_wise:
            clash.append("channel_wise=False (its scales are per block of each row)")
        if cfg.group_size != GGUF_BLOCK:
            clash.append(f"group_size={cfg.group_size!r} (its blocks hold {GGUF_BLOCK} weights)")
        if cfg.scale_init != "arq":
            clash.append(f"scale_init={cfg.scale_init!r} (a learnable scale starts at llama-quantize's d)")
        if clash:
            raise ValueError(f"{path}.gguf_type={gguf_type!r} fixes the weight grid, which contradicts "
                             f"{'; '.join(clash)}; leave those keys out")
    if gguf_type is not None and cfg.kernel_grid != "full":
        raise ValueError(f"{path}.gguf_type={gguf_type!r} fixes the weight grid (llama.cpp's blocks), which "
                         f"contradicts kernel_grid={cfg.kernel_grid!r} (an ONNX Runtime INT8 grid); give one or the other")
    _check_kernel_grid(cfg, path)
    if cfg.scale_init != "arq" and not cfg.learnable_scale:
        raise ValueError(
            f"{path}.scale_init={cfg.scale_init!r}: only a learnable (ULQ) weight scale has an initial value; "
            f"ARQ recomputes max|w| / qmax every forward. Use weights_retrain_algo='ulq_quantize' (got "
            f"{cfg.weights_retrain_algo!r}) or leave scale_init at 'arq'"
        )
    if cfg.group_size is not None and not cfg.channel_wise:
        raise ValueError(
            f"{path}.group_size={cfg.group_size}: group-wise scales are per output channel and group of input "
            "features, so they need channel_wise=True (got channel_wise=False)"
        )
    return cfg


def _check_kernel_grid(cfg: WeightQuantConfig, path: str) -> None:
    """The combinations a kernel grid allows (docs/numerics.md, "The kernel-aware weight grid")."""
    grid = cfg.kernel_grid
    if cfg.scale_init == "pair_mse" and grid != "pair_cap":
        raise ValueError(
            f"{path}.scale_init='pair_mse': the step that minimises the pair-capped grid's error needs "
            f"kernel_grid='pair_cap' (got kernel_grid={grid!r}); use scale_init 'arq' or 'mse'"
        )
    if grid == "full":
        if cfg.kernel_grid_grad != "identity":
            raise ValueError(f"{path}.kernel_grid_grad={cfg.kernel_grid_grad!r}: applies only to a kernel grid "
                             "(kernel_grid 'pair_cap' or 'int7'), got kernel_grid='full'")
        return
    if grid == "int7" and cfg.kernel_grid_grad != "identity":
        raise ValueError(
            f"{path}.kernel_grid_grad={cfg.kernel_grid_grad!r}: applies to kernel_grid='pair_cap' only; the int7 "
            "grid is elementwise and keeps the library's plain straight-through gradient ('identity')"
        )
    if cfg.dst_type != "INT8":
        raise ValueError(
            f"{path}.kernel_grid={grid!r}: is an INT8 weight grid, got dst_type={cfg.dst_type!r}; INT4 codes "
            "(|q| <= 8) never saturate ONNX Runtime's u8s8 pairs, so use kernel_grid='full' with INT4"
        )
    if cfg.group_size is not None:
        raise ValueError(
            f"{path}.kernel_grid={grid!r}: group-wise scales (group_size={cfg.group_size}) export as a blocked "
            "DequantizeLinear feeding a float MatMul, which never runs the u8s8 kernel; use kernel_grid='full' "
            "with group_size"
        )
    if grid == "pair_cap" and cfg.channel_wise and cfg.scale_init != "pair_mse":
        if not cfg.learnable_scale:
            raise ValueError(
                f"{path}.kernel_grid='pair_cap' with channel_wise=True and weights_retrain_algo="
                f"{cfg.weights_retrain_algo!r}: ARQ's per-channel max-abs step puts a +-127 code in every "
                "channel, so the pair cap binds in every channel (25.8x the output MSE of the full grid on "
                "MiniLM's Linears). Use weights_retrain_algo='ulq_quantize' with scale_init='pair_mse', "
                "channel_wise=False, or kernel_grid='int7'"
            )
        raise ValueError(
            f"{path}.kernel_grid='pair_cap' with channel_wise=True: a learnable scale must start at "
            f"scale_init='pair_mse' (got {cfg.scale_init!r}): the max-abs ('arq') step makes the cap bind in "
            "every channel and the clipped 'mse' step makes more codes reach it"
        )


def _group_size(value: Any, path: str) -> int | None:
    if value is None:
        return None
    rule = "None or a power of two >= 16 (e.g. 32, 64, 128)"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{path}: expected {rule} as an int, got {_describe(value)}")
    if value < 16 or value & (value - 1):
        raise ValueError(f"{path}: expected {rule}, got {value!r}")
    return value


def _load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"config: cannot read the JSON file {os.fspath(path)!r}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config: {os.fspath(path)!r} is not valid JSON: {err}") from None


def parse_config(config: Any = None) -> QATConfig:
    """Validate an AMCT config (dict, JSON file path, QATConfig or None) into a QATConfig."""
    if isinstance(config, QATConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        config = _load_json(config)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config: expected None, a dict, a QATConfig or a path to a JSON file, got {_describe(config)}"
        )
    _check_keys(config, _TOP_KEYS, "")
    cfg = QATConfig(
        retrain_enable=_bool(config.get("retrain_enable", True), "retrain_enable"),
        retrain_data_config=_parse_data(config.get("retrain_data_config")),
        retrain_weight_config=_parse_weight(config.get("retrain_weight_config")),
    )
    _check_dynamic_act(cfg.retrain_data_config, cfg.retrain_weight_config)
    return cfg


def _check_dynamic_act(data: DataQuantConfig, wcfg: WeightQuantConfig) -> None:
    """The runtime a dynamic activation preset names also fixes the weight grid it pairs with."""
    act = data.dynamic_act
    if act == "ort-matmulnbits-level4" and (wcfg.dst_type != "INT4" or wcfg.group_size is None
                                             or wcfg.gguf_type is not None):
        raise ValueError(
            "retrain_data_config.dynamic_act='ort-matmulnbits-level4' is ONNX Runtime's MatMulNBits kernel with "
            "accuracy_level=4, which holds group-wise INT4 weights (its activation block = group_size): it needs "
            "retrain_weight_config {'dst_type': 'INT4', 'channel_wise': True, 'group_size': 32 (or 16, 64, ...)}, "
            f"got dst_type={wcfg.dst_type!r}, group_size={wcfg.group_size!r}, gguf_type={wcfg.gguf_type!r}"
        )
    if act in LLAMA_CPP_ACTS and wcfg.gguf_type is None:
        raise ValueError(
            f"retrain_data_config.dynamic_act={act!r}: llama.cpp quantizes activations this way only in front of "
            "Q8_0/Q4_0 weights; set retrain_weight_config.gguf_type to 'Q8_0' or 'Q4_0'"
        )
