"""What a user inspects: the kernels a block of code dispatched and cumulative counters."""
from __future__ import annotations

from contextlib import contextmanager

from . import runtime


@contextmanager
def kernel_log():
    """Collect every kernel dispatched inside the block: entries have .name, .wgsl,
    .workgroups (grid) and .buffers (bindings)."""
    log: list = []
    runtime._kernel_logs.append(log)
    try:
        yield log
    finally:
        runtime._kernel_logs.remove(log)


def stats() -> dict:
    """Cumulative counters: kernels_dispatched, pipelines_compiled, buffers_allocated,
    bytes_allocated, bind_groups_created, submits, readbacks, captures_traced/replayed,
    plus live_bytes (bytes held by live tensors right now)."""
    s = dict(runtime.STATS)
    s["live_bytes"] = runtime.live_bytes()
    return s
