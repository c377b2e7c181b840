"""FSDP2 (torch.distributed.fsdp.fully_shard) support for the QAT modules' in-forward writes.

A QAT layer sets parameters inside a forward: the clip bounds at the end of calibration (IFMR)
and the initial ULQ weight scale. Under FSDP2 the module then holds the *unsharded* parameter,
whose storage is dropped when the layer reshards, so such a write would be lost. `write_param`
writes the value into the unsharded parameter (this forward's use) and into this rank's shard of
the sharded parameter (what the optimizer steps and the next all-gather reads). The value must
be the same on every rank, which calibration (pooled over ranks) and ARQ (of the full weight)
guarantee.

`fully_shard_qat` shards a QAT model under a low-precision `MixedPrecisionPolicy`: each QAT
layer keeps float32 parameters (its clip bounds, scales and weight grid stay exact) while the
user's policy applies to the rest of the model.
"""
from __future__ import annotations

import torch


def _fsdp_param(module, name):
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
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                if info.module is module and info.param_name == name:
                    return fsdp_param
    return None


@torch.no_grad()
def write_param(module, name: str, value: torch.Tensor) -> None:
    """module.<name>.copy_(value), also into the FSDP2 shard when FSDP2 manages the parameter."""
    param = getattr(module, name)
    if not _is_fsdp_module_tree(module):
        param.copy_(value)
        return
    fsdp_param = _fsdp_param(module, name)
    if fsdp_param is None:
        param.copy_(value)
        return
    if not hasattr(param, "device_mesh"):  # the unsharded parameter, used by this forward
        param.copy_(value.to(param.dtype))
    sharded = fsdp_param.sharded_param
    mesh = sharded.device_mesh
    dim = fsdp_param.fsdp_placement.dim
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = list(torch.chunk(value.reshape(fsdp_param._orig_size), world, dim=dim))
    local = sharded._local_tensor
    if rank < len(chunks) and local.numel() > 0:
        local.copy_(chunks[rank].to(local.dtype))


def _is_fsdp_module_tree(module) -> bool:
    """Cheap pre-check: FSDP2 is imported and some module is under its management."""
    import sys

    if "torch.distributed.fsdp._fully_shard._fsdp_state" not in sys.modules:
        return False
    from torch.distributed._composable_state import _module_state_mapping
    return len(_module_state_mapping) > 0


def _fsdp_api():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # pragma: no cover - builds without torch.distributed / FSDP2
        raise RuntimeError(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch "
                           f"build ({torch.__version__}): {err}") from None
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def qat_mp_policy(mp_policy=None):
    """The MixedPrecisionPolicy for one QAT layer's own `fully_shard` call, given the policy of the
    rest of the model: no parameter cast (param_dtype=None: weight, clip bounds and scales are
    all-gathered and used in float32), gradients reduced in float32, no input cast (a bf16 input
    is computed in float32 by the layer itself), and the output cast to `mp_policy.param_dtype`
    so that the layer hands the next one the dtype any other layer under `mp_policy` would.
    """
    _, MixedPrecisionPolicy, _ = _fsdp_api()
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy: expected a torch.distributed.fsdp.MixedPrecisionPolicy or None, got "
                        f"{mp_policy!r} ({type(mp_policy).__name__})")
    output_dtype = None if mp_policy is None else mp_policy.param_dtype
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, output_dtype=output_dtype,
                                cast_forward_inputs=False)


def fully_shard_qat(model, *, mp_policy=None, shard_root: bool = True, **fully_shard_kwargs):
    """FSDP2-shard `model` so that its QAT layers keep float32 parameters under any `mp_policy`.

    Each QAT layer (`amct_pytorch.qat_layers(model)`) gets its own
    `fully_shard(layer, mp_policy=qat_mp_policy(mp_policy), **fully_shard_kwargs)`; then, with
    `shard_root=True`, `fully_shard(model, mp_policy=mp_policy, **fully_shard_kwargs)` shards the
    rest. FSDP2 shards inner modules first, so with transformer blocks (or any other unit) call
    this with `shard_root=False`, then `fully_shard` each block and the root with your policy.
    `fully_shard_kwargs` (mesh, reshard_after_forward, offload_policy, ...) go to every call.
    Returns `model`.
    """
    import torch.nn as nn

    from .convert import qat_layers

    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp_api()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layer_policy = qat_mp_policy(mp_policy)  # checks mp_policy
    if not isinstance(shard_root, bool):
        raise TypeError(f"shard_root: expected a bool, got {shard_root!r}")
    layers = qat_layers(model)
    if not layers:
        raise ValueError("model: has no QAT layer (LinearQAT, Conv2dQAT, ...); convert it with "
                         "amct_pytorch.to_qat first, or shard it with torch's fully_shard")
    for name in layers:  # the layer itself and every module above it must still be unsharded
        parts = name.split(".")
        for depth in range(len(parts) + 1):
            path = ".".join(parts[:depth])
            if isinstance(model.get_submodule(path), FSDPModule):
                where = f"submodule {path!r}" if path else "the model itself"
                raise ValueError(
                    f"model: {where} is already sharded by fully_shard, so QAT layer {name!r} is (or is about "
                    "to be) managed by that call's policy; call fully_shard_qat on the unsharded model, before "
                    "fully_shard on any module that contains a QAT layer")
    for layer in layers.values():
        fully_shard(layer, mp_policy=layer_policy, **fully_shard_kwargs)
    if shard_root and "" not in layers:  # (a model that is itself one QAT layer is sharded above)
        root_policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy  # None: torch's default
        fully_shard(model, mp_policy=root_policy, **fully_shard_kwargs)
    return model


def low_precision_params_error(module, param_name: str, dtype) -> TypeError:
    """The error of a QAT layer whose `param_name` is not float32, naming the cure for its cause."""
    name = type(module).__name__
    if _is_fsdp_module_tree(module) and _fsdp_param(module, param_name) is not None:
        FSDPModule = _fsdp_api()[0]  # fully_shard(layer) makes LinearQAT an FSDPLinearQAT: name the QAT class
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
