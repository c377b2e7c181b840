"""amct_pytorch: quantization-aware training with AMCT's single-operator QAT API (LinearQAT and the
conv family), on any PyTorch device."""
from .config import DataQuantConfig, QATConfig, WeightQuantConfig, parse_config
from .runtime import calibrating, set_strict_inputs, strict_inputs, strict_inputs_enabled
from .nn.module.quantization.layer import QATLayer
from .nn.module.quantization.base import CalibrationSkippedWarning, QATModuleMixin
from .nn.module.quantization.embedding import EmbeddingQAT
from .nn.module.quantization.linear import LinearQAT
from .nn.module.quantization.transformers_conv1d import Conv1DQAT
from .nn.module.quantization.conv import (Conv1dQAT, Conv2dQAT, Conv3dQAT, ConvTranspose1dQAT, ConvTranspose2dQAT,
                                          ConvTranspose3dQAT)
from .export import DeployedLayer, DeployedLinear, ExportResult, deploy_view, export_onnx
from .quant_record import load_quant_record, save_quant_record
from .convert import (ALL_QAT_CLASSES, QAT_CLASSES, ConversionSummary, UnconvertedLayerWarning, calibrate,
                      disable_quantization, enable_quantization, freeze_calibration, qat_layers, quantized_layers,
                      to_float, to_qat, unfreeze_calibration)
from .outliers import ChannelSplit, split_outlier_channels
from .training import add_qat_params, migrate_optimizer_state
from .batchnorm import BatchNormFolding, fold_batchnorm

__all__ = ["LinearQAT", "Conv1dQAT", "Conv2dQAT", "Conv3dQAT", "ConvTranspose1dQAT", "ConvTranspose2dQAT",
           "ConvTranspose3dQAT", "EmbeddingQAT", "Conv1DQAT", "UnconvertedLayerWarning", "add_qat_params", "QATLayer", "QATModuleMixin", "QAT_CLASSES", "ALL_QAT_CLASSES", "set_strict_inputs",
           "strict_inputs", "strict_inputs_enabled", "CalibrationSkippedWarning", "DeployedLayer", "calibrating",
           "parse_config", "QATConfig", "DataQuantConfig", "WeightQuantConfig",
           "export_onnx", "ExportResult", "deploy_view", "DeployedLinear", "save_quant_record", "load_quant_record",
           "to_qat", "to_float", "ConversionSummary", "calibrate", "qat_layers", "quantized_layers", "freeze_calibration",
           "unfreeze_calibration", "disable_quantization", "enable_quantization",
           "split_outlier_channels", "ChannelSplit", "migrate_optimizer_state", "save_pretrained", "from_pretrained",
           "fold_batchnorm", "BatchNormFolding"]
__version__ = "0.1.0"


def __getattr__(name):
    # the Hugging Face helpers import transformers (optional): loaded on first use, so that
    # `import amct_pytorch` does not import it
    if name in ("save_pretrained", "from_pretrained"):
        from . import hf  # an optional dependency's module, not a cycle

        return getattr(hf, name)
    raise AttributeError(f"module 'amct_pytorch' has no attribute {name!r}")
