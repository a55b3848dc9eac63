"""BatchedSampler: ReSET (or a baseline) for a whole batch, graph-capturable, plus the stateless pieces
(temperature with greedy rows, min-p, top-p) that the HF and vLLM adapters reuse."""

import importlib.util
import math
import os
from typing import NamedTuple

import torch

from .config import SamplerConfig
from .entropy import check_logits, token_entropy
from .state import StepEntropyState, select_temperature

GREEDY_T = 1e-6  # a temperature at or below this means argmax


class SamplerOutput(NamedTuple):
    tokens: torch.Tensor  # [B] long
    entropy: torch.Tensor  # [B] float32, entropy of the raw logits (T = 1)
    temperature: torch.Tensor  # [B] float32, temperature applied to each row (<= 1e-6: greedy)


def scale_logits(logits: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """logits / T per row in float32; rows with T <= 1e-6 become one-hot (argmax 0, the rest -inf)."""
    x = logits.float()
    scaled = x / T.clamp(min=GREEDY_T)[:, None]
    greedy = (T <= GREEDY_T)[:, None]
    not_max = torch.arange(x.shape[1], device=x.device) != x.argmax(-1, keepdim=True)
    return scaled.masked_fill(greedy & not_max, -math.inf)


def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with p >= min_p * max p (probabilities of these, already temperature-scaled, logits)."""
    if min_p <= 0:
        return logits
    floor = logits.max(-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < floor, -math.inf)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter with Hugging Face's TopPLogitsWarper convention (drop the tokens whose ascending
    cumulative probability is <= 1 - top_p, always keep the most likely one). The dropped tokens form a
    prefix of the sorted order, so one cutoff logit per row replaces a scatter; exact ties at the cutoff
    are all kept."""
    if top_p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1).values
    n_drop = (sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p).sum(-1, keepdim=True)
    cutoff = sorted_logits.gather(1, n_drop.clamp(max=logits.shape[-1] - 1))
    return logits.masked_fill(logits < cutoff, -math.inf)


NUCLEUS_TOPK = 1024


def nucleus_topk(logits: torch.Tensor, top_p: float, k: int = NUCLEUS_TOPK):
    """The top-p distribution of :func:`top_p_mask` + softmax, found among each row's top ``k`` logits:
    (probabilities [B, k], their token ids [B, k]), or None when some row's nucleus (or a tie at its cutoff)
    reaches past the top ``k``. Same law as the full-vocabulary path without sorting 152k logits per step:
    the CPU decode path (it syncs with the host, so never on a GPU)."""
    if top_p >= 1.0 or logits.shape[-1] <= k:
        return None
    vals, idx = logits.topk(k, dim=-1)
    p = (vals - logits.logsumexp(-1, keepdim=True)).exp()
    if not bool((p.sum(-1) >= top_p).all()):
        return None
    n_keep = ((p.cumsum(-1) - p) < top_p).sum(-1, keepdim=True).clamp(min=1)  # HF rule, descending order
    cutoff = vals.gather(1, n_keep - 1)
    if bool((vals[:, -1:] >= cutoff).any()):
        return None
    return p.masked_fill(vals < cutoff, 0.0), idx


