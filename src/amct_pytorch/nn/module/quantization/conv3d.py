"""AMCT import path of Conv3dQAT (implemented in .conv)."""
from .conv import Conv3dQAT

__all__ = ["Conv3dQAT"]
