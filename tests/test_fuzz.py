"""Property-based fuzzing (hypothesis) of the config layer and the forward call.

- Any config dict (random keys, types, nesting): the constructor succeeds, or raises only
  ValueError/TypeError whose message names an offending key; the caller's dict is untouched.
- Any input in any module state: the forward succeeds with a finite output, or raises only
  ValueError/TypeError and leaves state_dict() exactly as it was. Exceptions by design: a
  calibrated layer lets NaN/inf inputs propagate as nn.Linear does unless strict mode is on
  (amct_pytorch.set_strict_inputs), and a float16 result may overflow float16 as nn.Linear's would;
  the state stays finite either way.
"""
import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amct_pytorch import LinearQAT, calibrating, strict_inputs
from amct_pytorch.config import _DATA_KEYS, _TOP_KEYS, _WEIGHT_KEYS
from amct_pytorch.functional import EPS

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECTIONS = {"retrain_data_config": _DATA_KEYS, "retrain_weight_config": _WEIGHT_KEYS}
GOOD_VALUES = {
    "retrain_enable": [True, False],
    "dst_type": ["INT8", "INT4"],
    "batch_num": [1, 2, 7],
    "fixed_min": [True, False],
    "clip_min": [-1.0, -3, -1e-3, None],
    "clip_max": [1.0, 4, 1e3, None],
    "ifmr_search": ["exact", "histogram"],
    "weights_retrain_algo": ["arq_retrain", "ulq_quantize", "ulq_retrain"],
    "channel_wise": [True, False],
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.integers(), st.floats(), st.floats(width=32),
    st.text(max_size=8), st.sampled_from(["INT8", "int8", "INT3", "exact", "ulq", "1.0", ""]),
    st.binary(max_size=4), st.complex_numbers(allow_nan=True), st.sampled_from([10**400, -10**400, 2**63]),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
numbers = st.one_of(st.sampled_from([10**400, -10**400, 3e38, -3e38, 1e39, -1e39, 1e-45, 1e-30]),
                    st.floats(), st.integers(), junk)
# keys: the real ones, near misses, random text, and keys that are not str at all
odd_keys = st.one_of(st.text(max_size=12), st.sampled_from(["weight_retrain_algo", "clipmax", "Batch_num", "dst"]),
                     st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False), st.tuples(st.integers()))


@st.composite
def _value(draw, key):
    """Mostly a valid value (so that the other keys get checked too), else junk."""
    good = GOOD_VALUES.get(key)
    numeric = key in ("clip_min", "clip_max", "batch_num")  # where the hostile numbers go: half the time
    if good and draw(st.integers(0, 1 if numeric else 5)):
        return draw(st.sampled_from(good))
    return draw(numbers if numeric else junk)


@st.composite
def configs(draw):
    cfg = {}
    for key in draw(st.lists(st.sampled_from(_TOP_KEYS), unique=True)):
        if key in SECTIONS and draw(st.integers(0, 4)):
            section = {k: draw(_value(k)) for k in draw(st.lists(st.sampled_from(SECTIONS[key]), unique=True))}
            if draw(st.integers(0, 5)) == 0:
                section[draw(odd_keys)] = draw(junk)
            cfg[key] = section
        else:
            cfg[key] = draw(_value(key))
    if draw(st.integers(0, 5)) == 0:
        cfg[draw(odd_keys)] = draw(junk)
    return cfg


def _key_names(cfg):
    """Every key of the config as the messages spell it: 'key' at the top, 'section.key' below."""
    names = []
    for key, value in cfg.items():
        names += [str(key), repr(key)]
        if isinstance(value, dict):
            names += [f"{key}.{sub}" for sub in value]
    return names


@FUZZ
@given(configs())
def test_constructor_accepts_or_names_the_offending_key(cfg):
    snapshot = copy.deepcopy(cfg)
    try:
        m = LinearQAT(4, 3, config=cfg)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(name in message for name in _key_names(cfg)), message
    else:
        # what was accepted is what was asked for, and a valid config round-trips
        assert m.config.retrain_enable == cfg.get("retrain_enable", True)
        assert LinearQAT(4, 3, config=m.config.to_dict()).config == m.config
        assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())
        data = m.config.retrain_data_config
        if not data.needs_calibration:  # bounds fixed by the config: never a degenerate (zero-width) grid
            width = float(m.acts_clip_max.detach()) - min(float(m.acts_clip_min.detach()), 0.0)
            assert width / (2**data.num_bits - 1) >= EPS
    assert repr(cfg) == repr(snapshot)  # the caller's dict is never modified


# ---- forward --------------------------------------------------------------------------
IN = 4
special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-40, 1e-30, 3e38, -3e38, 3.4028234e38, float("nan"),
                           float("inf"), -float("inf"), 1e20, 65504.0])
elements = st.one_of(st.floats(width=32), special, st.floats(-10, 10, width=32))


@st.composite
def inputs(draw):
    dtype = draw(st.sampled_from([torch.float32] * 12 + [torch.float64, torch.float16, torch.int32, torch.bool]))
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    last = draw(st.sampled_from([IN] * 6 + [0, 1, IN + 1]))
    shape = (*lead, last)
    n = 1
    for d in shape:
        n *= d
    values = draw(st.lists(elements, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype)


_MODULES = {}


def _assert_unchanged(m, before):
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def _prepared(search, weights, phase):
    """A module in the given state (built once; each example works on a deep copy)."""
    key = (search, weights, phase)
    if key not in _MODULES:
        torch.manual_seed(0)
        m = LinearQAT(IN, 3, config={"retrain_data_config": {"batch_num": 2, "ifmr_search": search},
                                     "retrain_weight_config": {"weights_retrain_algo": weights}}).train()
        for _ in range({"fresh": 0, "mid_calibration": 1, "calibrated": 2}[phase]):
            m(torch.randn(5, IN))
        _MODULES[key] = m
    return copy.deepcopy(_MODULES[key])


@FUZZ
@given(x=inputs(), search=st.sampled_from(["exact", "histogram"]),
       weights=st.sampled_from(["arq_retrain", "ulq_quantize"]),
       phase=st.sampled_from(["fresh", "mid_calibration", "calibrated"]),
       mode=st.sampled_from(["train", "eval", "no_grad", "calibrating"]), strict=st.booleans())
def test_forward_gives_finite_output_or_fails_without_a_trace(x, search, weights, phase, mode, strict):
    m = _prepared(search, weights, phase)
    m.train(mode in ("train", "no_grad"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        with strict_inputs(strict):
            y = _forward(m, x, mode)
    except (ValueError, TypeError) as err:
        assert str(err).startswith("input:"), str(err)
        _assert_unchanged(m, before)
    else:
        low = x.dtype in (torch.float16, torch.bfloat16)
        assert y.dtype == (x.dtype if low else torch.float32) and y.shape == (*x.shape[:-1], 3)
        finite_in = bool(torch.isfinite(x).all())
        assert finite_in or (phase == "calibrated" and not strict), x  # NaN/inf refused while calibrating
        if finite_in and not low:
            assert torch.isfinite(y).all(), (x, y)  # never NaN or inf silently
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                assert torch.isfinite(v).all(), k


def _forward(m, x, mode):
    if mode == "no_grad":
        with torch.no_grad():
            return m(x)
    if mode == "calibrating":
        with calibrating():
            return m(x)
    return m(x)