class BatchedSampler:
    """Samples one token per row from raw logits [B, V] with the policy of ``config``.

    State (ReSET modes) lives in device tensors updated in place; ``__call__`` has no host sync (with
    ``validate=False``, or while capturing a CUDA graph) and samples with the exponential race
    argmax(p / Exp(1)), so it can be captured. Each call records the sampled tokens for step detection.

    On CUDA the entropy, state update, temperature choice and token record run as three Triton kernels
    (``fused``, see fused.py) and the top-p / min-p draw as a radix select without a sort (nucleus.py): the
    torch path's tokens, temperatures and state, which stays the CPU path and the reference. ``fused=False``
    or FP4REASON_SAMPLER=torch forces the torch path; ``compile=True`` torch.compiles it instead.
    """

    def __init__(
        self,
        config: SamplerConfig,
        batch_size: int,
        device,
        newline_ids,
        double_newline_ids,
        *,
        validate: bool = True,
        compile: bool = False,
        fused: bool | None = None,
    ):
        if not isinstance(config, SamplerConfig):
            raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
        self.config, self.batch_size, self.device = config, batch_size, torch.device(device)
        self.validate = validate
        self.state = StepEntropyState(batch_size, config.window, self.device, newline_ids, double_newline_ids)
        t = 0.0 if config.mode == "greedy" else config.temperature
        self._fixed_T = torch.full((batch_size,), t, dtype=torch.float32, device=self.device)
        self._fixed_T_div = self._fixed_T.clamp(min=GREEDY_T)
        self.fused = _use_fused(fused, self.device, compile)
        if self.fused:
            from . import fused as fz
            from . import nucleus

            self._fz, self._nucleus = fz, nucleus
            self._params = fz.sampler_params(config, config.window, self.device)
            self._counters = nucleus.counters(batch_size, self.device)
        self._core = self._entropy_temperature
        if compile:  # fuse entropy + ReSET state update (~50 tiny kernels eager) into a few kernels
            self._core = torch.compile(self._core, fullgraph=True, dynamic=False)

    @classmethod
    def from_tokenizer(cls, config: SamplerConfig, batch_size: int, device, tokenizer, **kwargs):
        from .tokens import newline_token_ids

        return cls(config, batch_size, device, *newline_token_ids(tokenizer), **kwargs)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Start rows (bool mask [B] or indices; None = all) as new sequences."""
        self.state.reset(rows)

    def observe(self, tokens: torch.Tensor) -> None:
        """Override the last recorded token per row (teacher forcing); entries < 0 keep the sampled one."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.shape != (self.batch_size,):
            raise ValueError(
                f"observe expects tokens of shape [{self.batch_size}], got {tuple(tokens.shape)}"
            )
        self.state.last.copy_(torch.where(tokens >= 0, tokens.long(), self.state.last))

    def temperatures(self, H: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row temperature for entropies ``H`` [B]; advances the ReSET state."""
        cfg = self.config
        if not cfg.stateful:
            return self._fixed_T
        est = self.state.step(H, active=active)
        return select_temperature(cfg.mode, H, est, cfg.t_low, cfg.t_high, cfg.tau0)

    def _entropy_temperature(self, x: torch.Tensor, active: torch.Tensor | None):
        H = token_entropy(x)
        return H, self.temperatures(H, active)

    def __call__(
        self,
        logits: torch.Tensor,
        generator: torch.Generator | None = None,
        active: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Sample [B] tokens from raw logits [B, V]; ``active`` [B] bool limits state updates to live rows."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        check_logits(logits, self.batch_size, values=self.validate and not capturing)
        if active is not None and active.shape != (self.batch_size,):
            raise ValueError(f"active must have shape [{self.batch_size}], got {tuple(active.shape)}")
        if self.fused:
            native = logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
            return self._fused_call(logits if native else logits.float(), generator, active)
        x = logits.float()
        H, T = self._core(x, active)
        greedy_tok = x.argmax(-1)
        if self.config.mode == "greedy":
            tokens = greedy_tok
        else:
            race = self._race(x, T.clamp(min=GREEDY_T), generator)
            tokens = torch.where(T <= GREEDY_T, greedy_tok, race)
        self.state.record(tokens, active=active)
        return SamplerOutput(tokens, H, T)

    def _race(self, x: torch.Tensor, T_div: torch.Tensor, generator) -> torch.Tensor:
        """One exponential-race draw per row from the min-p / top-p distribution of x / T_div (on a CPU the
        nucleus is searched among the top candidates, :func:`nucleus_topk`)."""
        scaled = min_p_mask(x / T_div[:, None], self.config.min_p)
        nucleus = nucleus_topk(scaled, self.config.top_p) if x.device.type == "cpu" else None
        probs, ids = (
            nucleus if nucleus is not None else (top_p_mask(scaled, self.config.top_p).softmax(-1), None)
        )
        q = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-30)
        race = probs.div_(q).argmax(-1)
        return race if ids is None else ids.gather(1, race[:, None]).squeeze(1)

    def _fused_call(self, logits: torch.Tensor, generator, active) -> SamplerOutput:
        """Same law as the torch path in a fixed handful of Triton launches: entropy + state + temperature
        (fused.py), the top-p / min-p race without a sort (nucleus.py), token choice + record."""
        cfg, fz = self.config, self._fz
        if active is not None and active.device != logits.device:
            raise ValueError(f"active is on {active.device}, logits on {logits.device}")
        state = self.state if cfg.stateful else None
        row_max = torch.empty(self.batch_size, dtype=torch.float32, device=logits.device)
        H, greedy_tok, T, T_div = fz.entropy_temperature(
            logits, state, cfg.mode, self._params, active, row_max=row_max
        )
        if not cfg.stateful:
            T, T_div = self._fixed_T, self._fixed_T_div
        race = None
        if cfg.mode != "greedy":
            race = self._nucleus.sample(
                logits,
                T_div,
                cfg.top_p,
                cfg.min_p,
                generator=generator,
                row_max=row_max,
                counters=self._counters,
            )
        return SamplerOutput(fz.finish(race, greedy_tok, T, self.state, active), H, T)


def _use_fused(fused: bool | None, device: torch.device, compile: bool) -> bool:
    """The Triton path: by default on CUDA when triton imports and the kernels are compiled, not interpreted
    (FP4REASON_SAMPLER=torch forces the torch path); ``fused=True`` or FP4REASON_SAMPLER=fused insists (CPU
    tensors need the kernels defined under TRITON_INTERPRET=1)."""
    if fused is False:
        return False
    auto = fused is None
    if auto:
        choice = os.environ.get("FP4REASON_SAMPLER", "auto")
        if choice not in ("auto", "torch", "fused"):
            raise ValueError(f"FP4REASON_SAMPLER must be auto, torch or fused, got {choice!r}")
        if compile or choice == "torch":
            return False
        auto = choice == "auto"
        if auto and (device.type != "cuda" or importlib.util.find_spec("triton") is None):
            return False
    if compile:
        raise ValueError("fused=True and compile=True are alternatives; pick one")
    try:
        from . import fused as fz
    except ImportError as e:
        raise RuntimeError(f"the fused sampler needs triton: {e}") from e
    if auto and fz.interpreted():  # TRITON_INTERPRET set for other code; cannot be graph-captured
        return False
    if device.type != "cuda" and not fz.interpreted():
        raise ValueError(
            f"the fused sampler runs on CUDA, or on the CPU when fp4reason.sampling.fused was first imported "
            f"with TRITON_INTERPRET=1; got device {device}"
        )
    return True
