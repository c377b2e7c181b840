"""Model-wide conversion API on a tiny randomly initialised BERT (no download)."""
import re

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from amct_pytorch import (LinearQAT, calibrate, disable_quantization, enable_quantization,  # noqa: E402
                          freeze_calibration, qat_layers, to_float, to_qat, unfreeze_calibration)

W4 = {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}}
ULQ = {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize"}}


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def batch(seed=0, n=4, length=6):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


LINEARS = 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler


def test_converts_every_linear_sharing_parameters():
    model = tiny_bert()
    before = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    summary = to_qat(model)
    layers = qat_layers(model)
    assert len(before) == LINEARS and set(layers) == set(before) == set(summary.converted)
    assert all(layers[n].weight is w for n, w in before.items())
    assert not summary.skipped and not summary.overridden
    assert "converted 13 layer(s) to QAT modules" in str(summary)


def test_overrides_by_pattern_regex_and_layer_with_precedence():
    model = tiny_bert()
    target = model.encoder.layer[1].intermediate.dense
    summary = to_qat(model, overrides={
        "*.intermediate.dense": W4,
        re.compile(r"encoder\.layer\.0\.attention\.self\.(query|key)"): ULQ,
        target: {"retrain_data_config": {"dst_type": "INT4"}},
    })
    layers = qat_layers(model)
    assert layers["encoder.layer.0.intermediate.dense"].config.retrain_weight_config.dst_type == "INT4"
    assert layers["encoder.layer.0.attention.self.query"].config.retrain_weight_config.learnable_scale
    assert not layers["encoder.layer.0.attention.self.value"].config.retrain_weight_config.learnable_scale
    # the layer-object key beats the pattern that also matches it (whole config, no merge)
    won = layers["encoder.layer.1.intermediate.dense"].config
    assert won.retrain_data_config.dst_type == "INT4" and won.retrain_weight_config.dst_type == "INT8"
    assert summary.overridden["encoder.layer.1.intermediate.dense"] == "<Linear object>"
    assert summary.overridden["encoder.layer.0.intermediate.dense"] == "'*.intermediate.dense'"
    assert len(summary.overridden) == 4


def test_last_matching_pattern_wins():
    model = tiny_bert()
    to_qat(model, overrides={"*.dense": W4, "pooler.*": ULQ})
    pooler = qat_layers(model)["pooler.dense"].config.retrain_weight_config
    assert pooler.learnable_scale and pooler.dst_type == "INT8"


def test_skip_list_leaves_float_linear():
    model = tiny_bert()
    summary = to_qat(model, skip=["pooler.dense", re.compile(r".*\.key")])
    assert type(model.pooler.dense) is nn.Linear
    assert type(model.encoder.layer[0].attention.self.key) is nn.Linear
    assert len(summary.converted) == LINEARS - 3
    assert summary.skipped["pooler.dense"] == "skip list: 'pooler.dense'"
    assert "left as is (skip list" in str(summary)


@pytest.mark.parametrize("kwargs", [{"skip": ["encoder.*.nope"]}, {"overrides": {"*.qkv": W4}},
                                    {"overrides": {re.compile("pooler"): W4}}, {"overrides": {nn.Linear(2, 2): W4}}])
def test_key_matching_nothing_is_an_error_and_model_untouched(kwargs):
    model = tiny_bert()
    with pytest.raises(ValueError, match="matches no convertible layer.*encoder.layer.0"):
        to_qat(model, **kwargs)
    assert not qat_layers(model)


def test_bad_override_config_names_key_and_leaves_model():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"overrides\['\*.query'\]: unknown config key 'retrain_weight_config.bits'"):
        to_qat(model, overrides={"*.query": {"retrain_weight_config": {"bits": 4}}})
    with pytest.raises(TypeError, match="skip: expected a list"):
        to_qat(model, skip="pooler.dense")
    with pytest.raises(TypeError, match="each key must be"):
        to_qat(model, overrides={3: W4})
    assert not qat_layers(model)


def test_subclasses_and_existing_qat_layers_are_left_alone():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.MultiheadAttention(4, 1), LinearQAT(4, 4))
    summary = to_qat(model)
    assert list(summary.converted) == ["0"]
    assert type(model[1]) is Custom and type(model[2].out_proj) is not LinearQAT
    assert summary.skipped["1"] == "subclass Custom of nn.Linear is not converted"
    assert "NonDynamicallyQuantizableLinear" in summary.skipped["2.out_proj"]
    assert summary.skipped["3"] == "already a LinearQAT"


