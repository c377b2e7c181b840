"""Device check of the kernel-aware weight grid: LinearQAT / Conv2dQAT on pair_cap (ULQ per channel,
pair_mse) and int7, one training step on CUDA against the same step on CPU (forward, weight and
scale gradients), and the trained codes keep the pair rule. Prints one line per case; exit 1 on a
mismatch. Usage: PYTHONPATH=src python tools/kernel_grid_cuda_check.py"""
import sys

import torch

import amct_pytorch as ap
from amct_pytorch.nn.module.quantization.conv import Conv2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT
from amct_pytorch.saturation import pair_violations

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
if not torch.cuda.is_available():
    sys.exit("no CUDA device")
CFGS = {
    "pair_cap/ulq": {"retrain_weight_config": {"kernel_grid": "pair_cap", "weights_retrain_algo": "ulq_quantize",
                                               "channel_wise": True, "scale_init": "pair_mse"}},
    "pair_cap/arq": {"retrain_weight_config": {"kernel_grid": "pair_cap"}},
    "int7/ulq": {"retrain_weight_config": {"kernel_grid": "int7", "weights_retrain_algo": "ulq_quantize",
                                           "channel_wise": True}},
}
bad = 0
for name, cfg in CFGS.items():
    for make, shape, order in ((lambda c: LinearQAT(1024, 512, config=c), (64, 1024), "linear"),
                               (lambda c: Conv2dQAT(64, 32, 3, groups=2, padding=1, config=c), (4, 64, 16, 16), "conv")):
        torch.manual_seed(0)
        m_cpu = make(cfg)
        with torch.no_grad():
            m_cpu.weight.uniform_(-0.3, 0.3)
        x = torch.randn(*shape) * 2
        results = []
        for dev in ("cpu", "cuda"):
            torch.manual_seed(0)
            m = make(cfg).to(dev)
            m.load_state_dict(m_cpu.state_dict())
            xd = x.to(dev)
            with ap.calibrating():
                m(xd)
            y = m(xd)
            y.square().mean().backward()
            sg = m.wts_scales.grad.cpu() if m.wts_scales.grad is not None else torch.zeros(1)
            results.append((y.detach().cpu(), m.weight.grad.cpu(), sg, m.weight_codes().cpu()))
        (y0, g0, s0, c0), (y1, g1, s1, c1) = results
        codes_diff = int((c0 != c1).sum())
        viol = len(pair_violations(c1.numpy(), order, getattr(m_cpu, "groups", 1)))
        dy = float((y0 - y1).abs().max() / y0.abs().max())
        dg = float((g0 - g1).abs().max() / g0.abs().max())
        ds = float((s0 - s1).abs().max() / s0.abs().max().clamp(min=1e-30))
        ok = codes_diff == 0 and viol == 0 and dy < 1e-4 and dg < 1e-3 and ds < 1e-3
        bad += not ok
        print(f"{name:13s} {type(m_cpu).__name__:10s} codes differing {codes_diff}, pair violations {viol}, "
              f"rel diff y {dy:.1e} grad_w {dg:.1e} grad_s {ds:.1e} {'ok' if ok else 'MISMATCH'}", flush=True)
sys.exit(1 if bad else 0)
