"""The CREPE demo's work: float vs PTQ vs QAT of pretrained CREPE, one setting after another.

PTQ = to_qat (every Conv1d and the classifier Linear) + calibrate on synthesized tones.
QAT = the PTQ model fine-tuned by distilling the float model: binary cross-entropy between
the student's 360 logits and the float model's sigmoid saliences, on fresh synthesized tones
every step. CREPE's BatchNorms follow a ReLU (not a conv), so they cannot be folded; during
QAT they stay float, frozen in eval mode (running statistics fixed, affine trained), which
the demo compares with letting them train (batch statistics, running statistics updated).
"""
from __future__ import annotations

import copy
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import parse_config
from ..convert import calibrate, qat_layers, to_qat
from . import crepe_data
from .crepe import FRAME, load_crepe, local_average_cents, pitch_metrics
from .run import CLIP_NAMES, Setting, Timer, _progress, optimizer_step

BN_MODES = ("frozen", "train")
LOSSES = ("distil", "pitch")


SETTINGS = (
    Setting("w8a8", "W8A8 per-tensor (seed default config)", {}, steps=60),
    Setting("w4a8", "W4A8 per-tensor: INT4 weights, INT8 activations",
            {"retrain_weight_config": {"dst_type": "INT4"}}, steps=150),
)


@dataclass
class CrepeOptions:
    capacity: str = "tiny"
    steps: int | None = None  # None: each setting's own count
    batch_size: int = 64  # frames per training step
    calib_frames: int = 256  # frames per calibration batch
    eval_frames: int = crepe_data.EVAL_FRAMES
    curve_frames: int = 1024  # first frames of the eval set, evaluated along training for the plot
    eval_points: int = 4
    # measured on w4a8 (150 steps, 2048 eval frames): weights lr 1e-4 -> RPA 98.1%, 3e-4 -> 99.95%
    # (7.3 cents), 1e-3 -> 99.95% (5.3 cents; float 99.90%, 5.7 cents)
    lr_weights: float = 1e-3
    lr_clips: float = 1e-2
    lr_weight_scales: float = 1e-3
    loss: str = "distil"  # distil: BCE to the float saliences; pitch: BCE to CREPE's Gaussian targets
    bn_mode: str = "frozen"
    bn_compare: str | None = "w4a8"  # setting on which the other BatchNorm mode is also run and reported
    latency_batch: int = 256
    latency_runs: int = 5
    seed: int = 0
    settings: tuple = SETTINGS
    progress: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode: expected one of {BN_MODES}, got {self.bn_mode!r}")


class PitchEval:
    """RPA and cents error of a model on a fixed set of frames (float saliences kept as reference)."""

    def __init__(self, frames, cents, batch_size=1024):
        self.frames, self.cents, self.batch_size = frames, cents, batch_size

    @torch.no_grad()
    def salience(self, model) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            return torch.cat([model(self.frames[i:i + self.batch_size])
                              for i in range(0, len(self.frames), self.batch_size)])
        finally:
            model.train(was)

    def metrics(self, salience) -> dict:
        return pitch_metrics(local_average_cents(salience), self.cents)

    def __call__(self, model) -> dict:
        return self.metrics(self.salience(model))


def clip_ranges(model) -> dict[str, list[float]]:
    return {n: [m.acts_clip_min.item(), m.acts_clip_max.item()] for n, m in qat_layers(model).items()}


def set_bn_mode(model: nn.Module, mode: str) -> None:
    """frozen: BatchNorms compute with their running statistics even in train mode;
    train: batch statistics in train mode, running statistics updated (momentum 0.1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if mode == "frozen":
                m.eval()
            else:
                m.momentum = 0.1


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of targets in [0, 1] (the floor of their BCE)."""
    return F.binary_cross_entropy(p, p)


