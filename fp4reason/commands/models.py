"""``fp4reason models``: list the embedded default models and prepare (convert and cache) one."""

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list or prepare the embedded default models")
    p.add_argument("--prepare", metavar="NAME", help="convert NAME to bf16 safetensors in the cache now")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fp4reason.models import DEFAULT_MODELS, cache_dir, prepare_default_model

    if args.prepare:
        print(prepare_default_model(args.prepare))
        return 0
    for spec in DEFAULT_MODELS.values():
        ready = (cache_dir() / "models" / spec.name / "config.json").is_file()
        try:
            spec.part_paths()
            state = "converted" if ready else "installed"
        except (ModuleNotFoundError, FileNotFoundError):
            state = "not installed"
        print(f"{spec.name:22s} {state:14s} {spec.description}")
        if state == "not installed":
            print(f"{'':22s} install: {spec.install}")
    return 0
