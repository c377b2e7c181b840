"""amct_pytorch.saturation: ORT's u8s8 pairwise int16 saturation (issue 19), checked against the
rule's derivation by brute force, an independent scalar implementation, ORT outputs recorded
under `qemu-x86_64 -cpu Haswell` (tests/data/ort_u8s8_haswell.md), ORT on this machine, and,
when qemu-user is installed, ORT under qemu again."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amct_pytorch import saturation as sat

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "ort_u8s8_haswell.npz"
PROBE = ROOT / "tools" / "ort_u8s8_probe.py"
SX, SY = 2.0 ** -3, 2.0 ** -2   # the probe's activation and output steps


# ---------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------

def test_worst_case_rule_equals_same_sign_sum_over_128_for_every_int8_pair():
    q0, q1 = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij")
    simple = (np.sign(q0) == np.sign(q1)) & (q0 != 0) & (np.abs(q0) + np.abs(q1) > 128)
    np.testing.assert_array_equal(sat.pair_can_saturate(q0, q1), simple)
    assert simple.sum() > 0 and not simple[128 + 64, 128 + 64] and simple[128 + 65, 128 + 64]


@pytest.mark.parametrize("q", [(64, 64), (65, 64), (127, 1), (127, 2), (-64, -64), (-65, -64), (-128, -1),
                               (-128, 1), (127, -128), (-128, -128), (100, 29), (3, 5)])
@pytest.mark.parametrize("box", [(0, 255), (128, 255), (0, 127), (200, 210)])
def test_corner_extremes_equal_brute_force_over_every_activation_pair(q, box):
    lo, hi = box
    a = np.arange(lo, hi + 1)
    sums = a[:, None] * q[0] + a[None, :] * q[1]
    brute = bool((sums > 32767).any() or (sums < -32768).any())
    assert bool(sat.pair_can_saturate(q[0], q[1], lo, hi)) == brute


def test_hand_built_pairs_are_flagged_where_the_kernel_pairs_them():
    kn = np.zeros((8, 6), np.int64)
    kn[0, 0] = kn[1, 0] = 127     # pair (0, 1): flagged
    kn[1, 1] = kn[2, 1] = 127     # rows 1, 2: two different pairs
    kn[0, 2] = kn[2, 2] = 127     # rows 0, 2: two different pairs
    kn[2, 3] = kn[3, 3] = -128    # pair (2, 3), negative: flagged
    kn[4, 4], kn[5, 4] = 127, -128
    kn[6, 5] = kn[7, 5] = 64
    np.testing.assert_array_equal(sat.pair_violations(kn, "matmul"), [[0, 1, 0], [2, 3, 3]])
    # the same layer as a torch Linear weight (out, in)
    np.testing.assert_array_equal(sat.pair_violations(kn.T, "linear"), [[0, 1, 0], [2, 3, 3]])


def test_random_full_range_layer_is_flagged_and_7bit_and_int4_never_are():
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (64, 400))   # torch Linear (out, in)
    v = sat.pair_violations(w, "linear")
    # P(pair violates) = P(same sign, |a| + |b| > 128) ~ 1/4 for uniform codes
    assert 0.15 < len(v) / (64 * 200) < 0.35
    assert len(sat.pair_violations(rng.integers(-64, 64, (64, 400)), "linear")) == 0
    assert len(sat.pair_violations(rng.integers(-8, 8, (64, 400)), "linear")) == 0


def test_conv_reduction_order_is_kernel_taps_then_input_channels():
    w = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)   # (out, in, kh, kw)
    kn = sat.reduction_view(w, "conv")
    assert kn.shape == (12, 2)
    # column 0 runs (kh, kw, c) with c fastest
    expected = [w[0, c, i, j] for i in range(2) for j in range(2) for c in range(3)]
    np.testing.assert_array_equal(kn[:, 0], expected)
    one = np.arange(4 * 6).reshape(4, 6, 1, 1)
    np.testing.assert_array_equal(sat.reduction_view(one, "conv"), sat.reduction_view(one[:, :, 0, 0], "linear"))


def test_conv_pair_that_crosses_a_tap_is_flagged_and_depthwise_is_exempt():
    w = np.zeros((2, 3, 3, 3), np.int64)
    w[0, 2, 0, 0] = w[0, 0, 0, 1] = 127   # (kh, kw, c) positions 2 and 3: one pair
    w[1, 0, 0, 0] = w[1, 0, 0, 1] = 127   # positions 0 and 3 (adjacent in torch's order): not a pair
    np.testing.assert_array_equal(sat.pair_violations(w, "conv"), [[2, 3, 0]])
    dw = np.full((4, 1, 3, 3), 127)
    assert len(sat.pair_violations(dw, "conv", groups=4)) == 0          # ORT's exact depthwise kernel
    # channel multiplier 2: a GEMM over the 9 taps, 4 violating tap pairs per channel
    assert len(sat.pair_violations(np.full((8, 1, 3, 3), 127), "conv", groups=4)) == 8 * 4


@pytest.mark.parametrize("bad, match", [
    (dict(codes=np.zeros((4, 4)), order="rows"), "order must be one of"),
    (dict(codes=np.full((4, 4), 200), order="matmul"), r"codes must lie in \[-128, 127\]"),
    (dict(codes=np.full((4, 4), 0.5), order="matmul"), "integer codes"),
    (dict(codes=np.zeros((4, 4, 3)), order="linear"), "2-d"),
    (dict(codes=np.zeros((4, 4, 3, 3)), order="conv", groups=3), "divisible"),
])
def test_bad_input_is_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sat.pair_violations(**bad)
    with pytest.raises(ValueError, match="kernel must be one of"):
        sat.qgemm(np.zeros((1, 2)), np.zeros((2, 1)), kernel="vnni")
    with pytest.raises(ValueError, match=r"a_codes must lie in \[0, 255\]"):
        sat.qgemm(np.full((1, 2), -1), np.zeros((2, 1)))


# ---------------------------------------------------------------------------------------------
# the emulation
# ---------------------------------------------------------------------------------------------

def _scalar_u8s8(a, b):
    """One output at a time, pair by pair, with Python ints: an independent implementation."""
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n), np.int64)
    for i in range(m):
        for j in range(n):
            acc = 0
            for p in range(0, k, 2):
                s = int(a[i, p]) * int(b[p, j]) + (int(a[i, p + 1]) * int(b[p + 1, j]) if p + 1 < k else 0)
                acc += min(32767, max(-32768, s))
            out[i, j] = acc
    return out


@pytest.mark.parametrize("k", [1, 7, 16])
def test_emulation_equals_scalar_pairwise_computation(k):
    rng = np.random.default_rng(k)
    a = rng.integers(0, 256, (5, k))
    a[0] = 255
    b = rng.integers(-128, 128, (k, 6))
    np.testing.assert_array_equal(sat.qgemm(a, b, 0, 0, "u8s8_pairs"), _scalar_u8s8(a, b))
    np.testing.assert_array_equal(sat.qgemm(a, b, 0, 0, "exact"), a @ b)
    # zero-point corrections are exact: sum (a - za)(b - zb)
    za, zb = 131, rng.integers(-3, 4, 6)
    ref = (a - za) @ (b - zb[None])
    np.testing.assert_array_equal(sat.qgemm(a, b, za, zb, "exact"), ref)
    np.testing.assert_array_equal(sat.qgemm(a, b, za, zb, "u8s8_pairs") - sat.qgemm(a, b, 0, 0, "u8s8_pairs"),
                                  ref - a @ b)


def test_codes_within_the_rule_are_exact_under_every_activation_and_violations_are_not():
    rng = np.random.default_rng(1)
    b = rng.integers(-128, 128, (64, 32))
    a0, a1 = b[0::2], b[1::2]
    bad = (a0 * a1 > 0) & (np.abs(a0) + np.abs(a1) > 128)
    capped = b.copy()
    capped[1::2] = np.where(bad, np.sign(a1) * (128 - np.abs(a0)), a1)
    assert len(sat.pair_violations(capped)) == 0
    acts = np.concatenate([np.full((1, 64), 255), np.zeros((1, 64), np.int64), rng.integers(0, 256, (30, 64)),
                           np.where(capped > 0, 255, 0).T[:4], np.where(capped < 0, 255, 0).T[:4]])
    np.testing.assert_array_equal(sat.qgemm(acts, capped, 128, 0, "u8s8_pairs"),
                                  sat.qgemm(acts, capped, 128, 0, "exact"))
    # each column with a violating pair goes wrong under its own worst activation row
    worst = np.where(b > 0, 255, 0).T          # row n: 255 where column n is positive
    wrong = sat.qgemm(worst, b, 128, 0, "u8s8_pairs") != sat.qgemm(worst, b, 128, 0, "exact")
    pos_bad = ((a0 > 0) & (a1 > 0) & (a0 + a1 > 128)).any(axis=0)
    np.testing.assert_array_equal(np.diag(wrong), pos_bad)


def test_worst_case_error_is_attained_by_the_constructed_input_and_never_exceeded():
    rng = np.random.default_rng(9)
    b = rng.integers(-128, 128, (40, 12))
    b[:, 0] = 0
    b[0, 0] = b[1, 0] = -128           # a column whose only violation is negative
    bound = sat.worst_case_error(b)
    exact = lambda a: sat.qgemm(a, b, 0, 0, "exact")
    pairs = lambda a: sat.qgemm(a, b, 0, 0, "u8s8_pairs")
    # the input that attains it: 255 on the column's positive (or negative) same-sign pairs
    for n in range(b.shape[1]):
        best = 0
        for sign in (1, -1):
            a = np.where(sign * b[:, n] > 0, 255, 0)[None]
            best = max(best, int(abs(exact(a) - pairs(a))[0, n]))
        assert best == bound[n]
    # random and extreme inputs never exceed it
    acts = np.concatenate([rng.integers(0, 256, (200, 40)), np.full((1, 40), 255), np.zeros((1, 40), np.int64)])
    assert np.all(np.abs(exact(acts) - pairs(acts)) <= bound[None])
    summary = sat.layer_summary(b)
    assert not summary["exact_on_every_cpu"] and summary["first_violation"][:2] == (0, 1)
    assert summary["worst_case_accumulator_error"] == bound.max() > 0
    assert sat.layer_summary(np.clip(b, -64, 63))["exact_on_every_cpu"]


# ---------------------------------------------------------------------------------------------
# real ORT
# ---------------------------------------------------------------------------------------------

def _emulate_case(d, name, info, kernel):
    codes = d[name + "/codes"].astype(np.int64)
    ws = d[name + "/w_scale"]
    xq = d[name + "/x_codes"].astype(np.int64)
    u8 = name.endswith("_u8w")
    wc, zb = (codes + 128, 128) if u8 else (codes, 0)
    kern = "exact" if u8 else kernel
    if info["kind"] == "mm":
        return sat.matmul_integer_to_float(xq, wc, SX, ws, 0, zb, kern)
    mult = np.float32(SX) * ws / np.float32(SY)
    if info["kind"] == "qmm":
        a, za = sat.ort_activation_codes(xq)
        return sat.requantize(sat.qgemm(a, wc, za, zb, kern), mult, 0).astype(np.float32) * SY
    acc = sat.qconv(xq, wc, 0, zb, info["groups"], kern)
    return sat.requantize(acc, mult.reshape(1, -1, 1, 1), 0).astype(np.float32) * SY


def _check_record(d, kernel):
    """Every case equals the emulation of `kernel` exactly; with the pair kernel, exactly the int8
    layers the rule flags differ from the exact result."""
    meta = json.loads(str(d["meta"]))
    flagged_and_wrong = []
    for name, info in meta["cases"].items():
        y = d[name + "/y"]
        np.testing.assert_array_equal(_emulate_case(d, name, info, kernel), y, err_msg=name)
        exact = _emulate_case(d, name, info, "exact")
        order = "conv" if info["kind"] == "conv" else "matmul"
        flagged = not name.endswith("_u8w") and len(sat.pair_violations(d[name + "/codes"], order, info["groups"])) > 0
        wrong = not np.array_equal(exact, y)
        assert wrong == (flagged and kernel == "u8s8_pairs"), name
        if info["kind"] == "mm" and not name.endswith("_u8w"):   # the worst-case bound holds on real ORT
            bound = sat.worst_case_error(d[name + "/codes"], "matmul") * SX * d[name + "/w_scale"]
            assert np.all(np.abs(exact - y) <= bound[None]), name
        flagged_and_wrong.append(flagged and wrong)
    return meta, flagged_and_wrong


def test_recorded_haswell_outputs_equal_the_emulation_exactly():
    d = np.load(FIXTURE)
    meta, flagged_and_wrong = _check_record(d, "u8s8_pairs")
    assert sum(flagged_and_wrong) >= 10
    assert {"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv"} <= {op for c in meta["cases"].values()
                                                                        for op in c["ops"]}
    # the worst measured error: the hand-built pair (127, 127) at rows 0, 1
    assert np.abs(_emulate_case(d, "mm_rand", meta["cases"]["mm_rand"], "exact") - d["mm_rand/y"]).max() > 100


def _this_cpu_kernel() -> str | None:
    """The u8s8 kernel ORT picks here: pairs on x86 AVX2 / AVX-512BW without any VNNI, exact with VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    if "avx2" not in flags:
        return None
    return "exact" if {"avx512_vnni", "avx_vnni"} & flags else "u8s8_pairs"


def _load_probe():
    spec = importlib.util.spec_from_file_location("ort_u8s8_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ort_on_this_cpu_equals_the_emulation_of_its_kernel(tmp_path):
    pytest.importorskip("onnxruntime")
    kernel = _this_cpu_kernel()
    if kernel is None:
        pytest.skip("not an x86-64 CPU with AVX2 (the emulated kernels are x86 ones)")
    out = tmp_path / "native.npz"
    _load_probe().main(str(out))
    _check_record(np.load(out), kernel)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64")
def test_ort_under_qemu_haswell_equals_the_pair_emulation(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "haswell.npz"
    proc = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", os.path.realpath(sys.executable), str(PROBE), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_record(np.load(out), "u8s8_pairs")
