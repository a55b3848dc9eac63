"""Generation backends behind one call, ``backend.generate(user_prompts, sampler, max_new_tokens, seed)``:
our engine (default), Hugging Face ``generate``, and vLLM (large models, tensor parallel) where installed.
Each applies the model's chat template to the user prompts and returns one Completion per prompt."""

from dataclasses import dataclass

import torch

from fp4reason.eval.prompts import chat_text


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length"


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(
            "neither the model's generation_config nor the tokenizer defines an end-of-sequence token"
        )
    return ids


def _hf_sampling_kwargs(sampler, tokenizer) -> dict:
    """``generate`` kwargs for a SamplerConfig (None = greedy); a fresh ReSET processor per call."""
    from fp4reason.sampling import SamplerConfig, hf_generate_kwargs

    return hf_generate_kwargs(sampler or SamplerConfig(mode="greedy"), tokenizer)


class HFBackend:
    """Hugging Face ``model.generate`` in left-padded batches of ``batch_size``."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos = _eos_ids(model, tokenizer)

    @torch.inference_mode()
    def generate(self, prompts: list[str], sampler, max_new_tokens: int, seed: int) -> list[Completion]:
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]
        out = []
        try:
            for i in range(0, len(prompts), self.batch_size):
                texts = [chat_text(tok, p) for p in prompts[i : i + self.batch_size]]
                rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
                width = max(map(len, rows))
                ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
                torch.manual_seed(seed + i)
                seqs = self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos,
                    pad_token_id=pad,
                    **_hf_sampling_kwargs(sampler, tok),
                )
                for row in seqs[:, width:].tolist():
                    stop = next((j for j, t in enumerate(row) if t in self.eos), None)
                    row = row if stop is None else row[:stop]
                    out.append(
                        Completion(
                            tok.decode(row, skip_special_tokens=True),
                            len(row),
                            "length" if stop is None else "stop",
                        )
                    )
        finally:
            tok.padding_side = side
        return out


class EngineBackend:
    """fp4reason.engine.Engine (paged KV cache, FP4 kernels, per-sequence sampler state)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_seq_len: int = 4096):
        from fp4reason.engine import Engine

        self.engine = Engine(model, tokenizer, max_batch_size=batch_size, max_seq_len=max_seq_len)

    def generate(self, prompts: list[str], sampler, max_new_tokens: int, seed: int) -> list[Completion]:
        gens = self.engine.generate(
            prompts,
            sampler=sampler,
            max_new_tokens=max_new_tokens,
            chat_template=True,
            return_entropies=False,
            seed=seed,
        )
        return [
            Completion(g.text, len(g.token_ids), "stop" if g.finish_reason in ("stop", "eos") else "length")
            for g in gens
        ]


class VLLMBackend:
    """A vLLM deployment of ``model_path`` (BF16, or an FP4 compressed-tensors checkpoint), tensor parallel
    over ``tensor_parallel_size`` GPUs. Stateful samplers (ReSET and its ablations) run in
    fp4reason.integrations.vllm's logits processor, with ``temperature=1`` (the processor sets T_t)."""

    PROCESSOR = "fp4reason.integrations.vllm:ReSETVllmProcessor"

    def __init__(
        self, model_path: str, tensor_parallel_size: int = 1, max_model_len: int = 4096, **llm_kwargs
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ModuleNotFoundError("the vllm backend needs vLLM installed (pip install vllm)") from e
        self.llm = LLM(
            model=str(model_path),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            logits_processors=[self.PROCESSOR],
            **llm_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], sampler, max_new_tokens: int, seed: int) -> list[Completion]:
        from vllm import SamplingParams

        common = dict(max_tokens=max_new_tokens, seed=seed)
        if sampler is None or sampler.mode == "greedy":
            params = SamplingParams(temperature=0.0, **common)
        elif sampler.mode in ("fixed", "min_p"):
            params = SamplingParams(
                temperature=sampler.temperature, top_p=sampler.top_p, min_p=sampler.min_p, **common
            )
        else:
            reset = {k: getattr(sampler, k) for k in ("mode", "t_low", "t_high", "tau0")}
            params = SamplingParams(
                temperature=1.0, top_p=sampler.top_p, extra_args={"reset": reset}, **common
            )
        texts = [chat_text(self.tokenizer, p) for p in prompts]
        outs = self.llm.generate(texts, params, use_tqdm=False)
        return [
            Completion(
                o.outputs[0].text,
                len(o.outputs[0].token_ids),
                "length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outs
        ]


BACKENDS = ("engine", "hf", "vllm")
