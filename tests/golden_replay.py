"""The golden recordings (tests/data, copied from shared/golden) replayed step by step:
shared by tests/test_golden.py and benchmarks/golden_on_device.py."""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from amct_pytorch import LinearQAT

DATA = Path(__file__).parent / "data"
CASES = ["a_default", "b_batch_num2", "c_clip_given", "d_fixed_min", "e_ulq_weights"]


def load(name):
    """(recording, config) of one case; the recordings store a missing config as "None"."""
    rec = torch.load(DATA / f"{name}.pt", weights_only=True)
    cfg = None if rec["config"] == "None" else rec["config"]
    return rec, cfg


@dataclass
class Step:
    t: int
    record: dict  # the reference's tensors for this step
    module: LinearQAT
    output: torch.Tensor
    loss: torch.Tensor
    calibrated_before: bool  # m.is_calibrated before this step's forward
    fixed_min: bool
    last: bool  # the recording's last step


def replay(name, device="cpu"):
    """Yield a Step per comparable step after forward and backward of loss = mean(y²).

    Before each forward the reference's weights are loaded (it writes ŵ back into `weight`,
    we do not) and, once calibrated, its clip values (not clip_min under fixed_min: ours
    pins it at 0, spec 3.2; the reference restores it each forward). For e (ULQ weights)
    only step 0 is comparable: the reference never learns the scale.
    """
    rec, cfg = load(name)
    torch.manual_seed(0)
    m = LinearQAT.from_float(torch.nn.Linear(64, 32), config=copy.deepcopy(cfg)).to(device).train()
    fixed_min = bool(cfg and cfg.get("retrain_data_config", {}).get("fixed_min"))
    steps = rec["steps"][:1] if name.startswith("e_") else rec["steps"]
    for t, step in enumerate(steps):
        with torch.no_grad():
            m.weight.copy_(step["weight_before_forward"])
            m.bias.copy_(step["bias_before_forward"])
            if step["acts_quantized_this_step"]:
                m.acts_clip_max.copy_(step["acts_clip_max_before_forward"])
                if not fixed_min:
                    m.acts_clip_min.copy_(step["acts_clip_min_before_forward"])
        calibrated_before = m.is_calibrated
        m.zero_grad(set_to_none=True)
        y = m(step["input"].to(device))
        loss = y.pow(2).mean()
        loss.backward()
        yield Step(t, step, m, y, loss, calibrated_before, fixed_min, t == len(rec["steps"]) - 1)
