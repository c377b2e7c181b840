"""Writing a QAT layer's parameters from inside its forward, FSDP2-safe, and the error for a
parameter that is not float32.

A QAT layer sets parameters inside a forward: the clip bounds at the end of calibration (IFMR)
and the initial ULQ weight scale. Under FSDP2 the module then holds the *unsharded* parameter,
whose storage is dropped when the layer reshards, so such a write would be lost. `write_param`
writes the value into the unsharded parameter (this forward's use) and into this rank's shard of
the sharded parameter (what the optimizer steps and the next all-gather reads). The value must
be the same on every rank, which calibration (pooled over ranks) and ARQ (of the full weight)
guarantee.
"""
from __future__ import annotations

import sys

import torch


def fsdp_param(module, name):
    """The FSDPParam managing `module.<name>`, or None when no FSDP2 state manages it."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return None
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if not isinstance(state, FSDPState):
            continue
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for candidate in group.fsdp_params:
                info = candidate._module_info
                if info.module is module and info.param_name == name:
                    return candidate
    return None


@torch.no_grad()
def write_param(module, name: str, value: torch.Tensor) -> None:
    """module.<name>.copy_(value), also into the FSDP2 shard when FSDP2 manages the parameter."""
    param = getattr(module, name)
    if not fsdp_managed(module):
        param.copy_(value)
        return
    managed = fsdp_param(module, name)
    if managed is None:
        param.copy_(value)
        return
    if not hasattr(param, "device_mesh"):  # the unsharded parameter, used by this forward
        param.copy_(value.to(param.dtype))
    sharded = managed.sharded_param
    mesh = sharded.device_mesh
    dim = managed.fsdp_placement.dim
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = list(torch.chunk(value.reshape(managed._orig_size), world, dim=dim))
    local = sharded._local_tensor
    if rank < len(chunks) and local.numel() > 0:
        local.copy_(chunks[rank].to(local.dtype))


def fsdp_managed(module) -> bool:
    """Cheap pre-check: FSDP2 is imported and some module is under its management."""
    if "torch.distributed.fsdp._fully_shard._fsdp_state" not in sys.modules:
        return False
    from torch.distributed._composable_state import _module_state_mapping
    return len(_module_state_mapping) > 0


def fsdp_module_class():
    """torch's FSDPModule, or None in builds without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule  # optional: builds without torch.distributed
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


def low_precision_params_error(module, param_name: str, dtype) -> TypeError:
    """The error of a QAT layer whose `param_name` is not float32, naming the cure for its cause."""
    name = type(module).__name__
    if fsdp_managed(module) and fsdp_param(module, param_name) is not None:
        FSDPModule = fsdp_module_class()  # fully_shard(layer) makes LinearQAT an FSDPLinearQAT: name the QAT class
        name = next(c.__name__ for c in type(module).__mro__ if not issubclass(c, FSDPModule))
        return TypeError(
            f"module: {name} got {dtype} parameters from FSDP2 ({param_name} is {dtype}: the fully_shard call "
            f"that manages it has MixedPrecisionPolicy(param_dtype={dtype})); a QAT layer supports only "
            "torch.float32 parameters, so that its clip bounds, scales and weight grid stay exact. Shard the QAT "
            "layers first with amct_pytorch.fsdp.fully_shard_qat(model, mp_policy=your_policy) (each gets its "
            "own fully_shard with param_dtype=None; your policy applies to the rest of the model)")
    return TypeError(
        f"module: {name} supports only torch.float32 parameters, but its {param_name} is {dtype} (cast by "
        ".double()/.half()/.to(dtype)?); call .float() on it")
