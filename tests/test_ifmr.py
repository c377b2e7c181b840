"""IFMR calibration (spec section 4): the exact search against a naive reading of the spec,
and the streaming histogram against the exact search."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_pytorch import LinearQAT, calibrating
from amct_pytorch.ifmr import HIST_BINS, empty_histogram, hist_update, histogram_from_counts, ifmr_exact, ifmr_histogram


def naive_ifmr(values, num_bits):
    """The spec's words, one candidate at a time: float32 element errors, float64 means."""
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    x = values.reshape(-1).float()
    n = x.numel()
    k = max(n - int(0.999999 * n), 1)
    ordered = torch.sort(x).values
    hi = max(float(ordered[n - k]), 0.0)
    lo = min(float(ordered[k - 1]), 0.0)
    m = max(abs(hi), abs(lo)) or 1.0
    denom = qmax + 1 if abs(lo) > abs(hi) else qmax
    errors = []
    for r in torch.arange(0.7, 1.3, 0.01, dtype=torch.float32):
        c = r * torch.tensor(m, dtype=torch.float32)
        s = c / denom
        q = torch.round(torch.clamp(x, -c, c) / s) * s
        errors.append(float(((q - x) ** 2).double().mean()))
    best = min(range(len(errors)), key=lambda i: (errors[i], i))
    step = float(torch.arange(0.7, 1.3, 0.01, dtype=torch.float32)[best] * m / denom)
    return qmax * step, qmin * step, errors, best, m, denom


DISTRIBUTIONS = {
    "normal": lambda g, n: torch.randn(n, generator=g),
    "uniform": lambda g, n: torch.rand(n, generator=g) * 6 - 2,
    "laplace": lambda g, n: torch.distributions.Laplace(0.0, 1.0).sample((n,)),
    "heavy_tail": lambda g, n: torch.randn(n, generator=g) / (torch.rand(n, generator=g) + 0.05),
    "relu": lambda g, n: torch.relu(torch.randn(n, generator=g)) * 3,
    "negative": lambda g, n: -torch.rand(n, generator=g) ** 2 * 5 + 0.3,
    "bimodal": lambda g, n: torch.randn(n, generator=g) * 0.1 + torch.randint(0, 2, (n,), generator=g) * 4 - 2,
    "few_values": lambda g, n: torch.randint(-3, 5, (n,), generator=g).float() * 0.25,
    "tiny_scale": lambda g, n: torch.randn(n, generator=g) * 1e-6,
    "huge_scale": lambda g, n: torch.randn(n, generator=g) * 1e30,
}


def _data(name, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return DISTRIBUTIONS[name](g, n).float()


def _assert_matches_naive(values, bits):
    clip_max, clip_min = ifmr_exact(values, bits)
    n_max, n_min, errors, best, m, denom = naive_ifmr(values, bits)
    if not math.isclose(float(clip_max), n_max, rel_tol=1e-6):
        # only a float tie between two candidates' errors may separate the two searches
        qmax = 2 ** (bits - 1) - 1
        ours = round((float(clip_max) / qmax * denom / m - 0.7) / 0.01)
        assert math.isclose(errors[ours], errors[best], rel_tol=1e-6), (ours, best, errors[ours], errors[best])
    else:
        assert math.isclose(float(clip_min), n_min, rel_tol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_exact_search_matches_naive_spec(name, bits):
    _assert_matches_naive(_data(name), bits)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000), scale=st.floats(1e-3, 1e3),
       shift=st.floats(-2, 2), bits=st.sampled_from([8, 4]))
def test_exact_search_matches_naive_spec_random(seed, n, scale, shift, bits):
    g = torch.Generator().manual_seed(seed)
    _assert_matches_naive((torch.randn(n, generator=g) + shift) * scale, bits)


def test_exact_search_percentile_cut_uses_kth_value():
    x = torch.cat([torch.randn(1_500_000, generator=torch.Generator().manual_seed(1)), torch.tensor([1e3, -1e3])])
    _assert_matches_naive(x, 8)  # n = 1_500_002 gives k = 2: the single outlier on each side is cut


