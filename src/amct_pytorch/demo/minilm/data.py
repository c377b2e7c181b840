"""Demo text, all offline: English sentences from CPython's own documentation
(`pydoc_data.topics`, ships with Python) and the Lee-50 similarity benchmark (bundled,
see data/README.md)."""
from __future__ import annotations

import hashlib
import re
from importlib import resources

import torch

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]{2,}")


def doc_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences of `pydoc_data.topics`, deduplicated, in a stable order.

    Indented lines (code, grammar, tables) and reST headings are dropped; a sentence must
    be mostly words so that grammar fragments do not count as English text.
    """
    from pydoc_data.topics import topics

    seen = set()
    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.splitlines()
            if not lines or lines[0].startswith((" ", "\t")):
                continue
            if len(lines) > 1 and set(lines[1].strip()) <= set("*=-~^"):
                continue
            text = " ".join(line.strip() for line in lines)
            for sent in _SENTENCE_END.split(text):
                sent = sent.strip()
                words = sent.split()
                if not (min_words <= len(words) <= max_words) or not sent[0].isupper():
                    continue
                if len(_WORD.findall(sent)) < 0.7 * len(words) or sent in seen:
                    continue
                seen.add(sent)
                out.append(sent)
    return out


def split_sentences(sentences: list[str], eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Disjoint (train, eval) split, decided per sentence by a hash so it does not depend
    on the order or on the Python version's other topics."""
    train, held_out = [], []
    for s in sentences:
        bucket = int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little") / 2**32
        (held_out if bucket < eval_fraction else train).append(s)
    return train, held_out


def _data_file(name: str) -> str:
    # lee.cor is Latin-1 (it has pound signs); the ratings are plain ASCII
    return resources.files(__package__).joinpath("data").joinpath(name).read_text(encoding="latin-1")


def lee_documents() -> list[str]:
    """The 50 Lee documents (one per line of lee.cor)."""
    docs = [line.strip() for line in _data_file("lee.cor").splitlines() if line.strip()]
    if len(docs) != 50:
        raise RuntimeError(f"lee.cor: expected 50 documents, found {len(docs)}")
    return docs


def lee_ratings() -> torch.Tensor:
    """Mean human similarity of the 1225 document pairs i < j (upper triangle, row-major)."""
    rows = [[float(v) for v in line.split()] for line in _data_file("similarities0-1.txt").splitlines()
            if line.strip()]
    matrix = torch.tensor(rows, dtype=torch.float64)
    if matrix.shape != (50, 50):
        raise RuntimeError(f"similarities0-1.txt: expected a 50x50 matrix, got {tuple(matrix.shape)}")
    i, j = torch.triu_indices(50, 50, offset=1)
    return matrix[i, j]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))
