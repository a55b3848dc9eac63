"""The Hugging Face path: ReSETLogitsProcessor inside model.generate, hf_generate_kwargs, calibrate_tau."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_sampling import Reference
from transformers import LogitsProcessorList, TopPLogitsWarper

from fp4reason.sampling import (
    ReSETLogitsProcessor,
    SamplerConfig,
    calibrate_tau,
    hf_generate_kwargs,
    newline_token_ids,
    token_entropy,
)

NL = list(range(0, 40))  # many newline-class ids so a random tiny model crosses many step boundaries
DNL = list(range(40, 70))


class Spy(ReSETLogitsProcessor):
    """Records what the processor saw and returned."""

    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        self.seen = getattr(self, "seen", []) + [(scores.clone(), out.clone(), self.last_temperature.clone())]
        return out


def qwen3_with_generation_config():
    model = tiny_model("qwen3")
    gc = model.generation_config
    gc.temperature, gc.top_k, gc.top_p, gc.do_sample = 0.6, 20, 0.95, True  # what Qwen3 ships
    gc.pad_token_id = gc.eos_token_id = None
    return model


def test_generate_matches_reference_step_for_step():
    model = qwen3_with_generation_config()
    cfg = SamplerConfig(t_low=0.3, t_high=1.0, tau0=5.3, window=4)
    kw = hf_generate_kwargs(cfg, newline_token_ids=NL, double_newline_token_ids=DNL)
    spy = Spy(t_low=0.3, tau0=5.3, window=4, newline_token_ids=NL, double_newline_token_ids=DNL)
    kw["logits_processor"] = LogitsProcessorList([spy])
    B, P, N = 3, 5, 32
    prompt = torch.randint(70, 256, (B, P), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = model.generate(
        prompt, **kw, max_new_tokens=N, min_new_tokens=N, output_logits=True, return_dict_in_generate=True
    )
    seqs = out.sequences
    assert seqs.shape == (B, P + N) and len(spy.seen) == N
    temps, n_boundaries = [], 0
    for b in range(B):
        ref = Reference("reset", 0.3, 1.0, 5.3, 4, nl=NL, dnl=DNL)
        for t in range(N):
            H = float(token_entropy(out.logits[t][b : b + 1]))  # raw logits, independent of the processor
            T = ref.temperature(H)
            assert spy.seen[t][2][b].item() == pytest.approx(T), (b, t)
            temps.append(T)
            ref.out.append(int(seqs[b, P + t]))
            n_boundaries += ref.out[-1] in DNL
    assert set(np.round(temps, 3)) == {0.3, 1.0} and n_boundaries > 5


def test_scores_reaching_the_sampler_are_ours():
    """Qwen3's generation_config (T 0.6, top-k 20) must not be re-applied after the processor."""
    model = qwen3_with_generation_config()
    cfg = SamplerConfig(t_low=0.5, t_high=1.0, tau0=5.3, window=4)
    prompt = torch.randint(70, 256, (2, 4), generator=torch.Generator().manual_seed(1))

    def run(kwargs):
        spy = Spy(t_low=0.5, tau0=5.3, window=4, newline_token_ids=NL, double_newline_token_ids=DNL)
        kwargs = {**kwargs, "logits_processor": LogitsProcessorList([spy])}
        torch.manual_seed(0)
        out = model.generate(
            prompt, **kwargs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True
        )
        return [
            torch.equal(final, TopPLogitsWarper(0.95)(None, ours))
            for final, (_, ours, _) in zip(out.scores, spy.seen, strict=True)
        ]

    kw = hf_generate_kwargs(cfg, newline_token_ids=NL, double_newline_token_ids=DNL)
    assert all(run(kw))
    naive = dict(do_sample=True)  # the trap: generation_config re-applies T 0.6 and top-k 20
    assert not any(run(naive))


def test_greedy_and_fixed_kwargs():
    assert hf_generate_kwargs(SamplerConfig(mode="greedy"))["do_sample"] is False
    kw = hf_generate_kwargs(SamplerConfig(mode="fixed", temperature=0.6))
    assert kw["temperature"] == 1.0 and kw["top_k"] == 0 and kw["top_p"] == 0.95
    proc = kw["logits_processor"][0]
    x = torch.randn(2, 30)
    assert torch.allclose(proc(torch.zeros(2, 3, dtype=torch.long), x), x / 0.6)


def test_processor_one_hot_for_tiny_temperature_and_reuse_error():
    proc = ReSETLogitsProcessor(
        t_low=1e-7, t_high=1e-7, tau0=0.5, newline_token_ids=[1], double_newline_token_ids=[2]
    )
    x = torch.randn(3, 20)
    out = proc(torch.zeros(3, 4, dtype=torch.long), x)
    assert torch.equal(out.argmax(-1), x.argmax(-1)) and (out.isinf().sum(-1) == 19).all()
    with pytest.raises(ValueError, match="new processor"):
        proc(torch.zeros(3, 9, dtype=torch.long), x)  # not the next step of the same generate call
    with pytest.raises(ValueError, match="NaN"):
        ReSETLogitsProcessor(t_low=0.1, tau0=0.5, newline_token_ids=[1], double_newline_token_ids=[2])(
            torch.zeros(1, 2, dtype=torch.long), torch.full((1, 5), float("nan"))
        )
    with pytest.raises(ValueError, match="tokenizer"):
        ReSETLogitsProcessor(t_low=0.1, tau0=0.5)


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "\n": 2, "\n\n": 3, ".\n\n": 4, "\n\n\n": 5, " \n": 6, "b\n": 7, "x\n\ny": 8}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_newline_token_ids_scan_the_vocabulary():
    nl, dnl = newline_token_ids(_tokenizer())
    assert nl.tolist() == [2]  # exactly "\n" only: " \n" and "b\n" do not count
    assert dnl.tolist() == [3, 4, 5, 8]
    proc = ReSETLogitsProcessor(_tokenizer(), t_low=0.1, tau0=0.5)
    assert proc.nl_ids.tolist() == [2] and proc.dnl_ids.tolist() == [3, 4, 5, 8]


def test_calibrate_tau_is_the_percentile_of_raw_entropy():
    model = tiny_model("llama")
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None

    class Tok:  # minimal tokenizer: bytes -> ids, no chat template
        pad_token_id, eos_token_id, chat_template = 0, None, None

        def __call__(self, text, return_tensors):
            from transformers import BatchEncoding

            ids = torch.tensor([[min(255, ord(c)) for c in text]])
            return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    prompts = ["1+1=", "two times three"]
    tau = calibrate_tau(model, Tok(), prompts, max_new_tokens=12, percentile=0.8, seed=7)
    # independent: regenerate with the same seed, then teacher-force the sequences for the logits
    torch.manual_seed(7)
    ents = []
    for p in prompts:
        ids = Tok()(p, "pt")["input_ids"]
        seq = model.generate(
            ids, do_sample=True, temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=12, pad_token_id=0
        )
        with torch.no_grad():
            logits = model(seq).logits[0, ids.shape[1] - 1 : -1].double()
        logp = torch.log_softmax(logits, -1)
        ents += (-(logp.exp() * logp).sum(-1)).tolist()
    assert len(ents) == 24
    assert tau == pytest.approx(float(np.percentile(ents, 80)), abs=1e-4)
