"""CUDA autocast check: a LinearQAT/Conv2dQAT model trains under torch.autocast("cuda") with bf16,
and with fp16 plus torch.amp.GradScaler; prints dtypes, finiteness and the loss trend."""
import torch
import torch.nn as nn

import amct_pytorch as amct


def run(dtype, scaler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).cuda()
    amct.to_qat(model, {"retrain_weight_config": {"channel_wise": True}})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 3, 16, 16, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(float(loss))
    params32 = all(p.dtype == torch.float32 for p in model.parameters())
    print(f"{dtype}: out dtype {out.dtype}, params float32 {params32}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"finite {all(torch.isfinite(p).all() for p in model.parameters())}")
    return losses[-1] < losses[0] and params32


ok = run(torch.bfloat16, None) and run(torch.float16, torch.amp.GradScaler("cuda"))
print("cuda autocast check:", "ok" if ok else "FAILED")
