"""Running an exported model in ONNX Runtime (CPU provider) and comparing it with PyTorch."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.nn as nn


# ONNX Runtime rewrites that change what a QDQ graph computes (measured with onnxruntime 1.32)
# when a graph has the forms export_onnx avoids: WeightBiasQuantization turns the float bias of
# DequantizeLinear->Gemm/Conv into int32 codes at scale s_x*s_w (as integer runtimes do), moving
# outputs by up to s_x*s_w/2; ReluQuantRewrite drops a Relu in front of an INT4 QuantizeLinear
# even when the zero point is not qmin. Kept for callers that run other QDQ graphs exactly.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "ReluQuantRewrite")


def ort_session(path, session_options=None, *, disabled_optimizers=()):
    """An ONNX Runtime CPU session on `path` (default session options unless given)."""
    import onnxruntime as ort  # optional dependency

    kwargs = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(os.fspath(path), sess_options=session_options, providers=["CPUExecutionProvider"],
                                **kwargs)


def ort_max_abs_diff(model: nn.Module, inputs: tuple[torch.Tensor, ...], path, *, session_options=None) -> float:
    """Max abs difference between ONNX Runtime (CPU provider) on `path` and `model(*inputs)`."""
    session = ort_session(path, session_options)
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    with torch.no_grad(), autocast_off():
        want = flat_outputs(model(*inputs))
    if len(got) != len(want):
        raise RuntimeError(f"{path}: ONNX model has {len(got)} outputs, the PyTorch model {len(want)}")
    return max(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) for g, w in zip(got, want))


def flat_outputs(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in flat_outputs(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in flat_outputs(o)]
    raise TypeError(f"model output: cannot compare a {type(out).__name__} with the ONNX outputs")


def autocast_off():
    """Exports and reference outputs run in float32 even inside torch.autocast."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        except (RuntimeError, ValueError):  # a device type this build does not know
            continue
    return stack


def cpu_kernel_features() -> dict:
    """The CPU features that decide which integer kernels ONNX Runtime (and llama.cpp) pick: they
    read CPUID, not torch's settings. `int8_kernel` names ORT's x86 u8s8 path: "vnni" (exact),
    "avx2-pairwise" (vpmaddubsw: adjacent products summed in saturating int16) or "other"."""
    import platform

    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key in ("model name", "Model") and value.strip():
                    model = value.strip()
    except OSError:  # not Linux: the machine name only
        pass
    vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    avx512 = "avx512bw" in flags
    arch = platform.machine()
    if arch in ("x86_64", "AMD64"):
        kernel = "vnni" if vnni else "avx2-pairwise" if ("avx2" in flags or avx512) else "other"
    else:
        kernel = "other"  # ARM64: dot-product instructions, no pairwise int16 saturation
    return {"model": model, "arch": arch, "avx2": "avx2" in flags, "avx512bw": avx512, "vnni": vnni,
            "int8_kernel": kernel}
