"""Graph rewrites: named rules the scheduler applies to the unrealized graph before fusing it."""
from __future__ import annotations


def rewrite(root) -> None:
    """Apply every rule to the graph under `root` (nodes are changed in place)."""
    return None
