"""Shared fixtures: tiny randomly initialised models of every supported architecture."""

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from threads; avoids oversubscription

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(arch: str):
    """A tiny config of ``arch`` in {"qwen2", "qwen3", "llama"} (head_dim 16, GQA 4/2)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(**TINY, **extra)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    return model.eval()


@pytest.fixture(params=["qwen2", "qwen3", "llama"])
def arch(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_model_dir(path):
    """A saved 2-layer Llama (hidden 64) with the SmolLM2 tokenizer at ``path``, for CLI tests; skips the
    test when the default model's tokenizer is not installed."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        from fp4reason.models import prepare_default_model

        tok = AutoTokenizer.from_pretrained(prepare_default_model("smollm2-135m"))
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default tokenizer not available: {e}")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
