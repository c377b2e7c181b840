"""The QAT layers by AMCT's import paths: amct_pytorch.nn.module.quantization.{linear, conv2d, conv3d, conv_transpose_2d} (and the extensions beside them)."""