def _within_one_step(hist_bounds, exact_bounds, values, bits, bin_width):
    """|c_hist - c_exact| <= one candidate step (0.01 M) plus one histogram bin."""
    qmax = 2 ** (bits - 1) - 1
    _, _, _, _, m, denom = naive_ifmr(values, bits)
    c_hist = float(hist_bounds[0]) * denom / qmax
    c_exact = float(exact_bounds[0]) * denom / qmax
    assert abs(c_hist - c_exact) <= 0.01 * m * (1 + 1e-5) + bin_width, (c_hist, c_exact, m)
    assert float(hist_bounds[1]) < 0 < float(hist_bounds[0])


def _histogram_ifmr(batches, bits):
    hist = empty_histogram()
    rng = torch.zeros(())
    lo, hi = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    for b in batches:
        hist, rng = hist_update(hist, rng, b)
        lo, hi = torch.minimum(lo, b.min()), torch.maximum(hi, b.max())
    assert float(hist[0].sum()) == sum(b.numel() for b in batches)  # nothing lost in range growth
    assert math.isclose(float(hist[1].sum()), sum(float(b.double().sum()) for b in batches), rel_tol=1e-9, abs_tol=1e-9)
    return ifmr_histogram(hist, rng, torch.stack([lo, hi]), bits), float(rng) / HIST_BINS


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(set(DISTRIBUTIONS) - {"huge_scale"}))
def test_histogram_within_one_candidate_step_of_exact(name, bits):
    values = _data(name)
    bounds, width = _histogram_ifmr([values], bits)
    _within_one_step(bounds, ifmr_exact(values, bits), values, bits, width)


@pytest.mark.parametrize("name", ["normal", "heavy_tail", "relu", "bimodal"])
def test_histogram_over_batches_of_growing_range(name):
    # later batches exceed the first batch's range: old bins merge into wider ones
    batches = [_data(name, 8000, seed) * scale for seed, scale in ((1, 0.3), (2, 1.0), (3, 4.5))]
    bounds, width = _histogram_ifmr(batches, 8)
    values = torch.cat(batches)
    _within_one_step(bounds, ifmr_exact(values, 8), values, 8, width)


@pytest.mark.parametrize("power", [-100, 60, 100, 110, 120])
def test_histogram_bins_do_not_depend_on_the_power_of_two_scale_of_the_data(power):
    # torch.histc itself overflows for ranges >= 2**115 and puts every value in bin 0
    values = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    empty = empty_histogram()
    hist, rng = hist_update(empty, torch.zeros(()), values)
    scaled_hist, scaled_rng = hist_update(empty, torch.zeros(()), values * 2.0**power)
    assert float(scaled_rng) == float(rng) * 2.0**power
    assert torch.equal(scaled_hist[0], hist[0])
    assert torch.equal(scaled_hist[1], hist[1] * 2.0**power)


def test_histogram_counter_example_two_steps_off():
    """Found by hypothesis in CI: 4000 values of (randn + 1) * 152.875, seed 3487; bin centres
    picked 2 candidate steps from the exact search, bin means pick the same candidate."""
    test_histogram_within_one_step_random.hypothesis.inner_test(seed=3487, scale=152.875, shift=1.0, batches=1, bits=8)
    g = torch.Generator().manual_seed(3487)
    values = (torch.randn(4000, generator=g) + 1.0) * 152.875
    assert torch.equal(_histogram_ifmr([values], 8)[0][0], ifmr_exact(values, 8)[0])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("value", [-5.0, 5.0, 0.37, -1e3])
def test_histogram_of_a_constant_batch_picks_the_exact_candidate(value, bits):
    # every value sits at the bin's lower edge, 1/2 bin from its centre: centres were 28 steps off for -5.0
    values = torch.full((64, 16), value)
    (hist_max, hist_min), _ = _histogram_ifmr([values], bits)
    exact_max, exact_min = ifmr_exact(values, bits)
    assert torch.equal(hist_max, exact_max) and torch.equal(hist_min, exact_min)


