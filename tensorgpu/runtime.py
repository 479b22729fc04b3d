"""The only module that talks to wgpu: adapter and limits, buffer pool, pipeline and bind-group
caches, the queue of pending dispatches, and readback.

Why a pending queue: WebGPU charges ~60-90 us per submit and ~25 us per extra compute pass, so
every dispatch produced by any number of realizes is appended to one list and encoded into ONE
command encoder / ONE compute pass / ONE submit when a value is read back (or `flush()` is
called). Program order is kept by the order of the list; wgpu inserts the barriers between
dispatches of one pass. Buffers referenced by pending dispatches are kept alive until the
submit so the pool never hands them out early.

Threads: every piece of shared state here (the pending queue, the pool and arenas, the caches,
capture recorders, staging buffers, the lazy device) is guarded by ONE re-entrant lock, `LOCK`.
Entry points that touch it take it (`flush`, `read`, `read_later`, `Ticket.result`, `write`,
`dispatch`, `replay`, Buffer allocation and release, device creation; schedule.realize and
capture's __call__ above them), so any number of threads may use tensors and sessions; work
from different threads is interleaved per entry point, never inside one. Re-entrant because
realize -> dispatch -> flush nest. Uncontended, an acquire costs ~0.1 us.
"""
from __future__ import annotations

import collections
import functools
import heapq
import itertools
import os
import threading
import time
from collections import OrderedDict
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

from . import wgpu_unlock  # noqa: E402

wgpu_unlock.unlock()      # before anything loads wgpu-native (see wgpu_unlock: tensor cores)

import wgpu  # noqa: E402

MAX_WORKGROUPS_PER_DIM = 65535

LOCK = threading.RLock()   # see the module docstring: the one lock around all shared state

# Finalizers (Buffer/Tensor/trace __del__) that found LOCK held by another thread. A destructor
# runs wherever the garbage collector runs: possibly on wgpu's poll thread while another thread
# holds LOCK and waits on that very thread for a readback. Waiting there would deadlock, so the
# finalizer is queued and the next thread to take LOCK through an entry point runs it.
_DEFERRED: "collections.deque" = collections.deque()


def run_or_defer(fn: Callable[[], None]) -> None:
    """Run fn holding LOCK if that needs no wait (this thread holds it already, or nobody
    does); else queue it for the next locked entry point. For finalizers only."""
    if LOCK.acquire(blocking=False):
        try:
            fn()
        finally:
            LOCK.release()
    else:
        _DEFERRED.append(fn)


def _run_deferred() -> None:
    """Run the queued finalizers (LOCK held)."""
    while _DEFERRED:
        try:
            fn = _DEFERRED.popleft()
        except IndexError:
            return
        try:
            fn()
        except Exception:  # a finalizer never raises into the caller
            pass


def locked(fn: Callable) -> Callable:
    """Run `fn` holding LOCK (a decorator for the module's entry points); finalizers deferred
    by other threads run first."""
    import functools

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with LOCK:
            if _DEFERRED:
                _run_deferred()
            return fn(*args, **kwargs)
    return inner


class NoAdapterError(RuntimeError):
    """No WebGPU adapter (Vulkan, Metal, DX12) could be found or the one asked for is absent."""


# ----------------------------------------------------------------------------- statistics


class Stats(dict):
    """Cumulative counters a user (or a test) inspects through `tg.debug.stats()`."""

    KEYS = ("kernels_dispatched", "pipelines_compiled", "buffers_allocated", "bytes_allocated",
            "bind_groups_created", "submits", "readbacks", "captures_traced", "captures_replayed",
            "bytes_released", "pipelines_evicted")

    def __init__(self):
        super().__init__({k: 0 for k in self.KEYS})


STATS = Stats()
_kernel_logs: list = []  # active tg.debug.kernel_log() collectors


@dataclass
class KernelLogEntry:
    name: str
    wgsl: str
    workgroups: tuple
    buffers: int


# ----------------------------------------------------------------------------- device


@dataclass
class Options:
    """Soft switches for code generation, so tests can force the fallback paths on an adapter
    that has the features (lavapipe has shader-f16 and subgroups). They change the generated
    WGSL only; storage layouts are identical either way (f16 packed two per u32 word has the
    same bytes as array<f16>)."""
    use_f16: bool = True
    use_subgroups: bool = True
    use_coopmat: bool = True   # tensor-core matmuls where the adapter has them (Device.has_coopmat)
    max_storage_buffers: Optional[int] = None  # None: the adapter's limit
    # shader modules without naga's runtime checks (index clamping, loop bounding) on wgpu-native:
    # generated code indexes inside its bindings by construction, and the checks cost 4-5% of a
    # decode step's GPU time on the H200 (RESULTS.md, seventh session). TENSORGPU_TRUSTED_SHADERS=0
    # keeps them (a kernel bug then reads clamped values instead of another binding's memory).
    trusted_shaders: bool = True
    # memory bounds (ARCHITECTURE.md, "Memory bounds"): compiled pipelines kept (least recently
    # used dropped first), and bytes of free buffers the pool keeps for reuse (beyond it, the
    # oldest free buffers are released to the driver)
    max_pipelines: int = int(os.environ.get("TENSORGPU_MAX_PIPELINES", "512"))
    pool_high_water: int = int(os.environ.get("TENSORGPU_POOL_HIGH_WATER", str(256 << 20)))


