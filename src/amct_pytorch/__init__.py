"""amct_pytorch: quantization-aware training with AMCT's LinearQAT API, on any PyTorch device."""
from .config import DataQuantConfig, QATConfig, WeightQuantConfig, parse_config
from .nn.module.quantization.linear import LinearQAT, calibrating

__all__ = ["LinearQAT", "calibrating", "parse_config", "QATConfig", "DataQuantConfig", "WeightQuantConfig"]
__version__ = "0.1.0"
