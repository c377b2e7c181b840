"""The MiniLM demo's deployment: ONNX artifacts, their ONNX Runtime accuracy, size and latency, and
ONNX Runtime's own quantizations of the float model (--peers)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ...export import export_bert_gguf, export_gguf, export_onnx, int8_saturation_report, llama_embed, llama_run
from ...export.gguf import QUANT_TYPES
from ..common.ort import ort_session, quiet_third_party
from .model import SentenceEncoder, in_text_order, tokenize
from .settings import Options


def export_encoder(model, tokenizer, texts, path, **export_kwargs) -> dict[str, Any]:
    """Export `model` as SentenceEncoder(input_ids, attention_mask) -> embedding, batch and sequence
    dynamic (one artifact for every length), quantized weights stored as integers. `export_kwargs`
    go to export_onnx (e.g. group_wise_int4="qdq"); check=False unless given."""
    encoder = SentenceEncoder(model).eval()
    batch = tokenize(tokenizer, texts)
    export_kwargs.setdefault("check", False)  # the demo compares ORT on every held-out sentence instead
    start = time.perf_counter()
    with quiet_third_party():
        result = export_onnx(encoder, (batch["input_ids"], batch["attention_mask"]), path, **export_kwargs)
    return {"path": str(path), "size_mb": round(os.path.getsize(path) / 1e6, 2),
            "dynamic_dims": [list(d) for d in result.dynamic_dims],
            "weight_storage": {s: sum(f.storage == s for f in result.folded_weights)
                               for s in sorted({f.storage for f in result.folded_weights})},
            "int8_exactness": int8_saturation_report(path),
            "export_time_s": round(time.perf_counter() - start, 2)}


def session_feed(session, batch) -> dict:
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
        parts.append(torch.from_numpy(session.run(None, session_feed(session, b))[0]))
        order.append(b["order"])
    return in_text_order(parts, order)


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
                s.run(None, session_feed(s, f))
    times = {name: [] for name in sessions}
    names = list(sessions)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            s = sessions[name]
            fed = [session_feed(s, f) for f in feeds]
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


def peer_dynamic(float_path, out, reduce_range=False) -> Path:
    """ORT's own dynamic quantization of the float artifact: INT8 per-channel weights (MatMul and
    the embedding Gather), activations quantized at run time. `reduce_range`: 7-bit weights, ORT's
    recommendation for x86 CPUs without VNNI (whose u8s8 kernel saturates on full-range int8 pairs)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_third_party():
        quantize_dynamic(str(float_path), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         reduce_range=reduce_range)
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




# ---- GGUF for llama.cpp (--settings q8_0,q4_0) --------------------------------------------------
def _cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double())
    return {"mean_cos": float(c.mean()), "min_cos": float(c.min())}


def gguf_accuracy(path, texts, evaluator, torch_embeddings=None) -> dict[str, Any]:
    """The GGUF run by llama.cpp (llama-cpp-python in a child process, 1 thread) on every held-out
    sentence: cosine to the float PyTorch model and (when given) to the PyTorch QAT model."""
    start = time.perf_counter()
    got = torch.from_numpy(llama_embed(path, list(texts), threads=1))
    out = {**_cosines(got, evaluator.reference), "sentences": len(texts)}
    if torch_embeddings is not None:
        agree = _cosines(got, torch_embeddings)
        out["vs_torch_mean_cos"], out["vs_torch_min_cos"] = agree["mean_cos"], agree["min_cos"]
    out["eval_time_s"] = round(time.perf_counter() - start, 2)
    return out


def gguf_file(result, kind: str, label: str) -> dict[str, Any]:
    """The size facts of an export_gguf / export_bert_gguf result."""
    emb = result.tensor_bytes["token_embd.weight"]
    return {"kind": kind, "label": label, "path": str(result.path), "size_mb": round(result.file_bytes / 1e6, 2),
            "token_embd_type": result.tensor_types["token_embd.weight"],
            "token_embd_share": round(emb / result.file_bytes, 4)}


def export_gguf_student(student, tokenizer, path) -> dict[str, Any]:
    """A GGUF QAT student as its trained codes and scales (export_gguf)."""
    start = time.perf_counter()
    res = export_gguf(student.eval(), path, tokenizer=tokenizer)
    return {**gguf_file(res, "qat", "QAT"), "export_time_s": round(time.perf_counter() - start, 2)}


def gguf_float_and_peer(model, tokenizer, out: Path, kind: str) -> dict[str, Any]:
    """The float model as a GGUF of `kind`: F32 / F16, or llama-quantize's Q8_0 / Q4_0 of every encoder
    linear and token_embd (the PTQ peer: the QAT file's tensor set, size and types)."""
    path = out / f"float_{kind}.gguf"
    res = export_bert_gguf(model, tokenizer, path, linear_type=kind, token_embd_type=kind)
    label = f"float model as {kind.upper()}" + (" (llama-quantize's blocks: PTQ peer)" if kind in QUANT_TYPES else "")
    return gguf_file(res, "peer" if kind in QUANT_TYPES else "float", label)


def gguf_latency(paths: dict[str, str], texts, opts: Options) -> dict[str, Any]:
    """llama.cpp latency per sentence (n_threads = n_threads_batch = 1): each of the first
    `opts.gguf_latency_sentences` held-out sentences embedded alone, its best of `opts.gguf_latency_reps`
    passes (the other processes of a shared machine inflate a best-of less than a mean), then the median."""
    start = time.perf_counter()
    texts = list(texts[:opts.gguf_latency_sentences])
    out = {}
    for name, path in paths.items():
        run = llama_run(path, texts * opts.gguf_latency_reps, threads=1)
        best = [min(run.seconds[k + r * len(texts)] for r in range(opts.gguf_latency_reps)) for k in range(len(texts))]
        out[name] = round(1e3 * statistics.median(best), 3)
    return {"threads": 1, "reps": opts.gguf_latency_reps, "sentences": len(texts), "median_ms": out,
            "time_s": round(time.perf_counter() - start, 2)}
