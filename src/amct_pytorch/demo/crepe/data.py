"""Frames with exactly known pitch for the CREPE demo: synthesized harmonic tones.

Each frame is 1024 samples at 16 kHz of
    sum_k a_k sin(k * phi(t) + p_k) + white noise,
    phi(t) = 2 pi * integral of f(t) dt,   f(t) = f0 * 2^(v/1200 * sin(2 pi r t + q))
with a random f0 (log-uniform in [fmin, fmax]), a random count of harmonics (all below
0.95 * Nyquist) with random amplitudes (a_1 = 1, a_k = u_k / k^rho) and phases p_k, vibrato of depth
v cents at rate r Hz, and noise at a random SNR. The label is the instantaneous f0 at the
frame centre, in cents. Frames are normalised as CREPE expects (model.normalise_frames).
Everything is drawn from a seeded torch.Generator in float64: the same seed gives the same
frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import FRAME, SAMPLE_RATE, hz_to_cents, normalise_frames

# CREPE's 360 bins span about 32.7 Hz .. 1975.5 Hz. Below C2 a 64 ms frame holds fewer than
# four periods and the tiny model makes octave errors (measured: RPA 0.98 at 46-92 Hz against
# 1.00 from 130 Hz up); at the top the decoder's +-4-bin window is clipped by the last bin.
# The demo uses C2 .. A6, where the float tiny model is accurate (see docs/crepe_demo.md).
F_MIN, F_MAX = 65.41, 1760.0
EVAL_SEED = 20_180_215  # the fixed evaluation set
EVAL_FRAMES = 8192


@dataclass(frozen=True)
class ToneSpec:
    fmin: float = F_MIN
    fmax: float = F_MAX
    max_harmonics: int = 12
    rolloff: tuple[float, float] = (0.3, 1.5)  # rho range of a_k = u_k / k^rho
    vibrato_cents: float = 30.0  # max depth
    vibrato_hz: tuple[float, float] = (4.0, 7.0)
    snr_db: tuple[float, float] = (10.0, 40.0)

    def __post_init__(self):
        if not 0 < self.fmin < self.fmax < SAMPLE_RATE / 2:
            raise ValueError(f"fmin, fmax: expected 0 < fmin < fmax < {SAMPLE_RATE / 2}, got {self.fmin}, {self.fmax}")
        if self.max_harmonics < 1:
            raise ValueError(f"max_harmonics: expected >= 1, got {self.max_harmonics}")


def _uniform(gen, n, low, high):
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def synthesize(n: int, seed: int, spec: ToneSpec = ToneSpec()) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames float32 (n, 1024) normalised, true pitch float64 (n,) in cents)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    f0 = torch.exp(_uniform(gen, n, math.log(spec.fmin), math.log(spec.fmax)))
    depth = _uniform(gen, n, 0.0, spec.vibrato_cents)
    rate = _uniform(gen, n, *spec.vibrato_hz)
    vphase = _uniform(gen, n, 0.0, 2 * math.pi)
    rho = _uniform(gen, n, *spec.rolloff)
    snr = _uniform(gen, n, *spec.snr_db)
    k = torch.arange(1, spec.max_harmonics + 1, dtype=torch.float64)
    amp = torch.rand(n, spec.max_harmonics, generator=gen, dtype=torch.float64) / k**rho[:, None]
    amp[:, 0] = 1.0  # the fundamental is always present at full level: the pitch is unambiguous
    count = torch.randint(1, spec.max_harmonics + 1, (n,), generator=gen)
    hphase = _uniform(gen, n * spec.max_harmonics, 0.0, 2 * math.pi).reshape(n, -1)
    noise = torch.randn(n, FRAME, generator=gen, dtype=torch.float64)

    t = (torch.arange(FRAME, dtype=torch.float64) - FRAME / 2) / SAMPLE_RATE  # 0 at the frame centre
    w = 2 * math.pi * rate[:, None]
    # phi(t) = 2 pi f0 * integral_0^t 2^(c sin(w s + q)) ds, integrated numerically (trapezoid)
    inst = f0[:, None] * torch.exp2(depth[:, None] / 1200 * torch.sin(w * t + vphase[:, None]))
    dt = 1.0 / SAMPLE_RATE
    steps = 0.5 * (inst[:, 1:] + inst[:, :-1]) * dt
    phase = 2 * math.pi * torch.cat([torch.zeros(n, 1, dtype=torch.float64), steps.cumsum(1)], 1)
    highest = inst.max(1).values  # no harmonic above 0.95 Nyquist at any instant
    keep = (k[None, :] <= count[:, None]) & (k[None, :] * highest[:, None] < 0.95 * SAMPLE_RATE / 2)
    keep[:, 0] = True
    amp = amp * keep
    signal = torch.zeros_like(phase)
    for rows in range(0, n, 256):  # row blocks that stay in cache
        sl = slice(rows, rows + 256)
        for j in range(spec.max_harmonics):
            signal[sl].add_(torch.sin(phase[sl] * (j + 1) + hphase[sl, j, None]).mul_(amp[sl, j, None]))
    power = signal.pow(2).mean(1, keepdim=True)
    signal = signal + noise * (power / 10 ** (snr[:, None] / 10)).sqrt()
    true_hz = f0 * torch.exp2(depth / 1200 * torch.sin(vphase))  # f(t=0)
    return normalise_frames(signal).float(), hz_to_cents(true_hz)


def eval_set(n: int = EVAL_FRAMES, spec: ToneSpec = ToneSpec()) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation set (seed EVAL_SEED); a smaller n is a prefix-independent draw."""
    return synthesize(n, EVAL_SEED, spec)


class ToneStream:
    """Fresh training batches: batch i is synthesize(batch_size, seed + 1 + i) (never the eval seed)."""

    def __init__(self, batch_size: int, seed: int = 0, spec: ToneSpec = ToneSpec()):
        self.batch_size, self.seed, self.spec, self.index = batch_size, seed, spec, 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.index += 1
        s = self.seed * 1_000_003 + self.index
        if s == EVAL_SEED:
            s = -s
        return synthesize(self.batch_size, s, self.spec)
