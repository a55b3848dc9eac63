"""Evaluate several configurations (precision scheme x sampler) on the same problems, k samples each.

Records (one JSON line per problem x sample x configuration) are appended to a JSONL as they are produced;
a rerun with the same file skips what is already there. Samples are interleaved (sample j of every problem
chunk for every configuration before sample j+1), so an interrupted run still gives paired data, and
all configurations use the same seed for the same chunk and sample (common random numbers).
"""

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fp4reason.eval.data import Problem
from fp4reason.eval.grading import grade
from fp4reason.eval.prompts import user_prompt

BASELINE_SAMPLER = dict(mode="fixed", temperature=0.6, top_p=0.95)


@dataclass(frozen=True)
class EvalConfig:
    """A configuration to compare: ``scheme`` is "bf16" or a quantization scheme; ``sampler`` a
    SamplerConfig (None = greedy)."""

    name: str
    scheme: str
    sampler: object | None

    def sampler_dict(self) -> dict | None:
        return None if self.sampler is None else asdict(self.sampler)


def _num(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_config(spec: str, **defaults) -> EvalConfig:
    """``<scheme>[+<sampler mode>[:key=value,...]]``, e.g. "bf16", "nvfp4-w4a4", "nvfp4-w4a4+reset",
    "nvfp4-w4a4+reset:tau0=0.61,t_low=0.3", "nvfp4-w4a4+min_p:min_p=0.05", "bf16+greedy".

    Without a sampler the papers' baseline (T=0.6, top-p 0.95) is used. ``defaults`` (e.g. a calibrated
    tau0) fill SamplerConfig fields that the spec does not set; they do not override the baseline's."""
    from fp4reason.sampling import SamplerConfig

    spec = spec.strip()
    scheme, _, rest = spec.partition("+")
    if scheme != "bf16":
        from fp4reason.quant.scheme import get_scheme

        get_scheme(scheme)
    if not rest:
        return EvalConfig(spec, scheme, SamplerConfig(**BASELINE_SAMPLER))
    mode, _, params = rest.partition(":")
    if mode == "greedy":
        return EvalConfig(spec, scheme, None)
    known = {f.name for f in fields(SamplerConfig)}
    kw = {k: v for k, v in defaults.items() if v is not None and k in known}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in known or key == "mode":
            raise ValueError(
                f"config '{spec}': bad sampler parameter '{item}' (known: {sorted(known - {'mode'})})"
            )
        kw[key] = _num(value)
    return EvalConfig(spec, scheme, SamplerConfig(mode=mode, **kw))


def read_records(path: str | Path) -> list[dict]:
    """All complete records of a results JSONL (a torn last line from an interrupted write is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):
                raise ValueError(f"{path}:{n}: corrupt record (not the last line)") from None
    return out


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_resume(
    existing: list[dict], configs: list[EvalConfig], max_new_tokens: int, backend: str | None
) -> None:
    want = {c.name: c.sampler_dict() for c in configs}
    for r in existing:
        if r["config"] in want and (
            r["sampler"] != want[r["config"]]
            or r["max_new_tokens"] != max_new_tokens
            or (backend is not None and r.get("backend", backend) != backend)  # older records: no field
        ):
            raise ValueError(
                f"results file already has config '{r['config']}' with different settings "
                f"(sampler {r['sampler']}, max_new_tokens {r['max_new_tokens']}, "
                f"backend {r.get('backend')}); use another --out or name"
            )


def run_eval(
    configs: list[EvalConfig],
    problems: list[Problem],
    get_backend: Callable[[str], object],
    out_path: str | Path,
    *,
    k: int = 1,
    max_new_tokens: int = 1024,
    chunk_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Generate, grade and append records for every (config, problem, sample) not yet in ``out_path``;
    returns all records of the file. ``get_backend(scheme)`` returns the (cached) backend of a scheme; its
    ``backend`` attribute (a ModelPool's backend name), if any, is recorded and must match on resume, so one
    file never mixes generations of different backends."""
    from tqdm import tqdm

    if k < 1 or chunk_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"k, chunk_size and max_new_tokens must be >= 1, got {k}, {chunk_size}, {max_new_tokens}"
        )
    if len({c.name for c in configs}) != len(configs):
        raise ValueError("configuration names must be unique")
    if len({p.id for p in problems}) != len(problems):
        raise ValueError("problem ids must be unique")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_records(out_path)
    backend = getattr(get_backend, "backend", None)  # a ModelPool's backend name, recorded per sample
    _check_resume(existing, configs, max_new_tokens, backend)
    done = {(r["config"], r["problem_id"], r["sample"]) for r in existing}
    ids = {p.id for p in problems}
    todo_total = len(configs) * k * len(problems)
    n_done = sum(1 for c, pid, j in done if pid in ids and j < k and c in {x.name for x in configs})
    bar = tqdm(total=todo_total, initial=n_done, disable=not progress, desc="eval", unit="sample")
    chunks = [problems[i : i + chunk_size] for i in range(0, len(problems), chunk_size)]
    for j in range(k):
        for ci, chunk in enumerate(chunks):
            chunk_seed = seed + 1_000_003 * j + 1009 * ci
            for cfg in configs:
                pending = [p for p in chunk if (cfg.name, p.id, j) not in done]
                if not pending:
                    continue
                comps = get_backend(cfg.scheme).generate(
                    [user_prompt(p) for p in pending], cfg.sampler, max_new_tokens, chunk_seed
                )
                if len(comps) != len(pending):
                    raise RuntimeError(
                        f"backend returned {len(comps)} completions for {len(pending)} prompts"
                    )
                recs = []
                for p, c in zip(pending, comps, strict=True):
                    pred, ok = grade(p, c.text)
                    recs.append(
                        dict(
                            config=cfg.name,
                            scheme=cfg.scheme,
                            sampler=cfg.sampler_dict(),
                            problem_id=p.id,
                            sample=j,
                            seed=chunk_seed,
                            max_new_tokens=max_new_tokens,
                            backend=backend,
                            gold=p.answer,
                            pred=pred,
                            correct=bool(ok),
                            n_tokens=c.n_tokens,
                            finish_reason=c.finish_reason,
                            response=c.text,
                        )
                    )
                _append(out_path, recs)
                existing += recs
                done.update((cfg.name, p.id, j) for p in pending)
                bar.update(len(recs))
                bar.set_postfix_str(f"{cfg.name} s{j}")
    bar.close()
    return existing


