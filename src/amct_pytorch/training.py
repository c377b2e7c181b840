"""Helpers for the training stack (see docs/training_stack.md).

- `migrate_optimizer_state`: optimizer state saved with 0-d clip bounds (releases before the
  clip bounds became shape (1,)) made to fit the current parameters, in one call.
(`save_pretrained` / `from_pretrained` live in `amct_pytorch.hf`.)
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
