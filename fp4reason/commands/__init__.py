"""CLI subcommands, one per file; each exposes ``register(subparsers)``."""