def test_module_loads_an_old_counts_only_histogram_and_calibrates_on():
    cfg = {"retrain_data_config": {"batch_num": 2, "ifmr_search": "histogram"}}
    torch.manual_seed(0)
    m = LinearQAT(16, 8, config=cfg).train()
    m(torch.randn(32, 16))
    state = m.state_dict()
    old = dict(state, calib_hist=state["calib_hist"][0].clone())  # the layout before per-bin sums
    fresh = LinearQAT(16, 8, config=cfg).train()
    fresh.load_state_dict(old)
    assert old["calib_hist"].shape == (2 * HIST_BINS,)  # the caller's dict is left as it was
    counts, sums = fresh.calib_hist
    assert torch.equal(counts, state["calib_hist"][0])
    width = float(state["calib_range"]) / HIST_BINS
    filled = counts > 0
    centres = (torch.arange(2 * HIST_BINS) % HIST_BINS + 0.5).double() * width
    signs = torch.where(torch.arange(2 * HIST_BINS) < HIST_BINS, -1.0, 1.0).double()
    torch.testing.assert_close((sums / counts)[filled], (signs * centres)[filled], rtol=1e-12, atol=0)
    fresh(torch.randn(32, 16))
    assert fresh.is_calibrated and float(fresh.acts_clip_min.detach()) < 0 < float(fresh.acts_clip_max.detach())


def test_histogram_from_counts_keeps_counts_and_puts_values_at_bin_centres():
    hist, rng = hist_update(empty_histogram(), torch.zeros(()), torch.tensor([-1.3, 0.2, 0.21, 3.9]))
    converted = histogram_from_counts(hist[0], rng)
    assert torch.equal(converted[0], hist[0])
    assert float(hist[1].sum()) == pytest.approx(-1.3 + 0.2 + 0.21 + 3.9, rel=1e-6)
    # each of the 4 values moves to its bin's centre: at most half a bin width
    assert float(converted[1].sum()) == pytest.approx(float(hist[1].sum()), abs=4 * 0.5 * float(rng) / HIST_BINS)
    assert not torch.equal(converted[1], hist[1])


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known limit: candidates 27 and 29 have exact errors 8e-5 apart (relative); bin means "
                          "pick 27, the exact search 29")
def test_histogram_near_tie_two_steps_off():
    """Found by hypothesis (500 random examples) after the switch to bin means: 4000 plain randn values."""
    test_histogram_within_one_step_random.hypothesis.inner_test(seed=500, scale=1.0, shift=0.0, batches=1, bits=8)


# derandomized for reproducible CI. Not a guarantee: with bin means, plain random draws of these
# parameters still land > 1 step off in a few per thousand, all near-ties of the exact errors
@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3), shift=st.floats(-2, 2),
       batches=st.integers(1, 3), bits=st.sampled_from([8, 4]))
def test_histogram_within_one_step_random(seed, scale, shift, batches, bits):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(4000, generator=g) + shift) * scale * (1 + i) for i in range(batches)]
    bounds, width = _histogram_ifmr(parts, bits)
    values = torch.cat(parts)
    _within_one_step(bounds, ifmr_exact(values, bits), values, bits, width)


def test_module_histogram_search_close_to_exact_and_constant_memory():
    torch.manual_seed(0)
    batches = [torch.randn(64, 32) * (1 + i) for i in range(4)]
    mods = {s: LinearQAT(32, 8, config={"retrain_data_config": {"batch_num": 4, "ifmr_search": s}}).train()
            for s in ("exact", "histogram")}
    sizes = []
    for b in batches:
        with calibrating(), torch.no_grad():
            for m in mods.values():
                m(b)
        sizes.append(sum(t.numel() for k, t in mods["histogram"].named_buffers() if k.startswith("calib")))
    assert len(set(sizes)) == 1
    values = torch.cat([b.reshape(-1) for b in batches])
    exact = (mods["exact"].acts_clip_max.detach(), mods["exact"].acts_clip_min.detach())
    assert torch.equal(exact[0], ifmr_exact(values, 8)[0].reshape(1))  # clip bounds are shape (1,)
    hist = (mods["histogram"].acts_clip_max.detach(), mods["histogram"].acts_clip_min.detach())
    width = float(mods["histogram"].calib_range) / HIST_BINS if hasattr(mods["histogram"], "calib_range") else 0.0
    _within_one_step(hist, exact, values, 8, max(width, float(values.abs().max()) * 2 / HIST_BINS))
