"""The demo: float vs PTQ vs QAT of all-MiniLM-L6-v2, one setting after another.

QAT here = convert every used Linear, calibrate (IFMR, one batch), then fine-tune the
student by distilling the float model's sentence embeddings with a cosine loss. PTQ is
the same calibrated model without the fine-tuning.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import parse_config
from ..convert import QAT_CLASSES, calibrate, qat_layers, to_qat
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


GROUP_SIZE = 32  # the w4a8g default: one INT4 scale per output row and 32 input features


def w4a8_config(group_size: int | None = None, scale_init: str = "arq") -> dict:
    weights = {"dst_type": "INT4", "channel_wise": True, "weights_retrain_algo": "ulq_quantize"}
    if group_size is not None:
        weights["group_size"] = group_size
    if scale_init != "arq":
        weights["scale_init"] = scale_init
    return {"retrain_weight_config": weights}


def w4a8g(group_size: int = GROUP_SIZE, steps: int = 150) -> Setting:
    # scale_init "mse": PTQ 0.9512 -> 0.9542, QAT (150 steps, scale lr 1e-3) 0.9833 -> 0.9840; with scale
    # lr 3e-5: 0.9907 after 130 steps, 0.9913 after 150 (benchmarks/w4_recipe_sweep.py)
    return Setting("w4a8g", f"W4A8 group-wise: INT4 ULQ weights (MSE-initialised scales), one scale per row and "
                            f"{group_size} inputs, INT8 activations", w4a8_config(group_size, "mse"), steps=steps)


# Every built-in setting, by name (`--settings`); DEFAULT_SETTINGS run without options.
SETTINGS = {
    # 150 steps each: w8a8 0.9970, w4a8g 0.9913 held-out mean cosine. 120 / 130 steps reach 0.9961 / 0.9907
    # (100 w8a8 steps: 0.9957), too close to the 0.996 / 0.99 targets for another CPU's rounding; the
    # default run is ~5 min on a 2-core machine either way (benchmarks/w4_recipe_sweep.py, docs/minilm_demo.md)
    "w8a8": Setting("w8a8", "W8A8 per-tensor (seed default config)", {}, steps=150),
    "w4a8g": w4a8g(GROUP_SIZE, steps=150),
    "w4a8": Setting("w4a8", "W4A8: INT4 per-channel ULQ weights, INT8 activations", w4a8_config(), steps=300),
}
DEFAULT_SETTINGS = ("w8a8", "w4a8g")
# --quantize-embeddings: the three embedding tables as weight-only INT8 per row (EmbeddingQAT)
EMBEDDING_OVERRIDES = {"embeddings.*": {"retrain_weight_config": {"channel_wise": True}}}


@dataclass
class Options:
    steps: int | None = None  # None: each setting's own count
    batch_size: int = 32
    calib_size: int = 32
    # Clip bounds are O(1..25) and must travel far (a post-GELU input calibrates to about
    # [-18, 18] though it is >= -0.17): they get a large Adam step; weight scales are O(0.01) and an
    # Adam step of 1e-3 moved INT4 group scales by ~10 % per step: w4a8g QAT (150 steps) 0.9840 at 1e-3,
    # 0.9889 at 3e-4, 0.9907 at 1e-4, 0.9913 at 3e-5 (benchmarks/w4_recipe_sweep.py). Only ULQ settings
    # learn scales (w8a8's ARQ scales follow the weights).
    lr_weights: float = 5e-5
    lr_clips: float = 0.3
    lr_weight_scales: float = 3e-5
    eval_points: int = 4  # held-out evaluations along training (for the plot)
    max_eval: int | None = None  # cap on held-out sentences (quick mode)
    max_train: int | None = None
    seed: int = 0
    # Split FFN-out outlier weights before quantizing (float-exact; see amct_pytorch.outliers):
    # one weight of 7.9 among weights of std 0.045 otherwise sets block 0's per-tensor INT8 step.
    split_outliers: bool = True
    split_ratio: float = 3.0
    settings: tuple = tuple(SETTINGS[name] for name in DEFAULT_SETTINGS)
    progress: bool = True
    amp: str = "fp32"  # "bf16": QAT training forwards under torch.autocast(device, bfloat16)
    quantize_embeddings: bool = False  # also the embedding tables (INT8 per row, weight only)
    # deployment report: ORT latency (1 thread) on the first `latency_sentences` held-out
    # sentences in batches of `latency_batches`, `latency_reps` interleaved repetitions
    latency_batches: tuple = (8, 32)
    latency_sentences: int = 64
    latency_reps: int = 5
    latency_threads: int = 1
    peers: bool = False  # ORT quantize_dynamic / quantize_static rows of the float model


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


def clip_ranges(model) -> dict[str, list[float]]:
    return {name: [m.acts_clip_min.item(), m.acts_clip_max.item()] for name, m in qat_layers(model).items()
            if hasattr(m, "acts_clip_min")}  # embedding tables have no activation


def _progress(total, desc, enabled):
    tqdm = require("tqdm.auto").tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def with_run_options(opts, quick_values: dict, quick: bool, steps, batch_size):
    """`opts` with a demo's common command-line choices applied: --quick's values, then --steps and
    --batch-size when given."""
    if quick:
        opts = replace(opts, **quick_values)
    if steps is not None:
        opts = replace(opts, steps=steps)
    if batch_size is not None:
        opts = replace(opts, batch_size=batch_size)
    return opts


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
            optimizer_step(loss, optim, sched, step, history, bar, ".2e")
            if step in checkpoints:
                history["eval_step"].append(step)
                history["eval_mean_cos"].append(float(evaluator.cosines(student).mean()))
    student.eval()
    return history


def uses_split(config, opts: Options) -> bool:
    """The outlier split adds FFN neurons (1536 -> 1536 + k inputs of FFN-out), which a group_size
    must divide; group-wise scales confine an outlier to its own group anyway: no split there."""
    return opts.split_outliers and parse_config(config).retrain_weight_config.group_size is None


def run_setting(setting: Setting, model, tokenizer, train_texts, targets, evaluator, opts: Options) -> dict:
    timer = Timer()
    steps = opts.steps or setting.steps
    config = parse_config(setting.config)
    overrides = EMBEDDING_OVERRIDES if opts.quantize_embeddings else None
    layer_types = [*QAT_CLASSES, nn.Embedding] if opts.quantize_embeddings else None
    rng = random.Random(opts.seed)
    size = min(opts.calib_size, len(train_texts))
    calib_batches = [tokenize(tokenizer, rng.sample(train_texts, size))
                     for _ in range(config.retrain_data_config.batch_num)]

    with timer("calibrate"):
        ptq = copy.deepcopy(model)
        summary = to_qat(ptq, config, skip=SKIP, overrides=overrides, layer_types=layer_types)
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
        "embeddings_quantized": opts.quantize_embeddings,
        "ptq": ptq_metrics, "qat": qat_metrics, "times_s": timer.times, "history": history, "steps": steps,
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


# ---- deployment: ONNX artifacts, ONNX Runtime accuracy, size and latency ----------------------
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


def export_encoder(model, tokenizer, texts, path, **export_kwargs) -> dict[str, Any]:
    """Export `model` as SentenceEncoder(input_ids, attention_mask) -> embedding, batch and sequence
    dynamic (one artifact for every length), quantized weights stored as integers. `export_kwargs`
    go to export_onnx (e.g. group_wise_int4="qdq"); check=False unless given."""
    from ..export import export_onnx

    encoder = SentenceEncoder(model).eval()
    batch = tokenize(tokenizer, texts)
    export_kwargs.setdefault("check", False)  # the demo compares ORT on every held-out sentence instead
    start = time.perf_counter()
    with quiet_third_party():
        result = export_onnx(encoder, (batch["input_ids"], batch["attention_mask"]), path, **export_kwargs)
    return {"path": str(path), "size_mb": round(os.path.getsize(path) / 1e6, 2),
            "dynamic_dims": [list(d) for d in result.dynamic_dims],
            "export_time_s": round(time.perf_counter() - start, 2)}


def ort_session(path, threads: int | None = None):
    """An ORT CPU session with default options; `threads` pins the intra-op thread count."""
    import onnxruntime as ort

    from ..export import ort_session as default_session

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return default_session(path, so)


def _feed(session, batch) -> dict:
    """A tokenized batch (input_ids, attention_mask) as the session's inputs; a dict already keyed
    by the session's input names (numpy arrays) is passed through."""
    names = [i.name for i in session.get_inputs()]
    if all(n in batch for n in names):
        return {n: batch[n] for n in names}
    ids, mask = names
    return {ids: batch["input_ids"].numpy(), mask: batch["attention_mask"].numpy()}


