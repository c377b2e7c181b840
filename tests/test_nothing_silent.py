"""Issue 21: nothing is left float, fixed or unlearned without saying so (findings 2-6; finding 1,
GPT-2's Conv1D, is tests/test_gpt2_conv1d.py)."""
import warnings

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import amct_pytorch as amct  # noqa: E402
from amct_pytorch import (LinearQAT, UnconvertedLayerWarning, add_qat_params, calibrate, export_onnx,  # noqa: E402
                          to_qat)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.bil = nn.Bilinear(16, 16, 8)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.emb = nn.Embedding(10, 16)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(self.norm(y)) + self.bil(y, y).sum()


# ---- 2: the summary accounts for every weight ------------------------------------------------
def test_summary_lists_every_float_weight_with_reason_and_share_and_warns_once():
    model = Mixed()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = to_qat(model, {})
    ours = [w for w in seen if issubclass(w.category, UnconvertedLayerWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    assert "nn.LSTM (lstm)" in text and "nn.Bilinear (bil)" in text
    assert "LayerNorm" not in text and "Embedding" not in text  # norms have no matrix; embeddings convert on request
    assert list(summary.converted) == ["fc"]
    assert summary.left_float["lstm"].startswith("no QAT layer for nn.LSTM")
    assert summary.left_float["bil"].startswith("no QAT layer for nn.Bilinear")
    assert summary.left_float["norm"].startswith("no QAT layer for nn.LayerNorm")
    assert "layer_types" in summary.left_float["emb"]
    total = sum(p.numel() for p in Mixed().parameters())
    float_count = total - 16 * 16 - 16
    assert summary.float_params == float_count and summary.weight_params == total
    assert summary.float_share == pytest.approx(float_count / total)
    shown = str(summary)
    assert "lstm: left as is (no QAT layer for nn.LSTM" in shown
    assert f"{100 * float_count / total:.1f}% of the model's weight parameters" in shown


def test_skip_and_subclass_reasons_and_no_warning_without_unconvertible_types():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnconvertedLayerWarning)
        summary = to_qat(model, {}, skip=["1"])
    assert summary.left_float["1"] == "skip list: '1'"
    assert summary.skipped == {"1": "skip list: '1'"}


# ---- 3: shapes are never silently fixed -------------------------------------------------------
class RecurrentHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def calibrated(model, *examples):
    calibrate(model, list(examples), progress=False)
    return model.eval()


def recurrent():
    torch.manual_seed(0)
    model = RecurrentHead()
    to_qat(model, {"retrain_data_config": {"batch_num": 1}})
    return calibrated(model, (torch.randn(2, 6, 16),))


def test_explicit_dynamic_shapes_that_torch_cannot_keep_is_an_error_with_torchs_reason(tmp_path):
    model = recurrent()
    seq = torch.export.Dim("seq", min=2, max=64)
    with pytest.raises(ValueError, match=r"(?s)dynamic_shapes: torch.export cannot keep them.*seq"):
        export_onnx(model, (torch.randn(2, 6, 16),), tmp_path / "x.onnx", dynamic_shapes=({1: seq},), check=False)


def test_automatic_mode_names_a_dim_that_became_static(tmp_path):
    model = recurrent()
    with pytest.warns(UserWarning, match=r"(?s)input_0 dim 1 \(size 6 in the example\).*static"):
        result = export_onnx(model, (torch.randn(2, 6, 16),), tmp_path / "x.onnx", check=False)
    assert 1 not in result.dynamic_axes[0]
    # a dim the model pins (the features) is not warned about, and an MLP keeps batch and sequence
    mlp = nn.Sequential(nn.Linear(16, 16))
    to_qat(mlp, {"retrain_data_config": {"batch_num": 1}})
    calibrated(mlp, torch.randn(2, 6, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = export_onnx(mlp, (torch.randn(2, 6, 16),), tmp_path / "mlp.onnx", check=False)
    assert result.dynamic_axes == ((0, 1),)


# ---- 4: clip bounds and scales always learn or the user is told --------------------------------
def _steps(model, opt, n):
    for step in range(n):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_optimizer_built_before_to_qat_warns_and_add_qat_params_fixes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    to_qat(model, {"retrain_data_config": {"batch_num": 1}})
    calibrate(model, [torch.randn(8, 16)], progress=False)
    model.train()
    with pytest.warns(UserWarning, match=r"(?s)never change.*0\.acts_clip_max.*add_qat_params"):
        _steps(model, opt, 4)
    assert model[0].acts_clip_max.grad is not None
    added = add_qat_params(opt, model)
    assert "0.acts_clip_max" in added and "2.acts_clip_min" in added
    assert add_qat_params(opt, model) == []  # nothing twice
    before = model[0].acts_clip_max.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _steps(model, opt, 4)
    assert not torch.equal(model[0].acts_clip_max.detach(), before)


def test_optimizer_built_after_to_qat_never_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    to_qat(model, {"retrain_data_config": {"batch_num": 1}})
    calibrate(model, [torch.randn(8, 16)], progress=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _steps(model, opt, 5)


# ---- 5: compiled models export ----------------------------------------------------------------
def test_export_unwraps_a_compiled_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    to_qat(model, {"retrain_data_config": {"batch_num": 1}})
    calibrated(model, torch.randn(4, 16))
    result = export_onnx(torch.compile(model), (torch.randn(4, 16),), tmp_path / "c.onnx")
    assert result.max_abs_diff <= 1e-5


# ---- 6: messages name the layer by its path, and the remedy ------------------------------------
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 4)

    def forward(self, x, use_b=False):
        h = self.body(x)
        return self.head_b(h) if use_b else self.head_a(h)


def test_never_reached_layer_is_reported_as_such_and_export_needs_only_used_layers(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads()
    to_qat(model, {"retrain_data_config": {"batch_num": 1}})
    with pytest.warns(UserWarning, match=r"never called.*head_b") as rec:
        calibrate(model, [torch.randn(4, 16) for _ in range(5)], progress=False)
    assert not any("ran out" in str(w.message) for w in rec)
    model.eval()
    result = export_onnx(model, (torch.randn(4, 16),), tmp_path / "a.onnx")
    assert result.max_abs_diff <= 1e-5

    class UsesB(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, use_b=True)

    with pytest.raises(RuntimeError, match=r"^m\.head_b: activation calibration has not finished"):
        export_onnx(UsesB(model).eval(), (torch.randn(4, 16),), tmp_path / "b.onnx")


def test_bf16_model_names_the_layer_and_the_remedy():
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"^0: weight dtype torch.bfloat16.*\.float\(\) before to_qat.*autocast"):
        to_qat(model, {})
    assert type(model[0]) is nn.Linear  # untouched


def test_tuple_batches_point_to_forward():
    model = nn.Sequential(nn.Linear(4, 4))
    to_qat(model, {"retrain_data_config": {"batch_num": 1}})
    data = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    with pytest.raises(TypeError, match=r"(?s)model\(\*batch\).*2 items.*forward=lambda model, batch"):
        calibrate(model, data, progress=False)
    assert calibrate(model, data, forward=lambda m, b: m(b[0]), progress=False) == 1


def test_second_to_qat_with_another_config_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4))
    to_qat(model, {})
    summary = to_qat(model, {})  # the same config again: nothing to do
    assert summary.skipped == {"0": "already a LinearQAT"}
    with pytest.raises(ValueError, match=r"^0: is already a LinearQAT with another config.*to_float"):
        to_qat(model, {"retrain_weight_config": {"channel_wise": True}})
    assert isinstance(model[0], LinearQAT) and not model[0].config.retrain_weight_config.channel_wise
