"""ONNX export and ONNX Runtime as the demos run them: quiet, CPU, thread count pinned when asked."""
from __future__ import annotations

import contextlib
import logging
import warnings

from ...export import ort_session as cpu_session

THIRD_PARTY_LOGS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                    "torch._export", "onnxruntime", "root")


@contextlib.contextmanager
def quiet_third_party():
    """Silence what the exporters and ORT's quantization tools print (torch's pytree FutureWarnings,
    onnxscript's constant-folding logs, ORT's 'run pre-processing' hints): the demo's output is its
    own. Warnings raised from amct_pytorch itself still show."""
    loggers = [logging.getLogger(None if name == "root" else name) for name in THIRD_PARTY_LOGS]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"amct_pytorch(\.|$)")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def ort_session(path, threads: int | None = None, optimized_path=None):
    """An ORT CPU session with default options but ORT's own log at errors only; `threads` pins the
    intra-op thread count (and one inter-op thread); `optimized_path` saves the optimized graph there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # e.g. its note that a saved optimized graph is hardware specific
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return cpu_session(path, so)
