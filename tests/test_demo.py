"""The demo (`amct-qat demo`): data, bad input, interruption, and one end-to-end --quick run."""
import json
import subprocess
import sys

import pytest
import torch

from amct_pytorch import cli
from amct_pytorch.demo import data, main as demo_main, report
from amct_pytorch.demo.model import require


def test_sentences_split_is_disjoint_and_deterministic():
    sentences = data.doc_sentences()
    train, held_out = data.split_sentences(sentences)
    assert len(sentences) > 500 and len(held_out) > 100 and len(train) > 3 * len(held_out)
    assert not set(train) & set(held_out)
    assert data.split_sentences(list(reversed(sentences)))[1] == list(reversed(held_out))
    assert all(s[0].isupper() and 6 <= len(s.split()) <= 40 for s in sentences)


def test_lee_data_and_pearson():
    docs, ratings = data.lee_documents(), data.lee_ratings()
    assert len(docs) == 50 and all(len(d.split()) > 30 for d in docs)
    assert ratings.shape == (1225,) and 0 <= float(ratings.min()) and float(ratings.max()) <= 1
    a = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert data.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert data.pearson(a, -a) == pytest.approx(-1.0)


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(ImportError, match=r"amct_no_such_module is not installed.*pip install 'amct-qat\[demo\]'"):
        require("amct_no_such_module")


def test_bad_config_file_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"retrain_weight_config": {"dst_typ": "INT4"}}))
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--config" in err and "unknown config key 'retrain_weight_config.dst_typ'" in err and "dst_type" in err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--config", str(tmp_path / "missing.json")])
    assert "cannot read the JSON file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
    assert "--steps: expected a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"complete": true}')  # from an earlier run
    (out / "plot.png").write_bytes(b"old")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_main, "prepare", interrupted)
    assert cli.main(["demo", "--out", str(out), "--no-progress"]) == 130
    assert "interrupted; no report was written" in capsys.readouterr().err
    assert not (out / "report.json").exists() and not (out / "plot.png").exists()


def test_atomic_write_keeps_nothing_on_failure(tmp_path):
    target = tmp_path / "report.json"

    def failing(tmp):
        tmp.write_text('{"complete": tr')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report._replace_atomically(target, failing)
    assert list(tmp_path.iterdir()) == []
    report.write_json({"complete": True}, target)
    assert json.loads(target.read_text()) == {"complete": True}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "amct_pytorch.cli", "demo", "--quick", "--no-progress",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "setting" in run.stdout and "w8a8" in run.stdout and "Lee-50" in run.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["options"]["quick"]
    assert rep["float"]["lee_pearson"] == pytest.approx(0.656, abs=0.002)
    assert [s["name"] for s in rep["settings"]] == ["w8a8", "w4a8"]
    for s in rep["settings"]:
        assert s["converted"] == 36 and "pooler.dense" in s["left_float"]
        for phase in ("ptq", "qat"):
            m = s[phase]
            assert 0.5 < m["min_cos"] <= m["mean_cos"] < 1.0
            assert m["lee_delta"] == pytest.approx(m["lee_pearson"] - rep["float"]["lee_pearson"])
        assert s["qat"]["mean_cos"] > s["ptq"]["mean_cos"]  # even a few steps help
        assert len(s["history"]["loss"]) == s["steps"] == 6
        assert len(s["clip_ranges"]["before"]) == len(s["clip_ranges"]["after"]) == 36
        assert s["clip_ranges"]["before"] != s["clip_ranges"]["after"]
        assert (out / f"{s['name']}_qat.onnx").stat().st_size > 1_000_000
        assert s["onnx"]["min_cos_ort_vs_torch"] > 0.98
        assert set(s["times_s"]) >= {"calibrate", "ptq_eval", "train", "qat_eval", "onnx_export"}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*partial"))
    split = rep["outlier_split"]
    assert rep["options"]["split_outliers"] and split["enabled"] and split["pairs"] == 6
    assert split["hidden_before"] == 6 * 1536 and split["hidden_after"] == 6 * 1536 + split["added_neurons"] > 6 * 1536
    assert split["float_min_cos_after_split"] > 0.99999
    block0 = split["layers"]["encoder.layer.0.output.dense"]
    assert block0["max_abs_weight_before"] > 5 * block0["max_abs_weight_after"]
    assert "float-exact FFN outlier split" in run.stdout


def test_no_split_flag_reaches_the_demo(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(demo_main, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--no-split", "--out", str(tmp_path)]) == 0
    assert seen["split"] is False
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["split"] is True


def test_split_model_off_returns_the_model_itself():
    from amct_pytorch.demo.run import Options, split_model

    model = torch.nn.Linear(2, 2)
    assert split_model(model, None, Options(split_outliers=False)) == (model, {"enabled": False})


def test_config_file_replaces_the_built_in_settings(tmp_path):
    good = tmp_path / "w4.json"
    good.write_text(json.dumps({"retrain_weight_config": {"dst_type": "INT4"}}))
    (setting,) = demo_main.settings_from_file(good)
    assert setting.name == "custom" and "w4.json" in setting.label
    assert setting.config["retrain_weight_config"]["dst_type"] == "INT4"