class ModelPool:
    """Loads the BF16 model once and one quantized copy per FP4 scheme (or the saved FP4 checkpoint given
    for that scheme in ``checkpoints``, which skips re-quantizing), and builds a backend per scheme."""

    def __init__(
        self,
        model: str,
        backend: str = "engine",
        *,
        batch_size: int = 16,
        max_seq_len: int = 4096,
        tensor_parallel_size: int = 1,
        loader: Callable | None = None,
        checkpoints: dict[str, str] | None = None,
        vllm_memory: float = 0.4,
    ):
        from fp4reason.eval.backends import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}' (choose one of {BACKENDS})")
        self.model, self.backend, self.batch_size, self.max_seq_len = model, backend, batch_size, max_seq_len
        self.tp, self.loader, self._base, self._backends = tensor_parallel_size, loader, None, {}
        self.checkpoints = dict(checkpoints or {})
        self.vllm_memory = vllm_memory

    def _load(self):
        if self.loader is not None:
            return self.loader()
        from fp4reason.models import load_model

        return load_model(self.model)

    def model_for(self, scheme: str):
        """(model, tokenizer) for ``scheme``: the BF16 model, or a quantized deep copy of it."""
        import copy

        if scheme in self.checkpoints:
            from fp4reason.models import load_model
            from fp4reason.quant import checkpoint_info

            found = checkpoint_info(self.checkpoints[scheme])["scheme"]
            if found != scheme:
                raise ValueError(
                    f"checkpoint {self.checkpoints[scheme]} holds scheme '{found}', not '{scheme}'"
                )
            return load_model(self.checkpoints[scheme])
        if self._base is None:
            self._base = self._load()
        model, tok = self._base
        if scheme == "bf16":
            return model, tok
        from fp4reason.quant import quantize_model

        return quantize_model(copy.deepcopy(model), scheme, tokenizer=tok), tok

    def __call__(self, scheme: str):
        if scheme not in self._backends:
            from fp4reason.eval import backends as B

            if self.backend == "vllm":  # vLLM serves checkpoints: the model itself, or a saved FP4 one
                path = self.checkpoints.get(scheme, self.model if scheme == "bf16" else None)
                if path is None:
                    raise ValueError(
                        f"the vllm backend needs a saved checkpoint for scheme '{scheme}': export it with "
                        f"`fp4reason quantize` and pass --checkpoint {scheme}=PATH"
                    )
                self._backends[scheme] = B.VLLMBackend(
                    path, self.tp, self.max_seq_len, gpu_memory_utilization=self.vllm_memory
                )
            else:
                model, tok = self.model_for(scheme)
                self._backends[scheme] = (
                    B.HFBackend(model, tok, self.batch_size)
                    if self.backend == "hf"
                    else B.EngineBackend(model, tok, self.batch_size, self.max_seq_len)
                )
        return self._backends[scheme]
