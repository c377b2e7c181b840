"""llama.cpp in a child process (llama-cpp-python, embedding mode) and a PyTorch model computing what a
GGUF computes there (issue 20).

`llama_embed` / `llama_run` return L2-normalised sentence embeddings (llama.cpp aborts kill their
process, hence the child; the GGUF has no normalisation key). `llama_emulation` copies a BERT
encoder with dequantized block weights, llama.cpp's Q8_0 activation quantizer in front of each
quantized linear and optionally ggml's fp16-table tanh GELU (`llama_gelu`).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from typing import Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from .. import blockwise
from .gguf import QuantBlocks, Weight, strip_prefix

_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
args = json.loads(sys.stdin.read())
llm = Llama(model_path=args["path"], embedding=True, n_threads=args["threads"], n_threads_batch=args["threads"],
            n_ctx=args["n_ctx"], n_batch=args["n_ctx"], n_ubatch=args["n_ctx"], verbose=False)
out, times, ntok = [], [], []
for s in args["sentences"]:
    if args["tokens"]:
        ntok.append(llm.tokenize(s.encode("utf-8"), add_bos=True, special=False))
    t0 = time.perf_counter()
    e = llm.embed(s, normalize=False)
    times.append(time.perf_counter() - t0)
    out.append(e)
np.save(args["out"], np.asarray(out, dtype=np.float32))
json.dump({"seconds": times, "tokens": ntok}, open(args["out"] + ".json", "w"))
"""


class LlamaRun(NamedTuple):
    embeddings: np.ndarray  # (n, hidden), L2-normalised
    seconds: list  # wall time of each sentence's embed call
    tokens: list  # llama.cpp's token ids per sentence (when asked for)


def llama_embed(path, sentences: list[str], threads: int = 1, *, n_ctx: int = 512, with_tokens: bool = False,
                timeout: float = 600.0) -> np.ndarray:
    """L2-normalised llama.cpp embeddings of `sentences` (n, hidden), computed in a child process."""
    return llama_run(path, sentences, threads, n_ctx=n_ctx, with_tokens=with_tokens, timeout=timeout).embeddings


def llama_run(path, sentences: list[str], threads: int = 1, *, n_ctx: int = 512, with_tokens: bool = False,
              timeout: float = 600.0) -> LlamaRun:
    """`llama_embed` plus per-sentence timings and (optionally) llama.cpp's tokenization."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected a positive int")
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences: expected a list of str")
    with tempfile.TemporaryDirectory(prefix="amct-llama-") as tmp:
        out = os.path.join(tmp, "emb.npy")
        args = {"path": str(path), "sentences": list(sentences), "threads": threads, "n_ctx": n_ctx,
                "tokens": with_tokens, "out": out}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(args), capture_output=True,
                              text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp child process failed (exit code {proc.returncode}) on {path}:\n"
                               f"{proc.stderr[-4000:]}")
        emb = np.load(out)
        meta = json.load(open(out + ".json"))
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms == 0, 1.0, norms)
    return LlamaRun(emb, meta["seconds"], meta["tokens"])


# ----------------------------------------------------------------------------- PyTorch emulation

GELUS = ("erf", "tanh", "llama")


def llama_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml_gelu as llama.cpp's CPU backend computes it (GGML_GELU_FP16): the tanh approximation
    looked up from a table indexed by fp16(x) and holding fp16 values; x <= -10 gives 0, x >= 10 x."""
    xf = x.to(torch.float32)
    t = xf.detach().to(torch.float16).to(torch.float32)
    table = torch.nn.functional.gelu(t, approximate="tanh").to(torch.float16).to(torch.float32)
    out = torch.where(xf <= -10.0, torch.zeros_like(xf), torch.where(xf >= 10.0, xf, table))
    if xf.requires_grad:  # value: the table; gradient: the tanh GELU's at x
        smooth = torch.nn.functional.gelu(xf, approximate="tanh")
        smooth = torch.where(xf <= -10.0, torch.zeros_like(xf), torch.where(xf >= 10.0, xf, smooth))
        out = out.detach() + (smooth - smooth.detach())
    return out.to(x.dtype)


class LlamaGELU(nn.Module):
    """`llama_gelu` as a module: a BERT FFN activation computing what llama.cpp computes (its
    gradient is the tanh GELU's, straight through the fp16 roundings)."""

    def forward(self, x):
        return llama_gelu(x)


class _Gelu(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "llama":
            return llama_gelu(x)
        return torch.nn.functional.gelu(x, approximate="tanh" if self.kind == "tanh" else "none")


class EmulatedLinear(nn.Module):
    """y = x̂ W^T + b with W the dequantized blocks and x̂ the activation fake-quant of `spec`
    (None: float activations)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.spec = spec

    def forward(self, x):
        if self.spec is not None:
            x = blockwise.fake_quant_act_blocks(x, self.spec)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def llama_emulation(model: nn.Module, linear_weights: Mapping[str, Weight] | None = None, *,
                    act_spec=blockwise.LLAMA_CPP_X86_Q8_0, gelu: str = "erf",
                    token_embd: Weight | None = None) -> nn.Module:
    """A copy of a BERT encoder computing what its GGUF computes in llama.cpp, up to float
    accumulation order: every encoder Linear given as QuantBlocks uses the dequantized blocks and
    fake-quantizes its input with `act_spec` (llama.cpp quantizes the activations of Q8_0/Q4_0
    linears on the fly; x86: LLAMA_CPP_X86_Q8_0); float Linears stay float; `gelu` selects the
    FFN activation ("erf" as in BERT, "tanh", or "llama": ggml's fp16-table tanh GELU);
    `token_embd` (QuantBlocks) replaces the word embeddings with their dequantized value."""
    if gelu not in GELUS:
        raise ValueError(f"gelu={gelu!r}: expected one of {GELUS}")
    out = copy.deepcopy(model).eval()
    bert = getattr(out, "bert", out)
    for name, w in dict(linear_weights or {}).items():
        name = strip_prefix(name)
        mod = bert.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"linear_weights: {name} is not a Linear of the encoder")
        if isinstance(w, QuantBlocks):
            weight, spec = w.check(name).dequantize(), act_spec
        else:
            weight, spec = w.detach().to(torch.float32), None
        bias = None if mod.bias is None else mod.bias.detach().clone()
        parent, _, child = name.rpartition(".")
        setattr(bert.get_submodule(parent) if parent else bert, child, EmulatedLinear(weight, bias, spec))
    if token_embd is not None:
        emb = bert.embeddings.word_embeddings
        value = token_embd.dequantize() if isinstance(token_embd, QuantBlocks) else token_embd.detach()
        with torch.no_grad():
            emb.weight.copy_(value)
    if gelu != "erf":
        for layer in bert.encoder.layer:
            layer.intermediate.intermediate_act_fn = _Gelu(gelu)
    return out
