"""FSDP2 (torch.distributed.fsdp.fully_shard) for QAT models.

`fully_shard_qat` shards a QAT model under a low-precision `MixedPrecisionPolicy`: each QAT
layer keeps float32 parameters (its clip bounds, scales and weight grid stay exact) while the
user's policy applies to the rest of the model. The FSDP2-safe parameter write the layers use
inside their forward lives in `amct_pytorch.params` (`write_param`, re-exported here).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .convert import qat_layers
from .params import fsdp_managed, fsdp_param, low_precision_params_error, write_param  # noqa: F401 (public here too)


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
