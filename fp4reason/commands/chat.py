"""``fp4reason chat``: a multi-turn conversation in the terminal (chat template, streamed replies)."""

import argparse


def register(subparsers) -> None:
    from fp4reason.commands.generate import add_model_args

    p = subparsers.add_parser("chat", help="chat with a model (multi-turn, streaming); /reset, /exit")
    add_model_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fp4reason.commands.generate import load_engine, sampler_from_args

    engine = load_engine(args, max_batch_size=1)
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise ValueError(f"model '{args.model}' has no chat template")
    sampler = sampler_from_args(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("chat: empty line or /exit to quit, /reset to start over")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("", "/exit"):
            break
        if line == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        budget = min(args.max_new_tokens, engine.max_seq_len - len(ids))
        if budget < 1:
            print("[conversation is longer than --max-seq-len; /reset to start over]")
            messages.pop()
            continue
        print("model> ", end="", flush=True)
        (gen,) = engine.generate(
            [ids],
            sampler=sampler,
            max_new_tokens=budget,
            seed=args.seed,
            stream=lambda s: print(s, end="", flush=True),
        )
        print()
        messages.append({"role": "assistant", "content": gen.text})
    return 0
