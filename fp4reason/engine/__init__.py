"""Fast batched decoding (gpt-fast style): static KV cache, CUDA-graph decode steps, sampler in the graph."""

from fp4reason.engine.engine import Engine, Generation
from fp4reason.engine.model import FastDecoder

__all__ = ["Engine", "FastDecoder", "Generation"]
