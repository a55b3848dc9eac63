"""Completion-token cross-entropy over the full vocabulary in float32, a chunk of rows at a time.

``F.cross_entropy(logits.float(), ...)`` on a 16k-token, 152k-vocabulary sequence holds two float32 [T, V]
tensors (~20 GB); this keeps one chunk, recomputing the softmax in backward (grad = softmax - one_hot).
"""

import torch

from fp4reason.train.sem import _chunk_rows


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, rows.numel(), chunk):
            z = logits[rows[i : i + chunk]].float()
            total += (torch.logsumexp(z, -1) - z.gather(-1, targets[i : i + chunk, None]).squeeze(-1)).sum()
        ctx.save_for_backward(logits, rows, targets)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, rows, targets = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for i in range(0, rows.numel(), ctx.chunk):
            idx = rows[i : i + ctx.chunk]
            p = torch.softmax(logits[idx].float(), -1)
            p.scatter_add_(-1, targets[i : i + ctx.chunk, None], -torch.ones_like(p[:, :1]))
            grad[idx] = (p * grad_out).to(grad.dtype)
        return grad, None, None, None


def chunked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, chunk: int | None = None
) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies where ``labels != ignore_index``; ``logits[..., t]`` is scored
    against ``labels[..., t]`` (no shift); float32 result, gradient in the logits' dtype."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    rows = (lab != ignore_index).nonzero().squeeze(-1)
    targets = lab[rows]
    if targets.numel() and (targets.min() < 0 or targets.max() >= flat.shape[-1]):
        raise ValueError(f"labels must be in [0, {flat.shape[-1]}) or {ignore_index}")
    return _ChunkedCE.apply(flat, rows, targets, chunk or _chunk_rows(flat.shape[-1]))
