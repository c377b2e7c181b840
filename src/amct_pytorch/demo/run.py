"""The demo: float vs PTQ vs QAT of all-MiniLM-L6-v2, one setting after another.

QAT here = convert every used Linear, calibrate (IFMR, one batch), then fine-tune the
student by distilling the float model's sentence embeddings with a cosine loss. PTQ is
the same calibrated model without the fine-tuning.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..config import parse_config
from ..convert import calibrate, qat_layers, to_qat
from ..outliers import split_outlier_channels
from . import data as demo_data
from .model import batches, embed, encode, ffn_pairs, pool, require, tokenize

# The pooler (CLS dense + tanh) is not part of the sentence embedding: left float.
SKIP = ["pooler.dense"]
CLIP_NAMES = ("acts_clip_max", "acts_clip_min")


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    config: dict
    steps: int = 200  # QAT steps unless --steps overrides (INT4 weights need more to settle)


SETTINGS = (
    Setting("w8a8", "W8A8 per-tensor (seed default config)", {}, steps=150),
    Setting("w4a8", "W4A8: INT4 per-channel ULQ weights, INT8 activations",
            {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True,
                                       "weights_retrain_algo": "ulq_quantize"}}, steps=300),
)


@dataclass
class Options:
    steps: int | None = None  # None: each setting's own count
    batch_size: int = 32
    calib_size: int = 32
    # Clip bounds are O(1..25) and must travel far (a post-GELU input calibrates to about
    # [-18, 18] though it is >= -0.17): they get a large Adam step; weight scales are O(0.01).
    lr_weights: float = 5e-5
    lr_clips: float = 0.3
    lr_weight_scales: float = 1e-3
    eval_points: int = 4  # held-out evaluations along training (for the plot)
    max_eval: int | None = None  # cap on held-out sentences (quick mode)
    max_train: int | None = None
    seed: int = 0
    # Split FFN-out outlier weights before quantizing (float-exact; see amct_pytorch.outliers):
    # one weight of 7.9 among weights of std 0.045 otherwise sets block 0's per-tensor INT8 step.
    split_outliers: bool = True
    split_ratio: float = 3.0
    settings: tuple = SETTINGS
    progress: bool = True
    amp: str = "fp32"  # "bf16": QAT training forwards under torch.autocast(device, bfloat16)


@dataclass
class Timer:
    times: dict = field(default_factory=dict)

    def __call__(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.start, 2)
        return _Phase()


class SentenceEncoder(nn.Module):
    """input_ids, attention_mask -> L2-normalised mean-pooled embeddings (what ONNX gets)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return pool(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                    attention_mask)


class Evaluator:
    """Cosine to the float embeddings on held-out sentences and Lee-50 Pearson."""

    def __init__(self, model, tokenizer, eval_texts, batch_size=64):
        self.eval_batches = batches(tokenizer, eval_texts, batch_size)
        self.lee_batches = batches(tokenizer, demo_data.lee_documents(), 16)
        self.human = demo_data.lee_ratings()
        self.pairs = torch.triu_indices(50, 50, offset=1)
        self.reference = encode(model, self.eval_batches)
        self.float_lee = self.lee_pearson(model)

    def lee_pearson(self, model) -> float:
        docs = encode(model, self.lee_batches)
        i, j = self.pairs
        return demo_data.pearson((docs @ docs.T)[i, j], self.human)

    def cosines(self, model) -> torch.Tensor:
        return (encode(model, self.eval_batches) * self.reference).sum(1)

    def __call__(self, model) -> dict[str, float]:
        cos = self.cosines(model)
        lee = self.lee_pearson(model)
        return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "lee_pearson": lee,
                "lee_delta": lee - self.float_lee}


def clip_ranges(model) -> dict[str, list[float]]:
    return {name: [m.acts_clip_min.item(), m.acts_clip_max.item()] for name, m in qat_layers(model).items()}


def _progress(total, desc, enabled):
    tqdm = require("tqdm.auto").tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def _autocast(model, amp):
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=(amp == "bf16"))


