"""The `amct-qat` console script."""
from __future__ import annotations

import argparse
import sys


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _settings(value: str) -> str:
    from .demo.main import parse_settings

    try:
        parse_settings(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _group_size(value: str) -> int:
    n = _positive(value)
    if n not in (16, 32, 64, 128):  # powers of two >= 16 dividing 384 and 1536
        raise argparse.ArgumentTypeError(f"expected 16, 32, 64 or 128 (a power of two >= 16 dividing the "
                                         f"model's 384 and 1536 input features), got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-qat", description="Quantization-aware training with LinearQAT.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="whole-model QAT of all-MiniLM-L6-v2 (default) or CREPE: float vs PTQ vs QAT, offline",
        description="--model minilm (default): convert every used Linear of all-MiniLM-L6-v2 to LinearQAT, then "
                    "compare float, PTQ and QAT (cosine-distilled from the float model) for W8A8 per-tensor and "
                    "W4A8 group-wise, export each to ONNX and report its size, ONNX Runtime accuracy on all "
                    "held-out sentences and latency (docs/minilm_demo.md). --model crepe: convert every Conv1d and "
                    "the classifier of the pretrained "
                    "CREPE pitch estimator (tiny) and compare float, PTQ and QAT (distilled from the float "
                    "saliences on synthesized tones) for W8A8 and W4A8 per-tensor by raw pitch accuracy. "
                    "Prints a table and writes report.json, plot.png and ONNX models.")
    demo.add_argument("--model", choices=("minilm", "crepe"), default="minilm",
                      help="which pretrained model: minilm (default) or crepe (see docs/crepe_demo.md)")
    demo.add_argument("--steps", type=_positive,
                      help="QAT training steps for every setting (default minilm: w8a8 150, w4a8g 150, w4a8 300, "
                           "--config 200; "
                           "quick 6; crepe: w8a8 60, w4a8 150, --config 200; quick 4)")
    demo.add_argument("--batch-size", type=_positive,
                      help="sentences (minilm, default 32) or frames (crepe, default 64) per training batch")
    demo.add_argument("--out", default="amct_qat_out", help="output folder (default ./amct_qat_out)")
    demo.add_argument("--config", help="a JSON AMCT config file to run instead of the two built-in settings")
    demo.add_argument("--quick", action="store_true", help="smoke run on a few sentences or frames (under a minute)")
    demo.add_argument("--no-split", action="store_true",
                      help="minilm only (an error with --model crepe): quantize the model as shipped "
                           "(skip the float-exact FFN outlier channel split)")
    demo.add_argument("--amp", choices=["fp32", "bf16"], default="fp32",
                      help="minilm only: QAT training precision; bf16 runs the training forwards under "
                           "torch.autocast(bfloat16) (the QAT layers keep float32 math; default fp32)")
    demo.add_argument("--compare-batchnorm", action="store_true",
                      help="crepe only: also run the harder setting's QAT with BatchNorm training (batch "
                           "statistics) and report both modes")
    demo.add_argument("--settings", type=_settings,
                      help="minilm only: built-in settings to run, comma-separated, from w8a8 (INT8 per-tensor), "
                           "w4a8g (INT4 group-wise weights), w4a8 (INT4 per-channel weights); default w8a8,w4a8g")
    demo.add_argument("--group-size", type=_group_size,
                      help="minilm only: the w4a8g group size (16, 32, 64 or 128; default 32)")
    demo.add_argument("--peers", action="store_true",
                      help="minilm only: also quantize the float ONNX model with ONNX Runtime's quantize_dynamic "
                           "and quantize_static (per-channel) and report them alongside")
    demo.add_argument("--quantize-embeddings", action="store_true",
                      help="minilm only: also quantize the three embedding tables (EmbeddingQAT, weight-only INT8 "
                           "per row)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.main import run_demo, settings_from_file

        if args.model == "crepe" and args.no_split:
            parser.error("--no-split: applies only to --model minilm (CREPE has no FFN outlier split)")
        if args.model != "crepe" and args.compare_batchnorm:
            parser.error("--compare-batchnorm: applies only to --model crepe")
        if args.model == "crepe" and args.amp != "fp32":
            parser.error(f"--amp {args.amp}: applies only to --model minilm")
        if args.model == "crepe":
            for flag, given in (("--settings", args.settings), ("--group-size", args.group_size),
                                ("--peers", args.peers), ("--quantize-embeddings", args.quantize_embeddings)):
                if given:
                    parser.error(f"{flag}: applies only to --model minilm")
        if args.config is not None and args.settings is not None:
            parser.error("--settings: --config replaces the built-in settings; give one or the other")
        if args.config is not None:
            try:
                settings_from_file(args.config)
            except (TypeError, ValueError) as err:
                parser.error(f"--config {args.config}: {err}")
        try:
            if args.model == "crepe":
                from .demo.crepe_main import run_crepe_demo

                run_crepe_demo(out=args.out, steps=args.steps, batch_size=args.batch_size, config=args.config,
                               quick=args.quick, progress=not args.no_progress,
                               compare_batchnorm=args.compare_batchnorm)
            else:
                run_demo(out=args.out, steps=args.steps, batch_size=args.batch_size, config=args.config,
                         quick=args.quick, progress=not args.no_progress,
                         split=not args.no_split, amp=args.amp, settings=args.settings, group_size=args.group_size,
                         peers=args.peers, quantize_embeddings=args.quantize_embeddings)
        except ImportError as err:
            print(f"amct-qat demo: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\namct-qat demo: interrupted; no report was written", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
