"""SEM, ReQAT's selective entropy minimisation: push the already-confident label tokens to be more confident.

    penalty = mean_t  w_t * H_t,   w_t = max(0, 1 - (H_t - H_min) / (tau - H_min + eps))

over label tokens, with ``tau`` the ``percentile`` quantile (linear interpolation) and ``H_min`` the minimum
of the micro-batch's label-token entropies; the weights carry no gradient, ``H_t`` does. The caller adds
``lambda * penalty`` (ReQAT: lambda = 0.1) to the cross-entropy.

Entropy is over the full vocabulary in float32, a chunk of rows at a time, forward and backward,
so a 16k-token sequence with a 152k vocabulary needs one chunk of float32 rows, not all of [T, V] in float32.
"""

import torch

EPS = 1e-6


def _chunk_rows(vocab: int, budget_bytes: int = 256 << 20) -> int:
    return max(1, budget_bytes // (4 * vocab * 3))


class _ChunkedEntropy(torch.autograd.Function):
    """Row entropies of ``logits[rows]`` (float32 out), recomputing the softmax chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
        for i in range(0, rows.numel(), chunk):
            z = logits[rows[i : i + chunk]].float()
            logp = torch.log_softmax(z, dim=-1)
            out[i : i + chunk] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, rows)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        logits, rows = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for i in range(0, rows.numel(), ctx.chunk):
            idx = rows[i : i + ctx.chunk]
            z = logits[idx].float()
            p = torch.softmax(z, dim=-1)
            # dH/dz = -p * (z - E_p[z])
            g = -p * (z - (p * z).sum(-1, keepdim=True)) * grad_h[i : i + ctx.chunk, None]
            grad[idx] = g.to(grad.dtype)
        return grad, None, None


def token_entropy(
    logits: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Full-vocabulary float32 entropy (nats) of ``logits[..., V]`` at positions where ``mask`` is true
    (all if None), as a 1-D tensor in row-major order; differentiable, chunked."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        rows = torch.arange(flat.shape[0], device=logits.device)
    else:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}"
            )
        rows = mask.reshape(-1).nonzero().squeeze(-1)
    return _ChunkedEntropy.apply(flat, rows, chunk or _chunk_rows(logits.shape[-1]))


def sem_weights(entropy: torch.Tensor, percentile: float = 0.75) -> torch.Tensor:
    """SEM weights (no gradient) for a 1-D tensor of label-token entropies."""
    h = entropy.detach().float()
    tau = torch.quantile(h, percentile)
    h_min = h.min()
    return (1 - (h - h_min) / (tau - h_min + EPS)).clamp(min=0)


def sem_penalty(
    logits: torch.Tensor, labels: torch.Tensor, *, percentile: float = 0.75, ignore_index: int = -100
) -> torch.Tensor:
    """Mean of ``w_t * H_t`` over label tokens; ``logits[:, t]`` is scored against ``labels[:, t]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}")
    mask = labels != ignore_index
    if not mask.any():
        return logits.sum() * 0.0
    h = token_entropy(logits, mask)
    return (sem_weights(h, percentile) * h).mean()