def test_shared_layer_converted_once_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    summary = to_qat(model)
    assert model[0] is model[2] and isinstance(model[0], LinearQAT)
    assert list(summary.converted) == ["0"]


def test_calibrate_whole_model_then_qat_step_and_to_float_round_trip():
    model = tiny_bert()
    reference = model(**batch()).last_hidden_state.detach()
    to_qat(model, {"retrain_data_config": {"batch_num": 2}}, skip=["pooler.dense"])
    data = [batch(1), batch(2), batch(3)]
    assert calibrate(model, data, progress=False) == 2
    assert all(m.is_calibrated for m in qat_layers(model).values())
    assert not model.training  # eval mode restored
    quant = model(**batch()).last_hidden_state
    assert 0 < (quant - reference).abs().max() < 0.5
    # one training step moves the float master weights and the clip bounds
    model.train()
    q = model.encoder.layer[0].attention.self.query
    w0 = q.weight.detach().clone()
    clips0 = {n: m.acts_clip_max.detach().clone() for n, m in qat_layers(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(**batch(4)).last_hidden_state  # layer-normed: pow(2).mean() would be ~constant
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    assert not torch.equal(q.weight, w0)
    assert any(not torch.equal(m.acts_clip_max, clips0[n]) for n, m in qat_layers(model).items())
    model.eval()
    trained_w = q.weight
    restored = to_float(model)
    assert len(restored) == LINEARS - 1 and not qat_layers(model)
    assert type(model.encoder.layer[0].attention.self.query) is nn.Linear
    assert model.encoder.layer[0].attention.self.query.weight is trained_w
    float_out = model(**batch()).last_hidden_state
    assert not torch.equal(float_out, quant)  # float math again, no fake quant


def test_calibrate_runs_out_of_data_and_bad_arguments():
    model = tiny_bert()
    with pytest.raises(ValueError, match="no QAT layer"):
        calibrate(model, [batch()])
    to_qat(model, {"retrain_data_config": {"batch_num": 3}})
    with pytest.raises(ValueError, match=r"ran out after 2 batch\(es\).*batch_num=3"):
        calibrate(model, [batch(1), batch(2)], progress=False)
    with pytest.raises(ValueError, match="num_batches: expected an int >= 1, got 0"):
        calibrate(model, [batch()], num_batches=0)
    # custom forward for batches that are not model(**batch)
    seen = []
    calibrate(model, [batch(3)], forward=lambda m, b: seen.append(m(**b)), progress=False)
    assert len(seen) == 1 and all(m.is_calibrated for m in qat_layers(model).values())


def test_freeze_unfreeze_calibration():
    model = tiny_bert()
    to_qat(model, ULQ, overrides={"pooler.dense": {"retrain_data_config": {"fixed_min": True}}})
    assert freeze_calibration(model) == LINEARS
    for m in qat_layers(model).values():
        assert not m.acts_clip_max.requires_grad and not m.wts_scales.requires_grad
        assert m.weight.requires_grad
    assert unfreeze_calibration(model) == LINEARS
    pooler = qat_layers(model)["pooler.dense"]
    assert pooler.acts_clip_max.requires_grad and not pooler.acts_clip_min.requires_grad  # fixed_min
    assert qat_layers(model)["encoder.layer.0.output.dense"].acts_clip_min.requires_grad


def test_disable_enable_quantization_restores_only_what_it_disabled():
    model = tiny_bert()
    to_qat(model, overrides={"pooler.dense": {"retrain_enable": False}})
    calibrate(model, [batch(1)], progress=False)
    quant = model(**batch()).last_hidden_state
    assert disable_quantization(model) == LINEARS - 1
    plain = model(**batch()).last_hidden_state
    reference = tiny_bert()(**batch()).last_hidden_state
    torch.testing.assert_close(plain, reference)
    assert enable_quantization(model) == LINEARS - 1
    torch.testing.assert_close(model(**batch()).last_hidden_state, quant, rtol=0, atol=0)
    assert not qat_layers(model)["pooler.dense"].config.retrain_enable
