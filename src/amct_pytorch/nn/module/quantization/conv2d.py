"""AMCT import path of Conv2dQAT (implemented in .conv)."""
from .conv import Conv2dQAT

__all__ = ["Conv2dQAT"]
