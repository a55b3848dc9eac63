"""tau0 calibration: a percentile of the raw-logit entropy of the (quantized) model's own generations."""

import torch

from .entropy import token_entropy


@torch.no_grad()
def calibrate_tau(
    model,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int = 4096,
    percentile: float = 0.8,
    temperature: float = 0.6,
    top_p: float = 0.95,
    chat_template: bool = True,
    seed: int | None = 42,
    progress: bool = False,
) -> float:
    """tau0 = ``percentile`` quantile of per-token entropy over the generations for ``prompts``.

    Generates at temperature 0.6 / top-p 0.95 (paper protocol), one prompt at a time so there is no padding,
    and measures entropy on ``output_logits`` (raw, T = 1, full vocabulary), the quantity the runtime
    threshold is compared with; the reference used processed ``output_scores`` instead.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("calibrate_tau needs at least one prompt")
    if not 0.0 < percentile < 1.0:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    ents = []
    it = prompts
    if progress:
        from tqdm import tqdm

        it = tqdm(prompts, desc="calibrate-tau", unit="problem")
    for prompt in it:
        if chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        enc = tokenizer(text, return_tensors="pt").to(device)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            min_p=None,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        ents.extend(token_entropy(step).double().cpu() for step in out.logits)
    h = torch.cat(ents)
    return float(torch.quantile(h, percentile))
