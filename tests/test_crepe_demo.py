"""The CREPE demo (`amct-qat demo --model crepe`): model, data, metrics, BatchNorm handling, CLI, and
one end-to-end --quick run."""
import json
import subprocess
import sys

import pytest
import torch

from amct_pytorch import cli
from amct_pytorch.demo.crepe import data as crepe_data, model as crepe
from amct_pytorch.demo.crepe.run import set_bn_mode
from amct_pytorch.demo.crepe.settings import CrepeOptions

try:
    crepe.weights_path("tiny")
    HAVE_WEIGHTS = True
except ImportError:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="CREPE weights: " + crepe.WEIGHTS_HINT)


@needs_weights
def test_tiny_weights_load_and_the_model_finds_pitch():
    model = crepe.load_crepe("tiny")
    state = torch.load(crepe.weights_path("tiny"), weights_only=True)
    learned = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert sum(p.numel() for p in model.parameters()) == learned == 486_552
    frames, cents = crepe_data.synthesize(256, 123)
    salience = model(frames)
    assert salience.shape == (256, 360) and bool(((salience > 0) & (salience < 1)).all())
    m = crepe.pitch_metrics(crepe.local_average_cents(salience), cents)
    # measured 1.00 on the full eval set; 256 tones: > 0.9 holds unless >25 frames fail
    assert m["rpa"] > 0.9 and m["cents_error"] < 100


def test_architecture_shapes_and_bad_capacity():
    model = crepe.Crepe("tiny")
    assert [b.conv.out_channels for b in model.blocks] == [128, 16, 16, 16, 32, 64]
    assert model.blocks[0].conv.kernel_size == (512,) and model.blocks[0].conv.stride == (4,)
    assert model.classifier.in_features == 256
    assert model(torch.zeros(3, crepe.FRAME)).shape == (3, crepe.N_BINS)
    assert crepe.Crepe("full").classifier.in_features == 2048
    with pytest.raises(ValueError, match=r"capacity: expected one of \['full', 'tiny'\], got 'small'"):
        crepe.Crepe("small")


def test_checkpoint_keys_are_renamed_and_squeezed():
    state = {"conv2.weight": torch.zeros(16, 128, 64, 1), "conv2_BN.running_var": torch.ones(16),
             "classifier.bias": torch.zeros(360)}
    ours = crepe.checkpoint_to_ours(state)
    assert ours["blocks.1.conv.weight"].shape == (16, 128, 64)
    assert set(ours) == {"blocks.1.conv.weight", "blocks.1.bn.running_var", "classifier.bias"}


def test_data_is_deterministic_labelled_and_normalised():
    a, ca = crepe_data.synthesize(64, 5)
    b, cb = crepe_data.synthesize(64, 5)
    c, _ = crepe_data.synthesize(64, 6)
    assert torch.equal(a, b) and torch.equal(ca, cb) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (64, crepe.FRAME)
    # normalised: mean 0, population std 1 (float32 rounding of 1024-term sums: far below 1e-4)
    assert float(a.double().mean(1).abs().max()) < 1e-4
    assert float((a.double().pow(2).mean(1).sqrt() - 1).abs().max()) < 1e-4
    # labels: the vibrato moves the centre pitch at most vibrato_cents from a log-uniform f0 in range
    spec = crepe_data.ToneSpec()
    lo, hi = crepe.hz_to_cents(torch.tensor([spec.fmin, spec.fmax], dtype=torch.float64))
    assert bool((ca >= lo - spec.vibrato_cents).all() and (ca <= hi + spec.vibrato_cents).all())
    stream = crepe_data.ToneStream(8, seed=1)
    first, again = next(stream)[0], next(crepe_data.ToneStream(8, seed=1))[0]
    assert torch.equal(first, again) and not torch.equal(first, next(stream)[0])


def test_pure_tone_frequency_is_exact_in_the_frames():
    # one harmonic, no vibrato, no noise: the frame's spectrum peaks at the labelled pitch
    spec = crepe_data.ToneSpec(max_harmonics=1, vibrato_cents=0.0, snr_db=(200.0, 200.0))
    frames, cents = crepe_data.synthesize(4, 9, spec)
    hz = crepe.cents_to_hz(cents)
    spectrum = torch.fft.rfft(frames.double() * torch.hann_window(crepe.FRAME, dtype=torch.float64), n=16 * crepe.FRAME)
    peak_hz = spectrum.abs().argmax(1).double() * crepe.SAMPLE_RATE / (16 * crepe.FRAME)
    assert bool(((peak_hz - hz).abs() <= crepe.SAMPLE_RATE / (16 * crepe.FRAME)).all())  # one fine FFT bin


def test_bad_synthesis_arguments():
    with pytest.raises(ValueError, match="n: expected a positive int, got 0"):
        crepe_data.synthesize(0, 1)
    with pytest.raises(ValueError, match="fmin, fmax"):
        crepe_data.ToneSpec(fmin=500.0, fmax=100.0)
    with pytest.raises(ValueError, match=r"frames: expected shape \(n, 1024\)"):
        crepe.normalise_frames(torch.zeros(2, 10))


