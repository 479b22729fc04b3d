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


def describe(t) -> str:
    """A tensor described without computing it (what `repr` printed before it showed values):
    shape, dtype, realized / lazy (and the op) / pending in-place write, and its view."""
    from .printing import describe as _describe
    return _describe(t)


def schedule(*tensors):
    """The kernels that realize `tensors` (together, in one schedule), in order: planned by the
    scheduler after the graph rewrites, then run. Print it to see each kernel's name, grid,
    storage buffers and runtime parameters; tensors already realized give an empty schedule."""
    from .schedule import schedule as plan
    from .tensor import _sink
    root = _sink(tensors)
    s = plan(root)
    s.run()
    return s


@contextmanager
def tuning(knobs: dict, **values):
    """Set a kernel module's tuning knobs (its TUNING dict) inside the block and restore every
    knob after it, whatever the block changed: `with tg.debug.tuning(matmul.TUNING, split_k=2):`."""
    old = dict(knobs)
    knobs.update(values)
    try:
        yield knobs
    finally:
        knobs.clear()
        knobs.update(old)


def stats() -> dict:
    """Cumulative counters: kernels_dispatched, pipelines_compiled, buffers_allocated,
    bytes_allocated, bind_groups_created, submits, readbacks, captures_traced/replayed,
    plus live_bytes (bytes held by live tensors right now)."""
    s = dict(runtime.STATS)
    s["live_bytes"] = runtime.live_bytes()
    return s


class Profile(list):
    """(kernel name, GPU ns) per dispatch, from timestamps written between dispatches."""

    def table(self, top: int = 25) -> str:
        agg: dict = {}
        for name, ns in self:
            key = name.split("[")[0]
            t, c = agg.get(key, (0, 0))
            agg[key] = (t + ns, c + 1)
        total = sum(t for t, _ in agg.values()) or 1
        rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
        lines = [f"{'kernel':40s} {'calls':>6s} {'total us':>10s} {'us/call':>9s} {'%':>6s}"]
        for k, (t, c) in rows:
            lines.append(f"{k[:40]:40s} {c:6d} {t / 1e3:10.1f} {t / 1e3 / c:9.2f} {100 * t / total:6.1f}")
        lines.append(f"{'total':40s} {sum(c for _, c in agg.values()):6d} {total / 1e3:10.1f}")
        return "\n".join(lines)


@contextmanager
def profile():
    """GPU time per dispatch of everything submitted inside the block (needs the adapter's
    timestamp-query-inside-passes feature; adds a timestamp per dispatch, so use it to find
    the slow kernels, not for headline numbers)."""
    if "timestamp-query-inside-passes" not in runtime.get_device().features:
        raise RuntimeError("tg.debug.profile() needs the timestamp-query-inside-passes feature")
    p = Profile()
    runtime.flush()
    runtime._profilers.append(p)
    try:
        yield p
        runtime.flush()
        runtime._collect_profile()
    finally:
        runtime._profilers.remove(p)


def trim() -> int:
    """Give every free pooled GPU buffer (and free staging buffer) back to the driver now;
    returns the bytes released. Buffers of live tensors and captures are kept. The pool also
    trims itself when its free bytes pass `runtime.OPTIONS.pool_high_water`."""
    return runtime.trim()


def memory() -> dict:
    """GPU bytes held: `live` (in tensors and caches), `free` (pooled for reuse), `captured`
    (reserved for the replays of live tg.capture traces), `held` (allocated and not released:
    the sum of the three), and `pipelines` (compiled pipelines cached)."""
    return dict(runtime.pool_bytes(), pipelines=len(runtime._pipelines))
