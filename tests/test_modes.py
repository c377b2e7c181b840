"""The state rule: only train mode with grad enabled, or amct_pytorch.calibrating(), changes state."""
import io
import threading
import warnings

import pytest
import torch

from amct_pytorch import LinearQAT, calibrating
from state_helpers import _assert_unchanged, _snapshot

ULQ = {"retrain_data_config": {"batch_num": 2},
       "retrain_weight_config": {"weights_retrain_algo": "ulq_quantize"}}




def _fresh(config=ULQ):
    torch.manual_seed(0)
    return LinearQAT(8, 4, config=config)


def _calibrated(config=ULQ):
    m = _fresh(config).train()
    for _ in range(2):
        m(torch.randn(6, 8))
    assert m.is_calibrated
    return m


def _step_weights(m):
    """Move the weights as an optimiser would, so that a state update would show."""
    with torch.no_grad():
        m.weight.mul_(1.5)


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode", "eval_no_grad"])
@pytest.mark.parametrize("phase", ["before_calibration", "mid_calibration", "calibrated"])
def test_read_only_modes_never_change_state(mode, phase):
    m = _fresh() if phase == "before_calibration" else _calibrated()
    if phase == "mid_calibration":
        m = _fresh().train()
        m(torch.randn(6, 8))
    _step_weights(m)
    before = _snapshot(m)
    m.train(mode not in ("eval", "eval_no_grad"))
    for _ in range(3):
        if mode == "eval":
            y = m(torch.randn(6, 8))
            assert not m.updates_state()
        else:
            ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
            with ctx():
                y = m(torch.randn(6, 8))
                assert not m.updates_state()
        assert torch.isfinite(y).all()
    _assert_unchanged(m, before)
    assert m.is_calibrated == (phase == "calibrated")


def test_train_mode_with_grad_calibrates_and_stores_scales():
    m = _fresh().train()
    assert m.updates_state()
    m(torch.randn(6, 8))
    assert int(m.calib_batches) == 1 and bool(m.wts_scale_ready)
    m(torch.randn(6, 8))
    assert m.is_calibrated and float(m.acts_clip_max.detach()) > 0


def test_calibrating_context_updates_state_in_eval_and_no_grad():
    m = _fresh().eval()
    with calibrating(), torch.no_grad():
        assert m.updates_state()
        m(torch.randn(6, 8))
        m(torch.randn(6, 8))
    assert m.is_calibrated and bool(m.wts_scale_ready)
    assert not m.updates_state()


def test_calibrating_context_nests_restores_on_error_and_is_per_thread():
    m = _fresh().eval()
    seen = []
    with calibrating():
        with calibrating():
            pass
        assert m.updates_state()  # the inner block must not switch the outer one off
        worker = threading.Thread(target=lambda: seen.append(m.updates_state()))
        worker.start()
        worker.join()
    assert seen == [False]  # another thread's forward calls are not forced
    with pytest.raises(KeyError):
        with calibrating():
            raise KeyError("boom")
    assert not m.updates_state()


def test_export_and_tracing_never_change_state():
    m = _fresh().train()  # uncalibrated, train mode, grad enabled: a plain forward would calibrate
    _step_weights(m)
    before = _snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(m, torch.randn(6, 8), check_trace=False)
    _assert_unchanged(m, before)
    assert not m.is_calibrated

    # export wants a calibrated module in eval mode; inside calibrating() a plain forward would
    # still store ARQ's weight scale for the moved weights, export must not
    m = _calibrated(config={"retrain_data_config": {"batch_num": 2}}).eval()
    _step_weights(m)
    before = _snapshot(m)
    with calibrating(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.export(m, (torch.randn(6, 8),))
        torch.onnx.export(m, (torch.randn(6, 8),), io.BytesIO(), dynamo=False)
    _assert_unchanged(m, before)
    with calibrating():
        m(torch.randn(6, 8))
    assert not torch.equal(m.wts_scales, before["wts_scales"])  # control: a forward here does update


def test_extra_repr_states_the_rule():
    text = repr(_fresh())
    assert "train mode with grad enabled" in text and "calibrating()" in text
    assert "never in eval, no_grad or export" in text