OPTIONS = Options(
    use_f16=os.environ.get("TENSORGPU_DISABLE_F16", "") in ("", "0"),
    use_subgroups=os.environ.get("TENSORGPU_DISABLE_SUBGROUPS", "") in ("", "0"),
    use_coopmat=os.environ.get("TENSORGPU_DISABLE_COOPMAT", "") in ("", "0"),
    max_storage_buffers=int(os.environ["TENSORGPU_MAX_STORAGE_BUFFERS"]) if os.environ.get("TENSORGPU_MAX_STORAGE_BUFFERS") else None,
    trusted_shaders=os.environ.get("TENSORGPU_TRUSTED_SHADERS", "1") not in ("", "0"),
)


class Device:
    """The wgpu adapter + device, requested with the adapter's own limits and useful features."""

    WANTED_FEATURES = ("shader-f16", "subgroup", "timestamp-query", "timestamp-query-inside-passes", "pipeline-cache")

    def __init__(self):
        coop_lib = wgpu_unlock.STATE["patched"]
        adapters = [a for a in wgpu.gpu.enumerate_adapters_sync()]
        want = os.environ.get("TENSORGPU_ADAPTER", "")
        if want:
            chosen = [a for a in adapters if want.lower() in a.info["device"].lower()
                      or want.lower() in a.info["backend_type"].lower()]
            if not chosen:
                names = ", ".join(f"{a.info['device']} ({a.info['backend_type']})" for a in adapters) or "none"
                raise NoAdapterError(f"TENSORGPU_ADAPTER={want!r} matches no adapter; found: {names}")
            adapter = chosen[0]
        else:
            non_gl = [a for a in adapters if a.info["backend_type"] != "OpenGL"]
            adapter = None
            if non_gl:
                adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
                if adapter is None or adapter.info["backend_type"] == "OpenGL":
                    adapter = non_gl[0]
        if adapter is None:
            raise NoAdapterError(
                "no WebGPU adapter found (Vulkan, Metal or DX12). On Linux without a GPU install "
                "Mesa's software Vulkan driver: `apt-get install -y mesa-vulkan-drivers`; with a GPU, "
                "install its Vulkan driver. TENSORGPU_ADAPTER=<substring> picks one of several.")
        self.adapter = adapter
        features = [f for f in self.WANTED_FEATURES if f in adapter.features]
        if coop_lib and OPTIONS.use_coopmat and "cooperative-matrix" in adapter.features and "shader-f16" in features:
            features.append("cooperative-matrix")
        limit_names = ("max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage",
                       "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
                       "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
                       "max-compute-workgroups-per-dimension", "max-bindings-per-bind-group")
        limits = {k: adapter.limits[k] for k in limit_names if k in adapter.limits}
        self.device = adapter.request_device_sync(required_features=features, required_limits=limits)
        self.queue = self.device.queue
        self.features = set(self.device.features)
        self.limits = dict(self.device.limits)
        info = adapter.info
        self.name = info["device"]
        self.backend = info["backend_type"]
        self.adapter_type = info["adapter_type"]

    @property
    def has_f16(self) -> bool:
        return "shader-f16" in self.features and OPTIONS.use_f16

    @functools.cached_property
    def _coopmat_works(self) -> bool:
        from .kernels import matmul_coop
        with LOCK:      # the self-test submits and reads back: wgpu work, so under the one lock
            return matmul_coop.self_test(self)

    @property
    def has_coopmat(self) -> bool:
        """Tensor cores through wgpu's cooperative matrices: the feature was granted (see
        wgpu_unlock), f16 is on, and the 16x16 f16 -> f32 kernel shape passed its self-test."""
        return ("cooperative-matrix" in self.features and OPTIONS.use_coopmat and self.has_f16
                and self._coopmat_works)

    @property
    def has_subgroups(self) -> bool:
        return "subgroup" in self.features and OPTIONS.use_subgroups

    @property
    def max_storage_buffers(self) -> int:
        lim = int(self.limits["max-storage-buffers-per-shader-stage"])
        return min(lim, OPTIONS.max_storage_buffers) if OPTIONS.max_storage_buffers else lim

    @property
    def max_binding_size(self) -> int:
        return int(self.limits["max-storage-buffer-binding-size"])

    @property
    def max_workgroup_storage(self) -> int:
        return int(self.limits["max-compute-workgroup-storage-size"])

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "adapter_type": self.adapter_type,
                "limits": dict(self.limits), "features": sorted(self.features),
                "f16": self.has_f16, "subgroups": self.has_subgroups, "coopmat": self.has_coopmat,
                "trusted_shaders": OPTIONS.trusted_shaders}


