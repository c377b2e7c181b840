"""Config parsing: every key accepted and rejected, errors naming the key path and value."""
import copy
import json

import pytest

from amct_pytorch import LinearQAT, QATConfig, parse_config

D = "retrain_data_config"
W = "retrain_weight_config"


def _data(**kw):
    return {D: kw}


def _weight(**kw):
    return {W: kw}


def test_defaults():
    cfg = parse_config(None)
    assert cfg == parse_config({}) == QATConfig()
    assert cfg.retrain_enable is True
    d, w = cfg.retrain_data_config, cfg.retrain_weight_config
    assert (d.dst_type, d.batch_num, d.fixed_min, d.clip_min, d.clip_max) == ("INT8", 1, False, None, None)
    assert (w.dst_type, w.weights_retrain_algo, w.channel_wise) == ("INT8", "arq_retrain", False)


ACCEPTED = [
    ({"retrain_enable": False}, lambda c: c.retrain_enable is False),
    ({"retrain_enable": True}, lambda c: c.retrain_enable is True),
    (_data(dst_type="INT4"), lambda c: c.retrain_data_config.num_bits == 4),
    (_data(dst_type="INT8"), lambda c: c.retrain_data_config.num_bits == 8),
    (_data(batch_num=3), lambda c: c.retrain_data_config.batch_num == 3),
    (_data(fixed_min=True), lambda c: c.retrain_data_config.fixed_min is True),
    (_data(clip_min=-2), lambda c: c.retrain_data_config.clip_min == -2.0
     and isinstance(c.retrain_data_config.clip_min, float)),
    (_data(clip_max=1.5), lambda c: c.retrain_data_config.clip_max == 1.5),
    (_data(clip_max=3), lambda c: isinstance(c.retrain_data_config.clip_max, float)),
    (_data(clip_max=None), lambda c: c.retrain_data_config.clip_max is None),
    (_data(ifmr_search="histogram"), lambda c: c.retrain_data_config.ifmr_search == "histogram"),
    (_weight(dst_type="INT4"), lambda c: c.retrain_weight_config.num_bits == 4),
    (_weight(weights_retrain_algo="ulq_quantize"), lambda c: c.retrain_weight_config.learnable_scale),
    (_weight(weights_retrain_algo="ulq_retrain"),
     lambda c: c.retrain_weight_config.weights_retrain_algo == "ulq_quantize"),
    (_weight(weights_retrain_algo="arq_retrain"), lambda c: not c.retrain_weight_config.learnable_scale),
    (_weight(channel_wise=True), lambda c: c.retrain_weight_config.channel_wise is True),
    ({D: None, W: None}, lambda c: c == QATConfig()),
]


@pytest.mark.parametrize("config, check", ACCEPTED)
def test_accepted_values(config, check):
    assert check(parse_config(config))


REJECTED = [
    ({"retrain_enable": 1}, TypeError, "retrain_enable"),
    ({"retrain_enable": "yes"}, TypeError, "retrain_enable"),
    (_data(dst_type="int3"), ValueError, "retrain_data_config.dst_type"),
    (_data(dst_type="int8"), ValueError, "retrain_data_config.dst_type"),
    (_data(dst_type=8), TypeError, "retrain_data_config.dst_type"),
    (_data(batch_num=True), TypeError, "retrain_data_config.batch_num"),
    (_data(batch_num=0), ValueError, "retrain_data_config.batch_num"),
    (_data(batch_num=-3), ValueError, "retrain_data_config.batch_num"),
    (_data(batch_num=1.0), TypeError, "retrain_data_config.batch_num"),
    (_data(fixed_min=1), TypeError, "retrain_data_config.fixed_min"),
    (_data(fixed_min="True"), TypeError, "retrain_data_config.fixed_min"),
    (_data(clip_max=-1.0), ValueError, "retrain_data_config.clip_max"),
    (_data(clip_max=0.0), ValueError, "retrain_data_config.clip_max"),
    (_data(clip_max="1.0"), TypeError, "retrain_data_config.clip_max"),
    (_data(clip_max=float("nan")), ValueError, "retrain_data_config.clip_max"),
    (_data(clip_max=float("inf")), ValueError, "retrain_data_config.clip_max"),
    (_data(clip_max=True), TypeError, "retrain_data_config.clip_max"),
    (_data(clip_min=0.5), ValueError, "retrain_data_config.clip_min"),
    (_data(clip_min=float("-inf")), ValueError, "retrain_data_config.clip_min"),
    (_data(clip_min=[1]), TypeError, "retrain_data_config.clip_min"),
    (_data(fixed_min=True, clip_min=-1.0), ValueError, "fixed_min"),
    (_data(ifmr_search="fast"), ValueError, "retrain_data_config.ifmr_search"),
    (_weight(dst_type="INT16"), ValueError, "retrain_weight_config.dst_type"),
    (_weight(weights_retrain_algo="lsq"), ValueError, "retrain_weight_config.weights_retrain_algo"),
    (_weight(weights_retrain_algo=None), TypeError, "retrain_weight_config.weights_retrain_algo"),
    (_weight(channel_wise=0), TypeError, "retrain_weight_config.channel_wise"),
    ({D: [1, 2]}, TypeError, "retrain_data_config"),
    ({W: "INT8"}, TypeError, "retrain_weight_config"),
    ({1: True}, TypeError, "1"),
    ([("retrain_enable", True)], TypeError, "config"),
    (42, TypeError, "config"),
]


@pytest.mark.parametrize("config, error, key", REJECTED)
def test_rejected_values_name_the_key(config, error, key):
    with pytest.raises(error) as info:
        parse_config(config)
    assert key in str(info.value)
    with pytest.raises(error):
        LinearQAT(4, 2, config=config)


def test_error_names_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"batch_num.*int >= 1.*0"):
        parse_config(_data(batch_num=0))
    with pytest.raises(ValueError, match=r"'int3'.*INT4, INT8"):
        parse_config(_data(dst_type="int3"))


def test_typo_key_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match=r"weight_retrain_algo.*Did you mean 'weights_retrain_algo'"):
        parse_config(_weight(weight_retrain_algo="ulq_quantize"))
    with pytest.raises(ValueError, match=r"retrain_enabled.*Did you mean 'retrain_enable'.*Allowed keys"):
        parse_config({"retrain_enabled": True})
    with pytest.raises(ValueError, match=r"batchnum.*Did you mean 'batch_num'"):
        parse_config(_data(batchnum=2))


def test_callers_dict_is_not_mutated():
    cfg = {D: {"batch_num": 2, "clip_max": 3}, W: {"weights_retrain_algo": "ulq_retrain"}}
    before = copy.deepcopy(cfg)
    m = LinearQAT(8, 4, config=cfg)
    m(__import__("torch").randn(2, 8))
    assert cfg == before
    assert m.config.retrain_data_config.clip_max == 3.0


def test_json_file_config(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({D: {"fixed_min": True}, W: {"channel_wise": True}}))
    assert parse_config(str(path)).retrain_data_config.fixed_min
    assert LinearQAT(4, 3, config=path).config.retrain_weight_config.channel_wise
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_config(bad)
    with pytest.raises(ValueError, match="cannot read"):
        parse_config(tmp_path / "missing.json")


def test_to_dict_round_trips():
    cfg = parse_config({D: {"clip_max": 2.0, "fixed_min": True}, W: {"channel_wise": True, "dst_type": "INT4"}})
    assert parse_config(cfg.to_dict()) == cfg


def test_config_is_frozen():
    cfg = parse_config(None)
    with pytest.raises(Exception):
        cfg.retrain_enable = False
