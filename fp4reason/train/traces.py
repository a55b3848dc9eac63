"""Teacher traces for TAQ: a (BF16) teacher answers problems greedily; its answers become the completions.

Self-distillation (teacher = the model being quantized) is TAQ's trace alignment in its purest form.
Generation runs on fp4reason's engine.
"""

from fp4reason.train.data import prompt_ids


def generate_traces(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    extra: list[dict] | None = None,
) -> list[dict]:
    """Greedy teacher completions (fp4reason's engine) as records ``{"prompt", "completion", ...}``."""
    from fp4reason.engine import Engine

    engine = Engine(
        model,
        tokenizer,
        max_batch_size=batch_size,
        max_seq_len=max(len(prompt_ids(tokenizer, p)) for p in prompts) + max_new_tokens + 8,
    )
    gens = engine.generate(prompts, max_new_tokens=max_new_tokens, chat_template=True)
    extra = extra or [{} for _ in prompts]
    return [
        {**e, "prompt": p, "completion": g.text, "finish_reason": g.finish_reason}
        for p, g, e in zip(prompts, gens, extra, strict=True)
    ]
