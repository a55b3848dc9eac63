"""Adapters that plug fp4reason into serving engines (vLLM); each imports its engine lazily."""
