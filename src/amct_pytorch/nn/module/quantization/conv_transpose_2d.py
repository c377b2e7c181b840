"""AMCT import path of ConvTranspose2dQAT (implemented in .conv)."""
from .conv import ConvTranspose2dQAT

__all__ = ["ConvTranspose2dQAT"]
