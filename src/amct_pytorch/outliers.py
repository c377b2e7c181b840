"""Outlier channel splitting: a float-exact model edit that makes per-tensor weight
quantization fine enough where a few huge weights would set the scale.

A transformer FFN computes down(act(up(x))) with an elementwise act (GELU, ReLU, ...).
If input column j of `down` holds a weight far larger than the rest, a per-tensor
(or per-row) INT8 step sized for that weight rounds most other weights to 0 or ±1.
Duplicating hidden neuron j k times (row j of `up` copied, column j of `down` divided
by k and copied) computes the same function in float, and the largest weight shrinks
by k. The hidden layer grows by the number of copies (reported).
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["split_outlier_channels", "ChannelSplit"]


@dataclass(frozen=True)
class ChannelSplit:
    """What split_outlier_channels did to one (up, down) pair."""
    up: str
    down: str
    threshold: float  # columns of `down` whose max |w| exceeded this were split
    columns: tuple[int, ...]  # hidden neurons that were split
    copies: tuple[int, ...]  # how many neurons each one became
    max_abs_before: float
    max_abs_after: float

    @property
    def added(self) -> int:
        return sum(self.copies) - len(self.copies)


def _at_least(value, name: str, low: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low:
        raise ValueError(f"{name}: expected a finite real number >= {low}, got {value!r}")
    return float(value)


def _divisor(columns, copies, like: torch.Tensor) -> torch.Tensor:
    """Per hidden neuron (last dim of `like`): how many neurons it becomes (1 where not split)."""
    divisor = torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
    divisor[list(columns)] = torch.tensor(copies, dtype=like.dtype, device=like.device)
    return divisor


def _linear(modules: dict, name, role: str) -> nn.Linear:
    if not isinstance(name, str):
        raise TypeError(f"pairs: {role} layer name must be a str, got {type(name).__name__} {name!r}")
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"pairs: no module named {name!r} in the model{hint}")
    mod = modules[name]
    if type(mod) is not nn.Linear:  # LinearQAT holds calibrated state sized to the old width
        raise TypeError(f"pairs: {role} layer {name!r} must be a plain torch.nn.Linear, got {type(mod).__name__}"
                        " (split channels before to_qat)")
    return mod


def _plan(up_name, down_name, up: nn.Linear, down: nn.Linear, ratio, max_growth) -> ChannelSplit:
    if up.out_features != down.in_features:
        raise ValueError(f"pairs: {up_name!r} has {up.out_features} outputs but {down_name!r} takes "
                         f"{down.in_features} inputs; the pair must be up -> elementwise -> down")
    w = down.weight.detach().abs()
    if not torch.isfinite(w).all():
        raise ValueError(f"pairs: {down_name!r} has non-finite weights")
    k = max(1, math.ceil(0.999 * w.numel()))
    threshold = ratio * float(w.flatten().kthvalue(k).values)
    col_max = w.amax(dim=0)
    columns = torch.nonzero(col_max > threshold).flatten().tolist() if threshold > 0 else []
    copies = [math.ceil(float(col_max[j]) / threshold) for j in columns]
    split = ChannelSplit(up_name, down_name, threshold, tuple(columns), tuple(copies), float(col_max.max()),
                         float((col_max / _divisor(columns, copies, col_max)).max()))
    if split.added > max_growth * down.in_features:
        raise ValueError(f"pairs: splitting {down_name!r} needs {split.added} extra neurons, more than "
                         f"max_growth={max_growth} x {down.in_features}; raise ratio (now {ratio}) or max_growth")
    return split


def _grow(up: nn.Linear, down: nn.Linear, split: ChannelSplit) -> None:
    rep = [j for j, c in zip(split.columns, split.copies) for _ in range(c - 1)]
    rep = torch.tensor(rep, dtype=torch.long, device=down.weight.device)
    with torch.no_grad():
        w_down = down.weight / _divisor(split.columns, split.copies, down.weight)
        new_down = torch.cat([w_down, w_down[:, rep]], dim=1)
        new_up = torch.cat([up.weight, up.weight[rep]], dim=0)
        new_bias = None if up.bias is None else torch.cat([up.bias, up.bias[rep]])
    down.weight = nn.Parameter(new_down, requires_grad=down.weight.requires_grad)
    up.weight = nn.Parameter(new_up, requires_grad=up.weight.requires_grad)
    if new_bias is not None:
        up.bias = nn.Parameter(new_bias, requires_grad=up.bias.requires_grad)
    up.out_features = down.in_features = new_down.shape[1]


def split_outlier_channels(model: nn.Module, pairs: Iterable[tuple[str, str]], *, ratio: float = 3.0,
                           max_growth: float = 0.1) -> list[ChannelSplit]:
    """Split the hidden neurons whose `down` weights are outliers, in place, float-exactly.

    pairs: (up, down) module names of plain nn.Linear layers where `down` consumes only an
        elementwise function of `up`'s output (a transformer FFN: e.g. BERT's
        "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense").
    ratio: a column of `down` is split when its max |w| exceeds ratio x the 99.9th
        percentile of |w| of that layer, into ceil(max / threshold) neurons.
    max_growth: refuse (ValueError) to grow a hidden layer by more than this fraction.
    Call it on the float model before to_qat and before building the optimizer (the
    weights become new Parameters). Nothing is changed if any pair is invalid.
    Returns one ChannelSplit per pair.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    ratio = _at_least(ratio, "ratio", 1.0)
    max_growth = _at_least(max_growth, "max_growth", 0.0)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(f"pairs: expected an iterable of (up, down) name pairs, got {type(pairs).__name__}")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs: expected at least one (up, down) name pair, got none")
    modules = dict(model.named_modules())
    plans, seen = [], set()
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pairs: each entry must be an (up, down) pair of names, got {pair!r}")
        up_name, down_name = pair
        up, down = _linear(modules, up_name, "up"), _linear(modules, down_name, "down")
        for name in pair:
            if name in seen:
                raise ValueError(f"pairs: layer {name!r} appears in more than one pair")
            seen.add(name)
        plans.append((up, down, _plan(up_name, down_name, up, down, ratio, max_growth)))
    for up, down, split in plans:  # everything validated: now edit
        if split.columns:
            _grow(up, down, split)
    return [split for _, _, split in plans]
