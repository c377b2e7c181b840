"""A to_qat'd Hugging Face model (tiny random BertModel, no hub access) in transformers.Trainer:
fp32, bf16=True and gradient checkpointing; Trainer-checkpoint resume keeps the learned clip
bounds; amct_pytorch.save_pretrained -> plain AutoModel.from_pretrained (the registered
"amct_qat" quantizer of amct_pytorch.hf), and the two-call path for folders saved before it."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, BertConfig, BertModel, Trainer, TrainingArguments  # noqa: E402

import amct_pytorch  # noqa: E402
from amct_pytorch import CalibrationSkippedWarning, qat_layers, to_qat  # noqa: E402

CFG = {"retrain_data_config": {"batch_num": 2}}


class Regressor(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def gradient_checkpointing_enable(self, **kwargs):
        self.bert.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, labels=None):
        h = self.bert(input_ids=input_ids).last_hidden_state[:, 0]
        loss = (h.mean(-1) - labels).pow(2).mean()
        return {"loss": loss, "logits": h}


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    bert = BertModel(cfg)
    to_qat(bert, CFG)
    return bert


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.randn((), generator=g)}


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, logging_steps=100,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True, **kw)


def _clips(model):
    return {n: (m.acts_clip_max.detach().clone(), m.acts_clip_min.detach().clone())
            for n, m in qat_layers(model).items()}


@pytest.mark.parametrize("mode", ["fp32", "bf16", "gradient_checkpointing", "gradient_checkpointing_reentrant"])
def test_trainer_trains_and_resumes_with_learned_clip_bounds(tmp_path, mode):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    kw = {"bf16": True} if mode == "bf16" else {}
    if mode.startswith("gradient_checkpointing"):
        kw = {"gradient_checkpointing": True,
              "gradient_checkpointing_kwargs": {"use_reentrant": mode.endswith("reentrant")}}
    model = Regressor(_bert())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationSkippedWarning)
        trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, **kw), train_dataset=_Data())
        trainer.train()
    layers = qat_layers(model)
    assert layers and all(m.is_calibrated for m in layers.values())
    assert all(int(m.calib_batches) == 2 for m in layers.values())  # once per batch, also when checkpointing
    learned = _clips(model)
    # resume from the step-2 checkpoint, run to step 4: the same end state as the uninterrupted run
    resumed = Regressor(_bert())
    trainer2 = Trainer(model=resumed, args=_args(tmp_path, max_steps=4, **kw), train_dataset=_Data())
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for n, (hi, lo) in _clips(resumed).items():
        torch.testing.assert_close(hi, learned[n][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lo, learned[n][1], rtol=1e-5, atol=1e-6)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    bert = _bert().train()
    ids = torch.randint(0, 64, (4, 8))
    for _ in range(3):
        bert(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    bert.eval()
    expected = bert(input_ids=ids).last_hidden_state
    amct_pytorch.save_pretrained(bert, tmp_path)
    loaded = amct_pytorch.from_pretrained(AutoModel, tmp_path).eval()
    assert set(qat_layers(loaded)) == set(qat_layers(bert))
    for n, m in qat_layers(loaded).items():
        assert m.is_calibrated and torch.equal(m.acts_clip_max, qat_layers(bert)[n].acts_clip_max)
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)


# ---- plain AutoModel.from_pretrained through the registered "amct_qat" quantizer ------------
try:
    import amct_pytorch.hf  # noqa: F401  (registers the quantizer)
    HAS_HF = True
except ImportError:  # transformers 4
    HAS_HF = False
needs_hf = pytest.mark.skipif(not HAS_HF, reason="amct_pytorch.hf needs transformers >= 5")

EMB_ULQ = {"retrain_weight_config": {"channel_wise": True, "weights_retrain_algo": "ulq_quantize"}}


def _trained(embeddings=False, steps=3):
    """A tiny BertModel, to_qat'd, calibrated (batch_num=2) and trained `steps` SGD steps."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    bert = BertModel(cfg)
    # one layer with a frozen clip_min (fixed_min): its requires_grad=False must survive loading
    overrides = {"encoder.layer.0.output.dense": {"retrain_data_config": {"batch_num": 2, "fixed_min": True}}}
    if embeddings:  # --quantize-embeddings style: EmbeddingQAT tables next to the LinearQATs
        overrides.update({"embeddings.word_embeddings": EMB_ULQ, "embeddings.position_embeddings": {}})
        to_qat(bert, CFG, layer_types=[*amct_pytorch.QAT_CLASSES, torch.nn.Embedding], overrides=overrides,
               skip=["embeddings.token_type_embeddings"])
    else:
        to_qat(bert, CFG, overrides=overrides)
    opt = torch.optim.SGD(bert.parameters(), lr=0.05)
    bert.train()
    for step in range(steps):
        ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        bert(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
    return bert.eval()


def _assert_same_qat_model(loaded, saved, ids):
    assert {n: type(m) for n, m in qat_layers(loaded).items()} == {n: type(m) for n, m in qat_layers(saved).items()}
    assert all(m.is_calibrated for m in qat_layers(loaded).values())
    got, want = loaded.state_dict(), saved.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    grads = {n: p.requires_grad for n, p in saved.named_parameters()}
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == grads
    loaded.eval()
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, saved(input_ids=ids).last_hidden_state)


def _to_bin(path):
    """The saved folder with its weights as pytorch_model.bin instead of model.safetensors."""
    from safetensors.torch import load_file
    torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))


