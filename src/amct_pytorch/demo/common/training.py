"""The pieces of a demo's QAT run: phase timer, progress bar, clip ranges, and the training loop
(three parameter groups, linear warm-up then linear decay, one optimiser step with its bookkeeping)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...convert import qat_layers
from .deps import require

CLIP_NAMES = ("acts_clip_max", "acts_clip_min")


@dataclass
class Timer:
    """`with timer("phase"):` records the phase's wall time (s, 2 decimals) in `timer.times`."""
    times: dict = field(default_factory=dict)

    def __call__(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.start, 2)
        return _Phase()


def progress(total, desc, enabled):
    """A tqdm progress bar over `total` steps (a no-op bar when not `enabled`)."""
    tqdm = require("tqdm.auto").tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def clip_ranges(model) -> dict[str, list[float]]:
    """{layer name: [acts_clip_min, acts_clip_max]} of every QAT layer with an activation quantizer
    (embedding tables have none)."""
    return {name: [m.acts_clip_min.item(), m.acts_clip_max.item()] for name, m in qat_layers(model).items()
            if hasattr(m, "acts_clip_min")}


def param_groups(model, opts) -> list[dict]:
    """The trainable parameters in three groups with their own learning rates: activation clip
    bounds (`opts.lr_clips`), weight scales (`opts.lr_weight_scales`), the rest (`opts.lr_weights`);
    empty groups are left out."""
    groups = {"clips": [], "weight_scales": [], "weights": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = ("clips" if name.endswith(CLIP_NAMES) else
                    "weight_scales" if name.endswith("wts_scales") else "weights")
            groups[kind].append(p)
    lrs = {"clips": opts.lr_clips, "weight_scales": opts.lr_weight_scales, "weights": opts.lr_weights}
    return [{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps]


def warmup_decay(optim, steps: int):
    """Learning rates ramp up linearly over the first 5 % of `steps`, then decay linearly to 0."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))


def optimizer_step(loss, optim, sched, step: int, history: dict, bar, loss_format: str) -> None:
    """One step of a demo's training loop: backward, optimiser and LR-schedule step, and the
    bookkeeping (the loss in `history["loss"]` and on the progress bar)."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sched.step()
    history["step"].append(step)
    history["loss"].append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=format(history["loss"][-1], loss_format))


def train_loop(student, opts, steps: int, step_loss, evaluate, metric: str, desc: str, loss_format: str,
               optimizer=torch.optim.Adam, **optimizer_kwargs) -> dict[str, list]:
    """Train `student` for `steps` steps: `step_loss(step)` gives each step's loss (it sets the
    train mode it needs), `optimizer` (with `param_groups` and `warmup_decay`) steps; `evaluate()`
    runs before the first step and at `opts.eval_points` evenly spaced steps. Returns the history
    {"step", "loss", "eval_step", `metric`}; `student` is left in eval mode."""
    optim = optimizer(param_groups(student, opts), **optimizer_kwargs)
    sched = warmup_decay(optim, steps)
    checkpoints = {round(k * steps / opts.eval_points) for k in range(1, opts.eval_points + 1)}
    history = {"step": [], "loss": [], "eval_step": [0], metric: [evaluate()]}
    with progress(steps, desc, opts.progress) as bar:
        for step in range(1, steps + 1):
            optimizer_step(step_loss(step), optim, sched, step, history, bar, loss_format)
            if step in checkpoints:
                history["eval_step"].append(step)
                history[metric].append(evaluate())
    student.eval()
    return history
