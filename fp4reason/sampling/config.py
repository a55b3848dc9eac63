"""Sampler configuration and the paper's per-model ReSET presets (reset_reqat.md §1.5)."""

import math
from dataclasses import dataclass

MODES = ("reset", "fixed", "greedy", "min_p", "fixed_threshold", "sliding_window", "cool_confident_steps")
STEP_MODES = (
    "reset",
    "fixed_threshold",
    "sliding_window",
    "cool_confident_steps",
)  # stateful, use t_low/t_high


@dataclass(frozen=True)
class SamplerConfig:
    """One decoding policy: ReSET (default), its ablations, or a stateless baseline.

    reset: T_high if H_t >= tau else T_low, tau = step-entropy estimate in uncertain steps else tau0.
    fixed: one temperature. greedy: argmax. min_p: fixed temperature + min-p (then top-p).
    fixed_threshold: tau = tau0 always. sliding_window: step estimate = mean of the last `window` tokens.
    cool_confident_steps: T_low for every token of a confident step (paper Table 6).
    """

    mode: str = "reset"
    temperature: float = 0.6
    top_p: float = 0.95
    min_p: float = 0.0
    t_low: float = 0.1
    t_high: float = 1.0
    tau0: float = 0.55
    window: int = 32

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown sampler mode {self.mode!r}; expected one of {MODES}")
        for name in ("temperature", "top_p", "min_p", "t_low", "t_high", "tau0"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"SamplerConfig.{name} must be a finite number, got {v!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.mode in STEP_MODES:
            if self.t_low <= 0 or self.t_high <= 0:
                raise ValueError(
                    f"t_low and t_high must be > 0 (T <= 1e-6 acts as greedy), got "
                    f"t_low={self.t_low}, t_high={self.t_high}"
                )
            if self.tau0 < 0:
                raise ValueError(f"tau0 is an entropy in nats and must be >= 0, got {self.tau0}")
        if self.mode in ("fixed", "min_p") and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 for mode {self.mode!r} (use mode='greedy'), got {self.temperature}"
            )
        if self.mode == "min_p" and self.min_p <= 0:
            raise ValueError("mode 'min_p' needs min_p > 0")

    @property
    def stateful(self) -> bool:
        return self.mode in STEP_MODES


def _reset(t_low: float, tau0: float) -> SamplerConfig:
    return SamplerConfig(mode="reset", t_low=t_low, t_high=1.0, tau0=tau0, window=32, top_p=0.95)


# aiha-lab/ReSET reset/configs/hparams.json: T_high 1.0, w 32, top-p 0.95 for every model.
PRESETS: dict[str, SamplerConfig] = {
    "Qwen3-8B": _reset(0.1, 0.5505),
    "Qwen3-14B": _reset(0.3, 0.4863),
    "Qwen3-32B": _reset(0.1, 0.5363),
    "DeepSeek-R1-Distill-Qwen-7B": _reset(0.4, 0.6446),
    "DeepSeek-R1-Distill-Qwen-14B": _reset(0.3, 0.6488),
    # fp4reason's demo model, NVFP4 W4A4: tau0 from `fp4reason calibrate-tau` (4 GSM8K calibration-split
    # problems, seed 42); T_low 0.1 chosen by a sweep on 32 calibration-split problems (ties 0.2; the sweep
    # cannot separate 0.05..0.2). On 288 GSM8K test problems ReSET did not recover this model's FP4 gap.
    "qwen2.5-coder-0.5b": _reset(0.1, 0.6881),
}


def preset_for(name_or_path: str) -> SamplerConfig | None:
    """The preset whose key matches the last path component of ``name_or_path`` (case-insensitive)."""
    base = str(name_or_path).rstrip("/").split("/")[-1].lower()
    for key, cfg in PRESETS.items():
        if key.lower() == base or base.startswith(key.lower() + "-"):
            return cfg
    return None
