"""The demo (`amct-qat demo`): data, bad input, interruption, and one end-to-end --quick run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amct_pytorch import cli
from amct_pytorch.demo.common import report as common_report
from amct_pytorch.demo.common.deps import require
from amct_pytorch.demo.minilm import data, main as demo_main, report
from amct_pytorch.demo.minilm.settings import GROUP_SIZE


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
        common_report._replace_atomically(target, failing)
    assert list(tmp_path.iterdir()) == []
    common_report.write_json({"complete": True}, target)
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
    assert [s["name"] for s in rep["settings"]] == ["w8a8p", "w4a8g"]
    assert "Warning" not in run.stderr and "Loading weights" not in run.stderr  # no third-party noise
    assert rep["settings"][1]["config"]["retrain_weight_config"]["group_size"] == GROUP_SIZE
    assert [s["split_outliers"] for s in rep["settings"]] == [True, False]  # group_size must divide 1536
    dep = rep["deployment"]
    assert list(dep["artifacts"]) == ["float", "w8a8p", "w4a8g"] and not dep["not_exported"]
    assert dep["artifacts"]["float"]["ort"]["mean_cos"] > 0.99999
    for name, a in dep["artifacts"].items():
        assert (out / Path(a["path"]).name).stat().st_size == pytest.approx(a["size_mb"] * 1e6, abs=1e4)
        assert a["ort"]["sentences"] == rep["data"]["eval_sentences"] == 48
        assert a["ort"]["max_tokens"] > dep["example_shape"][1]  # one artifact, every length
        assert set(a["latency_ms"]) == {"8", "32"} and a["x_float"]["8"] > 0
    assert dep["latency"]["threads"] == 1
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
        assert s["onnx"]["ort"]["min_cos_vs_torch"] > 0.98
        assert s["onnx"]["ort"]["mean_cos"] == pytest.approx(s["qat"]["mean_cos"], abs=0.01)
        assert all(isinstance(d, str) for d in s["onnx"]["dynamic_dims"][0])  # batch and sequence dynamic
        assert set(s["times_s"]) >= {"calibrate", "ptq_eval", "train", "qat_eval", "onnx_export"}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*partial"))
    split = rep["outlier_split"]
    assert rep["options"]["split_outliers"] and split["enabled"] and split["pairs"] == 6
    assert split["hidden_before"] == 6 * 1536 and split["hidden_after"] == 6 * 1536 + split["added_neurons"] > 6 * 1536
    assert split["float_min_cos_after_split"] > 0.99999
    block0 = split["layers"]["encoder.layer.0.output.dense"]
    assert block0["max_abs_weight_before"] > 5 * block0["max_abs_weight_after"]
    assert "float-exact FFN outlier split" in run.stdout and "ms @8" in run.stdout


def test_no_split_flag_reaches_the_demo(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(demo_main, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--no-split", "--out", str(tmp_path)]) == 0
    assert seen["split"] is False
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["split"] is True


def test_split_model_off_returns_the_model_itself():
    from amct_pytorch.demo.minilm.run import split_model
    from amct_pytorch.demo.minilm.settings import Options

    model = torch.nn.Linear(2, 2)
    assert split_model(model, None, Options(split_outliers=False)) == (model, {"enabled": False})


def test_config_file_replaces_the_built_in_settings(tmp_path):
    good = tmp_path / "w4.json"
    good.write_text(json.dumps({"retrain_weight_config": {"dst_type": "INT4"}}))
    (setting,) = demo_main.settings_from_file(good)
    assert setting.name == "custom" and "w4.json" in setting.label
    assert setting.config["retrain_weight_config"]["dst_type"] == "INT4"


def test_settings_and_deployment_flags_reach_the_demo(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(demo_main, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["settings"] is None and not seen["peers"] and not seen["quantize_embeddings"]
    assert cli.main(["demo", "--settings", "w4a8g,w4a8", "--group-size", "32", "--peers", "--quantize-embeddings",
                     "--out", str(tmp_path)]) == 0
    assert seen["settings"] == "w4a8g,w4a8" and seen["group_size"] == 32 and seen["peers"]
    assert seen["quantize_embeddings"]
    for argv, message in ((["--settings", "w8a8,w3a8"], "unknown setting(s) ['w3a8']"),
                          (["--group-size", "48"], "expected 16, 32, 64 or 128"),
                          (["--model", "crepe", "--peers"], "--peers: applies only to --model minilm"),
                          (["--settings", "w8a8", "--config", "x.json"], "--config replaces the built-in settings")):
        with pytest.raises(SystemExit):
            cli.main(["demo", *argv, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err


def test_parse_settings_builds_the_group_wise_setting():
    from amct_pytorch.demo.minilm.run import uses_split
    from amct_pytorch.demo.minilm.settings import DEFAULT_SETTINGS, Options

    assert [s.name for s in demo_main.parse_settings(DEFAULT_SETTINGS)] == ["w8a8p", "w4a8g"]
    w8, g32, pc = demo_main.parse_settings("w8a8, w4a8g ,w4a8", group_size=32)
    assert g32.config["retrain_weight_config"]["group_size"] == 32 and "32 inputs" in g32.label
    assert "group_size" not in pc.config["retrain_weight_config"]
    opts = Options()
    assert uses_split(w8.config, opts) and uses_split(pc.config, opts) and not uses_split(g32.config, opts)
    with pytest.raises(ValueError, match="named twice"):
        demo_main.parse_settings("w8a8,w8a8")


def test_deployment_table_lists_every_artifact():
    ort = {"mean_cos": 0.997, "min_cos": 0.99, "sentences": 246, "max_tokens": 80}
    artifact = {"size_mb": 59.6, "ort": ort, "latency_ms": {"8": 50.0, "32": 200.0}, "x_float": {"8": 0.5, "32": 0.4}}
    rep = {"deployment": {"onnxruntime": "1.x", "not_exported": {"w4a8": "no"},
                          "latency": {"threads": 1, "reps": 5, "sentences": 64, "by_batch": {"8": {}, "32": {}}},
                          "artifacts": {"float": dict(artifact, ort=dict(ort, mean_cos=1.0)),
                                        "w8a8": dict(artifact, ort=dict(ort, max_abs_diff_vs_torch=0.01))}}}
    text = report.deployment_table(rep)
    assert "w8a8" in text and "59.6" in text and "0.9970" in text and "1.0e-02" in text and "(0.40)" in text
    assert "w4a8           not exported: no" in text and "all 246 held-out sentences" in text
