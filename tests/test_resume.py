"""Checkpoint and resume: state_dict() + optimizer state into fresh modules continue bit-identically."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_pytorch import LinearQAT

BATCH_NUM = 3
STEPS = 7
CONFIGS = {
    "exact": {"retrain_data_config": {"batch_num": BATCH_NUM}},
    "histogram": {"retrain_data_config": {"batch_num": BATCH_NUM, "ifmr_search": "histogram"}},
    "ulq_weights": {"retrain_data_config": {"batch_num": BATCH_NUM},
                    "retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}},
}
# steps done before the interruption
POINTS = {"during_calibration": 1, "right_after_calibration": BATCH_NUM, "mid_training": 5}


def _model(config, seed):
    torch.manual_seed(seed)
    return nn.Sequential(LinearQAT(12, 8, config=config), nn.ReLU(), LinearQAT(8, 4, config=config)).train()


def _optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 12, generator=gen) * (1 + i), torch.randn(16, 4, generator=gen)) for i in range(STEPS)]


def _train(model, opt, batches):
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _checkpoint(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    return buf.getvalue()


def _flat_optimizer_state(opt):
    return {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_continues_bit_identically(name, point):
    config, done = CONFIGS[name], POINTS[point]
    batches = _batches()
    ref = _model(config, seed=0)
    ref_opt = _optimizer(ref)
    ref_losses = _train(ref, ref_opt, batches)

    first = _model(config, seed=0)
    first_opt = _optimizer(first)
    _train(first, first_opt, batches[:done])
    layer = first[0]
    if point == "during_calibration":
        assert not layer.is_calibrated and int(layer.calib_batches) == done
    else:
        assert layer.is_calibrated
    blob = _checkpoint(first, first_opt)
    del first, first_opt

    saved = torch.load(io.BytesIO(blob))  # weights_only: a checkpoint is plain tensors
    resumed = _model(config, seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opt = _optimizer(resumed)
    resumed_opt.load_state_dict(saved["optimizer"])
    losses = _train(resumed, resumed_opt, batches[done:])

    assert [float(v) for v in losses] == [float(v) for v in ref_losses[done:]]
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses[done:]))
    expected, got = ref.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    expected_opt, got_opt = _flat_optimizer_state(ref_opt), _flat_optimizer_state(resumed_opt)
    assert expected_opt.keys() == got_opt.keys()
    for k in expected_opt:
        assert torch.equal(expected_opt[k], got_opt[k]), k
    x = torch.randn(5, 12)
    ref.eval(), resumed.eval()
    assert torch.equal(ref(x), resumed(x))


def test_an_interrupted_run_that_is_not_resumed_differs():
    """Control for the test above: restarting from scratch on the remaining batches is not the same run."""
    config, done = CONFIGS["exact"], POINTS["mid_training"]
    batches = _batches()
    ref = _model(config, seed=0)
    ref_losses = _train(ref, _optimizer(ref), batches)
    restart = _model(config, seed=0)
    restart_losses = _train(restart, _optimizer(restart), batches[done:])
    assert [float(v) for v in restart_losses] != [float(v) for v in ref_losses[done:]]


def test_loading_a_checkpoint_with_a_bad_calibration_buffer_says_which_key():
    m = LinearQAT(4, 2, config=CONFIGS["exact"])
    state = m.state_dict()
    state["calib_samples"] = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="calib_samples.*1-d"):
        m.load_state_dict(state)


# ---- determinism: same seed, same data, same results ----------------------------------
def _digest_of_a_run() -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, config in CONFIGS.items():
        model = _model(config, seed=0)
        opt = _optimizer(model)
        losses = _train(model, opt, _batches())
        digest.update(name.encode())
        for v in losses:
            digest.update(v.numpy().tobytes())
        for k, v in sorted(model.state_dict().items()):
            digest.update(k.encode() + v.numpy().tobytes())
    return digest.hexdigest()


def test_runs_are_deterministic_in_process():
    assert _digest_of_a_run() == _digest_of_a_run()


def test_runs_are_deterministic_across_processes():
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = "import test_resume; print(test_resume._digest_of_a_run())"
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=here, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=180) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    digests = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert len(digests[0]) == 64 and digests[0] == digests[1]