_DEVICE: Optional[Device] = None


def get_device() -> Device:
    global _DEVICE
    d = _DEVICE
    if d is None:
        with LOCK:   # double-checked: two threads' first ops must not create two devices
            if _DEVICE is None:
                _DEVICE = Device()
            d = _DEVICE
    return d


# ----------------------------------------------------------------------------- buffers


def _size_class(nbytes: int) -> int:
    """Round up so buffers of similar size share a pool slot: 256 B granularity below 64 KiB,
    then steps of 1/8 of the power of two (at most 12.5% waste)."""
    n = max(int(nbytes), 16)
    if n <= 65536:
        return (n + 255) // 256 * 256
    step = 1 << (n.bit_length() - 4)
    return (n + step - 1) // step * step


class _Pool:
    def __init__(self):
        self.free: dict[int, list] = {}
        self.bytes_held = 0
        # every GPUBuffer ever made stays referenced here, so the garbage collector can never
        # finalize (release) one that a dying Buffer wrapper is about to hand back to the pool
        self.all: list = []
        self.index: dict = {}   # id(GPUBuffer) -> creation order

    def take(self, size: int):
        # the oldest free buffer of the size class: a program that allocates the same way each
        # step then gets the same buffers each step, so its bind groups come from the cache
        lst = self.free.get(size)
        if lst:
            self.free_bytes -= size
            return heapq.heappop(lst)[1]
        dev = get_device()
        if size > int(dev.limits["max-buffer-size"]):
            raise MemoryError(f"buffer of {size} bytes exceeds the device's max_buffer_size {dev.limits['max-buffer-size']}")
        buf = dev.device.create_buffer(size=size, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST)
        self.index[id(buf)] = len(self.all)
        self.all.append(buf)
        STATS["buffers_allocated"] += 1
        STATS["bytes_allocated"] += size
        self.bytes_held += size
        return buf

    def give(self, size: int, buf) -> None:
        heapq.heappush(self.free.setdefault(size, []), (self.index[id(buf)], buf))
        self.free_bytes += size
        if self.free_bytes > OPTIONS.pool_high_water:
            self.trim(OPTIONS.pool_high_water // 2)

    free_bytes = 0

    def trim(self, keep: int = 0) -> int:
        """Release free buffers (largest size classes first) until at most `keep` bytes of free
        buffers remain; returns the bytes released. Bind groups cached over a released buffer
        are dropped with it (its id may be reused by a later buffer)."""
        gone: set = set()
        released = 0
        for size in sorted(self.free, reverse=True):
            lst = self.free[size]
            while lst and self.free_bytes > keep:
                _, buf = heapq.heappop(lst)
                gone.add(id(buf))
                self.all[self.index.pop(id(buf))] = None
                self.free_bytes -= size
                self.bytes_held -= size
                released += size
            if not lst:
                del self.free[size]
        # the count from the lists themselves: a Buffer finalized while a pool call was under way
        # (the garbage collector runs finalizers at any allocation, in any thread) can leave the
        # running count off, and a phantom count would keep free bytes above the high-water mark
        self.free_bytes = sum(size * len(lst) for size, lst in self.free.items())
        if gone:
            for k in [k for k in _bind_groups if not gone.isdisjoint(k[1])]:
                del _bind_groups[k]
            STATS["bytes_released"] += released
        return released


POOL = _Pool()
_live_bytes = [0]


class Arena:
    """The GPU buffers one capture's kernels use.

    While a capture traces, buffers freed by dying tensors come back here instead of the pool
    and are handed out again to later allocations of the same trace, so a replayed kernel list
    needs about as much memory as one eager run needs at its peak (not the sum of every
    intermediate it ever made). Once the trace is recorded, buffers whose tensors die stay
    reserved for the replays; `release()` (the trace is gone) gives them back to the pool."""

    def __init__(self):
        _all_arenas.add(self)
        self.tracing, self.released = True, False
        self.free: dict = {}     # size class -> GPU buffers free for reuse inside the trace
        self.idle: list = []     # (size class, GPU buffer) reserved for the replays
        self.reused: set = set()  # ids of GPU buffers handed out a second time in this trace
        self.pinned: set = set()  # ids of GPU buffers the host wrote: never handed out again

    def take(self, size: int):
        lst = self.free.get(size)
        if not lst:
            return POOL.take(size)
        buf = lst.pop()
        self.reused.add(id(buf))
        return buf

    def give(self, size: int, buf) -> None:
        if self.released:
            POOL.give(size, buf)
        elif self.tracing and id(buf) not in self.pinned:
            self.free.setdefault(size, []).append(buf)
        else:
            self.idle.append((size, buf))

    def host_write(self, buf: "Buffer") -> None:
        """A host write lands in `buf` during the trace. Replays do not repeat it, so no
        replayed kernel may share its GPU buffer: a reused one is swapped for a fresh one
        (before any kernel bound it: an upload), and the buffer is never handed out again."""
        if id(buf.gpu) in self.reused:
            if _bound_in_trace[0] is not None and buf in _bound_in_trace[0]:
                raise RuntimeError(f"host write into a {buf.nbytes}-byte buffer that kernels of this tg.capture "
                                   "trace also use for another tensor: write into a fresh tensor instead")
            self.free.setdefault(buf.capacity, []).append(buf.gpu)
            buf.gpu = POOL.take(buf.capacity)
        self.pinned.add(id(buf.gpu))

    def close(self) -> None:
        """The trace is recorded: nothing more is handed out."""
        self.tracing = False
        self.idle += [(size, b) for size, lst in self.free.items() for b in lst]
        self.free = {}

    def release(self) -> None:
        if not self.released:
            self.close()
            self.released = True
            for size, b in self.idle:
                POOL.give(size, b)
            self.idle = []


_arenas: list = []   # the arenas of the captures tracing now (innermost last)
_all_arenas: "weakref.WeakSet" = weakref.WeakSet()   # every arena not yet collected (memory accounting)
_bound_in_trace: list = [None]   # WeakSet of the Buffers kernels bound while a capture traces


@contextmanager
def untraced():
    """Work that is not part of the capture being traced (one-time constants cached for the
    life of a weight): not recorded, not logged, and its buffers come from the global pool."""
    saved = (list(_recorders), list(_kernel_logs), list(_arenas))
    del _recorders[:], _kernel_logs[:], _arenas[:]
    _collectors.append(None)     # dispatched now, not into the schedule being planned
    try:
        yield
    finally:
        _collectors.pop()
        _recorders[:], _kernel_logs[:], _arenas[:] = saved


class Buffer:
    """A GPU storage buffer holding `nbytes` bytes (capacity rounded up). Returned to the pool
    (or to the arena of the capture that made it) when the last Python reference goes away."""

    __slots__ = ("gpu", "nbytes", "capacity", "arena", "__weakref__")

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.capacity = _size_class(self.nbytes)
        with LOCK:
            self.arena = _arenas[-1] if _arenas else None
            self.gpu = (self.arena or POOL).take(self.capacity)
            _live_bytes[0] += self.capacity

    def __del__(self):
        try:
            run_or_defer(functools.partial(_give_back, self.arena or POOL, self.capacity, self.gpu))
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self):
        return f"Buffer({self.nbytes} B)"


