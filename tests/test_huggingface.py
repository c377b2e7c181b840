"""A to_qat'd Hugging Face model (tiny random BertModel, no hub access) in transformers.Trainer:
fp32, bf16=True and gradient checkpointing; Trainer-checkpoint resume keeps the learned clip
bounds; save_pretrained / from_pretrained round trip through amct_pytorch's two calls."""
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
