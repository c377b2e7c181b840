"""How a demo declares its command line for `amct-qat demo` (amct_pytorch.cli reads the
declarations): the options only it takes, how each reaches its run function, and its own checks.

An option of one demo given with another demo's --model is an error that names the option, its
value and the demo it belongs to: that error comes from these declarations, not from a
hand-written check per flag.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _same(value):
    return value


@dataclass(frozen=True)
class Option:
    """A command-line option that only one demo takes.

    flag: e.g. "--no-split"; help: its help text (shown as "<demo> only: <help>"); kwargs: the other
    keywords of `add_argument` (action, type, choices, default); param: the keyword of the demo's run
    function it sets (default: the flag's dest), after `convert`; why: appended to the error when
    the option is given with another demo."""
    flag: str
    help: str
    kwargs: dict = field(default_factory=dict)
    param: str = ""
    convert: Callable[[Any], Any] = _same
    why: str = ""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def default(self):
        return self.kwargs.get("default", False if self.kwargs.get("action") == "store_true" else None)

    def given(self, args: argparse.Namespace) -> bool:
        return getattr(args, self.dest) != self.default

    def foreign_error(self, args: argparse.Namespace, owner: str) -> str:
        """The error for this option given with another demo than `owner`."""
        value = getattr(args, self.dest)
        shown = self.flag if self.kwargs.get("action") == "store_true" else f"{self.flag} {value}"
        return f"{shown}: applies only to --model {owner}" + (f" ({self.why})" if self.why else "")

    def argument(self, args: argparse.Namespace) -> tuple[str, Any]:
        """(run keyword, value) for the demo's run function."""
        return self.param or self.dest, self.convert(getattr(args, self.dest))


def _no_check(args: argparse.Namespace) -> str | None:
    return None


@dataclass(frozen=True)
class Demo:
    """One `amct-qat demo --model NAME`.

    summary: its sentence in `amct-qat demo --help`; options: the options only it takes; run: called
    with out, steps, batch_size, config, quick, progress and each option's keyword (look the run
    function up at call time, so that the demo's module is imported only when it runs); check:
    cross-option checks on the parsed arguments, returning an error message or None."""
    name: str
    summary: str
    options: tuple[Option, ...]
    run: Callable[..., Any]
    check: Callable[[argparse.Namespace], str | None] = _no_check