def train(student, tokenizer, texts, targets, evaluator, opts: Options, steps: int) -> dict[str, list]:
    """Distil: minimise 1 - cos(student embedding, float embedding) on random batches."""
    rng = random.Random(opts.seed + 1)
    for m in student.modules():  # the float targets were made without dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    groups = {"clips": [], "weight_scales": [], "weights": []}
    for name, p in student.named_parameters():
        if p.requires_grad:
            kind = "clips" if name.endswith(CLIP_NAMES) else "weight_scales" if name.endswith("wts_scales") else "weights"
            groups[kind].append(p)
    lrs = {"clips": opts.lr_clips, "weight_scales": opts.lr_weight_scales, "weights": opts.lr_weights}
    optim = torch.optim.AdamW([{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps], weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    checkpoints = {round(k * steps / opts.eval_points) for k in range(1, opts.eval_points + 1)}
    history = {"step": [], "loss": [], "eval_step": [0], "eval_mean_cos": [float(evaluator.cosines(student).mean())]}
    index = list(range(len(texts)))
    with _progress(steps, "QAT training", opts.progress) as bar:
        for step in range(1, steps + 1):
            student.train()
            pick = rng.sample(index, min(opts.batch_size, len(index)))
            with _autocast(student, opts.amp):
                emb = embed(student, tokenize(tokenizer, [texts[k] for k in pick]))
            loss = (1.0 - (emb.float() * targets[pick]).sum(1)).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            history["step"].append(step)
            history["loss"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.2e}")
            if step in checkpoints:
                history["eval_step"].append(step)
                history["eval_mean_cos"].append(float(evaluator.cosines(student).mean()))
    student.eval()
    return history


def run_setting(setting: Setting, model, tokenizer, train_texts, targets, evaluator, opts: Options) -> dict:
    timer = Timer()
    steps = opts.steps or setting.steps
    config = parse_config(setting.config)
    rng = random.Random(opts.seed)
    size = min(opts.calib_size, len(train_texts))
    calib_batches = [tokenize(tokenizer, rng.sample(train_texts, size))
                     for _ in range(config.retrain_data_config.batch_num)]

    with timer("calibrate"):
        ptq = copy.deepcopy(model)
        summary = to_qat(ptq, config, skip=SKIP)
        calibrate(ptq, calib_batches, progress=opts.progress)
    with timer("ptq_eval"):
        ptq_metrics = evaluator(ptq)
    before = clip_ranges(ptq)
    student = copy.deepcopy(ptq)  # QAT starts from the PTQ (calibrated) state
    with timer("train"):
        history = train(student, tokenizer, train_texts, targets, evaluator, opts, steps)
    with timer("qat_eval"):
        qat_metrics = evaluator(student)
    return {
        "name": setting.name, "label": setting.label, "config": config.to_dict(),
        "converted": len(summary.converted), "left_float": summary.skipped,
        "ptq": ptq_metrics, "qat": qat_metrics, "times_s": timer.times, "history": history, "steps": steps,
        "clip_ranges": {"before": before, "after": clip_ranges(student)},
        "_student": student,
    }


def split_model(model, evaluator, opts: Options) -> tuple[nn.Module, dict]:
    """The model every setting quantizes: the float model, with FFN outlier channels split
    when opts.split_outliers (checked to compute the same embeddings)."""
    if not opts.split_outliers:
        return model, {"enabled": False}
    start = time.perf_counter()
    base = copy.deepcopy(model)
    splits = split_outlier_channels(base, ffn_pairs(base), ratio=opts.split_ratio)
    cos = evaluator.cosines(base)
    hidden = sum(base.get_submodule(s.up).out_features for s in splits)
    added = sum(s.added for s in splits)
    return base, {
        "enabled": True, "ratio": opts.split_ratio, "pairs": len(splits), "added_neurons": added,
        "hidden_before": hidden - added, "hidden_after": hidden,
        "float_min_cos_after_split": float(cos.min()),
        "layers": {s.down: {"columns_split": len(s.columns), "added": s.added,
                            "max_abs_weight_before": round(s.max_abs_before, 4),
                            "max_abs_weight_after": round(s.max_abs_after, 4)} for s in splits},
        "time_s": round(time.perf_counter() - start, 2)}


def export_check(student, tokenizer, texts, path) -> dict[str, Any]:
    """Export the QAT encoder to ONNX QDQ and compare ONNX Runtime with PyTorch eval."""
    from ..export import export_onnx, ort_session

    encoder = SentenceEncoder(student).eval()
    batch = tokenize(tokenizer, texts)
    inputs = (batch["input_ids"], batch["attention_mask"])
    start = time.perf_counter()
    # onnxscript's constant folder logs a harmless "Evaluation failed" for shape ops it skips
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:  # rounding ties can move one activation by a grid step: check=False, measured below
        export_onnx(encoder, inputs, path, check=False)
    finally:
        folding_log.setLevel(level)
    session = ort_session(path)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        want = encoder(*inputs)
    return {"path": str(path), "sentences": len(texts), "max_abs_diff": float((got - want).abs().max()),
            "min_cos_ort_vs_torch": float(torch.nn.functional.cosine_similarity(got, want).min()),
            "time_s": round(time.perf_counter() - start, 2)}


def prepare(opts: Options, timer: Timer):
    """Model, tokenizer, texts and the float reference embeddings."""
    from .model import load_model

    with timer("load"):
        model, tokenizer = load_model()
        train_texts, eval_texts = demo_data.split_sentences(demo_data.doc_sentences())
        if opts.max_train:
            train_texts = train_texts[: opts.max_train]
        if opts.max_eval:
            eval_texts = eval_texts[: opts.max_eval]
    with timer("float_eval"):
        evaluator = Evaluator(model, tokenizer, eval_texts)
    with timer("float_targets"):
        targets = encode(model, batches(tokenizer, train_texts, 64))
    return model, tokenizer, train_texts, eval_texts, evaluator, targets
