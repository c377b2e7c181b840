"""The runtime switches every layer of the package reads, in one place.

Each switch keeps the mechanism its use needs:
- `calibrating()`: a thread-local flag (a forward in another thread is not calibrating);
- strict inputs: a process-wide flag (`set_strict_inputs`);
- compiled kernels: a process-wide flag, initialised from the environment variable
  AMCT_PYTORCH_COMPILE=1 (`use_compiled_kernels`);
- the export flags: `pinned_qparams` is a context variable (the factors an `export_onnx`
  call computed, per module), and `export_onnx_active()` reads a plain module global, so that
  torch.compile treats it as a guarded constant. Both are read at call time: never copy them
  with `from ... import NAME`.
- probes of what torch is doing now: exporting/tracing, inside activation checkpointing.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading

import torch


# ---- calibrating() --------------------------------------------------------------------------
class _ForceFlag(threading.local):
    on = False  # a class default: every thread reads False until calibrating() sets it (no AttributeError,
                # which torch.compile of older torch versions cannot trace through getattr's default)


_FORCE = _ForceFlag()


@contextlib.contextmanager
def calibrating():
    """Let every QAT module's forward inside this block update state, even in eval/no_grad."""
    previous = _FORCE.on
    _FORCE.on = True
    try:
        yield
    finally:
        _FORCE.on = previous


def calibrating_now() -> bool:
    """Whether this thread is inside `calibrating()`."""
    return _FORCE.on


# ---- strict inputs --------------------------------------------------------------------------
_STRICT = False


def set_strict_inputs(enabled: bool = True) -> None:
    """Check every forward's input for NaN/inf, also after calibration (a host sync per call).

    Off by default: calibrating forwards always check (statistics can never be poisoned), but a
    calibrated layer lets a non-finite input propagate as nn.Linear does, so that a training step
    has no host sync and compiles with fullgraph=True. See also `strict_inputs()`.
    """
    global _STRICT
    if not isinstance(enabled, bool):
        raise TypeError(f"set_strict_inputs: enabled must be a bool, got {enabled!r}")
    _STRICT = enabled


def strict_inputs_enabled() -> bool:
    return _STRICT


@contextlib.contextmanager
def strict_inputs(enabled: bool = True):
    """set_strict_inputs(enabled) inside this block only."""
    previous = _STRICT
    set_strict_inputs(enabled)
    try:
        yield
    finally:
        set_strict_inputs(previous)


# ---- compiled kernels ----------------------------------------------------------------------
# Opt-in fused kernels: torch.compile (inductor) of the elementwise math, compiled lazily on
# first use (~10-30 s per shape family). Same formulas, so the fake-quantized tensors are
# bit-identical; only the order of the ULQ sums differs (float rounding of the gradients).
_COMPILED = os.environ.get("AMCT_PYTORCH_COMPILE", "0") == "1"


def use_compiled_kernels(enabled: bool = True) -> None:
    """Turn the torch.compile kernels on or off for every QAT layer (env: AMCT_PYTORCH_COMPILE=1)."""
    global _COMPILED
    if not isinstance(enabled, bool):
        raise TypeError(f"use_compiled_kernels: enabled must be a bool, got {enabled!r}")
    _COMPILED = enabled


def compiled_kernels_enabled() -> bool:
    return _COMPILED


# ---- export: the pinned factors and the export-active flag ------------------------------------
_PINNED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("amct_pinned_qparams", default=None)
_EXPORT_ONNX_ACTIVE = False


@contextlib.contextmanager
def pinned_qparams(table: dict):
    """Inside this block the export-time forward of each module `m` with `id(m)` in `table` uses
    `table[id(m)]` as its constants, and `export_onnx_active()` is True (export_onnx's own call)."""
    global _EXPORT_ONNX_ACTIVE
    token, was_active = _PINNED.set(table), _EXPORT_ONNX_ACTIVE
    _EXPORT_ONNX_ACTIVE = True
    try:
        yield
    finally:
        _PINNED.reset(token)
        _EXPORT_ONNX_ACTIVE = was_active


def pinned_for(module):
    """The constants `pinned_qparams` holds for `module`, or None."""
    table = _PINNED.get()
    return None if table is None else table.get(id(module))


def export_onnx_active() -> bool:
    """Whether export_onnx is exporting right now (its factors are pinned). A plain module global
    (not the context variable) so that torch.compile reads it as a guarded constant."""
    return _EXPORT_ONNX_ACTIVE


# torch < 2.13: dynamo reports torch.compiler.is_exporting() as True inside torch.compile too (seen
# with torch 2.11 on CUDA), so there is_exporting() counts only outside torch.compile
_EXPORT_FLAG_RELIABLE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def torch_exporting() -> bool:
    """torch.export / ONNX export is tracing this forward (not a torch.compile'd step)."""
    if torch.onnx.is_in_onnx_export():
        return True
    if not torch.compiler.is_exporting():
        return False
    if _EXPORT_FLAG_RELIABLE or not torch.compiler.is_compiling():
        return True
    return _EXPORT_ONNX_ACTIVE  # our export_onnx is running: its factors are pinned


def exporting() -> bool:
    """Exporting or tracing (TorchScript too): a forward that must not change state."""
    # torch.compiler.is_exporting covers torch.export (the dynamo ONNX exporter's first step);
    # is_compiling is left out on purpose: a torch.compile'd training step must still update state
    return torch_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()


# ---- activation checkpointing probes --------------------------------------------------------
def saved_tensor_hook_kind() -> str | None:
    """'forward' inside torch.utils.checkpoint(use_reentrant=False)'s forward, 'recompute' inside
    its recomputation in backward, else None (told apart by the saved-tensor hook it installs)."""
    if torch.compiler.is_compiling():
        return None
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    name = getattr(hooks[0], "__qualname__", "")
    if name.startswith("_recomputation_hook."):
        return "recompute"
    if name.startswith("_checkpoint_hook."):
        return "forward"
    return None


def in_reentrant_checkpoint_forward(depth: int = 64) -> bool:
    """Inside torch.utils.checkpoint(use_reentrant=True)'s no-grad first pass (its real forward
    runs again, with grad, in backward)."""
    try:
        from torch.utils.checkpoint import CheckpointFunction  # optional in minimal torch builds
    except ImportError:  # pragma: no cover
        return False
    code = CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