def _give_back(owner, capacity: int, gpu) -> None:
    owner.give(capacity, gpu)
    _live_bytes[0] -= capacity


def live_bytes() -> int:
    """Bytes held by live Buffers (not counting free pool slots)."""
    return _live_bytes[0]


def _byte_view(data) -> memoryview:
    """Host bytes of an ndarray (any shape, empty included) or a bytes-like object."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def upload(data, nbytes: Optional[int] = None) -> Buffer:
    """A new Buffer filled with `data` (bytes-like or ndarray), padded to a multiple of 4 bytes."""
    mv = _byte_view(data)
    n = len(mv) if nbytes is None else nbytes
    buf = Buffer(max(n, 4))
    write(buf, mv)
    return buf


@locked
def write(buf: Buffer, data, offset: int = 0) -> None:
    """Write host bytes into `buf` at byte `offset`, after every pending dispatch that uses it."""
    mv = _byte_view(data)
    if id(buf) in _pending_ids:
        flush()
    if buf.arena is not None and buf.arena.tracing:
        buf.arena.host_write(buf)
    n = len(mv)
    if n == 0:
        return
    if n % 4 or offset % 4:
        start, end = offset - offset % 4, (offset + n + 3) // 4 * 4
        cur = bytearray(read(buf, start, end - start)) if (offset % 4 or (offset + n) % 4) else bytearray(end - start)
        cur[offset - start: offset - start + n] = mv
        mv, offset = memoryview(bytes(cur)), start
    get_device().queue.write_buffer(buf.gpu, offset, mv)


# ----------------------------------------------------------------------------- pipelines


_pipeline_uids = itertools.count()


@dataclass
class Pipeline:
    pipeline: object
    layout: object
    wgsl: str
    name: str
    # what bind groups are cached under: a serial, never a Python id a later pipeline could reuse
    uid: int = field(default_factory=lambda: next(_pipeline_uids))


_pipelines: "OrderedDict" = OrderedDict()   # least recently used first; OPTIONS.max_pipelines of them
_bind_groups: dict = {}


def pipeline(name: str, wgsl: str, access: Sequence[str], entry: str = "main") -> Pipeline:
    """Compile (once) a compute pipeline. `access[i]` is "read" or "rw" for `@binding(i)` of
    group 0; the layout is explicit so unused bindings never break bind-group creation."""
    key = (wgsl, tuple(access), entry, OPTIONS.trusted_shaders)
    p = _pipelines.get(key)
    if p is not None:
        _pipelines.move_to_end(key)
        return p
    dev = get_device()
    types = {"read": wgpu.BufferBindingType.read_only_storage, "rw": wgpu.BufferBindingType.storage,
             "uniform": wgpu.BufferBindingType.uniform}
    entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": types[a]}}
               for i, a in enumerate(access)]
    bgl = dev.device.create_bind_group_layout(entries=entries)
    layout = dev.device.create_pipeline_layout(bind_group_layouts=[bgl])
    try:
        module = _shader_module(dev.device, wgsl, name)
        pipe = dev.device.create_compute_pipeline(layout=layout, compute={"module": module, "entry_point": entry}, label=name)
    except Exception as e:
        raise RuntimeError(f"tensorgpu internal error: WGSL of kernel {name!r} failed to compile:\n{e}\n--- source ---\n{wgsl}") from e
    STATS["pipelines_compiled"] += 1
    p = Pipeline(pipe, bgl, wgsl, name)
    _pipelines[key] = p
    while len(_pipelines) > max(OPTIONS.max_pipelines, 1):
        # least recently used first; a Dispatch (a capture's, a queued one) keeps its own
        # Pipeline alive, so eviction only costs a recompile if the source is seen again
        old = _pipelines.popitem(last=False)[1]
        for k in [k for k in _bind_groups if k[0] == old.uid]:
            del _bind_groups[k]
        STATS["pipelines_evicted"] += 1
    return p


def _shader_module(device, wgsl: str, name: str):
    """The WGSL module, through wgpu-native's wgpuDeviceCreateShaderModuleTrusted without runtime
    checks when OPTIONS.trusted_shaders: naga then neither clamps every storage index nor adds a
    counter to every loop (ShaderRuntimeChecks None). Another backend: the checked module."""
    if not OPTIONS.trusted_shaders:
        return device.create_shader_module(code=wgsl, label=name)
    try:
        from wgpu.backends.wgpu_native import _api
        from wgpu.backends.wgpu_native._api import ffi, lib, libf
    except Exception:   # noqa: BLE001 -- not wgpu-native: the checked module
        return device.create_shader_module(code=wgsl, label=name)
    src = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(wgsl))
    src[0].chain.next = ffi.NULL
    src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
    desc = _api.new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=ffi.cast("WGPUChainedStruct *", src),
                             label=_api.to_c_string_view(name))
    handle = libf.wgpuDeviceCreateShaderModuleTrusted(device._internal, desc, 0)   # WGPUShaderRuntimeChecks_None
    if handle == ffi.NULL:
        raise RuntimeError(f"wgpuDeviceCreateShaderModuleTrusted refused kernel {name!r}")
    return _api.GPUShaderModule(name, handle, device)


def _bind_group(p: Pipeline, buffers: Sequence[Buffer]):
    key = (p.uid, tuple(getattr(b, "uid", None) or id(b.gpu) for b in buffers), tuple(b.capacity for b in buffers),
           tuple(getattr(b, "offset", 0) for b in buffers))
    bg = _bind_groups.get(key)
    if bg is None:
        dev = get_device()
        lim = dev.max_binding_size
        entries = []
        for i, b in enumerate(buffers):
            size = b.capacity
            if size > lim:
                size = (min(b.nbytes, lim) + 3) // 4 * 4
                if b.nbytes > lim:
                    raise ValueError(f"kernel {p.name!r}: binding {i} is {b.nbytes} bytes, over the device's "
                                     f"max_storage_buffer_binding_size of {lim} bytes")
            entries.append({"binding": i, "resource": {"buffer": b.gpu, "offset": getattr(b, "offset", 0), "size": size}})
        bg = dev.device.create_bind_group(layout=p.layout, entries=entries)
        STATS["bind_groups_created"] += 1
        if len(_bind_groups) >= 8192:  # bounded: drop the oldest half (captures hold their own)
            for k in list(_bind_groups)[:4096]:
                del _bind_groups[k]
        _bind_groups[key] = bg
    return bg


def grid_for(n_workgroups: int) -> tuple:
    """A launch grid for `n_workgroups` workgroups, 2-D past 65,535. Kernels recover the linear
    id as `wid.x + wid.y * nwg.x` (see WGSL_LINEAR_ID) and must bounds-check it."""
    n = max(int(n_workgroups), 1)
    if n <= MAX_WORKGROUPS_PER_DIM:
        return (n, 1, 1)
    y = (n + MAX_WORKGROUPS_PER_DIM - 1) // MAX_WORKGROUPS_PER_DIM
    x = (n + y - 1) // y
    if y > MAX_WORKGROUPS_PER_DIM:
        raise ValueError(f"launch of {n} workgroups exceeds 65535 x 65535")
    return (x, y, 1)


WGSL_LINEAR_ID = "wid.x + wid.y * nwg.x"


# ----------------------------------------------------------------------------- dispatch queue


@dataclass
class Dispatch:
    pipe: Pipeline
    buffers: tuple
    grid: tuple
    bind_group: object = None
    writes: tuple = ()      # ids of the buffers bound read_write (ordering against pending readbacks)
    raw: tuple = ()         # (pipeline handle, bind group handle, x, y, z): what _encode passes on

    def __post_init__(self):
        if self.bind_group is not None:
            self.raw = (self.pipe.pipeline._internal, self.bind_group._internal) + tuple(self.grid)


@dataclass
class ScheduledKernel:
    """One kernel launch the scheduler planned: what `dispatch` will be called with."""
    name: str
    wgsl: str
    bindings: tuple      # (Buffer, "read" | "rw") in @binding order
    grid: tuple
    params: tuple = ()   # (value, compute type): the kernel's parameter uniform

    def __repr__(self):
        n = sum(1 for _ in self.bindings)
        p = f", {len(self.params)} params" if self.params else ""
        return f"{self.name} grid={self.grid} buffers={n}{p}"


_collectors: list = []  # schedule.py: the kernel lists being planned (innermost last; None = run)
_pending: list = []
_pending_ids: set = set()
SUBMIT_EVERY = int(os.environ.get("TENSORGPU_SUBMIT_EVERY", "64"))
_recorders: list = []  # capture.py hooks: callables(Dispatch)
_tracing = [0]         # > 0 while tg.capture traces a function


@locked
def dispatch(name: str, wgsl: str, bindings: Sequence[tuple], grid: tuple, params: Sequence[tuple] = ()) -> Dispatch:
    """Append one kernel launch to the pending queue.

    bindings: sequence of (Buffer, "read" | "rw") in @binding order (group 0).
    grid: workgroup counts (x, y, z); use `grid_for(n)` for a linear count.
    params: (value, "f32" | "i32" | "u32") runtime values the kernel reads from the uniform
    bound after the storage bindings (tensorgpu/params.py); values may be step variables.
    """
    if _collectors and _collectors[-1] is not None:
        # the scheduler is planning: record the launch, run nothing (schedule.Schedule.run)
        _collectors[-1].append(ScheduledKernel(name, wgsl, tuple(bindings), tuple(grid), tuple(params)))
        return None
    if params:
        from .params import binding_for
        bindings = list(bindings) + [(binding_for(get_device().device, params), "uniform")]
    access = tuple(a for _, a in bindings)
    bufs = tuple(b for b, _ in bindings)
    p = pipeline(name, wgsl, access)
    if any(g > MAX_WORKGROUPS_PER_DIM for g in grid):
        raise ValueError(f"kernel {name!r}: grid {grid} exceeds 65535 workgroups per dimension")
    d = Dispatch(p, bufs, tuple(grid), _bind_group(p, bufs), tuple(id(b) for b, a in bindings if a == "rw"))
    if 0 in grid:
        return d
    if _copy_srcs and not _copy_srcs.isdisjoint(d.writes):
        flush()   # a queued readback of a buffer this kernel overwrites must see the old bytes
    _pending.append(d)
    _pending_ids.update(id(b) for b in bufs)
    if _bound_in_trace[0] is not None:
        _bound_in_trace[0].update(bufs)
    STATS["kernels_dispatched"] += 1
    if len(_pending) >= SUBMIT_EVERY:
        # a long realize (a model's prefill) submits as it goes, so the GPU starts on the first
        # layers while Python is still scheduling the last ones
        flush()
    for log in _kernel_logs:
        log.append(KernelLogEntry(name, wgsl, tuple(grid), sum(a != "uniform" for a in access)))
    for rec in _recorders:
        rec(d)
    return d


@locked
def replay(dispatches: Sequence[Dispatch], ids: Optional[frozenset] = None, writes: Optional[frozenset] = None) -> None:
    """Queue already-built dispatches again (capture replay): no codegen, no new bind groups.
    ids / writes: the ids of every buffer the list binds / binds read_write, when the caller
    keeps them (a capture computes them once instead of per replay)."""
    if writes is None:
        writes = frozenset(i for d in dispatches for i in d.writes)
    if ids is None:
        ids = frozenset(id(b) for d in dispatches for b in d.buffers)
    if _copy_srcs and not _copy_srcs.isdisjoint(writes):
        flush()   # readbacks queued before this replay see the buffers before it
    _pending.extend(dispatches)
    _pending_ids.update(ids)
    STATS["kernels_dispatched"] += len(dispatches)


_profilers: list = []   # active tg.debug.profile() collectors


def _encode(encoder) -> None:
    if not _pending:
        return
    if _profilers:
        return _encode_profiled(encoder)
    cp = encoder.begin_compute_pass()
    encode_dispatches(cp, _pending)
    cp.end()


def encode_dispatches(cp, dispatches: Sequence[Dispatch]) -> None:
    """Record `dispatches` into the open compute pass `cp` (a pipeline is set only when it
    changes)."""
    if _RAW is not None:
        # straight to wgpu-native: wgpu-py's wrappers cost several us per call, and a decode
        # step encodes a few hundred dispatches
        set_pipe, set_bg, disp, null = _RAW
        h = cp._internal
        last = None
        for p, bg, x, y, z in [d.raw for d in dispatches]:
            if p is not last:
                set_pipe(h, p)
                last = p
            set_bg(h, 0, bg, 0, null)
            disp(h, x, y, z)
    else:
        last = None
        for d in dispatches:
            if d.pipe is not last:
                cp.set_pipeline(d.pipe.pipeline)
                last = d.pipe
            cp.set_bind_group(0, d.bind_group)
            cp.dispatch_workgroups(*d.grid)


def _raw_entry_points():
    try:
        from wgpu.backends.wgpu_native._api import ffi, libf
        return (libf.wgpuComputePassEncoderSetPipeline, libf.wgpuComputePassEncoderSetBindGroup,
                libf.wgpuComputePassEncoderDispatchWorkgroups, ffi.NULL)
    except Exception:  # another wgpu backend: use the public API
        return None


_RAW = _raw_entry_points() if os.environ.get("TENSORGPU_RAW_ENCODE", "1") != "0" else None


def _encode_profiled(encoder) -> None:
    """Same pass, with a GPU timestamp between dispatches (timestamp-query-inside-passes);
    the per-kernel times land in the active profilers after the submit completes."""
    dev = get_device()
    n = len(_pending)
    qs = dev.device.create_query_set(type=wgpu.QueryType.timestamp, count=n + 1)
    cp = encoder.begin_compute_pass()
    cp._write_timestamp(qs, 0)
    for i, d in enumerate(_pending):
        cp.set_pipeline(d.pipe.pipeline)
        cp.set_bind_group(0, d.bind_group)
        cp.dispatch_workgroups(*d.grid)
        cp._write_timestamp(qs, i + 1)
    cp.end()
    res = dev.device.create_buffer(size=8 * (n + 1), usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    stage = dev.device.create_buffer(size=8 * (n + 1), usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
    encoder.resolve_query_set(qs, 0, n + 1, res, 0)
    encoder.copy_buffer_to_buffer(res, 0, stage, 0, 8 * (n + 1))
    names = [d.pipe.name for d in _pending]
    _profile_reads.append((stage, names))


_profile_reads: list = []


def _collect_profile() -> None:
    while _profile_reads:
        stage, names = _profile_reads.pop(0)
        stage.map_sync(wgpu.MapMode.READ)
        ts = np.frombuffer(bytes(stage.read_mapped(copy=True)), np.uint64).astype(np.int64)
        stage.unmap()
        for name, dt_ns in zip(names, np.diff(ts)):
            for p in _profilers:
                p.append((name, int(dt_ns)))


@locked
def flush() -> None:
    """Encode every pending dispatch into one pass (plus queued readback copies) and submit once."""
    if not _pending and not _pending_copies:
        return
    dev = get_device()
    t0 = time.perf_counter()
    enc = dev.device.create_command_encoder()
    _encode(enc)
    for src, off, stage, size in _pending_copies:
        enc.copy_buffer_to_buffer(src.gpu, off, stage, 0, size)
    _pending_copies.clear()
    _copy_srcs.clear()
    t1 = time.perf_counter()
    cb = enc.finish()
    t2 = time.perf_counter()
    dev.queue.submit([cb])
    t3 = time.perf_counter()
    HOST_TIME["encode_s"] += t1 - t0
    HOST_TIME["finish_s"] += t2 - t1
    HOST_TIME["submit_s"] += t3 - t2
    STATS["submits"] += 1
    _pending.clear()
    _pending_ids.clear()
    if _profile_reads:
        _collect_profile()


def pending_count() -> int:
    return len(_pending)


_pending_copies: list = []
_copy_srcs: set = set()     # ids of the buffers _pending_copies reads

# Host seconds spent in wgpu by flush() (encoding the pass, finishing the command buffer,
# submitting) and waiting in Ticket.result() for a mapped readback: where a decode step's host
# time goes (run_models.py reports it per step). Cumulative; callers take differences.
HOST_TIME = {"encode_s": 0.0, "finish_s": 0.0, "submit_s": 0.0, "map_s": 0.0}


class Ticket:
    """A readback queued with the next submit and mapped only when `.result()` is asked for,
    so the CPU can queue step N+1 before it waits for step N's bytes (pipelined decode)."""

    def __init__(self, stage, offset_in_stage: int, nbytes: int, cap: int):
        self.stage, self.off, self.nbytes, self.cap = stage, offset_in_stage, nbytes, cap
        self._data = None

    @locked
    def result(self) -> bytes:
        if self._data is None:
            if any(c[2] is self.stage for c in _pending_copies):
                flush()
            size = self.off + self.nbytes
            size = (size + 3) // 4 * 4
            t0 = time.perf_counter()
            self.stage.map_sync(wgpu.MapMode.READ, 0, size)
            HOST_TIME["map_s"] += time.perf_counter() - t0
            try:
                self._data = bytes(self.stage.read_mapped(0, size, copy=True))[self.off:self.off + self.nbytes]
            finally:
                self.stage.unmap()
            free = _free_stages.setdefault(self.cap, [])
            if len(free) < MAX_FREE_STAGES:   # bounded: a staging buffer per size class in flight
                free.append(self.stage)
            STATS["readbacks"] += 1
        return self._data


