"""split_outlier_channels: float-exact, shrinks the outlier weights, refuses bad input untouched."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from amct_pytorch import LinearQAT, calibrate, to_qat
from amct_pytorch.outliers import split_outlier_channels
from float_bounds import EPS32, assert_within, linear_tolerance
from state_helpers import _assert_unchanged as assert_unchanged, _snapshot as snapshot

GELU_SLOPE = 1.13  # max |gelu'(z)|, reached near z = 1.5


def _split_tolerance(up, act, down, x):
    """How far the split pair's output may lie from the original's by float32 rounding alone.

    The split is exact in real arithmetic, not in float32: the up layer's rows are computed in a
    matmul of another shape (possibly other kernels and summation order), and down sums h * w/k
    over k copies instead of h * w. Each matmul is within its rounding bound (float_bounds); the
    up layer's difference reaches the output through the activation (slope <= GELU_SLOPE, plus
    a few ulps of its own) and |W_down|; |W_down| after the split sums to the original's.
    """
    with torch.no_grad():
        h = act(up(x))
        dh = GELU_SLOPE * linear_tolerance(x, up.weight, up.bias) + 4 * EPS32 * h.abs()
        return linear_tolerance(h, down.weight, down.bias) + dh @ down.weight.abs().t()


class FFN(nn.Module):
    def __init__(self, d=32, hidden=256, bias=True, outliers=((3, 5, 1.5),), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(d, hidden, bias=bias)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, d)
        with torch.no_grad():
            for row, col, value in outliers:
                self.down.weight[row, col] = value

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _int8_per_tensor(w):
    scale = w.abs().max() / 127
    return torch.clamp(torch.round(w / scale), -128, 127) * scale


def test_split_is_float_exact_and_shrinks_the_largest_weight():
    model, x = FFN(outliers=((3, 5, 1.5), (7, 40, -0.6))), torch.randn(32, 32)
    want = model(x)
    [split] = split_outlier_channels(model, [("up", "down")])
    assert split.columns == (5, 40) and split.max_abs_before == pytest.approx(1.5)
    assert split.copies == tuple(math.ceil(v / split.threshold) for v in (1.5, 0.6))
    assert model.up.out_features == model.down.in_features == 256 + split.added
    assert model.up.weight.shape == (256 + split.added, 32) and model.up.bias.shape == (256 + split.added,)
    assert model.down.weight.detach().abs().max() <= split.threshold + 1e-6
    assert split.max_abs_after == pytest.approx(float(model.down.weight.detach().abs().max()))
    assert_within(model(x), want, _split_tolerance(model.up, model.act, model.down, x), "split output")


def test_split_cuts_the_per_tensor_int8_weight_error():
    """The point of the split: the per-tensor grid step follows the shrunken maximum."""
    model, x = FFN(d=32, hidden=256), torch.randn(64, 32)
    want = model(x).detach()

    @torch.no_grad()
    def quant_error(m):
        h = m.act(m.up(x))
        return float((nn.functional.linear(h, _int8_per_tensor(m.down.weight), m.down.bias) - want).pow(2).mean())

    before = quant_error(model)
    split_outlier_channels(model, [("up", "down")])
    assert quant_error(model) < before / 10


def test_nothing_to_split_leaves_the_layers_as_they_were():
    model = FFN(outliers=())
    params = [model.up.weight, model.down.weight]
    [split] = split_outlier_channels(model, [("up", "down")], ratio=10.0)
    assert split.columns == () and split.added == 0
    assert model.up.weight is params[0] and model.down.weight is params[1]


def test_up_without_bias_and_requires_grad_and_dtype_are_kept():
    model = FFN(bias=False).double()
    model.up.weight.requires_grad_(False)
    x = torch.randn(8, 32, dtype=torch.float64)
    want = model(x)
    [split] = split_outlier_channels(model, [("up", "down")])
    assert split.added > 0 and model.up.bias is None
    assert not model.up.weight.requires_grad and model.down.weight.requires_grad
    assert model.down.weight.dtype == torch.float64
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_split_model_converts_calibrates_and_trains():
    model, x = FFN(), torch.randn(32, 32)
    split_outlier_channels(model, [("up", "down")])
    summary = to_qat(model)
    assert set(summary.converted) == {"up", "down"}
    calibrate(model, [x], progress=False)
    model.train()
    model(x).pow(2).mean().backward()
    assert model.down.weight.grad.shape == model.down.weight.shape


def test_tiny_bert_ffn_pairs_split_exactly():
    transformers = pytest.importorskip("transformers")
    from amct_pytorch.demo.minilm.model import ffn_pairs

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[4, 9] = 0.5
    ids = torch.randint(0, 64, (2, 10))
    layers = model.encoder.layer
    seen = {}  # per block: the FFN's input and (pre-residual) output, before and after the split

    def keep(key, value):
        seen[key] = value.detach()  # returns None: the hook leaves the output as it is

    hooks = [layers[i].intermediate.dense.register_forward_hook(lambda mod, args, out, i=i: keep(("in", i), args[0]))
             for i in range(2)]
    hooks += [layers[i].output.dense.register_forward_hook(lambda mod, args, out, i=i: keep(("out", i), out))
              for i in range(2)]
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    for h in hooks:
        h.remove()
    pairs = ffn_pairs(model)
    assert pairs == [(f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense") for i in range(2)]
    splits = split_outlier_channels(model, pairs)
    assert 9 in splits[1].columns
    with torch.no_grad():
        for i in range(2):  # each split FFN on the original's input: within the rounding bound
            up, act, down = layers[i].intermediate.dense, layers[i].intermediate.intermediate_act_fn, layers[i].output.dense
            x = seen["in", i]
            assert_within(down(act(up(x))), seen["out", i], _split_tolerance(up, act, down, x), f"block {i}")
        # the whole model: block 1 and the LayerNorms see inputs that moved by those bounds
        # (<= ~1e-6 here); 1e-5 allows an amplification by 10 through attention and LayerNorm
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pairs, kwargs, error, match", [
    ([("up", "dwn")], {}, ValueError, r"no module named 'dwn' in the model; did you mean 'down'\?"),
    ([("act", "down")], {}, TypeError, r"up layer 'act' must be a plain torch.nn.Linear, got GELU"),
    ([("up", "down")], {"ratio": 0.5}, ValueError, r"ratio: expected a finite real number >= 1.0, got 0.5"),
    ([("up", "down")], {"ratio": float("nan")}, ValueError, r"ratio: expected a finite real number"),
    ([("up", "down")], {"ratio": True}, ValueError, r"ratio: expected a finite real number"),
    ([("up", "down")], {"max_growth": -1}, ValueError, r"max_growth: expected a finite real number >= 0.0"),
    ([("up", "down")], {"max_growth": 0.0}, ValueError, r"needs \d+ extra neurons, more than max_growth=0.0"),
    ([], {}, ValueError, r"pairs: expected at least one"),
    ("up", {}, TypeError, r"pairs: expected an iterable of \(up, down\) name pairs, got str"),
    ([("up",)], {}, ValueError, r"each entry must be an \(up, down\) pair of names, got \('up',\)"),
    ([("up", 3)], {}, TypeError, r"down layer name must be a str, got int 3"),
    ([("up", "down"), ("up", "down")], {}, ValueError, r"layer 'up' appears in more than one pair"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(pairs, kwargs, error, match):
    model = FFN()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        split_outlier_channels(model, pairs, **kwargs)
    assert_unchanged(model, before)


def test_pair_whose_widths_do_not_chain_is_refused():
    model = FFN()
    model.down = nn.Linear(128, 32)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'up' has 256 outputs but 'down' takes 128 inputs; the pair must be up "):
        split_outlier_channels(model, [("up", "down")])
    assert_unchanged(model, before)


def test_quantized_layers_are_refused():
    model = FFN()
    to_qat(model)
    with pytest.raises(TypeError, match=r"got LinearQAT \(split channels before to_qat\)"):
        split_outlier_channels(model, [("up", "down")])
    assert isinstance(model.down, LinearQAT) and model.down.in_features == 256


def test_a_later_invalid_pair_leaves_the_earlier_ones_untouched():
    model = nn.Sequential(FFN(), FFN(seed=1))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no module named '1.dow'"):
        split_outlier_channels(model, [("0.up", "0.down"), ("1.up", "1.dow")])
    assert_unchanged(model, before)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), value=st.floats(0.1, 10.0), sign=st.sampled_from([-1.0, 1.0]),
       ratio=st.floats(1.0, 8.0))
def test_split_property(seed, value, sign, ratio):
    model = FFN(outliers=((seed % 32, seed % 256, sign * value),), seed=seed)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    want = model(x)
    [split] = split_outlier_channels(model, [("up", "down")], ratio=ratio, max_growth=1.0)
    assert float(model.down.weight.detach().abs().max()) <= split.threshold * (1 + 1e-6) or not split.columns
    assert model.down.in_features == 256 + split.added
    assert_within(model(x), want, _split_tolerance(model.up, model.act, model.down, x), "split output")
