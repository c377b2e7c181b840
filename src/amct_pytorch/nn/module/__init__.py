"""The QAT modules: see amct_pytorch.nn.module.quantization."""