_free_stages: dict = {}
MAX_FREE_STAGES = 8   # free staging (mappable) buffers kept per size class


@locked
def read_later(buf: "Buffer", offset: int = 0, nbytes: Optional[int] = None) -> Ticket:
    """Queue a copy of `buf`'s bytes into a mappable buffer with the next submit."""
    n = buf.nbytes - offset if nbytes is None else int(nbytes)
    start = offset - offset % 4
    size = (offset + n - start + 3) // 4 * 4
    cap = _size_class(size)
    lst = _free_stages.get(cap)
    stage = lst.pop() if lst else get_device().device.create_buffer(
        size=cap, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
    _pending_copies.append((buf, start, stage, size))
    _copy_srcs.add(id(buf))
    return Ticket(stage, offset - start, n, cap)


@locked
def read(buf: Buffer, offset: int = 0, nbytes: Optional[int] = None) -> bytes:
    """Bytes of `buf` after all pending work: one submit (pending dispatches + the copy) and one map."""
    if _tracing[0]:
        raise RuntimeError("a value was read back (.numpy()/.item()) inside a tg.capture'd function: "
                           "return the tensor instead and read it after the call")
    n = buf.nbytes - offset if nbytes is None else int(nbytes)
    if n <= 0:
        return b""
    return read_later(buf, offset, n).result()


@locked
def sync() -> None:
    """Wait until the GPU has finished all submitted work (benchmarks use this)."""
    flush()
    if not hasattr(sync, "_buf"):
        sync._buf = Buffer(4)
    read(sync._buf, 0, 4)


@locked
def trim() -> int:
    """Release every free buffer the pool holds (and the free staging buffers) back to the
    driver; returns the bytes released. Live tensors, captures and pending work keep theirs."""
    flush()
    released = POOL.trim(0)
    for cap, lst in list(_free_stages.items()):
        released += cap * len(lst)
        lst.clear()
    return released


def pool_bytes() -> dict:
    """GPU bytes the runtime holds: `live` (Buffers in use), `free` (pool slots kept for reuse),
    `captured` (buffers reserved for the replays of live captures) and `held` (everything
    allocated and not yet released: live + free + captured)."""
    captured = sum(size for a in list(_all_arenas) if not a.released for size, _ in a.idle)
    return {"live": _live_bytes[0], "free": POOL.free_bytes, "captured": captured, "held": POOL.bytes_held}