def ort_encode(session, tokenized) -> torch.Tensor:
    """Embeddings from ORT of pre-tokenized batches (`model.batches`), in the original text order."""
    parts, order = [], []
    for b in tokenized:
        parts.append(torch.from_numpy(session.run(None, _feed(session, b))[0]))
        order.append(b["order"])
    out = torch.empty(sum(len(o) for o in order), parts[0].shape[1])
    out[torch.cat(order)] = torch.cat(parts)
    return out


def ort_accuracy(path, evaluator, torch_embeddings=None) -> dict[str, Any]:
    """The ORT-run artifact on every held-out sentence, each batch at its own padded length:
    cosine to the float PyTorch model's embeddings, and (when given) the difference to the
    PyTorch model it was exported from."""
    start = time.perf_counter()
    got = ort_encode(ort_session(path), evaluator.eval_batches)
    out = {**evaluator.accuracy(got), "sentences": len(got),
           "max_tokens": max(int(b["input_ids"].shape[1]) for b in evaluator.eval_batches)}
    if torch_embeddings is not None:
        out["max_abs_diff_vs_torch"] = float((got - torch_embeddings).abs().max())
        out["min_cos_vs_torch"] = float(torch.nn.functional.cosine_similarity(got, torch_embeddings).min())
    out["eval_time_s"] = round(time.perf_counter() - start, 2)
    return out


