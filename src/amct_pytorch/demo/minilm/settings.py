"""The MiniLM demo's built-in settings (`--settings`) and options."""
from __future__ import annotations

from dataclasses import dataclass

from ..common.settings import Setting

GGUF_STEPS = {"q8_0": 100, "q4_0": 200}
# Q8_0's own error is tiny (PTQ 0.99964 held-out mean cosine): at the shared weight lr 5e-5 the first 25
# steps pulled it down to 0.99885 and 100 steps ended at 0.99955, below PTQ; at 1e-5 it rises steadily,
# 0.99976 / 0.99978 / 0.99980 / 0.99982 after 25 / 50 / 75 / 100 steps (min 0.9996), at 5e-6 0.99980 /
# 0.99981 / 0.99982 / 0.99983 (min 0.9997) (benchmarks/w4_recipe_sweep.py, idle 2-core machine)
GGUF_LR_WEIGHTS = {"q8_0": 5e-6, "q4_0": None}
GROUP_SIZE = 32  # the w4a8g default: one INT4 scale per output row and 32 input features


def w4a8_config(group_size: int | None = None, scale_init: str = "arq") -> dict:
    weights = {"dst_type": "INT4", "channel_wise": True, "weights_retrain_algo": "ulq_quantize"}
    if group_size is not None:
        weights["group_size"] = group_size
    if scale_init != "arq":
        weights["scale_init"] = scale_init
    return {"retrain_weight_config": weights}


def w4a8g(group_size: int = GROUP_SIZE, steps: int = 150) -> Setting:
    # scale_init "mse": PTQ 0.9512 -> 0.9542, QAT (150 steps, scale lr 1e-3) 0.9833 -> 0.9840; with scale
    # lr 3e-5: 0.9907 after 130 steps, 0.9913 after 150 (benchmarks/w4_recipe_sweep.py)
    return Setting("w4a8g", f"W4A8 group-wise: INT4 ULQ weights (MSE-initialised scales), one scale per row and "
                            f"{group_size} inputs, INT8 activations", w4a8_config(group_size, "mse"), steps=steps)


# Q8_0's d (amax/127, ~1e-3 here) is ~8x smaller than Q4_0's (max/-8): the shared scale learning rate (3e-5,
# an Adam step of ~2 % of a Q8_0 d) moved it too far (quick run: 0.9996 PTQ -> 0.992 after 6 steps), so Q8_0
# keeps llama-quantize's d of the current weights (ARQ-like) and Q4_0 learns its d.
GGUF_ALGOS = {"Q8_0": "arq_retrain", "Q4_0": "ulq_quantize"}


def gguf_config(gguf_type: str) -> dict:
    """llama.cpp's profile: Q8_0/Q4_0 block weights with fp16 block scales (Q4_0 learned), activations as
    llama.cpp's x86 kernels quantize them (docs/gguf.md)."""
    return {"retrain_weight_config": {"gguf_type": gguf_type, "weights_retrain_algo": GGUF_ALGOS[gguf_type]},
            "retrain_data_config": {"dynamic_act": "llama.cpp-x86"}}


def gguf_setting(name: str, steps: int) -> Setting:
    kind = name.upper()
    lr = GGUF_LR_WEIGHTS[name]
    return Setting(name, f"GGUF {kind} for llama.cpp: {kind} linears and token_embd ({'learned' if kind == 'Q4_0' else 'ARQ-like'} "
                         f"fp16 block scales), "
                         f"activations as llama.cpp's x86 Q8_0, ggml's GELU" + (f", weight lr {lr:g}" if lr else ""),
                   gguf_config(kind), steps=steps, lr_weights=lr)


