"""AMCT import path of Conv1dQAT (implemented in .conv)."""
from .conv import Conv1dQAT

__all__ = ["Conv1dQAT"]
