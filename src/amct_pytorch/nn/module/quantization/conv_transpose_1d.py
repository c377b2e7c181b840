"""AMCT import path of ConvTranspose1dQAT (implemented in .conv)."""
from .conv import ConvTranspose1dQAT

__all__ = ["ConvTranspose1dQAT"]
