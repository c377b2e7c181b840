"""How an INT8 weight is stored so that ONNX Runtime computes it exactly on every CPU.

ORT's x86 u8s8 kernels on CPUs without VNNI (AVX2, and AVX-512 without VNNI) add the products of
adjacent pairs of weight codes along the reduction in saturating int16 (`amct_pytorch.saturation`):
a same-sign pair with |q_a| + |q_b| > 128 can saturate, and the layer then computes wrong values
there while it is exact on a VNNI CPU. Such a layer is stored as uint8 codes q + 128 with zero
point 128: ORT still fuses it into its integer ops and takes the u8u8 kernel, which is exact
(measured under qemu's Haswell CPU; slower than u8s8, faster than float). INT4 codes (|q| <= 8)
cannot saturate.

`int8_storage` ("auto" by default) decides per layer: "auto" stores int8 where the codes keep the
pair rule and uint8 + 128 where they do not; "int8" always stores int8 (exact only on VNNI CPUs
when a pair breaks the rule: `export_onnx`'s check then refuses the artifact); "uint8" always
stores uint8 + 128.
"""
from __future__ import annotations

import numpy as np

from ..saturation import layer_summary

INT8_STORAGES = ("auto", "int8", "uint8")
UINT8_ZERO_POINT = 128


def check_storage(int8_storage) -> str:
    if int8_storage not in INT8_STORAGES:
        raise ValueError(f"int8_storage: expected one of {INT8_STORAGES}, got {int8_storage!r}")
    return int8_storage


def choose_storage(codes: np.ndarray, order: str | None, groups: int, int8_storage: str) -> tuple[str, str]:
    """("int8" or "uint8", why) for the INT8 codes of one layer whose fused kernel reduces in `order`
    ("matmul": stored (K, N); "linear": (out, in); "conv": (out, in/groups, *kernel); None: a float
    kernel, which cannot saturate)."""
    if int8_storage == "uint8":
        return "uint8", "int8_storage='uint8'"
    if order is None:
        return "int8", "runs on a float kernel (no integer pair sums)"
    summary = layer_summary(codes, order, groups)
    if summary["exact_on_every_cpu"]:
        return "int8", "keeps the u8s8 pair rule: exact on every CPU"
    k, k1, n = summary["first_violation"]
    why = (f"{summary['violating_pairs']} of {summary['pairs']} code pairs can saturate ORT's u8s8 kernel on CPUs "
           f"without VNNI (first: positions {k}, {k1} of output {n})")
    if int8_storage == "int8":
        return "int8", why + "; kept int8 as asked (int8_storage='int8'): exact only on VNNI CPUs"
    return "uint8", why + "; stored as uint8 + 128 (ORT's exact u8u8 kernel)"


def as_uint8(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int16) + UINT8_ZERO_POINT).astype(np.uint8)
