"""Post-training FP4 quantization of Hugging Face causal LMs and compressed-tensors / ModelOpt checkpoints."""

from fp4reason.quant.checkpoint import (
    CheckpointError,
    checkpoint_info,
    is_quantized_checkpoint,
    load_quantized,
    save_quantized,
)
from fp4reason.quant.kshift import K_SHIFT_FILE, load_k_shift, save_k_shift
from fp4reason.quant.kv4 import KV4Cache, disable_kv4, enable_kv4, uses_kv4
from fp4reason.quant.linear import FP4Linear
from fp4reason.quant.ptq import calibration_text, decoder_linears, quantize_model
from fp4reason.quant.scheme import SCHEMES, Scheme, get_scheme, quantization_config

__all__ = [
    "K_SHIFT_FILE",
    "load_k_shift",
    "save_k_shift",
    "SCHEMES",
    "CheckpointError",
    "FP4Linear",
    "KV4Cache",
    "Scheme",
    "calibration_text",
    "checkpoint_info",
    "decoder_linears",
    "disable_kv4",
    "enable_kv4",
    "get_scheme",
    "is_quantized_checkpoint",
    "load_quantized",
    "quantization_config",
    "quantize_model",
    "save_quantized",
    "uses_kv4",
]