# Every built-in setting, by name (`--settings`); DEFAULT_SETTINGS run without options.
SETTINGS = {
    # 150 steps each: w8a8 0.9970, w4a8g 0.9913 held-out mean cosine. 120 / 130 steps reach 0.9961 / 0.9907
    # (100 w8a8 steps: 0.9957), too close to the 0.996 / 0.99 targets for another CPU's rounding; the
    # default run is ~5 min on a 2-core machine either way (benchmarks/w4_recipe_sweep.py, docs/minilm_demo.md)
    "w8a8": Setting("w8a8", "W8A8 per-tensor (seed default config)", {}, steps=150),
    # the kernel-aware weight grids (issue 19): w8a8 with codes that ONNX Runtime's u8s8 kernel sums
    # exactly on every CPU (pair-capped, or 7-bit); the same ARQ per-tensor scales and 150 steps
    "w8a8p": Setting("w8a8p", "W8A8 per-tensor, pair-capped INT8 weight grid (exact u8s8 on every CPU)",
                     {"retrain_weight_config": {"kernel_grid": "pair_cap"}}, steps=150),
    "w8a8i7": Setting("w8a8i7", "W8A8 per-tensor, 7-bit weight codes [-64, 63] (exact u8s8 on every CPU)",
                      {"retrain_weight_config": {"kernel_grid": "int7"}}, steps=150),
    "w4a8g": w4a8g(GROUP_SIZE, steps=150),
    # group-wise INT4 trained against ONNX Runtime's MatMulNBits accuracy_level 4 (its own dynamic per-block
    # int8 quantization of the input, no static activation quantizer): exported at level 4 (int8 compute)
    "w4a8g4": Setting("w4a8g4", f"W4 group-wise (32 inputs per scale) with MatMulNBits level 4's dynamic per-block "
                                f"INT8 input", {**w4a8_config(GROUP_SIZE, "mse"),
                                                "retrain_data_config": {"dynamic_act": "ort-matmulnbits-level4"}},
                      steps=150),
    "w4a8": Setting("w4a8", "W4A8: INT4 per-channel ULQ weights, INT8 activations", w4a8_config(), steps=300),
    # opt-in (--settings q8_0,q4_0): GGUF files run in llama.cpp (needs the `gguf` extra)
    "q8_0": gguf_setting("q8_0", steps=GGUF_STEPS["q8_0"]),
    "q4_0": gguf_setting("q4_0", steps=GGUF_STEPS["q4_0"]),
}
# w8a8p, not w8a8: the same accuracy to 1e-4, exact on every CPU with int8 weights (ORT's fast u8s8 kernel);
# w8a8's full grid needs the uint8 fallback there, 1.6x slower (tools/results/kernel_grid_qat.md)
DEFAULT_SETTINGS = ("w8a8p", "w4a8g")
GGUF_SETTINGS = ("q8_0", "q4_0")


def is_gguf(setting: Setting) -> bool:
    return setting.name in GGUF_SETTINGS or "gguf_type" in setting.config.get("retrain_weight_config", {})


# --quantize-embeddings: the three embedding tables as weight-only INT8 per row (EmbeddingQAT)
EMBEDDING_OVERRIDES = {"embeddings.*": {"retrain_weight_config": {"channel_wise": True}}}


def parse_settings(names, group_size=None) -> tuple[Setting, ...]:
    """`--settings w8a8,w4a8g,w4a8`: built-in settings by name, in the order given."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise ValueError(f"unknown setting(s) {unknown or names!r}; choose from {', '.join(SETTINGS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a setting is named twice: {','.join(names)}")
    picked = []
    for n in names:
        s = SETTINGS[n]
        if n == "w4a8g" and group_size is not None:
            s = w4a8g(group_size, s.steps)
        picked.append(s)
    return tuple(picked)


@dataclass
class Options:
    steps: int | None = None  # None: each setting's own count
    batch_size: int = 32
    calib_size: int = 32
    # Clip bounds are O(1..25) and must travel far (a post-GELU input calibrates to about
    # [-18, 18] though it is >= -0.17): they get a large Adam step; weight scales are O(0.01) and an
    # Adam step of 1e-3 moved INT4 group scales by ~10 % per step: w4a8g QAT (150 steps) 0.9840 at 1e-3,
    # 0.9889 at 3e-4, 0.9907 at 1e-4, 0.9913 at 3e-5 (benchmarks/w4_recipe_sweep.py). Only ULQ settings
    # learn scales (w8a8's ARQ scales follow the weights).
    lr_weights: float = 5e-5
    lr_clips: float = 0.3
    lr_weight_scales: float = 3e-5
    eval_points: int = 4  # held-out evaluations along training (for the plot)
    max_eval: int | None = None  # cap on held-out sentences (quick mode)
    max_train: int | None = None
    seed: int = 0
    # Split FFN-out outlier weights before quantizing (float-exact; see amct_pytorch.outliers):
    # one weight of 7.9 among weights of std 0.045 otherwise sets block 0's per-tensor INT8 step.
    split_outliers: bool = True
    split_ratio: float = 3.0
    settings: tuple = tuple(SETTINGS[name] for name in DEFAULT_SETTINGS)
    progress: bool = True
    amp: str = "fp32"  # "bf16": QAT training forwards under torch.autocast(device, bfloat16)
    quantize_embeddings: bool = False  # also the embedding tables (INT8 per row, weight only)
    # deployment report: ORT latency (1 thread) on the first `latency_sentences` held-out
    # sentences in batches of `latency_batches`, `latency_reps` interleaved repetitions
    latency_batches: tuple = (8, 32)
    latency_sentences: int = 64
    latency_reps: int = 5
    latency_threads: int = 1
    gguf_latency_sentences: int = 64  # llama.cpp latency: each sentence's best of gguf_latency_reps passes
    gguf_latency_reps: int = 3
    peers: bool = False  # ORT quantize_dynamic / quantize_static rows of the float model
