"""Quant-factor record: exact JSON round trip, and clear errors for records that do not fit."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from amct_pytorch import LinearQAT, load_quant_record, save_quant_record

CONFIGS = {
    "per_tensor": {},
    "per_channel_int4": {"retrain_data_config": {"dst_type": "INT4"},
                         "retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}},
    "fixed_min": {"retrain_data_config": {"fixed_min": True}},
    "ulq": {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}},
}


def build(config, out2=4):
    return nn.Sequential(LinearQAT(8, 6, config=config), nn.ReLU(), LinearQAT(6, out2, config=config))


def trained(config, seed=0):
    torch.manual_seed(seed)
    model = build(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
    return model.eval()


def fresh_copy(model, config):
    """A new model with the same float weights and no quantization state."""
    other = build(config)
    for src, dst in zip(model, other):
        if isinstance(src, LinearQAT):
            with torch.no_grad():
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
    return other.eval()


def state_bytes(model):
    return {k: (v.dtype, tuple(v.shape), v.detach().numpy().tobytes()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(tmp_path, name):
    config = CONFIGS[name]
    model = trained(config)
    record = save_quant_record(model, tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text()) == record
    assert set(record["layers"]) == {"0", "2"}

    other = fresh_copy(model, config)
    assert not other[0].is_calibrated
    load_quant_record(other, tmp_path / "q.json")
    assert other[0].is_calibrated and other[2].is_calibrated
    assert save_quant_record(other, tmp_path / "again.json") == record
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "q.json").read_bytes()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))  # bit for bit
    for src, dst in ((model[0], other[0]), (model[2], other[2])):
        assert torch.equal(dst.acts_clip_max, src.acts_clip_max) and torch.equal(dst.acts_clip_min, src.acts_clip_min)
        scale, offset = src.act_qparams()
        assert torch.equal(dst.acts_scale, scale.reshape(1)) and int(dst.acts_offset) == int(offset)
        assert torch.equal(dst.wts_scales, src.weight_qparams())
        assert torch.equal(dst.wts_offsets, torch.zeros_like(dst.wts_offsets))
    # loaded layers are calibrated: a training forward does not calibrate again
    other.train()(torch.randn(4, 8) * 100)
    assert torch.equal(other[0].acts_clip_max, model[0].acts_clip_max)


def test_record_fields(tmp_path):
    model = trained(CONFIGS["per_channel_int4"])
    layer = save_quant_record(model, tmp_path / "q.json")["layers"]["0"]
    assert (layer["act_bits"], layer["weight_bits"], layer["channel_wise"]) == (4, 4, True)
    assert len(layer["scale_w"]) == 6 and layer["offset_w"] == [0] * 6
    qmin, qmax = -8, 7
    assert qmin <= layer["offset_d"] <= qmax and isinstance(layer["offset_d"], int)
    scale = torch.tensor(layer["scale_d"], dtype=torch.float32)
    assert scale.item() == layer["scale_d"]  # a float32 value, written without loss
    assert layer["clip_max_d"] == model[0].acts_clip_max.item()


def test_other_layer_names_is_a_clear_error(tmp_path):
    model = trained({})
    save_quant_record(model, tmp_path / "q.json")
    other = nn.Sequential(nn.Identity(), LinearQAT(8, 6), nn.ReLU(), LinearQAT(6, 4)).eval()
    before = state_bytes(other)
    with pytest.raises(ValueError, match=r"missing from the record \['1', '3'\].*not in the model \['0', '2'\]"):
        load_quant_record(other, tmp_path / "q.json")
    assert state_bytes(other) == before


def test_other_shapes_is_a_clear_error(tmp_path):
    model = trained({})
    save_quant_record(model, tmp_path / "q.json")
    other = build({}, out2=5).eval()
    before = state_bytes(other)
    with pytest.raises(ValueError, match=r"layer '2'.out_features: the record has 4, but the model's layer has 5"):
        load_quant_record(other, tmp_path / "q.json")
    assert state_bytes(other) == before and not other[0].is_calibrated  # layer '0' fitted, still untouched


def test_other_quant_config_is_a_clear_error(tmp_path):
    save_quant_record(trained({}), tmp_path / "q.json")
    other = build({"retrain_weight_config": {"channel_wise": True}}).eval()
    with pytest.raises(ValueError, match=r"channel_wise: the record has False, but the model's layer has True"):
        load_quant_record(other, tmp_path / "q.json")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["layers"]["0"].update(scale_d=r["layers"]["0"]["scale_d"] * 2), "do not follow from clip_max_d"),
    (lambda r: r["layers"]["0"].update(scale_w=[1.0, 2.0]), r"scale_w: expected a list of 1 values"),
    (lambda r: r["layers"]["0"].update(scale_w=[0.0]), r"scale_w\[0\]: expected a nonzero number"),
    (lambda r: r["layers"]["0"].update(offset_w=[3]), "every offset must be 0"),
    (lambda r: r["layers"]["0"].update(clip_max_d="1.0"), "clip_max_d: expected a finite number"),
    (lambda r: r["layers"]["0"].pop("offset_d"), r"missing keys \['offset_d'\]"),
    (lambda r: r.update(version=2), "version 2 is not supported"),
    (lambda r: r.update(format="other"), "is not an amct-qat quant record"),
])
def test_bad_record_is_a_clear_error_and_changes_nothing(tmp_path, edit, message):
    model = trained({})
    record = save_quant_record(model, tmp_path / "q.json")
    edit(record)
    (tmp_path / "bad.json").write_text(json.dumps(record))
    other = fresh_copy(model, {})
    before = state_bytes(other)
    with pytest.raises(ValueError, match=message):
        load_quant_record(other, tmp_path / "bad.json")
    assert state_bytes(other) == before


def test_unreadable_files(tmp_path):
    model = trained({})
    with pytest.raises(ValueError, match="cannot read"):
        load_quant_record(model, tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quant_record(model, tmp_path / "broken.json")


def test_save_needs_calibrated_layers(tmp_path):
    model = build({}).eval()
    with pytest.raises(RuntimeError, match="calibration has not finished"):
        save_quant_record(model, tmp_path / "q.json")
    with pytest.raises(ValueError, match="holds no QAT module"):
        save_quant_record(nn.Linear(2, 2), tmp_path / "q.json")
    assert not (tmp_path / "q.json").exists()


def test_save_does_not_change_state(tmp_path):
    model = trained(CONFIGS["ulq"])
    before = copy.deepcopy(state_bytes(model))
    save_quant_record(model, tmp_path / "q.json")
    assert state_bytes(model) == before


# Layers that quantize their input on the fly have no activation factors to record or deploy.
DYNAMIC = {
    "q8_0_llama": {"retrain_weight_config": {"gguf_type": "Q8_0"}, "retrain_data_config": {"dynamic_act": "llama.cpp-x86"}},
    "q4_0_llama": {"retrain_weight_config": {"gguf_type": "Q4_0", "weights_retrain_algo": "ulq_quantize"},
                   "retrain_data_config": {"dynamic_act": "llama.cpp-x86"}},
    "int4_level4": {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True, "group_size": 32,
                                              "weights_retrain_algo": "ulq_quantize"},
                    "retrain_data_config": {"dynamic_act": "ort-matmulnbits-level4"}},
}


def dynamic_model(config, seed=0, steps=3):
    torch.manual_seed(seed)
    model = nn.Sequential(LinearQAT(64, 32, config=config), nn.ReLU(), LinearQAT(32, 8, config=config))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        model.train()(torch.randn(16, 64)).square().mean().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", list(DYNAMIC))
def test_dynamic_act_layers_record_no_activation_factors(tmp_path, name):
    from amct_pytorch.export import deploy_view

    config = DYNAMIC[name]
    model = dynamic_model(config)
    record = save_quant_record(model, tmp_path / "q.json")
    layer = record["layers"]["0"]
    want_act = config["retrain_data_config"]["dynamic_act"]
    assert layer["dynamic_act"] == want_act and layer["act_block"] == 32
    assert [layer[k] for k in ("clip_max_d", "clip_min_d", "scale_d", "offset_d")] == [None] * 4
    gguf = config["retrain_weight_config"].get("gguf_type")
    assert layer.get("gguf_type") == gguf
    assert len(layer["scale_w"]) == 32 * 64 // 32  # one per block / group of 32 along K

    other = dynamic_model(config, seed=1, steps=0)  # other weights and scales ...
    for src, dst in ((model[0], other[0]), (model[2], other[2])):
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    load_quant_record(other, tmp_path / "q.json")  # ... the record's scales
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    assert save_quant_record(other, tmp_path / "again.json") == record

    # the deploy view has no static activation factors either, and its weights are the eval forward's
    view = deploy_view(model)["0"]
    assert view.act_scale is None and view.act_offset is None
    assert (view.act_dynamic, view.act_block) == (want_act, 32)
    if gguf is not None:
        codes, d = model[0].gguf_blocks()
        assert view.storage == gguf and torch.equal(view.codes(), codes)
        assert torch.equal(view.weight_scale, d.to(torch.float32).reshape(-1))
    with torch.no_grad():
        dense = nn.functional.linear(torch.eye(64), view.dequantized_weight())
    assert torch.equal(dense, nn.functional.linear(torch.eye(64), model[0].fake_quantized_weight()))

    # a record with activation factors for such a layer, or a dynamic record for a static layer: refused
    bad = json.loads((tmp_path / "q.json").read_text())
    bad["layers"]["0"]["scale_d"] = 0.1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    before = state_bytes(other)
    with pytest.raises(ValueError, match=r"\['scale_d'\] must be null.*on the fly"):
        load_quant_record(other, tmp_path / "bad.json")
    assert state_bytes(other) == before
    static = nn.Sequential(LinearQAT(64, 32), nn.ReLU(), LinearQAT(32, 8)).eval()
    with pytest.raises(ValueError, match=r"unknown keys \[.*'dynamic_act'"):
        load_quant_record(static, tmp_path / "q.json")
