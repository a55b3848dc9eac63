"""``fp4reason eval``: accuracy of BF16 / FP4 schemes / FP4 + samplers on one benchmark, k samples each,
appended to a resumable JSONL and summarized as a markdown + JSON table and a bar chart."""

import argparse

DEFAULT_CONFIGS = ["bf16", "nvfp4-w4a4", "nvfp4-w4a4+reset"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate BF16 vs FP4 (and FP4 + ReSET / baseline samplers) on a benchmark",
        description="Configurations are '<scheme>[+<sampler>[:key=value,...]]', e.g. bf16, nvfp4-w4a4, "
        "nvfp4-w4a4+reset:tau0=0.6,t_low=0.3, nvfp4-w4a4+min_p:min_p=0.05, bf16+greedy. "
        "Without a sampler the "
        "papers' baseline (T=0.6, top-p 0.95) is used. Rerunning with the same --out resumes.",
    )
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="model name or path (default: %(default)s)")
    p.add_argument(
        "--benchmark",
        default="gsm8k",
        help="gsm8k, aime2025, gpqa-diamond, champ, champ-numeric, or a JSONL path (question/answer)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "calib", "all"],
        help="'calib' is a seeded 15%% split kept apart for tuning (default: %(default)s)",
    )
    p.add_argument("--limit", type=int, help="first N problems of the split")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="default: %(default)s")
    p.add_argument("--reference", help="config the others are compared with (default: the first)")
    p.add_argument("--k", type=int, default=1, help="samples per problem (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument(
        "--batch-size", type=int, default=16, help="problems per generate call (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau0", type=float, help="ReSET tau0 for configs that do not set it (see calibrate-tau)")
    p.add_argument("--t-low", type=float, help="ReSET T_low for configs that do not set it")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="SCHEME=PATH",
        help="use a saved FP4 checkpoint (fp4reason quantize) for SCHEME instead of quantizing",
    )
    p.add_argument("--backend", default="engine", choices=["engine", "hf", "vllm"])
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend only")
    p.add_argument("--out", help="results JSONL (default: runs/eval-<model>-<benchmark>-<split>.jsonl)")
    p.add_argument("--report", help="report path prefix for .md/.json/.png (default: --out without .jsonl)")
    p.add_argument("--title", default="")
    p.add_argument("--report-only", action="store_true", help="only summarize the records already in --out")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)


def _default_out(args) -> str:
    from pathlib import Path

    bench = Path(args.benchmark).stem if args.benchmark.endswith(".jsonl") else args.benchmark
    return f"runs/eval-{Path(str(args.model)).name}-{bench}-{args.split}.jsonl"


def _checkpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        scheme, eq, path = item.partition("=")
        if not eq or not path:
            raise ValueError(f"--checkpoint expects SCHEME=PATH, got '{item}'")
        out[scheme] = path
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fp4reason.eval.data import load_benchmark
    from fp4reason.eval.report import summarize, write_report
    from fp4reason.eval.runner import ModelPool, parse_config, read_records, run_eval

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    configs = [parse_config(s, tau0=args.tau0, t_low=args.t_low) for s in args.configs]
    out = Path(args.out or _default_out(args))
    if args.report_only:
        if not out.is_file():
            raise FileNotFoundError(f"no results file at {out}")
        records = read_records(out)
    else:
        problems = load_benchmark(args.benchmark, split=args.split, limit=args.limit)
        pool = ModelPool(
            args.model,
            args.backend,
            batch_size=args.batch_size,
            max_seq_len=args.max_new_tokens + 1024,
            tensor_parallel_size=args.tensor_parallel_size,
            checkpoints=_checkpoints(args.checkpoint),
        )
        print(f"{len(problems)} problems x {args.k} samples x {len(configs)} configs -> {out}")
        records = run_eval(
            configs,
            problems,
            pool,
            out,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.batch_size,
            seed=args.seed,
        )
        ids = {p.id for p in problems}
        records = [r for r in records if r["problem_id"] in ids and r["sample"] < args.k]
    summary = summarize(records, [c.name for c in configs], args.reference)
    if args.report_only:
        summary.update(results=str(out))
        title = args.title or out.stem
    else:
        summary.update(model=str(args.model), benchmark=args.benchmark, split=args.split, results=str(out))
        title = args.title or f"{args.model} / {args.benchmark} ({args.split})"
    prefix = args.report or str(out.with_suffix(""))
    paths = write_report(summary, prefix, title)
    print(Path(paths[0]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(map(str, paths)))
    return 0
