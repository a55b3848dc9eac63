"""ReQAT training: W4A4KV4 fake-quant QAT, SEM, Q-FIT and TAQ on accelerate (see ``trainer`` for commands)."""

from fp4reason.train.data import (
    Example,
    read_traces,
    step_schedule,
    tokenize_trace,
    trace_order,
    write_traces,
)
from fp4reason.train.fakequant import ATTN_NAME, QATLinear, prepare_qat, strip_qat
from fp4reason.train.qfit import K_SHIFT_FILE, LayerFit, load_k_shift, qfit, save_k_shift
from fp4reason.train.sem import sem_penalty, sem_weights, token_entropy
from fp4reason.train.trainer import TrainConfig, evaluate_loss, train

__all__ = [
    "ATTN_NAME",
    "K_SHIFT_FILE",
    "Example",
    "LayerFit",
    "QATLinear",
    "TrainConfig",
    "evaluate_loss",
    "load_k_shift",
    "prepare_qat",
    "qfit",
    "read_traces",
    "save_k_shift",
    "sem_penalty",
    "sem_weights",
    "step_schedule",
    "strip_qat",
    "token_entropy",
    "tokenize_trace",
    "trace_order",
    "train",
    "write_traces",
]
