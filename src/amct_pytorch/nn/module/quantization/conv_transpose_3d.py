"""AMCT import path of ConvTranspose3dQAT (implemented in .conv)."""
from .conv import ConvTranspose3dQAT

__all__ = ["ConvTranspose3dQAT"]
