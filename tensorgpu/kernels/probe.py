"""Device probes: what this adapter can do at best, so every kernel's benchmark can say how far it
is from the limit on the same machine in the same run.

  copy      a trivial vec4 copy kernel: the practical memory bandwidth (copy_buffer_to_buffer is
            much slower on some drivers, e.g. ~850 GB/s vs ~3000 GB/s on an H100)
  fma_peak  independent vec4 FMA chains in registers, no memory traffic: the f32 FLOP/s ceiling

and the timing the benchmarks share:

  gpu_time_per_dispatch  GPU timestamps written at the beginning and end of one compute pass
            holding R copies of already-built dispatches: GPU time only. Wall clock cannot give
            this for short kernels, because dispatches are queued in Python and encoded at submit,
            so the CPU cost per dispatch (~5-10 us) never overlaps the GPU work.
  time_per_dispatch      wall-clock fallback: [wall(2R) - wall(R)] / R, which cancels the fixed
            submit + readback cost but includes the per-dispatch CPU cost.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import time
from typing import Callable, Optional, Sequence

import numpy as np
import wgpu

from .. import runtime
from ..runtime import Buffer

_COPY_WG = 256


def _copy_wgsl(n_vec4: int) -> str:
    return f"""@group(0) @binding(0) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@compute @workgroup_size({_COPY_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {{
    let i = ({runtime.WGSL_LINEAR_ID}) * {_COPY_WG}u + lid;
    if (i < {n_vec4}u) {{ dst[i] = src[i]; }}
}}
"""


def copy(dst: Buffer, src: Buffer, nbytes: int) -> runtime.Dispatch:
    """Queue a copy of the first `nbytes` (a multiple of 16) of src into dst, one vec4 per thread."""
    if nbytes % 16:
        raise ValueError(f"probe.copy: nbytes={nbytes} is not a multiple of 16")
    if nbytes > min(src.nbytes, dst.nbytes):
        raise ValueError(f"probe.copy: {nbytes} bytes do not fit src ({src.nbytes} B) / dst ({dst.nbytes} B)")
    if src is dst:
        raise ValueError("probe.copy: src and dst are the same buffer")
    n = nbytes // 16
    return runtime.dispatch("probe_copy", _copy_wgsl(n), [(dst, "rw"), (src, "read")], runtime.grid_for(-(-n // _COPY_WG)))


FMA_WG = 256
FMA_CHAINS = 8  # independent vec4 accumulators per thread (enough to cover FMA latency)


def _fma_wgsl(iters: int) -> str:
    decl = "".join(f"    var a{j} = vec4<f32>(x + {j}.0, x - {j}.0, x * {j + 1}.0, -x);\n" for j in range(FMA_CHAINS))
    body = "".join(f"        a{j} = fma(a{j}, m, c);\n" for j in range(FMA_CHAINS))
    total = " + ".join(f"a{j}" for j in range(FMA_CHAINS))
    # m and c come from memory so nothing can be folded at compile time; the final store is
    # conditional on a value that never occurs, so the chains are live but cost no bandwidth.
    return f"""@group(0) @binding(0) var<storage, read_write> buf: array<f32>;
@compute @workgroup_size({FMA_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {{
    let x = f32(lid) * 0.001 + f32(wid.x);
    let m = vec4<f32>(buf[0]);
    let c = vec4<f32>(buf[1]);
{decl}    for (var i = 0u; i < {iters}u; i++) {{
{body}    }}
    let s = {total};
    if (s.x == -1.2345e-30) {{ buf[2] = s.x + s.y + s.z + s.w; }}
}}
"""


def fma_peak(buf: Buffer, workgroups: int, iters: int) -> tuple:
    """Queue the FMA micro-kernel on `workgroups` x 256 threads; returns (FLOP count, Dispatch).
    `buf` (>= 16 bytes) must hold the multiplier and addend as f32 at [0] and [1] (e.g. 0.9999, 1e-4,
    so values stay finite)."""
    if buf.nbytes < 12:
        raise ValueError("probe.fma_peak: buf needs at least 3 f32 slots")
    d = runtime.dispatch("probe_fma", _fma_wgsl(iters), [(buf, "rw")], runtime.grid_for(workgroups))
    return 2 * 4 * FMA_CHAINS * iters * FMA_WG * workgroups, d


# ----------------------------------------------------------------------------- timing


def recorded(enqueue: Callable[[], None]) -> list:
    """The Dispatch objects `enqueue()` queues, for timestamped replay (gpu_time*): what every
    kernel benchmark times."""
    rec: list = []
    runtime._recorders.append(rec.append)
    try:
        enqueue()
    finally:
        runtime._recorders.remove(rec.append)
    return rec


def warm_up(enqueue: Callable[[], None], seconds: float = 0.3) -> None:
    """Run `enqueue` (queue one dispatch) back to back for `seconds`: compiles the pipeline and lifts
    the GPU clocks, which drop to a fraction within a second or two of short bursts."""
    t0 = time.perf_counter()
    n = 1
    while time.perf_counter() - t0 < seconds:
        for _ in range(n):
            enqueue()
        runtime.sync()
        n = min(n * 2, 256)


def _wall(enqueue, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        enqueue()
    runtime.sync()
    return time.perf_counter() - t


def time_per_dispatch(enqueue: Callable[[], None], target_s: float = 0.05, rounds: int = 5,
                      max_reps: int = 2000) -> float:
    """GPU seconds of one dispatch queued by `enqueue`: min over rounds of [wall(2R) - wall(R)] / R,
    R chosen so R dispatches take about `target_s`. Call after `warm_up`."""
    one = _wall(enqueue, 4) / 4
    reps = max(2, min(max_reps, int(target_s / max(one, 1e-7))))
    best = float("inf")
    for _ in range(rounds):
        t1 = _wall(enqueue, reps)
        t2 = _wall(enqueue, 2 * reps)
        best = min(best, (t2 - t1) / reps)
    if best <= 0:  # noise larger than the work: fall back to the uncorrected figure
        best = _wall(enqueue, reps) / reps
    return best


def has_timestamps() -> bool:
    return "timestamp-query" in runtime.get_device().features


def gpu_time(dispatches: Sequence[runtime.Dispatch], reps: int) -> float:
    """GPU seconds for `reps` repetitions of `dispatches` (Dispatch objects as returned by
    runtime.dispatch) encoded into one compute pass bracketed by timestamps. Pending work is
    flushed first; this submits its own command buffer and waits for it."""
    runtime.flush()
    dev = runtime.get_device()
    qs = dev.device.create_query_set(type=wgpu.QueryType.timestamp, count=2)
    resolve = dev.device.create_buffer(size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    stage = dev.device.create_buffer(size=16, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
    enc = dev.device.create_command_encoder()
    cp = enc.begin_compute_pass(timestamp_writes={"query_set": qs, "beginning_of_pass_write_index": 0,
                                                  "end_of_pass_write_index": 1})
    runtime.encode_dispatches(cp, list(dispatches) * reps)
    cp.end()
    enc.resolve_query_set(qs, 0, 2, resolve, 0)
    enc.copy_buffer_to_buffer(resolve, 0, stage, 0, 16)
    dev.queue.submit([enc.finish()])
    stage.map_sync(wgpu.MapMode.READ, 0, 16)
    try:
        t0, t1 = np.frombuffer(bytes(stage.read_mapped(0, 16, copy=True)), np.uint64)
    finally:
        stage.unmap()
    return float(int(t1) - int(t0)) * 1e-9   # wgpu normalises timestamps to nanoseconds


def gpu_time_per_dispatch(dispatches: Sequence[runtime.Dispatch], warmup_s: float = 0.3,
                          target_s: float = 0.05, rounds: int = 5) -> float:
    """Warm up for `warmup_s` of back-to-back GPU work (compiles nothing new; lifts the clocks),
    then the min over `rounds` of timestamped passes of R repetitions, R sized to ~target_s,
    divided by R. Falls back to wall-clock timing without the timestamp-query feature."""
    if not has_timestamps():
        def enqueue():
            for d in dispatches:
                runtime.replay([d])
        warm_up(enqueue, warmup_s)
        return time_per_dispatch(enqueue, target_s, rounds)
    one = max(gpu_time(dispatches, 2) / 2, 1e-7)
    reps = max(1, min(10000, int(target_s / one)))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        gpu_time(dispatches, reps)
    return min(gpu_time(dispatches, reps) for _ in range(rounds)) / reps


def gpu_clocks() -> Optional[str]:
    """`nvidia-smi` SM / memory clocks where available (the H100 throttles on bursty work)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--query-gpu=clocks.sm,clocks.mem", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def copy_bandwidth(nbytes: int) -> float:
    """Measured copy bandwidth in bytes/s (read + write) for buffers of `nbytes`; cached per process
    so other benchmarks can quote "% of copy bandwidth" from the same run."""
    src, dst = Buffer(nbytes), Buffer(nbytes)
    d = copy(dst, src, nbytes)
    return 2 * nbytes / gpu_time_per_dispatch([d])


@functools.lru_cache(maxsize=None)
def copy_bandwidth_cold(nbytes: int, total: int = 120 << 20) -> float:
    """Copy bandwidth in bytes/s (read + write) of back-to-back copies of `nbytes` each, cycling
    over enough buffer pairs (> `total` bytes together) that no copy finds its data in L2: what
    a copy achieves at one size, start-up and drain included (copy_bandwidth's large buffers hide
    both). Cached per process."""
    pairs = max(2, -(-total // (2 * nbytes)))
    bufs = [(Buffer(nbytes), Buffer(nbytes)) for _ in range(pairs)]
    ds = [copy(dst, src, nbytes) for dst, src in bufs]
    return 2 * nbytes * pairs / gpu_time_per_dispatch(ds)


@functools.lru_cache(maxsize=None)
def fma_flops(workgroups: int, iters: int) -> float:
    """Measured f32 FMA throughput in FLOP/s; cached per process."""
    buf = runtime.upload(np.array([0.9999, 1e-4, 0.0, 0.0], np.float32))
    flops, d = fma_peak(buf, workgroups, iters)
    return flops / gpu_time_per_dispatch([d])


def bench_dispatches(benchmark, dispatches, reps: int = 10) -> float:
    """GPU seconds per repetition of `dispatches` (timestamps, after a warm-up), plus a
    pytest-benchmark wall-clock entry for `reps` replays and a sync (the benchmarks' table)."""
    t = gpu_time_per_dispatch(dispatches)

    def step():
        for _ in range(reps):
            runtime.replay(dispatches)
        runtime.sync()
    benchmark.pedantic(step, rounds=3, iterations=1)
    return t