def train(student, teacher, curve: PitchEval, opts: CrepeOptions, steps: int, bn_mode: str, seed: int,
          desc="QAT training") -> dict[str, list]:
    groups = {"clips": [], "weight_scales": [], "weights": []}
    for name, p in student.named_parameters():
        if p.requires_grad:
            kind = ("clips" if name.endswith(CLIP_NAMES) else
                    "weight_scales" if name.endswith("wts_scales") else "weights")
            groups[kind].append(p)
    lrs = {"clips": opts.lr_clips, "weight_scales": opts.lr_weight_scales, "weights": opts.lr_weights}
    optim = torch.optim.Adam([{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps])
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    checkpoints = {round(k * steps / opts.eval_points) for k in range(1, opts.eval_points + 1)}
    history = {"step": [], "loss": [], "eval_step": [0], "eval_rpa": [curve(student)["rpa"]]}
    stream = crepe_data.ToneStream(opts.batch_size, seed=seed)
    with _progress(steps, desc, opts.progress) as bar:
        for step in range(1, steps + 1):
            frames, cents = next(stream)
            if opts.loss == "distil":
                with torch.no_grad():
                    target = teacher(frames)
            else:
                from .crepe import gaussian_targets
                target = gaussian_targets(cents)
            student.train()
            set_bn_mode(student, bn_mode)
            # BCE minus the targets' own entropy (same gradient): 0 when the student matches them
            loss = (F.binary_cross_entropy_with_logits(student.logits(frames), target)
                    - _entropy(target))
            optimizer_step(loss, optim, sched, step, history, bar, ".4f")
            if step in checkpoints:
                history["eval_step"].append(step)
                history["eval_rpa"].append(curve(student)["rpa"])
    student.eval()
    return history


def calibrated(model, config, opts: CrepeOptions):
    """A converted, calibrated copy of `model` (every Conv1d and the classifier)."""
    ptq = copy.deepcopy(model)
    summary = to_qat(ptq, config)
    batches = [crepe_data.synthesize(opts.calib_frames, -(1 + k))[0]  # seeds apart from training and eval
               for k in range(config.retrain_data_config.batch_num)]
    calibrate(ptq, batches, progress=opts.progress)
    return ptq, summary


def run_setting(setting: Setting, model, evaluator: PitchEval, curve: PitchEval, opts: CrepeOptions,
                bn_modes=None) -> dict:
    """PTQ and QAT of one setting; with several `bn_modes`, QAT runs once per mode from the
    same PTQ state (the first mode is the one reported as the setting's QAT)."""
    timer = Timer()
    steps = opts.steps or setting.steps
    config = parse_config(setting.config)
    with timer("calibrate"):
        ptq, summary = calibrated(model, config, opts)
    with timer("ptq_eval"):
        ptq_metrics = evaluator(ptq)
    before = clip_ranges(ptq)
    runs = {}
    for mode in bn_modes or (opts.bn_mode,):
        student = copy.deepcopy(ptq)
        with timer("train" if not runs else f"train_bn_{mode}"):
            history = train(student, model, curve, opts, steps, mode, seed=opts.seed + 1,
                            desc=f"QAT {setting.name} (BatchNorm {mode})")
        with timer("qat_eval" if not runs else f"qat_eval_bn_{mode}"):
            salience = evaluator.salience(student)
        runs[mode] = (student, history, evaluator.metrics(salience), salience)
    mode = next(iter(runs))
    student, history, qat_metrics, salience = runs[mode]
    return {
        "name": setting.name, "label": setting.label, "config": config.to_dict(),
        "converted": len(summary.converted), "left_float": summary.skipped,
        "ptq": ptq_metrics, "qat": qat_metrics, "times_s": timer.times, "history": history, "steps": steps,
        "bn_mode": mode,
        "bn_modes": {m: {**r[2], "history": r[1]} for m, r in runs.items()},
        "clip_ranges": {"before": before, "after": clip_ranges(student)},
        "_student": student, "_salience": salience,
    }


# ---- ONNX ------------------------------------------------------------------------------
class _QuietExport:
    """Hide two harmless exporter logs: onnxscript's constant folder skipping shape ops and
    torch's note that torchvision ops are not registered."""

    NAMES = ("onnxscript.optimizer._constant_folding", "torch.onnx._internal.exporter._registration")

    def __enter__(self):
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        self.levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for n in self.NAMES:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)
        self.warnings.__exit__(*exc)


def export_float(model, path) -> dict:
    """The float model through torch.onnx.export (dynamo, dynamic batch), for the latency baseline."""
    start = time.perf_counter()
    with _QuietExport():
        torch.onnx.export(model.eval(), (torch.zeros(8, FRAME),), path, dynamo=True, external_data=False,
                          input_names=["input_0"], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    return {"path": str(path), "size_bytes": os.path.getsize(path), "time_s": round(time.perf_counter() - start, 2)}


def export_check(student, evaluator: PitchEval, torch_salience, path) -> dict:
    """Export the QAT model with amct_pytorch.export_onnx (dynamic batch), run the artifact in
    ONNX Runtime on the whole eval set: max abs diff to PyTorch and the artifact's own RPA."""
    from ..export import export_onnx, ort_session

    start = time.perf_counter()
    with _QuietExport():  # rounding ties can move one activation by a grid step: check=False, measured below
        export_onnx(student.eval(), (evaluator.frames[:8],), path, check=False)
    export_s = time.perf_counter() - start
    session = ort_session(path)
    name = session.get_inputs()[0].name
    b = evaluator.batch_size
    got = torch.cat([torch.from_numpy(session.run(None, {name: evaluator.frames[i:i + b].numpy()})[0])
                     for i in range(0, len(evaluator.frames), b)])
    diff = (got.double() - torch_salience.double()).abs()
    metrics = evaluator.metrics(got)
    return {"path": str(path), "size_bytes": os.path.getsize(path), "frames": len(got),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ort_rpa": metrics["rpa"], "ort_cents_error": metrics["cents_error"],
            "export_s": round(export_s, 2), "time_s": round(time.perf_counter() - start, 2)}


def ort_latency(path, batch: int, runs: int) -> dict:
    """Median wall time of one ONNX Runtime run on `batch` frames, 1 thread, default graph
    optimizations; also the op types of the optimized graph (whether QLinearConv appeared)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    optimized = f"{path}.ort_optimized.onnx"
    opts.optimized_model_filepath = optimized
    opts.log_severity_level = 3  # its note that a saved optimized graph is hardware specific is expected
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: crepe_data.synthesize(batch, 7)[0].numpy()}
    session.run(None, feed)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    ops = {}
    try:
        for node in onnx.load(optimized).graph.node:
            key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            ops[key] = ops.get(key, 0) + 1
    finally:
        if os.path.exists(optimized):
            os.remove(optimized)
    return {"median_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1),
            "runs": runs, "batch": batch, "threads": 1,
            "optimized_ops": {k: ops[k] for k in sorted(ops)}}


@dataclass
class Prepared:
    model: nn.Module
    evaluator: PitchEval
    curve: PitchEval
    float_metrics: dict
    timer: Timer = field(default_factory=Timer)


def prepare(opts: CrepeOptions, timer: Timer) -> Prepared:
    with timer("load"):
        model = load_crepe(opts.capacity)
    with timer("eval_set"):
        frames, cents = crepe_data.eval_set(opts.eval_frames)
    evaluator = PitchEval(frames, cents)
    curve = PitchEval(frames[: opts.curve_frames], cents[: opts.curve_frames])
    with timer("float_eval"):
        float_metrics = evaluator(model)
    return Prepared(model, evaluator, curve, float_metrics)
