"""Optional dependencies of the demos (the `demo` extra), imported on first use."""
from __future__ import annotations

import importlib

EXTRA_HINT = "the demo needs the 'demo' extra: pip install 'amct-qat[demo]'"


def require(module: str):
    """Import an optional dependency, or fail naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed; {EXTRA_HINT}") from err
