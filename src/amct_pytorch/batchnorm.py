"""Fold BatchNorm layers into the convolution they directly follow (before quantization).

In eval mode BatchNorm is a per-channel affine map y = s * (x - mean) + beta with
s = gamma / sqrt(var + eps). When x is the output of a convolution and nothing else reads
x, the map can move into the conv: W' = W * s (per output channel), b' = (b - mean) * s + beta.
The quantized conv then sees the weights the deployed model really multiplies with.

"Directly follows" is read from a torch.fx trace of the model (a conv call whose only user
is a BatchNorm call, each module called once). A model that fx cannot trace falls back to
nn.Sequential adjacency (a conv child immediately followed by a BatchNorm child). Every
BatchNorm that is not folded is reported with the reason (summary and one warning).
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class BatchNormFolding:
    """What fold_batchnorm did. `folded`: (conv name, BatchNorm name) pairs; `not_folded`:
    (BatchNorm name, reason) pairs; `method`: "fx" or "sequential" (how adjacency was read)."""

    folded: tuple[tuple[str, str], ...]
    not_folded: tuple[tuple[str, str], ...]
    method: str
    trace_error: str | None = None  # why fx tracing failed, when method == "sequential"

    def __iter__(self):  # `for conv, bn in fold_batchnorm(model)`
        return iter(self.folded)

    def __len__(self):
        return len(self.folded)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s) into the preceding conv (adjacency from {self.method})"]
        lines += [f"  {bn} -> {conv}" for conv, bn in self.folded]
        lines += [f"  {bn}: not folded ({why})" for bn, why in self.not_folded]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"folded": [list(p) for p in self.folded], "not_folded": dict(self.not_folded),
                "method": self.method, "trace_error": self.trace_error}


class _LeafTracer(torch.fx.Tracer):
    """Every module without children is a leaf (also custom ones such as LinearQAT), so
    tracing never steps into a layer's own forward."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or not any(True for _ in m.children())


def _is_conv(m) -> bool:
    return type(m) in CONVS + TRANSPOSED


def _fx_pairs(model: nn.Module, bn_names: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs, reasons = [], {}
    seen_bn = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in bn_names:
            continue
        bn_name = node.target
        seen_bn.add(bn_name)
        if calls[bn_name] > 1:
            reasons[bn_name] = f"called {calls[bn_name]} times in forward"
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            reasons[bn_name] = "its input is not a traced tensor"
            continue
        if src.op == "call_module" and _is_conv(modules.get(src.target)):
            conv_name = src.target
            if calls[conv_name] > 1:
                reasons[bn_name] = f"follows {conv_name}, which is called {calls[conv_name]} times in forward"
            elif len(src.users) > 1:
                others = ", ".join(sorted(u.name for u in src.users if u is not node))
                reasons[bn_name] = f"follows {conv_name}, whose output is also used by {others}"
            else:
                pairs.append((conv_name, bn_name))
            continue
        reasons[bn_name] = f"follows {_describe(src, modules)}, not a plain conv"
    for name in bn_names:
        if name not in seen_bn:
            reasons[name] = "not called in the traced forward"
    return pairs, reasons


def _describe(node: torch.fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)} ({node.op.replace('_', ' ')})"
    return f"{node.name} ({node.op})"


def _sequential_pairs(model: nn.Module, bn_names: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    name_of = {id(m): n for n, m in model.named_modules()}
    pairs, reasons = [], {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq._modules.values())
        for prev, cur in zip(children, children[1:]):
            if isinstance(cur, BATCHNORMS) and _is_conv(prev):
                pairs.append((name_of[id(prev)], name_of[id(cur)]))
    paired = {bn for _, bn in pairs}
    for name in bn_names:
        if name not in paired:
            reasons[name] = "the model cannot be traced by torch.fx and this BatchNorm is not right after a conv in an nn.Sequential"
    return pairs, reasons


def _out_channel_view(conv: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """`s` (one value per output channel) shaped to multiply the conv weight."""
    w = conv.weight
    if not isinstance(conv, TRANSPOSED):  # weight (out, in/groups, *k)
        return s.reshape(-1, *([1] * (w.dim() - 1)))
    # transposed: weight (in, out/groups, *k); input channel i of group g feeds outputs g*out_g + j
    g = conv.groups
    in_g, out_g = w.shape[0] // g, w.shape[1]
    return s.reshape(g, 1, out_g).expand(g, in_g, out_g).reshape(w.shape[0], out_g, *([1] * (w.dim() - 2)))


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> None:
    f64 = torch.float64
    var, mean = bn.running_var.to(f64), bn.running_mean.to(f64)
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.to(f64)
    shift = -mean * s + (bn.bias.to(f64) if bn.bias is not None else 0.0)
    bias = shift if conv.bias is None else conv.bias.to(f64) * s + shift
    w = conv.weight
    w.copy_((w.to(f64) * _out_channel_view(conv, s)).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))


def _replace(model: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is target:
                setattr(parent, attr, new)


def fold_batchnorm(model: nn.Module, *, warn: bool = True) -> BatchNormFolding:
    """Fold, in place, every BatchNorm1d/2d/3d that directly follows an nn.Conv1d/2d/3d or
    nn.ConvTranspose1d/2d/3d into that conv (weight scaled per output channel, bias set or
    created) and replace it by nn.Identity. In eval mode the model computes the same
    function (up to float rounding; the fold itself is computed in float64).

    The conv and BatchNorm Parameters stay the same objects (new data), except a conv
    without bias gets a new bias Parameter: build optimizers after folding.
    Raises ValueError (naming the layer) for a foldable BatchNorm with
    track_running_stats=False (no running statistics to fold) or a channel-count mismatch.
    BatchNorms that are not folded are listed in the result and, with `warn`, in one warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    bn_names = [n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    other_norms = [n for n, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, BATCHNORMS)]
    trace_error = None
    if not bn_names:
        pairs, reasons, method = [], {}, "fx"
    else:
        try:
            pairs, reasons = _fx_pairs(model, bn_names)
            method = "fx"
        except Exception as err:  # noqa: BLE001 - any tracing failure means: read nn.Sequential instead
            trace_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            pairs, reasons = _sequential_pairs(model, bn_names)
            method = "sequential"
            reasons = {n: f"{why} (fx: {trace_error})" for n, why in reasons.items()}
    for name in other_norms:
        reasons[name] = f"{type(model.get_submodule(name)).__name__} is not folded (only BatchNorm1d/2d/3d)"

    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:  # validate all before changing anything
        conv, bn = modules[conv_name], modules[bn_name]
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(f"{bn_name}: BatchNorm with track_running_stats=False has no running statistics "
                             f"to fold into {conv_name}; fold only models whose BatchNorms track them")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"{bn_name}: num_features={bn.num_features} does not match the out_channels="
                             f"{conv.out_channels} of {conv_name}")
        if conv.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{conv_name}: cannot fold into a {conv.weight.dtype} weight")
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        _fold(conv, bn)
        identity = nn.Identity()
        _replace(model, bn, identity)

    not_folded = tuple((n, reasons[n]) for n in bn_names + other_norms if n in reasons)
    result = BatchNormFolding(tuple(pairs), not_folded, method, trace_error)
    if warn and not_folded:
        listed = "; ".join(f"{n}: {why}" for n, why in not_folded)
        warnings.warn(f"fold_batchnorm: {len(not_folded)} BatchNorm layer(s) left as they are: {listed}",
                      stacklevel=2)
    return result
