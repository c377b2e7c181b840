"""A demo's quantization settings and the command-line choices every demo shares."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ...config import parse_config


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    config: dict
    steps: int = 200  # QAT steps unless --steps overrides (INT4 weights need more to settle)
    lr_weights: float | None = None  # this setting's weight learning rate (None: the demo's Options.lr_weights)


def setting_options(opts, setting: Setting):
    """`opts` with the setting's own learning rate, when it has one."""
    return opts if setting.lr_weights is None else replace(opts, lr_weights=setting.lr_weights)


def settings_from_file(path) -> tuple[Setting, ...]:
    """--config: one AMCT config file (JSON) replaces the built-in settings."""
    config = parse_config(path)  # validates now, before minutes of work
    return (Setting("custom", f"custom config {Path(path).name}", config.to_dict()),)


def with_run_options(opts, quick_values: dict, quick: bool, steps, batch_size):
    """`opts` with a demo's common command-line choices applied: --quick's values, then --steps and
    --batch-size when given."""
    if quick:
        opts = replace(opts, **quick_values)
    if steps is not None:
        opts = replace(opts, steps=steps)
    if batch_size is not None:
        opts = replace(opts, batch_size=batch_size)
    return opts


def step_plan(opts) -> str:
    """'w8a8 150, w4a8g 150': each setting of `opts.settings` with the QAT steps it will run."""
    return ", ".join(f"{s.name} {opts.steps or s.steps}" for s in opts.settings)