def test_decoding_and_metrics_on_known_cases():
    cents = crepe.bin_cents()
    # a single active bin decodes to its own cents; two equal neighbours to their midpoint
    s = torch.zeros(3, 360)
    s[0, 100] = 0.9
    s[1, 200] = s[1, 201] = 0.5
    s[2, 359] = 1.0  # the window is clipped at the last bin
    s[2, 357] = 1.0  # two bins inside the window: the midpoint
    got = crepe.local_average_cents(s)
    want = torch.stack([cents[100], (cents[200] + cents[201]) / 2, (cents[357] + cents[359]) / 2])
    # the weighted mean of <= 9 float64 terms of size ~1e4: rounding far below 1e-9 cents
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    # bins outside the +-4 window of the argmax do not count
    far = torch.zeros(1, 360)
    far[0, 50], far[0, 60] = 1.0, 0.99
    assert float(crepe.local_average_cents(far)) == pytest.approx(float(cents[50]), abs=1e-9)
    # RPA: within 50 cents inclusive; mean absolute error
    true = torch.tensor([1000.0, 2000.0, 3000.0, 4000.0], dtype=torch.float64)
    pred = true + torch.tensor([0.0, 50.0, -50.5, 1200.0], dtype=torch.float64)
    m = crepe.pitch_metrics(pred, true)
    assert m["rpa"] == 0.5 and m["cents_error"] == pytest.approx((0 + 50 + 50.5 + 1200) / 4)
    with pytest.raises(ValueError, match="pred_cents, true_cents"):
        crepe.pitch_metrics(pred, true[:2])
    assert crepe.hz_to_cents(torch.tensor(10.0)) == 0
    assert float(crepe.cents_to_hz(crepe.hz_to_cents(torch.tensor(440.0, dtype=torch.float64)))) == pytest.approx(440.0)


def test_gaussian_targets_peak_at_the_true_bin():
    t = crepe.gaussian_targets(crepe.bin_cents()[[10, 300]])
    assert t.argmax(1).tolist() == [10, 300] and t.max() == 1.0
    assert float(t[0, 11]) == pytest.approx(float(torch.exp(torch.tensor(-(20.0**2) / (2 * 25.0**2)))), rel=1e-6)


def test_bn_modes_during_qat():
    model = crepe.Crepe("tiny").train()
    set_bn_mode(model, "frozen")
    bns = [b.bn for b in model.blocks]
    assert not any(bn.training for bn in bns) and model.blocks[0].conv.training
    before = bns[0].running_mean.clone()
    model(torch.randn(4, crepe.FRAME))  # frozen: running statistics stay
    assert torch.equal(bns[0].running_mean, before)
    model.train()
    set_bn_mode(model, "train")
    model(torch.randn(4, crepe.FRAME))  # train: they follow the batches
    assert all(bn.training and bn.momentum == 0.1 for bn in bns) and not torch.equal(bns[0].running_mean, before)
    with pytest.raises(ValueError, match=r"bn_mode: expected one of \('frozen', 'train'\), got 'free'"):
        CrepeOptions(bn_mode="free")
    with pytest.raises(ValueError, match="loss: expected one of"):
        CrepeOptions(loss="mse")


def test_cli_bad_input_for_crepe(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--model", "crepe", "--no-split", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--no-split: applies only to --model minilm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "resnet"])
    err = capsys.readouterr().err
    assert "--model" in err and "'resnet'" in err and "minilm" in err and "crepe" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"retrain_weight_config": {"dst_type": "INT3"}}))
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "crepe", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert "--config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_routes_crepe_options(monkeypatch, tmp_path):
    from amct_pytorch.demo.crepe import main as crepe_main

    seen = {}
    monkeypatch.setattr(crepe_main, "run_crepe_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--model", "crepe", "--quick", "--steps", "3", "--batch-size", "8", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    assert seen == {"out": str(tmp_path), "steps": 3, "batch_size": 8, "config": None, "quick": True,
                    "progress": False, "compare_batchnorm": False}
    with pytest.raises(SystemExit):
        cli.main(["demo", "--compare-batchnorm", "--out", str(tmp_path)])  # minilm has no BatchNorm comparison


@needs_weights
@pytest.mark.slow
def test_quick_crepe_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"complete": true}')  # from an earlier run: must be replaced
    run = subprocess.run([sys.executable, "-m", "amct_pytorch.cli", "demo", "--model", "crepe", "--quick",
                          "--compare-batchnorm", "--no-progress", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RPA %" in run.stdout and "w4a8" in run.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["options"]["quick"] and rep["data"]["eval_frames"] == 512
    assert 0.0 <= rep["float"]["rpa"] <= 1.0 and rep["float"]["rpa"] > 0.9
    assert [s["name"] for s in rep["settings"]] == ["w8a8", "w4a8"]
    for s in rep["settings"]:
        assert s["converted"] == 7 and s["left_float"] == {}  # six Conv1d and the classifier
        for phase in ("ptq", "qat"):
            assert 0.0 <= s[phase]["rpa"] <= 1.0 and s[phase]["cents_error"] >= 0
        assert len(s["history"]["loss"]) == s["steps"] == 4
        o = s["onnx"]
        assert (out / f"{s['name']}_qat.onnx").stat().st_size == o["size_bytes"] > 100_000
        assert o["frames"] == 512 and 0.0 <= o["ort_rpa"] <= 1.0
        # ORT rounds x/scale then adds the offset: a tie can move one activation by a grid step;
        # the saliences stay close and the decoded RPA within a few frames of PyTorch's
        assert o["max_abs_diff"] < 0.2 and abs(o["ort_rpa"] - s["qat"]["rpa"]) <= 4 / 512
        assert o["latency"]["median_ms"] > 0 and o["latency"]["threads"] == 1
    assert set(rep["batchnorm"]["comparison"]["w4a8"]) == {"frozen", "train"}
    assert rep["batchnorm"]["fold"]["folded"] == [] and len(rep["batchnorm"]["fold"]["not_folded"]) == 6
    assert rep["float"]["onnx"]["latency"]["median_ms"] > 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*partial"))
