"""The `amct-qat` console script.

`amct-qat demo [--model NAME]` runs one of the demos declared in DEMOS (the first is the
default). Each demo declares the options only it takes (amct_pytorch.demo.common.cli.Option,
in demo/<name>/cli.py); giving one with another --model is an error built from that declaration.
"""
from __future__ import annotations

import argparse
import sys

from .demo.common.cli import positive_int
from .demo.common.settings import settings_from_file
from .demo.crepe.cli import DEMO as CREPE
from .demo.minilm.cli import DEMO as MINILM

DEMOS = {demo.name: demo for demo in (MINILM, CREPE)}  # --model choices; the first is the default
DEFAULT_DEMO = next(iter(DEMOS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-qat", description="Quantization-aware training with LinearQAT.")
    sub = parser.add_subparsers(dest="command", required=True)
    summaries = " ".join(f"--model {name}{' (default)' if name == DEFAULT_DEMO else ''}: {demo.summary}"
                         for name, demo in DEMOS.items())
    demo = sub.add_parser(
        "demo", help="whole-model QAT of all-MiniLM-L6-v2 (default) or CREPE: float vs PTQ vs QAT, offline",
        description=f"{summaries} Prints a table and writes report.json, plot.png and ONNX models.")
    demo.add_argument("--model", choices=tuple(DEMOS), default=DEFAULT_DEMO,
                      help="which pretrained model: minilm (default) or crepe (see docs/crepe_demo.md)")
    demo.add_argument("--steps", type=positive_int,
                      help="QAT training steps for every setting (default minilm: w8a8 150, w4a8g 150, w4a8 300, "
                           "--config 200; "
                           "quick 6; crepe: w8a8 60, w4a8 150, --config 200; quick 4)")
    demo.add_argument("--batch-size", type=positive_int,
                      help="sentences (minilm, default 32) or frames (crepe, default 64) per training batch")
    demo.add_argument("--out", default="amct_qat_out", help="output folder (default ./amct_qat_out)")
    demo.add_argument("--config", help="a JSON AMCT config file to run instead of the two built-in settings")
    demo.add_argument("--quick", action="store_true", help="smoke run on a few sentences or frames (MiniLM: about 1 min on an idle 2-core CPU, 6 min on a loaded one)")
    for name, spec in DEMOS.items():
        for option in spec.options:
            demo.add_argument(option.flag, help=f"{name} only: {option.help}",
                              **option.kwargs)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _demo_error(args: argparse.Namespace) -> str | None:
    """Why the parsed `amct-qat demo` arguments cannot run, or None."""
    chosen = DEMOS[args.model]
    for name, spec in DEMOS.items():
        if spec is not chosen:
            for option in spec.options:
                if option.given(args):
                    return option.foreign_error(args, name)
    error = chosen.check(args)
    if error is None and args.config is not None:
        try:
            settings_from_file(args.config)
        except (TypeError, ValueError) as err:
            error = f"--config {args.config}: {err}"
    return error


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        error = _demo_error(args)
        if error is not None:
            parser.error(error)
        chosen = DEMOS[args.model]
        kwargs = dict(out=args.out, steps=args.steps, batch_size=args.batch_size, config=args.config,
                      quick=args.quick, progress=not args.no_progress)
        kwargs.update(option.argument(args) for option in chosen.options)
        try:
            chosen.run(**kwargs)
        except ImportError as err:
            print(f"amct-qat demo: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\namct-qat demo: interrupted; no report was written", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
