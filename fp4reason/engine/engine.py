"""The decode engine: prefill, then one CUDA-graph replay per token (model step + sampler), per-row stops.

On a GPU each (batch size, KV-length bucket) gets its own graph, captured lazily; a step reads the KV
cache only up to its bucket, so attention cost grows with the context instead of with ``max_seq_len``.
The graph also holds the sampler (ReSET or any ``SamplerConfig``), writes the sampled token back as the
next input and records tokens, entropies and temperatures in device history buffers: the host reads only
the new token ids, one step behind, so the GPU never waits for it. On a CPU the same step runs eagerly.
"""

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fp4reason.engine.model import FastDecoder, Ops


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: Literal["eos", "length"]
    entropies: list[float] | None = None
    temperatures: list[float] | None = None


class _Stream:
    """Incremental detokenization (decode a short window, emit what is new, hold back partial UTF-8)."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tok, self.cb, self.ids, self.prefix, self.read = tokenizer, callback, [], 0, 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        dec = lambda ids: self.tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, now = dec(self.ids[self.prefix : self.read]), dec(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.cb(now[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)


MAX_SAMPLER_CONFIGS = 4  # sampler configs whose graphs are kept (all share one memory pool)


class _Batch:
    """Static device buffers of one batch size, shared by its graphs."""

    def __init__(self, b: int, s: int, device, sampler) -> None:
        self.sampler = sampler
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)  # input token of the step
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # its cache slot
        self.start = torch.zeros(b, dtype=torch.long, device=device)  # first real slot per row
        self.hist_tok = torch.zeros(b, s + 1, dtype=torch.long, device=device)  # token for slot i at [:, i]
        self.hist_ent = torch.zeros(b, s + 1, dtype=torch.float32, device=device)
        self.hist_temp = torch.zeros(b, s + 1, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}


class Engine:
    """Batched FP4/BF16 decoding of a Hugging Face causal LM (Qwen2/2.5, Qwen3, Llama).

    ``attn`` picks the decode attention: "sdpa", "math", or "triton" (q/k norm, RoPE, cache write and
    attention in one fused kernel; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``). Default: "triton" on
    CUDA when triton is installed (H100, Qwen3-8B shapes: 1.31x faster steps than SDPA at batch 1, and flat
    in the context length, benchmarks/results/gpu_h100_s2_final), else "sdpa".
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_seq_len: int = 4096,
        device: torch.device | str | None = None,
        use_cuda_graphs: bool | None = None,
        compile: bool | None = None,
        kv_bucket: int = 256,
        fuse: bool = True,
        kv4: bool | None = None,
        attn: str | None = None,
    ) -> None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if attn is None:
            from fp4reason.engine.attention import available

            attn = "triton" if device.type == "cuda" and available(device) is None else "sdpa"
        model.to(device).eval()
        if kv4 is None:
            from fp4reason.quant import uses_kv4

            kv4 = uses_kv4(model)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch_size, self.max_seq_len, self.kv_bucket = max_batch_size, max_seq_len, kv_bucket
        self.decoder = FastDecoder(
            model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv4=kv4, fuse=fuse, attn=attn
        )
        cuda = device.type == "cuda"
        self.use_cuda_graphs = cuda if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and not cuda:
            raise ValueError("use_cuda_graphs=True needs a CUDA device")
        if compile if compile is not None else cuda:
            _raise_recompile_limit()
            self.decoder.ops = Ops(compiled=True)
        self._batches: dict[tuple, _Batch] = {}
        self._pool = None
        self._newlines = None
        self.stats: dict = {}  # timings of the last chunk: prefill_s, decode_s, steps, token_times
        self.eos_token_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        scheme: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        calib_data=None,
        **kw,
    ) -> "Engine":
        """Load a default model name, model directory or FP4 checkpoint; quantize to ``scheme`` if given."""
        from fp4reason.models import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        if scheme is not None:
            from fp4reason.quant import quantize_model

            quantize_model(model, scheme, calib_data, tokenizer=tokenizer)
        return cls(model, tokenizer, device=device, **kw)

    # ----------------------------------------------------------------------------------------------
    def _sampler(self, config, b: int):
        from fp4reason.sampling import BatchedSampler, newline_token_ids

        if self._newlines is None:  # a scan of the whole vocabulary: once per engine, not per batch size
            empty = torch.zeros(0, dtype=torch.long)
            self._newlines = (empty, empty) if self.tokenizer is None else newline_token_ids(self.tokenizer)
        return BatchedSampler(config, b, self.device, *self._newlines, validate=self.device.type != "cuda")

    def _batch(self, config, b: int) -> _Batch:
        key = (config, b)
        if key not in self._batches:
            configs = list(dict.fromkeys(k[0] for k in self._batches))  # oldest first
            if config not in configs and len(configs) >= MAX_SAMPLER_CONFIGS:
                for k in [k for k in self._batches if k[0] == configs[0]]:
                    del self._batches[k]
                if not any(st.graphs for st in self._batches.values()):
                    self._pool = None  # a pool whose graphs are all gone cannot take new captures
            self._batches[key] = _Batch(b, self.max_seq_len, self.device, self._sampler(config, b))
        return self._batches[key]

    def _step(self, st: _Batch, kv_len: int) -> None:
        """Decode one token for every row of ``st`` entirely on the device (what a graph captures)."""
        logits = self.decoder.decode(st.tokens, st.slot, st.start, kv_len)
        out = st.sampler(logits)
        nxt = st.slot + 1
        st.hist_tok.index_copy_(1, nxt, out.tokens[:, None])
        st.hist_ent.index_copy_(1, nxt, out.entropy.float()[:, None])
        st.hist_temp.index_copy_(1, nxt, out.temperature.float()[:, None])
        st.tokens.copy_(out.tokens)
        st.slot.copy_(nxt)

    def _replay(self, st: _Batch, kv_len: int) -> None:
        if not self.use_cuda_graphs:
            self._step(st, kv_len)
            return
        graph = st.graphs.get(kv_len)
        if graph is None:
            graph = st.graphs[kv_len] = self._capture(st, kv_len)
        graph.replay()

    def _capture(self, st: _Batch, kv_len: int) -> torch.cuda.CUDAGraph:
        # warm up on a side stream (compiles kernels, leaves lazily allocated state in place) with the
        # buffers and the RNG saved and restored, since each warm-up call advances the step it simulates
        saved = [t.clone() for t in _state_tensors(self, st)]
        gen = torch.cuda.default_generators[self.device.index]
        rng = gen.get_state()  # warm-up samples must not shift the seeded random stream
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step(st, kv_len)
        torch.cuda.current_stream().wait_stream(s)
        gen.set_state(rng)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(st, kv_len)
        for t, v in zip(_state_tensors(self, st), saved, strict=True):
            t.copy_(v)
        return graph

    def warmup(self, batch_size: int, max_len: int, sampler=None) -> None:
        """Capture the graphs of ``batch_size`` rows for every KV bucket up to ``max_len`` now (benchmarks:
        keeps capture and compile time out of the timed run)."""
        from fp4reason.sampling import SamplerConfig

        if not self.use_cuda_graphs:
            return
        st = self._batch(sampler if sampler is not None else SamplerConfig(mode="greedy"), batch_size)
        with torch.no_grad():
            for kv_len in range(
                self.kv_bucket, min(max_len, self.max_seq_len) + self.kv_bucket, self.kv_bucket
            ):
                kv_len = min(kv_len, self.max_seq_len)
                st.slot.fill_(max(kv_len - 2, 0))  # both warm-up steps stay inside the cache
                if kv_len not in st.graphs:
                    st.graphs[kv_len] = self._capture(st, kv_len)
        torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------------------------------------
    def encode(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], chat_template: bool = False
    ) -> list[list[int]]:
        """Prompts as token ids (optionally wrapped in the tokenizer's chat template as one user turn)."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids instead")
                if chat_template:
                    p = self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                    )
                    ids = self.tokenizer(p, add_special_tokens=False).input_ids
                else:
                    ids = self.tokenizer(p).input_ids
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("empty prompt")
            out.append(ids)
        return out

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        sampler=None,
        max_new_tokens: int = 256,
        chat_template: bool = False,
        return_entropies: bool = False,
        stream: Callable[[str], None] | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        """Generate for every prompt (in chunks of ``max_batch_size``); ``stream`` gets text for batch 1."""
        from fp4reason.sampling import SamplerConfig

        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not a single string")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampler = sampler if sampler is not None else SamplerConfig(mode="greedy")
        if stream is not None and (len(prompts) != 1 or self.tokenizer is None):
            raise ValueError("streaming needs exactly one prompt and a tokenizer")
        ids = self.encode(prompts, chat_template)
        if seed is not None:
            torch.manual_seed(seed)
        chunks = [ids[i : i + self.max_batch_size] for i in range(0, len(ids), self.max_batch_size)]
        results: list[Generation] = []
        bar = None
        if len(chunks) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="seq")
        for chunk in chunks:
            results += self._generate_chunk(chunk, sampler, max_new_tokens, return_entropies, stream)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return results

    def _generate_chunk(self, prompts, config, max_new: int, diagnostics: bool, stream) -> list[Generation]:
        b, t = len(prompts), max(len(p) for p in prompts)
        if t + max_new > self.max_seq_len:
            raise ValueError(
                f"prompt of {t} tokens + {max_new} new tokens exceeds max_seq_len={self.max_seq_len}"
            )
        dev = self.device
        st = self._batch(config, b)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        pad = pad if pad is not None else 0
        start = [t - len(p) for p in prompts]
        tokens = torch.tensor([[pad] * s + p for s, p in zip(start, prompts, strict=True)], device=dev)
        st.start.copy_(torch.tensor(start, device=dev))
        st.sampler.reset(None)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(tokens, st.start)
        out = st.sampler(logits)
        st.hist_tok[:, t] = out.tokens
        st.hist_ent[:, t] = out.entropy.float()
        st.hist_temp[:, t] = out.temperature.float()
        st.tokens.copy_(out.tokens)
        st.slot.fill_(t)

        eos = self.eos_token_ids
        done = [False] * b
        n_out = [0] * b
        finish = ["length"] * b
        streamer = _Stream(self.tokenizer, stream) if stream is not None else None
        pinned = dev.type == "cuda"
        host = [torch.empty(b, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        events = [torch.cuda.Event() for _ in range(2)] if pinned else None

        def consume(toks: list[int]) -> bool:
            for r, tok in enumerate(toks):
                if done[r]:
                    continue
                n_out[r] += 1
                if streamer is not None:
                    streamer.push(tok)
                if tok in eos:
                    done[r], finish[r] = True, "eos"
                elif n_out[r] >= max_new:
                    done[r] = True
            return all(done)

        finished = consume(out.tokens.tolist())
        t1 = time.perf_counter()
        stamps = [t1]
        # step i samples the token for slot t+1+i; the host reads step i-1's tokens while step i runs
        i = 0
        pending = None
        while not finished and i < max_new - 1:
            slot = t + i
            kv_len = min(self.max_seq_len, -(-(slot + 1) // self.kv_bucket) * self.kv_bucket)
            self._replay(st, kv_len)
            if pinned:
                host[i % 2].copy_(st.tokens, non_blocking=True)
                events[i % 2].record()
                if pending is not None:
                    events[pending % 2].synchronize()
                    finished = consume(host[pending % 2].tolist())
                    stamps.append(time.perf_counter())
                pending = i
            else:
                finished = consume(st.tokens.tolist())
                stamps.append(time.perf_counter())
            i += 1
        if pending is not None and not finished:
            events[pending % 2].synchronize()
            consume(host[pending % 2].tolist())
            stamps.append(time.perf_counter())
        if pinned:
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        self.stats = dict(
            prefill_s=t1 - t0, decode_s=t2 - t1, steps=i, token_times=stamps, batch=b, prompt_len=t
        )

        toks = st.hist_tok[:, t : t + max_new].tolist()
        ents = st.hist_ent[:, t : t + max_new].tolist()
        check_finite_steps(ents, n_out)
        temps = st.hist_temp[:, t : t + max_new].tolist() if diagnostics else None
        gens = []
        for r in range(b):
            ids = toks[r][: n_out[r]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
            gens.append(
                Generation(
                    ids,
                    text,
                    finish[r],
                    ents[r][: n_out[r]] if diagnostics else None,
                    temps[r][: n_out[r]] if diagnostics else None,
                )
            )
        return gens


def check_finite_steps(ents: list[list[float]], n_out: list[int]) -> None:
    """Raise if a generated token came from non-finite logits (its entropy is NaN: a NaN or +inf logit, or
    all -inf). The CPU sampler checks every step's logits itself; a CUDA-graph step cannot stop the host, so
    the check runs once on the recorded entropies after the decode."""
    first_bad = {}  # row -> its first generated token with a NaN entropy
    for r, (row, n) in enumerate(zip(ents, n_out, strict=True)):
        i = next((i for i, h in enumerate(row[:n]) if math.isnan(h)), None)
        if i is not None:
            first_bad[r] = i
    if first_bad:
        r0 = min(first_bad)
        raise ValueError(
            f"logits of rows {sorted(first_bad)[:8]} were NaN/+Inf or entirely -Inf (row {r0} from generated "
            f"token {first_bad[r0]} on): the model is broken (check its weights, scales or kernels)"
        )


def _state_tensors(engine: Engine, st: _Batch) -> list[torch.Tensor]:
    """Everything a step mutates: step buffers, sampler state, the KV cache."""
    tensors = [st.tokens, st.slot, st.hist_tok, st.hist_ent, st.hist_temp]
    tensors += [v for v in vars(st.sampler.state).values() if isinstance(v, torch.Tensor)]
    return tensors


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def _raise_recompile_limit() -> None:
    """One compiled graph per batch size and pointwise function: allow all 16 batch sizes (+ slack)."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 64))


__all__ = ["Engine", "Generation"]
