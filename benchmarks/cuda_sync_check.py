"""No host sync in QAT training and eval steps on CUDA, checked with torch.cuda.set_sync_debug_mode("error")
(any operation that synchronizes the host with the device raises). Covers the learnable-scale
EmbeddingQAT (whose forward used to read its `wts_scale_ready` buffer on the host every call),
LinearQAT and Conv2dQAT (ARQ and learnable scale), after calibration / the first step. A positive
control shows the mode catches a host read. Prints one line per case; exits 1 on a failure."""
import sys

import torch
import torch.nn as nn

import amct_pytorch as amct

dev = torch.device("cuda")
failures = 0


def steps(name, module, make_input, calibrate=True):
    global failures
    x = make_input()
    if calibrate:
        module(x).sum().backward()  # calibration (IFMR) and the first learnable-scale write
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(3):
            module(x).sum().backward()
        module.eval()
        with torch.no_grad():
            module(x)
        module.train()
        print(f"{name}: no host sync in 3 training steps and an eval forward")
    except RuntimeError as err:
        failures += 1
        print(f"{name}: FAILED: {str(err).splitlines()[0]}")
    finally:
        torch.cuda.set_sync_debug_mode(0)


ulq = {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize"}}
for cw in (False, True):
    cfg = {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": cw}}
    steps(f"EmbeddingQAT ulq channel_wise={cw}", amct.EmbeddingQAT(30522, 384, config=cfg).to(dev),
          lambda: torch.randint(0, 30522, (8, 64), device=dev))
for cfg_name, cfg in (("arq", {}), ("ulq", ulq)):
    steps(f"LinearQAT {cfg_name}", amct.LinearQAT(384, 1536, config=cfg).to(dev),
          lambda: torch.randn(8, 64, 384, device=dev))
    steps(f"Conv2dQAT {cfg_name}", amct.Conv2dQAT(16, 32, 3, padding=1, config=cfg).to(dev),
          lambda: torch.randn(4, 16, 32, 32, device=dev))
emb = amct.EmbeddingQAT(100, 8, config=ulq).to(dev)
emb(torch.zeros(2, dtype=torch.long, device=dev)).sum().backward()
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
try:
    bool(emb.wts_scale_ready)  # what EmbeddingQAT's forward did before: must be caught
    print("positive control: FAILED (a host read went unnoticed)")
    failures += 1
except RuntimeError:
    print("positive control: a host read of wts_scale_ready raises under sync_debug_mode('error')")
finally:
    torch.cuda.set_sync_debug_mode(0)
sys.exit(1 if failures else 0)
