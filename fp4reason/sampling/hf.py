"""Hugging Face ``generate()`` path: ReSETLogitsProcessor and the generate kwargs that make it exact."""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .config import SamplerConfig
from .entropy import check_logits, token_entropy
from .sampler import min_p_mask, scale_logits
from .state import StepEntropyState, select_temperature


class ReSETLogitsProcessor(LogitsProcessor):
    """Divides each row's scores by its ReSET temperature (T <= 1e-6: one-hot argmax).

    Stateful: use one instance per ``generate`` call. The ``input_ids`` of the first call are the prompt, so
    only generated tokens drive the step state. Needs ``temperature=1.0`` and top-k off in ``generate``
    (use :func:`hf_generate_kwargs`); top-p runs after it. ``mode``/``temperature``/``min_p`` give the
    baselines of :class:`SamplerConfig` through the same processor.
    """

    supports_continuous_batching = False  # per-row state; CB lays scores out per token, not per sequence

    def __init__(
        self,
        tokenizer=None,
        *,
        t_low: float,
        t_high: float = 1.0,
        tau0: float,
        window: int = 32,
        newline_token_ids=None,
        double_newline_token_ids=None,
        mode: str = "reset",
        temperature: float = 0.6,
        min_p: float = 0.0,
    ):
        self.config = SamplerConfig(
            mode=mode,
            t_low=t_low,
            t_high=t_high,
            tau0=tau0,
            window=window,
            temperature=temperature,
            min_p=min_p,
        )
        if self.config.stateful and (newline_token_ids is None or double_newline_token_ids is None):
            if tokenizer is None:
                raise ValueError("ReSETLogitsProcessor needs a tokenizer or explicit newline token id sets")
            from .tokens import newline_token_ids as scan

            nl, dnl = scan(tokenizer)
            newline_token_ids = nl if newline_token_ids is None else newline_token_ids
            double_newline_token_ids = dnl if double_newline_token_ids is None else double_newline_token_ids
        self.nl_ids = torch.as_tensor(
            [] if newline_token_ids is None else newline_token_ids, dtype=torch.long
        )
        self.dnl_ids = torch.as_tensor(
            [] if double_newline_token_ids is None else double_newline_token_ids, dtype=torch.long
        )
        self.reset()

    @classmethod
    def from_config(cls, config: SamplerConfig, tokenizer=None, **kwargs) -> "ReSETLogitsProcessor":
        return cls(
            tokenizer,
            t_low=config.t_low,
            t_high=config.t_high,
            tau0=config.tau0,
            window=config.window,
            mode=config.mode,
            temperature=config.temperature,
            min_p=config.min_p,
            **kwargs,
        )

    def reset(self) -> None:
        """Forget the batch; the next call's ``input_ids`` are taken as a new prompt."""
        self.state, self.prompt_len, self.calls = None, 0, 0
        self.last_temperature = self.last_entropy = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, L = input_ids.shape
        check_logits(scores, B)
        cfg = self.config
        if self.state is None:
            self.state = StepEntropyState(B, cfg.window, scores.device, self.nl_ids, self.dnl_ids)
            self.prompt_len = L
        elif self.state.capacity != B or L != self.prompt_len + self.calls:
            raise ValueError(
                f"ReSETLogitsProcessor got input_ids {tuple(input_ids.shape)} after {self.calls} calls on a "
                f"batch of {self.state.capacity} with prompt length {self.prompt_len}: use a new processor "
                f"per generate() call (beam search and continuous batching are not supported)"
            )
        self.calls += 1
        H = token_entropy(scores)
        if cfg.stateful:
            n_gen = L - self.prompt_len
            none = torch.full((B,), -1, dtype=torch.long, device=input_ids.device)
            self.state.last.copy_(input_ids[:, -1] if n_gen >= 1 else none)
            self.state.prev.copy_(input_ids[:, -2] if n_gen >= 2 else none)
            est = self.state.step(H)
            T = select_temperature(cfg.mode, H, est, cfg.t_low, cfg.t_high, cfg.tau0)
        else:
            t = 0.0 if cfg.mode == "greedy" else cfg.temperature
            T = torch.full((B,), t, dtype=torch.float32, device=scores.device)
        self.last_entropy, self.last_temperature = H, T
        return min_p_mask(scale_logits(scores, T), cfg.min_p).to(scores.dtype)


def hf_generate_kwargs(config: SamplerConfig, tokenizer=None, **processor_kwargs) -> dict:
    """``generate()`` kwargs for ``config``: our processor does temperature (and min-p), HF top-p after it.

    temperature=1.0 and top_k=0 override a model's generation_config.json (Qwen3 ships T 0.6, top-k 20), which
    would otherwise be applied again after the processor. Greedy mode returns plain greedy decoding.
    """
    if config.mode == "greedy":
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
    proc = ReSETLogitsProcessor.from_config(config, tokenizer, **processor_kwargs)
    return dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=config.top_p,
        min_p=None,
        num_beams=1,
        logits_processor=LogitsProcessorList([proc]),
    )
