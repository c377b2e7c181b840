"""Bounds on float32 rounding, for tests that compare two computations of the same value.

A float32 sum of n terms, in any order, with or without FMA, is within gamma_n ~ n*u of
the exact sum relative to the sum of the terms' magnitudes (Higham, Accuracy and Stability
of Numerical Algorithms, 3.1; u = eps32 / 2). Two implementations (eager vs compiled,
chunked vs whole, another CPU's kernels) therefore differ by at most n * eps32 * sum|terms|.
The same computation repeated in one process, on the same shapes, is bit-identical instead:
tests assert that with torch.equal.
"""
import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23


def sum_tolerance(terms: torch.Tensor, extra_roundings: int = 2) -> float:
    """|difference| two float32 summations of `terms` (each term rounded once) can show."""
    return (terms.numel() + extra_roundings) * EPS32 * float(terms.detach().double().abs().sum())


def linear_tolerance(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """Per element of x @ weight.T + bias: the bound two matmul kernels can differ by."""
    x, weight = x.detach().abs(), weight.detach().abs()
    magnitude = x @ weight.t()
    if bias is not None:
        magnitude = magnitude + bias.detach().abs()
    return (weight.shape[1] + 1) * EPS32 * magnitude * (1 + 1e-5)  # the last factor: rounding of the bound itself


def assert_within(actual, expected, tol, what=""):
    """|actual - expected| <= tol elementwise (tol a tensor or a number)."""
    diff = (actual.detach() - expected.detach()).abs()
    over = diff - tol
    assert bool((over <= 0).all()), f"{what}: max |diff| {float(diff.max()):.3g} exceeds the rounding bound by {float(over.max()):.3g}"
