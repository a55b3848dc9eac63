"""The ``fp4reason`` command line: one subcommand per file in ``fp4reason.commands``."""

import argparse
import importlib
import sys

COMMANDS = [
    "demo",
    "quantize",
    "info",
    "generate",
    "chat",
    "calibrate_tau",
    "eval",
    "analyze",
    "train",
    "qfit",
    "models",
]


def build_parser() -> argparse.ArgumentParser:
    from fp4reason import __version__

    parser = argparse.ArgumentParser(
        prog="fp4reason",
        description="Run large reasoning models in 4-bit floating point (NVFP4, MXFP4), fast and accurate.",
    )
    parser.add_argument("--version", action="version", version=f"fp4reason {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fp4reason.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, ModuleNotFoundError, TypeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"fp4reason {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
