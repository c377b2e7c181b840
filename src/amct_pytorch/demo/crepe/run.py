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
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import parse_config
from ...convert import calibrate, to_qat
from ..common.settings import Setting
from ..common.training import Timer, clip_ranges, train_loop
from . import data as crepe_data
from .model import gaussian_targets, load_crepe, local_average_cents, pitch_metrics
from .settings import CrepeOptions


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
    stream = crepe_data.ToneStream(opts.batch_size, seed=seed)

    def step_loss(step):
        frames, cents = next(stream)
        if opts.loss == "distil":
            with torch.no_grad():
                target = teacher(frames)
        else:
            target = gaussian_targets(cents)
        student.train()
        set_bn_mode(student, bn_mode)
        # BCE minus the targets' own entropy (same gradient): 0 when the student matches them
        return F.binary_cross_entropy_with_logits(student.logits(frames), target) - _entropy(target)

    return train_loop(student, opts, steps, step_loss, lambda: curve(student)["rpa"], "eval_rpa", desc, ".4f")


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
