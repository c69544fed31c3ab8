"""A project module that only `recipes.stamps` imports: editing it rebuilds the stamp stage and nothing else."""

from __future__ import annotations


def banner(text: str) -> str:
    return f"== {text} ==\n"
