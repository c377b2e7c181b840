"""MiniLM (all-MiniLM-L6-v2) as GGUF in llama.cpp: F32 vs PyTorch, Q8_0 / Q4_0 PTQ (llama-quantize's
blocks of the float model) vs float, PyTorch emulation vs llama.cpp with the same weights, sizes,
1-thread latency. Held-out demo sentences (demo.data.split_sentences).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/gguf_minilm.py --n 246 --out benchmarks/results_gguf_minilm.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amct_pytorch.blockwise import LLAMA_CPP_X86_Q8_0
from amct_pytorch.demo import data as demo_data
from amct_pytorch.demo import model as demo_model
from amct_pytorch.gguf_export import QuantBlocks, export_bert_gguf, llama_emulation, llama_run


def cos_stats(a, b):
    c = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(c.mean()), "min": float(c.min())}


@torch.no_grad()
def torch_embed(model, tokenizer, texts):
    if next(model.parameters()).dtype == torch.float32:
        return demo_model.encode(model, demo_model.batches(tokenizer, texts, 16)).numpy()
    out = []  # demo_model.encode collects float32; float64 models one batch at a time here
    for b in demo_model.batches(tokenizer, texts, 16):
        e = demo_model.embed(model, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        out.append((b["order"], e))
    order = torch.cat([o for o, _ in out])
    emb = torch.cat([e for _, e in out])
    return emb[torch.argsort(order)].numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--latency-sentences", type=int, default=60)
    ap.add_argument("--latency-repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = demo_model.load_model()
    _, held_out = demo_data.split_sentences(demo_data.doc_sentences())
    texts = held_out[:args.n]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("pooler")]
    emb_w = model.embeddings.word_embeddings.weight.detach()
    t0 = time.perf_counter()
    ref = torch_embed(model, tok, texts)
    results = {"sentences": len(texts), "cpu": platform.processor() or platform.machine(), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for kind in ("f32", "f16", "q8_0", "q4_0"):
            path = Path(tmp) / f"minilm-{kind}.gguf"
            if kind in ("q8_0", "q4_0"):
                weights = {n: QuantBlocks.from_float(model.get_submodule(n).weight.detach(), kind) for n in linears}
                token_embd = QuantBlocks.from_float(emb_w, kind)
            else:
                weights, token_embd = None, None
            res = export_bert_gguf(model, tok, path, linear_weights=weights, linear_type=kind,
                                   token_embd=token_embd, token_embd_type=kind)
            run = llama_run(path, texts, threads=1, with_tokens=(kind == "f32"))
            runs[kind] = run
            row = {"file_bytes": res.file_bytes, "token_embd_bytes": res.tensor_bytes["token_embd.weight"],
                   "token_embd_share": res.tensor_bytes["token_embd.weight"] / res.file_bytes,
                   "llama_vs_float": cos_stats(run.embeddings, ref),
                   "latency_ms_1thread_first_pass": {"mean": 1e3 * float(np.mean(run.seconds)),
                                                     "median": 1e3 * float(np.median(run.seconds))}}
            # 1-thread latency (n_threads = n_threads_batch = 1): each sentence's best of R passes, so that
            # other processes on a shared machine inflate it less
            lat_texts = texts[:args.latency_sentences]
            lat = llama_run(path, lat_texts * args.latency_repeats, threads=1)
            best = np.array(lat.seconds).reshape(args.latency_repeats, len(lat_texts)).min(0)
            row["latency_ms_1thread_best_of_repeats"] = {"median": 1e3 * float(np.median(best)),
                                                         "mean": 1e3 * float(best.mean()),
                                                         "sentences": len(lat_texts), "repeats": args.latency_repeats}
            if kind == "f32":
                same = sum(ids == tok(s, truncation=True, max_length=512)["input_ids"]
                           for s, ids in zip(texts, run.tokens))
                row["tokenization_identical"] = f"{same}/{len(texts)}"
                row["llama_vs_torch_llama_gelu"] = cos_stats(run.embeddings, torch_embed(
                    llama_emulation(model, gelu="llama"), tok, texts))
            if weights is not None:
                for act, gelu in ((None, "erf"), ("x86", "erf"), ("x86", "llama"), (None, "llama")):
                    emu = llama_emulation(model, weights, act_spec=LLAMA_CPP_X86_Q8_0 if act else None, gelu=gelu,
                                          token_embd=token_embd)
                    e = torch_embed(emu, tok, texts)
                    row[f"llama_vs_torch[act={act or 'float'},gelu={gelu}]"] = cos_stats(run.embeddings, e)
                    if act and gelu == "erf":
                        row["torch_emulation_vs_float"] = cos_stats(e, ref)
                    if act and gelu == "llama":  # the same emulation in float64: how far float order alone moves it
                        e64 = torch_embed(emu.double(), tok, texts)
                        row["torch_fp32_vs_fp64[act=x86,gelu=llama]"] = cos_stats(e, e64)
            results["rows"][kind] = row
            print(kind, json.dumps(row, indent=1), flush=True)
    results["seconds"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
