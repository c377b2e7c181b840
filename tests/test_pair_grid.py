"""amct_pytorch.pair_grid: the kernel-aware INT8 weight grid (issue 19)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from amct_pytorch import pair_grid as pg
from amct_pytorch import saturation as sat
from amct_pytorch.functional import arq_scale, lsq_scale_grad, rows_layout


def _per_channel(w, bits=8):
    return arq_scale(w, bits, True, rows_layout(w.shape))


@pytest.mark.parametrize("shape, order, groups", [((16, 40), "linear", 1), ((7, 33), "linear", 1),
                                                  ((8, 3, 3, 3), "conv", 1), ((6, 5, 2, 2), "conv", 1),
                                                  ((8, 3, 3, 3), "conv", 2), ((8, 1, 3, 3), "conv", 4),
                                                  ((4, 6, 3), "conv", 1)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_codes_satisfy_the_pair_rule_in_the_kernels_order(shape, order, groups, per_channel):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w.view(shape[0], -1)[:, :2] = 3.0     # same-sign maxima side by side: the cap must bind
    s = _per_channel(w) if per_channel else arq_scale(w, 8, False)
    plain = torch.round(w / s.reshape((-1,) + (1,) * (w.dim() - 1))).clamp(-128, 127).to(torch.int8)
    assert len(sat.pair_violations(plain.numpy(), order, groups)) > 0
    codes = pg.pair_codes(w, s, order, groups)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert len(sat.pair_violations(codes.numpy(), order, groups)) == 0
    # codes change only inside violating pairs
    mask = sat.pair_violation_mask(plain.numpy(), order, groups)
    kn_plain, kn_codes = sat.reduction_view(plain.numpy(), order), sat.reduction_view(codes.numpy(), order)
    rows = np.repeat(mask, 2, axis=0)[: kn_plain.shape[0]]
    np.testing.assert_array_equal(kn_codes[~rows], kn_plain[~rows])
    # the emulated kernel computes the capped layer exactly under the worst activations
    acts = np.concatenate([np.full((1, kn_codes.shape[0]), 255), np.where(kn_codes > 0, 255, 0).T])
    np.testing.assert_array_equal(sat.qgemm(acts, kn_codes, 128, 0, "u8s8_pairs"),
                                  sat.qgemm(acts, kn_codes, 128, 0, "exact"))


def test_a_capped_pair_is_the_nearest_feasible_integer_point():
    rng = np.random.default_rng(3)
    grid = np.arange(-128, 128)
    feasible = [(a, b) for a in grid for b in grid if not (a * b > 0 and abs(a) + abs(b) > 128)]
    fa, fb = np.array(feasible).T
    v = np.concatenate([rng.uniform(-140, 140, (300, 2)), [[127.2, 126.9], [127.5, 1.5], [-128.0, -128.0],
                                                           [140.0, 20.3], [64.5, 64.5], [0.4, 128.6]]])
    q = pg.pair_codes(torch.tensor(v, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).numpy()
    for (va, vb), (qa, qb) in zip(v, q):
        best = ((fa - va) ** 2 + (fb - vb) ** 2).min()
        assert (qa - va) ** 2 + (qb - vb) ** 2 == pytest.approx(best, abs=1e-9), (va, vb, qa, qb)


def test_shared_reduction_not_one_partner():
    q = pg.pair_codes(torch.tensor([[127.2, 126.9, -100.4, -60.0, 127.0, -128.0]]), torch.ones(1))
    assert q.tolist() == [[64, 64, -84, -44, 127, -128]]


def test_one_by_one_conv_equals_linear_including_gradients():
    torch.manual_seed(1)
    w_lin = torch.randn(6, 10)
    w_lin[:, :2] = 2.5
    s = _per_channel(w_lin)
    w_conv = w_lin.reshape(6, 10, 1, 1)
    assert torch.equal(pg.pair_codes(w_conv, s, "conv").reshape(6, 10), pg.pair_codes(w_lin, s, "linear"))
    g = torch.randn(6, 10)
    grads = []
    for w, order in ((w_lin.clone().requires_grad_(), "linear"), (w_conv.clone().requires_grad_(), "conv")):
        ss = s.clone().requires_grad_()
        out = pg.fake_quant_pair(w, ss, order)
        (out.reshape(6, 10) * g).sum().backward()
        grads.append((out.detach().reshape(6, 10), w.grad.reshape(6, 10), ss.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _reference_soft(w, s):
    """Independent plain-autograd version of the grid for a Linear, with round() straight-through
    and the capped pairs written as the projection onto |q_a| + |q_b| = 128."""
    v = w / s.reshape(-1, 1)
    va, vb = v[:, 0::2], v[:, 1::2]
    def ste(t):
        return t + (torch.round(t) - t).detach()

    def code(t):  # straight-through inside [-128, 127] (judged on v, as functional.lsq_scale_grad)
        return torch.where((t >= -128) & (t <= 127), ste(t), torch.round(t).clamp(-128, 127).detach())

    qa, qb = code(va), code(vb)
    ra, rb = qa.detach(), qb.detach()
    capped = (ra * rb > 0) & (ra.abs() + rb.abs() > 128)
    sign = torch.sign(ra)
    lim = torch.where(sign > 0, 127.0, 128.0)
    x = ste(torch.clamp((va.abs() - vb.abs() + 128) / 2, 128 - lim, lim))
    qa = torch.where(capped, sign * x, qa)
    qb = torch.where(capped, sign * (128 - x), qb)
    q = torch.stack([qa, qb], dim=2).reshape(w.shape)
    return q * s.reshape(-1, 1)


def test_gradients_equal_plain_autograd_of_the_projection():
    torch.manual_seed(2)
    w = torch.randn(12, 24, dtype=torch.float64)
    w[:, 0] = w[:, 1] = 2.0          # capped (127, 127)-like pairs in every row
    w[:, 2], w[:, 3] = 2.2, 0.5      # one partner beyond the range
    s = _per_channel(w) * 0.9
    g = torch.randn(12, 24, dtype=torch.float64)
    w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    out = pg.fake_quant_pair(w1, s1, "linear", weight_grad="projected")
    (out * g).sum().backward()
    w2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref = _reference_soft(w2, s2)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-12)
    factor = 1.0 / (24 * 127) ** 0.5     # LSQ's scaling of the scale gradient
    torch.testing.assert_close(s1.grad, s2.grad * factor, rtol=1e-12, atol=1e-12)
    # the capped pairs' common mode gets no weight gradient, their difference does
    capped_rows = w1.grad[:, 0] + w1.grad[:, 1]
    assert torch.allclose(capped_rows, torch.zeros_like(capped_rows))
    # identity: the plain straight-through gradient
    w3 = w.clone().requires_grad_()
    (pg.fake_quant_pair(w3, s, "linear", weight_grad="identity") * g).sum().backward()
    assert torch.equal(w3.grad, g)


def test_unconstrained_layer_matches_the_librarys_grid_and_lsq_gradient():
    torch.manual_seed(4)
    w = torch.randn(8, 32) * 0.01
    w[:, 5] = 1.0                       # the max; its partner is tiny: no pair binds
    s = _per_channel(w)
    s.requires_grad_()
    out = pg.fake_quant_pair(w, s, "linear")
    plain = torch.round(w / s.detach().reshape(-1, 1)).clamp(-128, 127) * s.detach().reshape(-1, 1)
    assert torch.equal(out.detach(), plain)
    g = torch.randn(8, 32)
    (out * g).sum().backward()
    torch.testing.assert_close(s.grad, lsq_scale_grad(w, g, s.detach(), 8, rows_layout(w.shape)))


def test_int7_alternative():
    torch.manual_seed(5)
    w = torch.randn(8, 64)
    s = pg.arq_scale_int7(w)
    s.requires_grad_()
    out = pg.fake_quant_int7(w, s)
    codes = torch.round(out.detach() / s.detach().reshape(-1, 1))
    assert codes.min() >= -64 and codes.max() <= 63 and codes.abs().max() >= 63
    assert len(sat.pair_violations(codes.to(torch.int64).numpy(), "linear")) == 0
    g = torch.randn(8, 64)
    (out * g).sum().backward()
    torch.testing.assert_close(s.grad, lsq_scale_grad(w, g, s.detach(), 7, rows_layout(w.shape)))


def test_depthwise_conv_is_left_unconstrained():
    w = torch.full((4, 1, 3, 3), 1.0)
    s = torch.full((4,), 1.0 / 127)
    assert int(pg.pair_codes(w, s, "conv", groups=4).min()) == 127
    # channel multiplier 2: the tap pairs are capped, (127, 127) -> (64, 64)
    assert int(pg.pair_codes(w, s, "conv", groups=2).reshape(4, -1)[:, 1].max()) == 64


def test_pair_mse_scale_never_worse_than_its_base():
    torch.manual_seed(6)
    w = torch.randn(16, 128)
    base = _per_channel(w)
    best = pg.pair_mse_scale(w, base, "linear")

    def err(s):
        return ((pg.pair_codes(w, s).float() * s.reshape(-1, 1) - w) ** 2).sum(dim=1)

    assert torch.all(err(best) <= err(base))
    # with ARQ's step every channel's +-127 forces same-sign partners down: a larger step helps
    assert (err(best) < err(base)).sum() >= 8 and torch.all(best[err(best) < err(base)] > base[err(best) < err(base)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(order="rows"), "order must be one of"),
    (dict(scale=torch.ones(3)), "scale must hold 1 or 8"),
    (dict(groups=3), "groups must be a positive int dividing"),
    (dict(weight_grad="masked"), "weight_grad must be one of"),
    (dict(num_bits=4), "INT8 grid"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(weight=torch.randn(8, 4), scale=torch.ones(8), order="linear", groups=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pg.fake_quant_pair(**args)
