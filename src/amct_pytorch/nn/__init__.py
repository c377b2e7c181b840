"""Mirrors AMCT's import path: amct_pytorch.nn.module.quantization.linear."""
