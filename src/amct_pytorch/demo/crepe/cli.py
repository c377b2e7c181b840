"""`amct-qat demo --model crepe`: the options only this demo takes."""
from __future__ import annotations

from ..common.cli import Demo, Option


def _run(**kwargs):
    from . import main  # looked up at call time: imported only when this demo runs

    return main.run_crepe_demo(**kwargs)


OPTIONS = (
    Option("--compare-batchnorm", "also run the harder setting's QAT with BatchNorm training (batch statistics) "
                                  "and report both modes", {"action": "store_true"}),
)

DEMO = Demo(
    "crepe",
    "convert every Conv1d and the classifier of the pretrained CREPE pitch estimator (tiny) and compare float, "
    "PTQ and QAT (distilled from the float saliences on synthesized tones) for W8A8 and W4A8 per-tensor by raw "
    "pitch accuracy.",
    OPTIONS, _run)
