"""Decode health check on the GPU host: does a quantized Qwen3-8B-shaped model decode finite logits and
in-range tokens, and where does the first non-finite value appear?

``--eager``: decode without CUDA graphs and check every projection, attention and pointwise op's output
after it runs (synchronizing), so the first non-finite output is named by layer and op. Default: the
engine's CUDA-graph decode, checking the logits and sampled tokens of every step on the host.

    python benchmarks/decode_check.py --variant nvfp4-w4a4 --eager --steps 64
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e_bench import GREEDY, QWEN3_8B, build_model, prompts  # noqa: E402
from fp4reason.engine import Engine  # noqa: E402
from fp4reason.engine import model as engine_model  # noqa: E402
from fp4reason.quant import quantize_model  # noqa: E402


class FirstBad(Exception):
    pass


def _finite(t) -> bool:
    ts = t if isinstance(t, tuple | list) else (t,)
    return all(not isinstance(v, torch.Tensor) or bool(torch.isfinite(v).all()) for v in ts)


def instrument(engine: Engine, where: list) -> None:
    """Check every projection, attention and op output of the decoder as it is made (eager decode)."""

    def wrap(name, fn):
        def checked(*a, **k):
            out = fn(*a, **k)
            if not _finite(out):
                bad_in = [i for i, v in enumerate(a) if isinstance(v, torch.Tensor) and not _finite(v)]
                raise FirstBad(f"{where[0]}: {name} output non-finite (non-finite inputs: {bad_in})")
            return out

        return checked

    names = {}
    for i, layer in enumerate(engine.decoder.layers):
        for pname in ("qkv", "o", "gate_up", "down"):
            names[id(getattr(layer, pname))] = f"layer {i} {pname}"
        layer._triton_attn = wrap(f"layer {i} attention", layer._triton_attn)
    proj_call = engine_model.Projection.__call__

    def checked_proj(self, *a, **k):
        where[0] = names.get(id(self), "lm_head or other")
        return wrap("projection", proj_call)(self, *a, **k)

    engine_model.Projection.__call__ = checked_proj
    ops = engine.decoder.ops
    for name in (
        "norm_act",
        "act_nvfp4",
        "rms_norm",
        "add_rms_norm",
        "silu_mul_act",
        "silu_mul",
        "qkv_heads",
    ):
        setattr(ops, name, wrap(name, getattr(ops, name)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="nvfp4-w4a4")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs; check every op's output")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_model(args.layers, dev)
    calib = [torch.randint(0, QWEN3_8B["vocab_size"], (256,)).tolist()]
    quantize_model(model, args.variant, calib, progress=False)
    engine = Engine(
        model, None, max_batch_size=args.batch, max_seq_len=args.prompt_len + args.steps + 1,
        use_cuda_graphs=not args.eager and dev.type == "cuda",
    )  # fmt: skip
    print(f"{args.variant}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
    vocab = engine.decoder.config.vocab_size
    ps = prompts(args.batch, args.prompt_len, vocab)
    logits = engine.decoder.prefill(
        torch.tensor(ps, device=dev), torch.zeros(args.batch, dtype=torch.long, device=dev)
    )
    print(
        f"prefill logits finite: {_finite(logits)}, amax {logits.float().abs().max().item():.3g}", flush=True
    )
    if args.eager:
        where = ["prefill"]
        instrument(engine, where)
    seen = []
    orig = engine.decoder.decode

    def decode(tokens, *a):
        t = tokens.tolist() if args.eager else None
        if t is not None and not all(0 <= v < vocab for v in t):
            raise FirstBad(f"step {len(seen)}: token ids out of range {t}")
        out = orig(tokens, *a)
        if args.eager:
            seen.append(bool(torch.isfinite(out).all()))
            if not seen[-1]:
                raise FirstBad(f"step {len(seen) - 1}: logits non-finite")
        return out

    engine.decoder.decode = decode
    try:
        gens = engine.generate(ps, sampler=GREEDY, max_new_tokens=args.steps, seed=0)
    except (FirstBad, ValueError) as e:
        print(f"FIRST BAD: {e}", flush=True)
        return 1
    toks = [t for g in gens for t in g.token_ids]
    ok = all(0 <= t < vocab for t in toks)
    print(f"decoded {len(toks)} tokens, all in range: {ok}; first 16: {toks[:16]}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
