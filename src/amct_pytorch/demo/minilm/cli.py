"""`amct-qat demo` (--model minilm, the default): the options only this demo takes."""
from __future__ import annotations

import argparse
import operator

from ..common.cli import Demo, Option, positive_int
from .settings import parse_settings


def _settings(value: str) -> str:
    try:
        parse_settings(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _group_size(value: str) -> int:
    n = positive_int(value)
    if n not in (16, 32, 64, 128):  # powers of two >= 16 dividing 384 and 1536
        raise argparse.ArgumentTypeError(f"expected 16, 32, 64 or 128 (a power of two >= 16 dividing the "
                                         f"model's 384 and 1536 input features), got {value!r}")
    return n


def _check(args: argparse.Namespace) -> str | None:
    if args.config is not None and args.settings is not None:
        return "--settings: --config replaces the built-in settings; give one or the other"
    return None


def _run(**kwargs):
    from . import main  # looked up at call time: imported only when this demo runs

    return main.run_demo(**kwargs)


OPTIONS = (
    Option("--no-split", "quantize the model as shipped (skip the float-exact FFN outlier channel split)",
           {"action": "store_true"}, param="split", convert=operator.not_, why="CREPE has no FFN outlier split"),
    Option("--amp", "QAT training precision; bf16 runs the training forwards under torch.autocast(bfloat16) "
                    "(the QAT layers keep float32 math; default fp32)",
           {"choices": ["fp32", "bf16"], "default": "fp32"}),
    Option("--settings", "built-in settings to run, comma-separated, from w8a8 (INT8 per-tensor), w8a8p / w8a8i7 "
                         "(w8a8 on the pair-capped / 7-bit kernel grid), w4a8g (INT4 group-wise weights), w4a8g4 (w4a8g for "
                         "MatMulNBits accuracy level 4), w4a8 "
                         "(INT4 per-channel weights), q8_0 / q4_0 (GGUF files run in llama.cpp; needs the gguf extra); "
                         "default w8a8p,w4a8g",
           {"type": _settings}),
    Option("--group-size", "the w4a8g group size (16, 32, 64 or 128; default 32)", {"type": _group_size}),
    Option("--peers", "also quantize the float ONNX model with ONNX Runtime's quantize_dynamic and "
                      "quantize_static (per-channel) and report them alongside", {"action": "store_true"}),
    Option("--quantize-embeddings", "also quantize the three embedding tables (EmbeddingQAT, weight-only INT8 "
                                    "per row)", {"action": "store_true"}),
)

DEMO = Demo(
    "minilm",
    "convert every used Linear of all-MiniLM-L6-v2 to LinearQAT, then compare float, PTQ and QAT "
    "(cosine-distilled from the float model) for W8A8 per-tensor and W4A8 group-wise, export each to ONNX and "
    "report its size, ONNX Runtime accuracy on all held-out sentences and latency (docs/minilm_demo.md).",
    OPTIONS, _run, _check)
