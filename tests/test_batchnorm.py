"""fold_batchnorm: conv -> BatchNorm folded exactly (within float32 rounding), everything else reported."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_pytorch import BatchNormFolding, fold_batchnorm

U32 = 2.0**-24  # float32 unit roundoff
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FUNC = {(False, 1): F.conv1d, (False, 2): F.conv2d, (False, 3): F.conv3d,
        (True, 1): F.conv_transpose1d, (True, 2): F.conv_transpose2d, (True, 3): F.conv_transpose3d}


def _randomise_bn(bn, gen):
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))


def _conv_call(conv, x, w, b):
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if transposed:
        kw["output_padding"] = conv.output_padding
    return FUNC[(transposed, x.dim() - 2)](x, w, b, **kw)


def _reference_and_bound(conv, bn, x):
    """conv -> BN in float64 from the original float32 parameters, and an elementwise bound on
    |float32 folded - exact|: the folded float32 weights and bias are within u (relative) of
    their exact values; the float32 conv of n products then adds at most gamma_n relative error
    of sum |w'| |x| + |b'| (Higham, inner products), n = fan-in + 1."""
    f64 = torch.float64
    w, b = conv.weight.detach().to(f64), None if conv.bias is None else conv.bias.detach().to(f64)
    y = _conv_call(conv, x.to(f64), w, b)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = (bn.weight.detach().to(f64) if bn.affine else 1.0) / torch.sqrt(bn.running_var.to(f64) + bn.eps)
    beta = bn.bias.detach().to(f64) if bn.affine else 0.0
    ref = (y - bn.running_mean.to(f64).reshape(shape)) * s.reshape(shape) + (beta.reshape(shape) if bn.affine else 0.0)
    abs_w = w.abs()
    mag = _conv_call(conv, x.to(f64).abs(), abs_w, None) * s.abs().reshape(shape)
    shift = (b if b is not None else 0.0) * s - bn.running_mean.to(f64) * s + beta
    mag = mag + shift.abs().reshape(shape)
    n = conv.weight[0].numel() + 1
    gamma = (n + 2) * U32 / (1 - (n + 2) * U32)
    return ref, 2 * gamma * mag + 1e-30


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups,bias,affine,transposed", [
    (1, True, True, False), (1, False, True, False), (4, True, False, False), (8, False, True, False),
    (1, True, True, True), (2, False, True, True)])
def test_fold_matches_conv_then_bn_in_eval(dim, groups, bias, affine, transposed):
    gen = torch.Generator().manual_seed(dim * 100 + groups)
    cin, cout = 8, 8
    conv_cls = CONVT[dim] if transposed else CONV[dim]
    kw = dict(stride=2, padding=1) if transposed else dict(padding=1)
    conv = conv_cls(cin, cout, 3, groups=groups, bias=bias, **kw)
    bn = BN[dim](cout, affine=affine)
    _randomise_bn(bn, gen)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    x = torch.randn(2, cin, *([6] * dim), generator=gen)
    ref, bound = _reference_and_bound(conv, bn, x)
    ref = F.relu(ref)
    weight_param = conv.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything folds: no warning
        result = fold_batchnorm(model)
    assert list(result) == [("0", "1")] and result.not_folded == () and result.method == "fx"
    assert isinstance(model[1], nn.Identity) and model[0].weight is weight_param and model[0].bias is not None
    with torch.no_grad():
        got = model(x).double()
    assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())


class Branchy(nn.Module):
    """A traced custom module: conv->bn folds; conv->relu->bn does not; a conv whose
    output has a second user does not; a conv called twice does not."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_d, self.bn_d = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn_a(self.conv_a(x))
        x = self.bn_b(torch.relu(self.conv_b(x)))
        c = self.conv_c(x)
        x = self.bn_c(c) + c
        x = self.conv_d(self.conv_d(x))
        return self.bn_d(x)


def test_traced_custom_module_folds_only_direct_pairs_and_reports_the_rest():
    torch.manual_seed(0)
    model = Branchy().eval()
    gen = torch.Generator().manual_seed(1)
    for bn in (model.bn_a, model.bn_b, model.bn_c, model.bn_d):
        _randomise_bn(bn, gen)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="3 BatchNorm layer") as record:
        result = fold_batchnorm(model)
    assert len(record) == 1
    assert result.folded == (("conv_a", "bn_a"),) and result.method == "fx"
    reasons = dict(result.not_folded)
    assert set(reasons) == {"bn_b", "bn_c", "bn_d"}
    assert "relu" in reasons["bn_b"] and "not a plain conv" in reasons["bn_b"]
    assert "conv_c" in reasons["bn_c"] and "also used by" in reasons["bn_c"]
    assert "called 2 times" in reasons["bn_d"]
    assert isinstance(model.bn_a, nn.Identity) and isinstance(model.bn_b, nn.BatchNorm2d)
    with torch.no_grad():
        got = model(x)
    # exactness is tested above; here: the model still computes the same function
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4))
        self.head_bn = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = self.head_bn(x)
        return x


def test_untraceable_model_falls_back_to_sequential_adjacency():
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="2 BatchNorm layer"):
        result = fold_batchnorm(model)
    assert result.method == "sequential" and "TraceError" in result.trace_error
    assert result.folded == (("features.0", "features.1"),)
    reasons = dict(result.not_folded)
    assert set(reasons) == {"features.3", "head_bn"} and "cannot be traced" in reasons["head_bn"]
    assert isinstance(model.features[1], nn.Identity) and isinstance(model.features[3], nn.BatchNorm1d)


def test_bn_without_running_stats_is_refused_naming_it():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"^1: BatchNorm with track_running_stats=False .* into 0"):
        fold_batchnorm(model)
    assert torch.equal(model[0].weight, before) and isinstance(model[1], nn.BatchNorm2d)  # untouched


def test_nothing_to_fold_and_bad_input():
    model = nn.Sequential(nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fold_batchnorm(model)
    assert isinstance(result, BatchNormFolding) and len(result) == 0 and result.not_folded == ()
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fold_batchnorm("model")


def test_shared_bn_registration_is_replaced_everywhere():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv1d(1, 3, 2), nn.BatchNorm1d(3))
            self.alias = self.block[1]  # the same BatchNorm under a second name (not called again)

        def forward(self, x):
            return self.block(x)

    model = Aliased()
    assert fold_batchnorm(model, warn=False).folded == (("block.0", "block.1"),)
    assert isinstance(model.block[1], nn.Identity) and isinstance(model.alias, nn.Identity)


def test_crepe_batchnorms_follow_relu_and_are_reported():
    from amct_pytorch.demo.crepe.model import Crepe

    result = fold_batchnorm(Crepe("tiny"), warn=False)
    assert result.folded == () and len(result.not_folded) == 6
    assert all("relu" in why for _, why in result.not_folded)


def test_to_qat_can_fold_first():
    from amct_pytorch import Conv2dQAT, to_qat

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    weight = model[0].weight
    summary = to_qat(model, fold_batchnorm=True)
    assert isinstance(model[0], Conv2dQAT) and model[0].weight is weight and isinstance(model[1], nn.Identity)
    assert summary.batchnorm.folded == (("0", "1"),) and dict(summary.batchnorm.not_folded).keys() == {"3"}
    assert "folded 1 BatchNorm" in str(summary)
    assert to_qat(nn.Sequential(nn.Conv1d(1, 1, 1), nn.BatchNorm1d(1))).batchnorm is None  # off by default
    with pytest.raises(TypeError, match="fold_batchnorm: expected a bool"):
        to_qat(nn.Sequential(nn.Conv1d(1, 1, 1)), fold_batchnorm="yes")
