"""amct_pytorch: quantization-aware training with AMCT's LinearQAT API, on any PyTorch device."""
from .config import DataQuantConfig, QATConfig, WeightQuantConfig, parse_config
from .nn.module.quantization.linear import LinearQAT, calibrating
from .export import DeployedLinear, ExportResult, deploy_view, export_onnx
from .quant_record import load_quant_record, save_quant_record
from .convert import (ConversionSummary, calibrate, disable_quantization, enable_quantization,
                      freeze_calibration, qat_layers, to_float, to_qat, unfreeze_calibration)
from .outliers import ChannelSplit, split_outlier_channels
from .batchnorm import BatchNormFolding, fold_batchnorm

__all__ = ["LinearQAT", "calibrating", "parse_config", "QATConfig", "DataQuantConfig", "WeightQuantConfig",
           "export_onnx", "ExportResult", "deploy_view", "DeployedLinear", "save_quant_record", "load_quant_record",
           "to_qat", "to_float", "ConversionSummary", "calibrate", "qat_layers", "freeze_calibration",
           "unfreeze_calibration", "disable_quantization", "enable_quantization",
           "split_outlier_channels", "ChannelSplit", "fold_batchnorm", "BatchNormFolding"]
__version__ = "0.1.0"
