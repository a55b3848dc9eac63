"""Export a QAT-trained model as a real FP4 checkpoint (compressed-tensors ``nvfp4-pack-quantized``) plus
its Q-FIT key shifts.

The checkpoint is ``fp4reason.quant``'s (weights NVFP4, input scales max-calibrated, KV4 flag in the
config); ``k_shift.safetensors`` beside it holds ``model.layers.{i}.self_attn.k_shift`` [1, kv_heads, 1,
head_dim]: at inference subtract it from every key after RoPE, before the key enters the KV4 cache
(attention is unchanged in exact arithmetic; only the quantization error is). The Q-FIT scales are already
folded into the weights and need nothing.
"""

from pathlib import Path

from fp4reason.train.fakequant import strip_qat


def export_fp4(
    model, tokenizer, out_dir, *, scheme: str = "nvfp4-w4a4kv4", calib_data=None, progress: bool = True
) -> Path:
    """Quantize ``model`` (in place; fake-quant wrappers removed) to ``scheme``; write it to ``out_dir``."""
    from fp4reason.quant import quantize_model, save_quantized

    strip_qat(model)
    quantize_model(model, scheme, calib_data, tokenizer=tokenizer, progress=progress)
    return save_quantized(model, out_dir, tokenizer)  # writes k_shift.safetensors when the model has shifts
