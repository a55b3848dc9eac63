"""FP4 numerics: NVFP4, MXFP4 and the E1M2 KV-cache format, bit-exact with compressed-tensors."""

from fp4reason.formats.elements import (
    E1M2_MAX,
    E2M1_MAX,
    E2M1_VALUES,
    codes_to_e2m1,
    e2m1_to_codes,
    pack_nibbles,
    round_e1m2,
    round_e2m1,
    unpack_nibbles,
)
from fp4reason.formats.kv4 import fake_quantize_kv4, qdq_kv4
from fp4reason.formats.mxfp4 import MX_BLOCK_SIZE, MXFP4Tensor, fake_quantize_mxfp4, qdq_mxfp4, quantize_mxfp4
from fp4reason.formats.nvfp4 import (
    BLOCK_SIZE,
    FP8_MAX,
    NVFP4Tensor,
    fake_quantize_nvfp4,
    nvfp4_block_scales,
    nvfp4_global_scale,
    qdq_nvfp4,
    quantize_nvfp4,
    straight_through,
)

__all__ = [
    "BLOCK_SIZE",
    "E1M2_MAX",
    "E2M1_MAX",
    "E2M1_VALUES",
    "FP8_MAX",
    "MX_BLOCK_SIZE",
    "MXFP4Tensor",
    "NVFP4Tensor",
    "codes_to_e2m1",
    "e2m1_to_codes",
    "fake_quantize_kv4",
    "fake_quantize_mxfp4",
    "fake_quantize_nvfp4",
    "nvfp4_block_scales",
    "nvfp4_global_scale",
    "pack_nibbles",
    "qdq_kv4",
    "qdq_mxfp4",
    "qdq_nvfp4",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "round_e1m2",
    "round_e2m1",
    "straight_through",
    "unpack_nibbles",
]
