"""ReSET's per-sequence state (step detection, HSE step-entropy estimate, SAT threshold) for many rows.

All state lives in fixed-shape device tensors updated with vectorised ops: no per-row loop and no host sync,
so it runs inside a captured CUDA graph. Sums are float64 so the means are exact enough over 32k tokens and
mathematically equal means (window == global while the window holds all history, step == global before the
first boundary) compare equal, as in the one-sequence reference.
"""

from typing import NamedTuple

import torch

from .tokens import token_class_table


class Estimates(NamedTuple):
    step: torch.Tensor  # HSE: window mean for the first `w` tokens of a step, then the within-step mean
    window: torch.Tensor  # mean of the last `w` entropies (the sliding-window ablation)
    mean: torch.Tensor  # mean of all past entropies (H-bar)


class StepEntropyState:
    """State of ``capacity`` sequences; rows are addressed by position (or by slot index, for vLLM)."""

    def __init__(self, capacity: int, window: int, device, nl_ids, dnl_ids):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.window, self.device = capacity, window, torch.device(device)
        self.code = token_class_table(nl_ids, dnl_ids, self.device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.win = torch.zeros(capacity, window, **f64)  # ring buffer, slot glob_n % window is the oldest
        self.win_sum = torch.zeros(capacity, **f64)
        self.step_sum = torch.zeros(capacity, **f64)
        self.glob_sum = torch.zeros(capacity, **f64)
        i64 = dict(dtype=torch.long, device=self.device)
        self.step_n = torch.zeros(capacity, **i64)
        self.glob_n = torch.zeros(capacity, **i64)
        self.last = torch.full((capacity,), -1, **i64)  # last generated token, -1 = none
        self.prev = torch.full((capacity,), -1, **i64)  # the one before
        self._rows = torch.arange(capacity, **i64)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Start rows clean: bool mask [capacity], index tensor, or None for all rows."""
        if rows is None:
            for t in (self.win, self.win_sum, self.step_sum, self.glob_sum, self.step_n, self.glob_n):
                t.zero_()
            self.last.fill_(-1)
            self.prev.fill_(-1)
            return
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.capacity,):
                raise ValueError(f"reset mask must have shape [{self.capacity}], got {tuple(rows.shape)}")
            self.win.masked_fill_(rows[:, None], 0)
            for t in (self.win_sum, self.step_sum, self.glob_sum, self.step_n, self.glob_n):
                t.masked_fill_(rows, 0)
            self.last.masked_fill_(rows, -1)
            self.prev.masked_fill_(rows, -1)
        else:
            rows = rows.long().flatten()
            self.win.index_fill_(0, rows, 0)
            for t in (self.win_sum, self.step_sum, self.glob_sum, self.step_n, self.glob_n):
                t.index_fill_(0, rows, 0)
            self.last.index_fill_(0, rows, -1)
            self.prev.index_fill_(0, rows, -1)

    def _get(self, t: torch.Tensor, idx):
        return t if idx is None else t.index_select(0, idx)

    def _put(self, t: torch.Tensor, idx, v: torch.Tensor) -> None:
        if idx is None:
            t.copy_(v)
        else:
            t.index_copy_(0, idx, v)

    def _class(self, tokens: torch.Tensor) -> torch.Tensor:
        none = self.code.numel() - 1
        return self.code[torch.where((tokens < 0) | (tokens > none), none, tokens)]

    def record(
        self, tokens: torch.Tensor, idx: torch.Tensor | None = None, active: torch.Tensor | None = None
    ):
        """Append generated tokens (prev <- last <- tokens) for rows ``idx`` (None: all), where ``active``."""
        last = self._get(self.last, idx)
        new_prev, new_last = last, tokens.to(self.last.dtype)
        if active is not None:
            new_prev = torch.where(active, last, self._get(self.prev, idx))
            new_last = torch.where(active, new_last, last)
        new = torch.stack([new_last, new_prev])  # materialise before writing: under torch.compile (2.13) a
        self._put(self.last, idx, new[0])  # prev.copy_(last) followed by last.copy_(tokens) gets reordered
        self._put(self.prev, idx, new[1])

    def step(
        self, H: torch.Tensor, idx: torch.Tensor | None = None, active: torch.Tensor | None = None
    ) -> Estimates:
        """One decoding step for rows ``idx``: detect a step boundary from the last two tokens, form the
        estimates from past entropies only, then append ``H`` (float [n]) to the state where ``active``."""
        W = self.window
        cl, cp = self._class(self._get(self.last, idx)), self._class(self._get(self.prev, idx))
        boundary = (cl == 2) | ((cl == 1) & (cp == 1))
        step_sum = self._get(self.step_sum, idx).masked_fill(boundary, 0)
        step_n = self._get(self.step_n, idx).masked_fill(boundary, 0)
        glob_sum, glob_n = self._get(self.glob_sum, idx), self._get(self.glob_n, idx)
        win_sum = self._get(self.win_sum, idx)

        H64 = H.double()
        first = glob_n == 0
        glob_mean = glob_sum / glob_n.clamp(min=1)
        # times 1/W, not / W: CUDA's tensor / scalar is a multiply by the reciprocal and the CPU's a true
        # division; one spelling keeps both devices (and the fused Triton kernel) bit-identical
        win_mean = torch.where(glob_n <= W, glob_mean, win_sum * (1.0 / W))
        step_mean = torch.where(step_n < W, win_mean, step_sum / step_n.clamp(min=1))
        est = Estimates(torch.where(first, H64, step_mean), torch.where(first, H64, win_mean), glob_mean)
        est = est._replace(mean=torch.where(first, est.step, glob_mean))

        rows = self._rows[: H.shape[0]] if idx is None else idx
        flat = rows * W + glob_n % W
        old = self.win.view(-1).index_select(0, flat)
        upd = dict(
            win=H64,
            win_sum=win_sum + H64 - old,
            step_sum=step_sum + H64,
            step_n=step_n + 1,
            glob_sum=glob_sum + H64,
            glob_n=glob_n + 1,
        )
        keep = dict(
            win=old, win_sum=win_sum, step_sum=step_sum, step_n=step_n, glob_sum=glob_sum, glob_n=glob_n
        )
        if active is not None:
            upd = {k: torch.where(active, v, keep[k]) for k, v in upd.items()}
        self.win.view(-1).index_copy_(0, flat, upd.pop("win"))
        for k, v in upd.items():
            self._put(getattr(self, k), idx, v)
        return est


def select_temperature(mode: str, H: torch.Tensor, est: Estimates, t_low, t_high, tau0) -> torch.Tensor:
    """SAT rule (and its ablations): T_high where H >= tau else T_low, float32 [n].

    ``t_low``/``t_high``/``tau0`` are Python floats or per-row tensors (no host-to-device copy here, so it
    stays graph-capturable).
    """
    H = H.double()
    if mode == "fixed_threshold":
        tau = tau0
    else:
        s = est.window if mode == "sliding_window" else est.step
        tau = torch.where(s > est.mean, s, tau0)
    T = torch.where(H >= tau, t_high, t_low)
    if mode == "cool_confident_steps":
        T = torch.where(est.step > est.mean, T, t_low)
    return T.float()
