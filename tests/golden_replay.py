"""The golden recordings (tests/data, copied from shared/golden) replayed step by step:
shared by tests/test_golden.py and benchmarks/golden_on_device.py."""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from amct_pytorch import LinearQAT
from amct_pytorch.functional import act_qparams, fake_quant_act, fake_quant_weight, int_range

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


# ---- how far float32 rounding alone can move a replayed value from the recorded one -----------
EPS32 = torch.finfo(torch.float32).eps  # 2**-23; the unit roundoff u is EPS32 / 2
FACTOR_ULPS = 4  # stored factors (scales, clip bounds): a few roundings of the same short formula


def rounding_tolerances(r: Step) -> dict:
    """Per-element bounds on |ours - reference| for the step's output, loss and gradients.

    A float32 sum of k terms, in any order, with or without FMA, is within gamma_k ~ k*u of
    the exact sum *relative to the sum of the terms' magnitudes* (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1). Two implementations (the reference's kernels on
    its machine, ours on this one: MKL/ATen pick kernels by CPU, thread count and shape, CUDA
    others) therefore differ by at most k*u*M each, i.e. k*EPS32*M together, where M is the
    same computation on absolute values (for y = x̂ŵᵀ + b: M = |x̂||ŵ|ᵀ + |b|). An error
    upstream enters the terms, so a chain of computations adds its lengths k. These bounds are
    worst cases, and still far below the smallest quantization effect: one activation code
    moves y by scale * |w| ~ 1e-3, against ~1e-4 here (the replays on CPU are bit-identical;
    a CUDA replay was off by 2.4e-6, 2 EPS32*M). A fixed 1e-6 is two ulps of outputs near 4.
    """
    m, step = r.module, r.record
    x = step["input"].to(r.output.device)
    batch, n_in = x.reshape(-1, x.shape[-1]).shape
    with torch.no_grad():
        wq = fake_quant_weight(m.weight, m.weight_qparams(), m.config.retrain_weight_config.num_bits).abs()
        if step["acts_quantized_this_step"]:
            bits = m.config.retrain_data_config.num_bits
            scale, offset = act_qparams(m.acts_clip_max, m.acts_clip_min, bits)
            xq = fake_quant_act(x, scale, offset, bits).abs()
        else:
            xq = x.abs()
        m_y = xq @ wq.t() + (m.bias.abs() if m.bias is not None else 0.0)
        k_y = n_in + 1  # n_in products and the bias
        n_out = m_y.numel()
        m_g = 2 * m_y / n_out  # dloss/dy = 2y/N: two more roundings
        k_g = k_y + 2
        tol = {
            "output": k_y * EPS32 * m_y,
            # loss = mean(y²): |Δ(y²)| <= 2|y||Δy|, then a sum of N terms and the division
            "loss": (2 * k_y + n_out + 2) * EPS32 * m_y.square().mean(),
            "grad_weight": (k_g + batch) * EPS32 * (m_g.t() @ xq),
            "grad_bias": (k_g + batch) * EPS32 * m_g.sum(0),
        }
        if step["acts_quantized_this_step"]:
            # ULQ: sums over all x elements of dloss/dx̂ * (e + clipped above/below), |e| <= 1/(2L)
            qmin, qmax = int_range(bits)
            clipped = (x > scale * (qmax - offset)) | (x < scale * (qmin - offset))
            m_gx = m_g @ wq
            m_clip = (m_gx * (0.5 / (qmax - qmin) + clipped.float())).sum()
            k_clip = k_g + wq.shape[0] + batch * n_in + 4  # the matmul, the sum, the clipped rows' e terms
            tol["grad_acts_clip_max"] = tol["grad_acts_clip_min"] = k_clip * EPS32 * m_clip
    return tol


def factor_tolerance(expected: torch.Tensor) -> torch.Tensor:
    """Scales and clip bounds come from a handful of roundings of the same formula on the same data."""
    return FACTOR_ULPS * EPS32 * expected.abs()


def excess(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> float:
    """max(|actual - expected| - tol) over the elements: <= 0 when within the bound."""
    actual = actual.detach().to(expected.device).reshape(expected.shape)
    return float(((actual - expected).abs() - tol.to(expected.device).reshape(expected.shape)).max())
