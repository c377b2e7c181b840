"""Deployment: ONNX QDQ export of models holding QAT modules, checked in ONNX Runtime, and the
integer deploy view.

The package is split by job: `driver` (export_onnx, shapes, the check), `passes` (graph
rewrites: integer weights, Gemm -> MatMul + Add, the conv bias, shared quantizers, Relu before
INT4), `matmulnbits` (group-wise INT4 as com.microsoft MatMulNBits), `gguf` (GGUF files for llama.cpp:
export_gguf), `llama` (llama.cpp in a child process, and its PyTorch emulation), `onnx_graph` (reading and
editing a graph), `ort` (ONNX Runtime sessions and comparisons), `deploy` (deploy_view). The
module-side half (the factors, the export-time forward, the int32 bias) sits beside the modules
in `amct_pytorch.nn.module.quantization.qdq`; its names are re-exported here, as are the custom
ops of `amct_pytorch.ops`.
"""
from ..nn.module.quantization.qdq import (QParams, check_exportable, export_forward, int32_bias, module_qparams, pinned_embedding,
                                          require_calibrated, simulated_int32_bias, weight_axis)
from ..ops import INT4_OPSET, onnx_translations, quant_dequant, quant_dequant_blocked
from ..runtime import export_onnx_active as export_context_active
from .check import ArtifactCheckError, LayerCheck, check_artifact, int8_saturation_report
from .deploy import DeployedLayer, DeployedLinear, deploy_view
from .driver import BIAS_MODES, ExportResult, export_onnx
from .gguf import GGUFExport, QuantBlocks, export_bert_gguf, export_gguf, pack_blocks, unpack_blocks
from .llama import LlamaGELU, LlamaRun, llama_embed, llama_emulation, llama_gelu, llama_run
from .matmulnbits import MATMULNBITS_ACCURACY_LEVEL, MATMULNBITS_DYNAMIC_ACCURACY_LEVEL, MS_DOMAIN, matmulnbits_codes, pack_matmulnbits
from .onnx_graph import FoldedWeight, weight_codes
from .ort import ORT_DISABLED_OPTIMIZERS, cpu_kernel_features, ort_max_abs_diff, ort_session
from .storage import INT8_STORAGES
from .passes import (GROUP_WISE_INT4_FORMS, fold_weight_quantizers, keep_relu_before_int4_quantizers,
                     static_dim_params, unshare_activation_quantizers)

__all__ = ["export_onnx", "ExportResult", "BIAS_MODES", "GROUP_WISE_INT4_FORMS", "deploy_view", "DeployedLayer",
           "DeployedLinear", "FoldedWeight", "weight_codes", "fold_weight_quantizers",
           "keep_relu_before_int4_quantizers", "unshare_activation_quantizers", "static_dim_params",
           "MATMULNBITS_ACCURACY_LEVEL", "MS_DOMAIN", "pack_matmulnbits", "matmulnbits_codes",
           "ORT_DISABLED_OPTIMIZERS", "ort_session", "ort_max_abs_diff", "QParams", "module_qparams",
           "check_exportable", "require_calibrated", "weight_axis", "export_forward", "int32_bias",
           "simulated_int32_bias", "pinned_embedding", "INT4_OPSET", "onnx_translations", "quant_dequant", "quant_dequant_blocked",
           "export_context_active", "ArtifactCheckError", "LayerCheck", "check_artifact",
           "int8_saturation_report", "cpu_kernel_features", "INT8_STORAGES", "export_gguf", "export_bert_gguf",
           "GGUFExport", "QuantBlocks", "pack_blocks", "unpack_blocks", "llama_embed", "llama_run", "LlamaRun",
           "llama_emulation", "llama_gelu", "LlamaGELU", "MATMULNBITS_DYNAMIC_ACCURACY_LEVEL"]
