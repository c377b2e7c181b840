"""The demo's work: float vs PTQ vs QAT of all-MiniLM-L6-v2, one setting after another.

QAT here = convert every used Linear, calibrate (IFMR, one batch), then fine-tune the
student by distilling the float model's sentence embeddings with a cosine loss. PTQ is
the same calibrated model without the fine-tuning.
"""
from __future__ import annotations

import copy
import random
import time

import torch
import torch.nn as nn

from ...config import parse_config
from ...convert import QAT_CLASSES, calibrate, to_qat
from ...export import LlamaGELU
from ...outliers import split_outlier_channels
from ..common.settings import Setting, setting_options
from ..common.training import Timer, clip_ranges, train_loop
from . import data as demo_data
from .model import SKIP, batches, embed, encode, ffn_pairs, load_model, tokenize
from .settings import EMBEDDING_OVERRIDES, Options, is_gguf

# GGUF settings: the word embeddings (llama.cpp's token_embd) in the setting's block format too, the
# position and token-type tables float (llama.cpp keeps them F32)
GGUF_EMBEDDING_SKIP = ["embeddings.position_embeddings", "embeddings.token_type_embeddings"]


def gguf_overrides(config) -> dict:
    weights = {k: v for k, v in config.to_dict()["retrain_weight_config"].items()
               if k in ("gguf_type", "weights_retrain_algo")}
    return {"embeddings.word_embeddings": {"retrain_weight_config": weights}}


def use_llama_gelu(model) -> int:
    """The FFN activation as llama.cpp computes it (ggml's fp16-table tanh GELU); returns how many."""
    layers = model.encoder.layer
    for layer in layers:
        layer.intermediate.intermediate_act_fn = LlamaGELU()
    return len(layers)


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

    def accuracy(self, embeddings: torch.Tensor) -> dict[str, float]:
        """Mean and min cosine of held-out embeddings (text order) to the float model's."""
        cos = (embeddings * self.reference).sum(1)
        return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}

    def __call__(self, model, keep: dict | None = None) -> dict[str, float]:
        emb = encode(model, self.eval_batches)
        if keep is not None:
            keep["embeddings"] = emb
        lee = self.lee_pearson(model)
        return {**self.accuracy(emb), "lee_pearson": lee, "lee_delta": lee - self.float_lee}


def _autocast(model, amp):
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=(amp == "bf16"))


def train(student, tokenizer, texts, targets, evaluator, opts: Options, steps: int) -> dict[str, list]:
    """Distil: minimise 1 - cos(student embedding, float embedding) on random batches."""
    rng = random.Random(opts.seed + 1)
    for m in student.modules():  # the float targets were made without dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    index = list(range(len(texts)))

    def step_loss(step):
        student.train()
        pick = rng.sample(index, min(opts.batch_size, len(index)))
        with _autocast(student, opts.amp):
            emb = embed(student, tokenize(tokenizer, [texts[k] for k in pick]))
        return (1.0 - (emb.float() * targets[pick]).sum(1)).mean()

    return train_loop(student, opts, steps, step_loss, lambda: float(evaluator.cosines(student).mean()),
                      "eval_mean_cos", "QAT training", ".2e", torch.optim.AdamW, weight_decay=0.0)


def uses_split(config, opts: Options) -> bool:
    """The outlier split adds FFN neurons (1536 -> 1536 + k inputs of FFN-out), which a group_size
    must divide; group-wise scales confine an outlier to its own group anyway: no split there."""
    return opts.split_outliers and parse_config(config).retrain_weight_config.group_size is None


def run_setting(setting: Setting, model, tokenizer, train_texts, targets, evaluator, opts: Options) -> dict:
    timer = Timer()
    opts = setting_options(opts, setting)
    steps = opts.steps or setting.steps
    config = parse_config(setting.config)
    overrides = EMBEDDING_OVERRIDES if opts.quantize_embeddings else None
    layer_types = [*QAT_CLASSES, nn.Embedding] if opts.quantize_embeddings else None
    skip = SKIP
    gguf = is_gguf(setting)
    if gguf:
        overrides, layer_types, skip = gguf_overrides(config), [*QAT_CLASSES, nn.Embedding], SKIP + GGUF_EMBEDDING_SKIP
    rng = random.Random(opts.seed)
    size = min(opts.calib_size, len(train_texts))
    calib_batches = [tokenize(tokenizer, rng.sample(train_texts, size))
                     for _ in range(config.retrain_data_config.batch_num)]

    with timer("calibrate"):
        ptq = copy.deepcopy(model)
        if gguf:
            use_llama_gelu(ptq)
        summary = to_qat(ptq, config, skip=skip, overrides=overrides, layer_types=layer_types)
        if not gguf:  # a dynamic activation has nothing to calibrate
            calibrate(ptq, calib_batches, progress=opts.progress)
    with timer("ptq_eval"):
        ptq_metrics = evaluator(ptq)
    before = clip_ranges(ptq)
    student = copy.deepcopy(ptq)  # QAT starts from the PTQ (calibrated) state
    with timer("train"):
        history = train(student, tokenizer, train_texts, targets, evaluator, opts, steps)
    kept = {}
    with timer("qat_eval"):
        qat_metrics = evaluator(student, keep=kept)
    return {
        "name": setting.name, "label": setting.label, "config": config.to_dict(),
        "converted": len(summary.converted), "left_float": summary.skipped,
        "embeddings_quantized": opts.quantize_embeddings or gguf, "gguf": gguf,
        "ptq": ptq_metrics, "qat": qat_metrics, "times_s": timer.times, "history": history, "steps": steps,
        "lr_weights": opts.lr_weights,
        "clip_ranges": {"before": before, "after": clip_ranges(student)},
        "_student": student, "_embeddings": kept["embeddings"],
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


def prepare(opts: Options, timer: Timer):
    """Model, tokenizer, texts and the float reference embeddings."""
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
