"""fp4reason: large reasoning models in 4-bit floating point, fast and accurate."""

__version__ = "0.1.0"
