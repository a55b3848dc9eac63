"""Token entropy of raw logits, and the input checks every sampler entry point shares."""

import torch


def check_logits(logits: torch.Tensor, batch_size: int | None = None, *, values: bool = True) -> None:
    """Raise ValueError for a bad logits tensor: not [B, V] floating point, empty vocabulary, wrong batch,
    and (if ``values``; costs a host sync on GPU) rows with NaN or +Inf, or rows that are all -Inf."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [batch, vocab] tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary (shape [B, 0])")
    if batch_size is not None and logits.shape[0] != batch_size:
        raise ValueError(f"logits have batch {logits.shape[0]}, the sampler was built for {batch_size}")
    if values:
        bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:8].tolist()
            raise ValueError(f"logits rows {rows} contain NaN/+Inf or are entirely -Inf")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits) over the full vocabulary, in float32: [B, V] -> [B].

    -Inf logits (masked tokens) contribute 0; no clamping, no top-k.
    """
    p = torch.softmax(logits.float(), dim=-1)
    return -torch.special.xlogy(p, p).sum(-1)
