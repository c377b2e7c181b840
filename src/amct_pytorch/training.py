"""Helpers for the training stack (see docs/training_stack.md).

- `migrate_optimizer_state`: optimizer state saved with 0-d clip bounds (releases before the
  clip bounds became shape (1,)) made to fit the current parameters, in one call.
- `add_qat_params`: the clip bounds and learnable weight scales that `to_qat` created, added to an
  optimizer built before conversion (which holds only the float weights).
- `watch_qat_params`: the check behind the warning when such a parameter receives gradients
  over several optimizer steps but no optimizer that steps holds it (so it never changes).
(`save_pretrained` / `from_pretrained` live in `amct_pytorch.hf`.)
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .nn.module.quantization.layer import QATLayer

# optimizer steps with a gradient but no holder before a QAT parameter is warned about
STEPS_BEFORE_WARNING = 3


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


def qat_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of the quantization parameters `to_qat` adds (clip bounds,
    learnable weight scales): every parameter of a QAT layer but its float `weight` and `bias`."""
    found, seen = {}, set()
    for prefix, m in model.named_modules():
        if not isinstance(m, QATLayer):
            continue
        for name, p in m.named_parameters(recurse=False):
            if name not in ("weight", "bias") and id(p) not in seen:
                seen.add(id(p))
                found[f"{prefix}.{name}" if prefix else name] = p
    return found


def add_qat_params(optimizer: torch.optim.Optimizer, model: nn.Module, **group_options) -> list[str]:
    """Add the quantization parameters of `model`'s QAT layers (clip bounds, learnable weight scales)
    that `optimizer` does not hold yet, as one new param group, and return their names.

    For an optimizer built before `to_qat`: it holds the float weights (shared with the QAT
    layers) but not the parameters `to_qat` created, which then get gradients and never change.
    `group_options` (lr, weight_decay, ...) apply to the new group; unset ones take the
    optimizer's defaults. Parameters with requires_grad=False (freeze_calibration) are left out.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = {n: p for n, p in qat_parameters(model).items() if p.requires_grad and id(p) not in held}
    if new:
        optimizer.add_param_group({"params": list(new.values()), **group_options})
    return list(new)


# ---- the "receives gradients, never changes" check ----------------------------------------------
# Host-side only: after every optimizer step (torch's global step hook) a watched parameter that has
# a .grad but is held by no optimizer seen stepping gets a strike; a parameter found held is dropped
# from the watch list. Reading .grad and the param groups never touches device memory, so there is
# no host-device synchronisation on accelerators (comparing values would need one).
# id(parameter) -> [weak reference, name, strikes] (a WeakKeyDictionary would compare tensors with ==)
_WATCHED: dict[int, list] = {}
_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()
_HOOK = []


def watch_qat_params(params: dict[str, nn.Parameter]) -> None:
    """Watch these parameters ({name: parameter}) for the warning described in the module doc."""
    for name, p in params.items():
        _WATCHED[id(p)] = [weakref.ref(p), name, 0]
    if params and not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(after_optimizer_step))


def after_optimizer_step(optimizer, args, kwargs) -> None:
    """torch's optimizer step post-hook behind `watch_qat_params` (host-side bookkeeping only)."""
    _OPTIMIZERS.add(optimizer)
    if not _WATCHED:
        return
    held = {id(p) for opt in list(_OPTIMIZERS) for group in opt.param_groups for p in group["params"]}
    stale = []
    for key, entry in list(_WATCHED.items()):
        p = entry[0]()
        if p is None or key in held:
            del _WATCHED[key]  # gone, or an optimizer holds it: nothing left to watch
        elif p.grad is not None and p.requires_grad:
            entry[2] += 1
            if entry[2] >= STEPS_BEFORE_WARNING:
                stale.append(entry[1])
                del _WATCHED[key]
    if stale:
        shown = ", ".join(stale[:6]) + (f", ... ({len(stale)} in all)" if len(stale) > 6 else "")
        warnings.warn(
            f"QAT parameters received gradients over {STEPS_BEFORE_WARNING} optimizer steps but no optimizer "
            f"that steps holds them, so they never change: {shown}. An optimizer built before to_qat holds only "
            "the float weights; add the clip bounds and weight scales with "
            "amct_pytorch.add_qat_params(optimizer, model), or build the optimizer after to_qat.",
            UserWarning, stacklevel=3)
