"""ReSET decoding (step-aware entropy temperature) and the baseline samplers, batched and graph-capturable."""

from .calibrate import calibrate_tau
from .config import MODES, PRESETS, SamplerConfig, preset_for
from .entropy import check_logits, token_entropy
from .hf import ReSETLogitsProcessor, hf_generate_kwargs
from .sampler import BatchedSampler, SamplerOutput, min_p_mask, nucleus_topk, scale_logits, top_p_mask
from .state import Estimates, StepEntropyState, select_temperature
from .tokens import newline_token_ids, token_class_table

__all__ = [
    "MODES",
    "PRESETS",
    "BatchedSampler",
    "Estimates",
    "ReSETLogitsProcessor",
    "SamplerConfig",
    "SamplerOutput",
    "StepEntropyState",
    "calibrate_tau",
    "check_logits",
    "hf_generate_kwargs",
    "min_p_mask",
    "newline_token_ids",
    "preset_for",
    "scale_logits",
    "select_temperature",
    "token_class_table",
    "token_entropy",
    "nucleus_topk",
    "top_p_mask",
]
