"""Graph breaks of a calibrated 3-layer LinearQAT MLP under torch._dynamo.explain (train and eval forward).

Usage: PYTHONPATH=src python benchmarks/graph_breaks.py
"""
import json

import torch
import torch.nn as nn

from amct_pytorch import LinearQAT


def mlp(config=None):
    torch.manual_seed(0)
    return nn.Sequential(LinearQAT(32, 64, config=config), nn.ReLU(), LinearQAT(64, 64, config=config), nn.ReLU(),
                         LinearQAT(64, 8, config=config))


def count(model, x):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(x)
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count,
            "reasons": sorted({str(b.reason).splitlines()[0][:120] for b in ex.break_reasons})}


def main():
    out = {}
    for name, cfg in {"arq": None, "ulq": {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize"}}}.items():
        model = mlp(cfg).train()
        x = torch.randn(16, 32)
        model(x).sum().backward()  # batch_num 1: calibrated
        out[f"{name}_train"] = count(model.train(), x)
        out[f"{name}_eval"] = count(model.eval(), x)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