def time_artifacts(sessions: dict, feeds: list[dict], reps: int, warmup: int = 1) -> dict[str, dict]:
    """{name: {"median_ms": ms per batch, "per_rep_ms": [...]}}. Every artifact runs the same batches;
    the artifacts take turns within each repetition (machine noise hits all alike); a repetition's
    time is the mean over its batches, the result the median over repetitions."""
    for s in sessions.values():
        for _ in range(warmup):
            for f in feeds:
                s.run(None, _feed(s, f))
    times = {name: [] for name in sessions}
    names = list(sessions)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            s = sessions[name]
            fed = [_feed(s, f) for f in feeds]
            start = time.perf_counter()
            for f in fed:
                s.run(None, f)
            times[name].append(round((time.perf_counter() - start) * 1e3 / len(feeds), 3))
    return {name: {"median_ms": statistics.median(t), "per_rep_ms": t} for name, t in times.items()}


def latency(paths: dict[str, str], tokenizer, texts, opts: Options) -> dict[str, Any]:
    """ORT latency of every artifact, `opts.latency_threads` intra-op thread(s), per batch size:
    consecutive held-out sentences, each batch padded to its own longest sentence."""
    start = time.perf_counter()
    texts = texts[:opts.latency_sentences]
    sessions = {name: ort_session(p, opts.latency_threads) for name, p in paths.items()}
    out = {}
    for b in opts.latency_batches:
        feeds = [tokenize(tokenizer, texts[k:k + b]) for k in range(0, len(texts) - b + 1, b)]
        if feeds:
            out[str(b)] = {"batches": len(feeds), **time_artifacts(sessions, feeds, opts.latency_reps)}
    return {"threads": opts.latency_threads, "reps": opts.latency_reps, "sentences": len(texts),
            "by_batch": out, "time_s": round(time.perf_counter() - start, 2)}


def peer_dynamic(float_path, out) -> Path:
    """ORT's own dynamic quantization of the float artifact: INT8 per-channel weights (MatMul and
    the embedding Gather), activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_third_party():
        quantize_dynamic(str(float_path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return Path(out)


def weight_matmuls(path) -> list[str]:
    """The MatMul nodes with a weight initializer (the Linear layers, what QAT quantizes); not the
    attention's activation x activation MatMuls."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]


def peer_static(float_path, out, calib_batches) -> Path:
    """ORT's static quantization of the float artifact: QDQ, INT8 per-channel weights, INT8
    activations calibrated (MinMax, ORT's default) on the sentences the QAT settings calibrate on.
    Like the QAT settings it quantizes the Linear MatMuls only: with ORT's default op list (every
    MatMul, Add, Gather, Softmax ...), MinMax calibration left a mean cosine of 0.38 (48 held-out
    sentences)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib_batches)

        def get_next(self):
            b = next(self.items, None)
            return None if b is None else {"input_0": b["input_ids"].numpy(), "input_1": b["attention_mask"].numpy()}

    with quiet_third_party():
        quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=weight_matmuls(float_path))
    return Path(out)


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