@needs_hf
@pytest.mark.parametrize("weights", ["safetensors", "sharded_safetensors", "bin"])
def test_plain_auto_model_from_pretrained_gives_back_the_qat_model(tmp_path, weights):
    from transformers.trainer_utils import validate_quantization_for_training
    bert = _trained()
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(9))
    kw = {"max_shard_size": "20KB"} if weights == "sharded_safetensors" else {}
    amct_pytorch.save_pretrained(bert, tmp_path, **kw)
    assert not hasattr(bert.config, "quantization_config")  # the live model's config is left as it was
    if weights == "bin":
        _to_bin(tmp_path)
    files = os.listdir(tmp_path)
    assert (sum(f.endswith(".safetensors") for f in files) > 1) == (weights == "sharded_safetensors")
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    legacy = json.loads((tmp_path / "amct_qat_config.json").read_text())
    assert qcfg == {"quant_method": "amct_qat", **legacy} and len(legacy["layers"]) == 13

    loaded = AutoModel.from_pretrained(tmp_path)
    _assert_same_qat_model(loaded, bert, ids)
    assert isinstance(loaded.hf_quantizer, amct_pytorch.hf.AmctQATQuantizer)
    validate_quantization_for_training(loaded)  # transformers.Trainer accepts it for training
    # the loaded model saves again with its own save_pretrained (config.json keeps the quantization_config)
    loaded.save_pretrained(tmp_path / "again")
    _assert_same_qat_model(AutoModel.from_pretrained(tmp_path / "again"), bert, ids)


@needs_hf
def test_plain_from_pretrained_with_embedding_qat_and_into_a_head_model(tmp_path):
    bert = _trained(embeddings=True)
    assert type(bert.embeddings.word_embeddings) is amct_pytorch.EmbeddingQAT
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(9))
    amct_pytorch.save_pretrained(bert, tmp_path)
    _assert_same_qat_model(AutoModel.from_pretrained(tmp_path), bert, ids)
    # the saved names are the BertModel's: inside BertForSequenceClassification they get its "bert." prefix
    from transformers import BertForSequenceClassification
    head = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert set(qat_layers(head)) == {"bert." + n for n in qat_layers(bert)}
    _assert_same_qat_model(head.bert, bert, ids)


@needs_hf
def test_state_saved_mid_calibration_loads_and_calibration_continues(tmp_path):
    torch.manual_seed(0)
    bert = _bert().eval()
    batches = [torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with amct_pytorch.calibrating(), torch.no_grad():
        bert(input_ids=batches[0])  # 1 of batch_num=2: the exact IFMR search keeps the samples
    assert not any(m.is_calibrated for m in qat_layers(bert).values())
    amct_pytorch.save_pretrained(bert, tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    for n, m in qat_layers(loaded).items():
        assert not m.is_calibrated and torch.equal(m.calib_samples, qat_layers(bert)[n].calib_samples)
        assert m.calib_samples.numel() > 0
    with amct_pytorch.calibrating(), torch.no_grad():
        bert(input_ids=batches[1])
        loaded(input_ids=batches[1])
    _assert_same_qat_model(loaded, bert, batches[0])


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@needs_hf
def test_clear_errors_for_a_bad_quantization_config_or_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    amct_pytorch.save_pretrained(_bert(), tmp_path)
    with pytest.raises(ValueError, match="float32 master weights"):
        AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layers = lambda cfg: cfg["quantization_config"]["layers"]  # noqa: E731
    _edit_config(tmp_path, lambda cfg: layers(cfg).update({"encoder.layer.9.output.dense": {}}))
    with pytest.raises(ValueError, match="does not have, e.g. 'encoder.layer.9.output.dense'"):
        AutoModel.from_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: (layers(cfg).pop("encoder.layer.9.output.dense"),
                                        layers(cfg).update({"encoder.layer.0.output.LayerNorm": {}})))
    with pytest.raises(ValueError, match="'encoder.layer.0.output.LayerNorm' is a LayerNorm"):
        AutoModel.from_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: layers(cfg).update({"encoder.layer.0.output.LayerNorm": {"bits": 8}}))
    with pytest.raises(ValueError, match=r"layers\['encoder.layer.0.output.LayerNorm'\]"):
        AutoModel.from_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: layers(cfg).pop("encoder.layer.0.output.LayerNorm"))
    weights = str(tmp_path / "model.safetensors")
    state = load_file(weights)
    del state["encoder.layer.1.output.dense.acts_clip_max"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks the QAT state .* 'encoder.layer.1.output.dense.acts_clip_max'"):
        AutoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("embeddings", [False, True])
def test_folder_without_quantization_config_still_loads_through_amct_from_pretrained(tmp_path, embeddings):
    bert = _trained(embeddings=embeddings, steps=2)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(9))
    amct_pytorch.save_pretrained(bert, tmp_path)
    _edit_config(tmp_path, lambda cfg: cfg.pop("quantization_config"))  # as saved by the previous release
    loaded = amct_pytorch.from_pretrained(AutoModel, tmp_path)
    assert getattr(loaded, "hf_quantizer", None) is None  # the two-call path did the conversion
    _assert_same_qat_model(loaded, bert, ids)


def test_import_amct_pytorch_does_not_import_transformers():
    code = "import sys, amct_pytorch; assert 'transformers' not in sys.modules, 'eager transformers import'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
