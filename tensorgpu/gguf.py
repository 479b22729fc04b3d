"""GGUF files in and out: `load_gguf` uploads every tensor's raw bytes (quant blocks as-is) to
the GPU once, `save_gguf` writes dicts of Tensors / arrays through `gguf.GGUFWriter`.

Why a parser of our own instead of `gguf.GGUFReader`: the reader trusts every count and length
in the file. On a corrupt file it raises whatever numpy or struct happen to raise, and an array
whose length field says 2**60 makes it loop forever over empty slices. It is also slow: it builds
numpy views per array element, ~2 s for a 50k-token vocabulary plus its merges. `_scan` walks the
structure with every count checked against the bytes left in the file, decodes the metadata
(~15 ms for the same vocabulary), and checks every tensor (type, dimensions, offsets, device
limits) before a single byte goes to the GPU. Tensor bytes are uploaded straight from an
np.memmap of the file, as GGUFReader would give them. `check_with_gguf_reader=True` (and the
tests) parse with GGUFReader too and require identical results; anything it raises becomes a
GGUFError.

Spec: llama.cpp docs/gguf.md. Layout (little-endian, v2/v3):
    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count  x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32) | tensor data (offsets relative to here)
"""
from __future__ import annotations

import gc
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import dtypes as dt
from . import runtime

__all__ = ["GGUFError", "GGUFFile", "load_gguf", "save_gguf"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
MAX_ARRAY_NESTING = 4
PROGRESS_THRESHOLD = 50 * 1024 * 1024  # files larger than this get a progress bar by default
UPLOAD_CHUNK = 64 * 1024 * 1024        # bytes per queue.write_buffer call (bounds wgpu's staging)

# GGUF metadata value types -> fixed byte size (None: variable: string / array)
_VT_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
             7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_VT_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_VT_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_VT_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
             12: "<f8"}
_VT_STRING, _VT_ARRAY, _VT_UINT32, _VT_BOOL = 8, 9, 4, 7

# GGML tensor types tensorgpu can hold (see dtypes.py) and the names of all known ones.
_SUPPORTED_GGML = {d.ggml_type: d for d in (dt.float32, dt.float16, dt.bfloat16, dt.int32, dt.q8_0, dt.q4_0,
                                            dt.q4_1, dt.q5_0, dt.q5_1, dt.q4_k, dt.q5_k, dt.q6_k)}


def _ggml_type_name(type_id: int) -> str:
    import gguf
    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return "unknown"


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded: corrupt, truncated, unsupported or too large."""


# ----------------------------------------------------------------------------- scanning


@dataclass
class _TensorEntry:
    name: str
    ne: tuple            # ggml order (fastest first)
    type_id: int
    dtype: dt.DType
    rel_offset: int      # relative to the data section
    offset: int          # absolute file offset
    nbytes: int

    @property
    def np_shape(self) -> tuple:
        return tuple(reversed(self.ne))


@dataclass
class _Scan:
    version: int
    alignment: int
    data_start: int
    kv_types: dict       # key -> value type id
    metadata: dict       # key -> Python value
    tensors: list        # [_TensorEntry] in file order


class _Scanner:
    """Bounds-checked reads from the mapped file; every failure names the path and offset.
    Reads copy bytes out (slicing an mmap gives bytes), so no view pins the map."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path = buf, size, path

    def fail(self, msg: str):
        raise GGUFError(f"{self.path}: {msg}")

    def need(self, off: int, n: int, what: str) -> None:
        if n < 0 or off + n > self.size:
            self.fail(f"truncated in {what}: needs {n} bytes at offset {off} but the file ends at {self.size}")

    def u32(self, off: int, what: str) -> int:
        self.need(off, 4, what)
        return struct.unpack_from("<I", self.buf, off)[0]

    def u64(self, off: int, what: str) -> int:
        self.need(off, 8, what)
        return struct.unpack_from("<Q", self.buf, off)[0]

    def string(self, off: int, what: str):
        n = self.u64(off, f"{what} (string length)")
        if n > self.size - off - 8:
            self.fail(f"{what}: string length {n} at offset {off} runs past the end of the file ({self.size} bytes)")
        raw = self.buf[off + 8: off + 8 + n]
        try:
            return raw.decode("utf-8"), off + 8 + n
        except UnicodeDecodeError as e:
            self.fail(f"{what} at offset {off} is not valid UTF-8 ({e.reason} at byte {e.start}): {raw[:64]!r}")

    def value(self, off: int, vtype: int, what: str, depth: int = 0):
        """Decode one value of type `vtype` at `off`: (Python value, offset after it)."""
        fmt = _VT_STRUCT.get(vtype)
        if fmt is not None:
            self.need(off, _VT_SIZE[vtype], what)
            v = struct.unpack_from(fmt, self.buf, off)[0]
            return (v != 0 if vtype == _VT_BOOL else v), off + _VT_SIZE[vtype]
        if vtype == _VT_STRING:
            return self.string(off, what)
        if vtype != _VT_ARRAY:
            self.fail(f"{what} at offset {off}: unknown value type {vtype}")
        if depth >= MAX_ARRAY_NESTING:
            self.fail(f"{what} at offset {off}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype = self.u32(off, f"{what} (array element type)")
        count = self.u64(off + 4, f"{what} (array length)")
        if etype not in _VT_NAMES:
            self.fail(f"{what} at offset {off}: unknown array element type {etype}")
        off += 12
        esize = _VT_SIZE.get(etype)
        min_size = esize if esize is not None else (8 if etype == _VT_STRING else 12)
        if count * min_size > self.size - off:
            self.fail(f"{what}: array of {count} {_VT_NAMES[etype]} at offset {off - 12} needs at least "
                      f"{count * min_size} bytes but only {self.size - off} remain in the file")
        if esize is not None:
            arr = np.frombuffer(self.buf[off: off + count * esize], dtype=_VT_NUMPY[etype])
            return (arr != 0 if etype == _VT_BOOL else arr).tolist(), off + count * esize
        if etype == _VT_STRING:  # hot loop for tokenizer vocabularies
            buf, end, unpack = self.buf, self.size, struct.Struct("<Q").unpack_from
            out = []
            for i in range(count):
                if off + 8 > end:
                    self.need(off, 8, f"{what} (element {i} length)")
                n = unpack(buf, off)[0]
                if n > end - off - 8:
                    self.fail(f"{what}: string element {i} of length {n} at offset {off} runs past the end of "
                              f"the file ({end} bytes)")
                try:
                    out.append(buf[off + 8: off + 8 + n].decode("utf-8"))
                except UnicodeDecodeError as e:
                    self.fail(f"{what}: string element {i} at offset {off} is not valid UTF-8 ({e.reason})")
                off += 8 + n
            return out, off
        out = []
        for i in range(count):
            v, off = self.value(off, etype, f"{what}[{i}]", depth + 1)
            out.append(v)
        return out, off


def _scan(buf, size: int, path: str, max_binding: Optional[int], max_buffer: Optional[int]) -> _Scan:
    s = _Scanner(buf, size, path)
    s.need(0, 4, "the magic number")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        s.fail(f"not a GGUF file: magic bytes are {magic!r} ({magic.hex(' ')}), expected b'GGUF' (47 47 55 46)")
    version = s.u32(4, "the header (version)")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            s.fail(f"big-endian GGUF (version {version >> 24}) is not supported; convert it to little-endian")
        s.fail(f"unsupported GGUF version {version}: tensorgpu reads versions "
               f"{', '.join(map(str, SUPPORTED_VERSIONS))}" + (" (v1 files predate 64-bit counts; re-convert them)"
                                                                if version == 1 else ""))
    n_tensors = s.u64(8, "the header (tensor count)")
    n_kv = s.u64(16, "the header (metadata key-value count)")
    off = 24
    # each kv needs >= 13 bytes (u64 key length, u32 type, 1-byte value); each tensor info >= 24
    if n_kv * 13 > size - off:
        s.fail(f"header claims {n_kv} metadata key-value pairs, which cannot fit in the {size - off} bytes after the header")
    if n_tensors * 24 > size - off:
        s.fail(f"header claims {n_tensors} tensors, which cannot fit in the {size - off} bytes after the header")

    kv_types: dict = {}
    metadata: dict = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        kv_off = off
        key, off = s.string(off, f"metadata key #{i}")
        if key in kv_types:
            s.fail(f"metadata key {key!r} (#{i}, offset {kv_off}) appears twice")
        vtype = s.u32(off, f"metadata key {key!r} (value type)")
        if vtype not in _VT_NAMES:
            s.fail(f"metadata key {key!r} at offset {kv_off}: unknown value type {vtype}")
        if key == "general.alignment":
            if vtype != _VT_UINT32:
                s.fail(f"general.alignment must be uint32, found {_VT_NAMES[vtype]}")
            alignment = s.u32(off + 4, "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                s.fail(f"general.alignment is {alignment}, not a power of two")
        metadata[key], off = s.value(off + 4, vtype, f"metadata value of {key!r}")
        kv_types[key] = vtype

    entries: list = []
    names: set = set()
    for i in range(n_tensors):
        ti_off = off
        name, off = s.string(off, f"tensor info #{i} (name)")
        where = f"tensor {name!r} (info #{i} at offset {ti_off})"
        if name in names:
            s.fail(f"{where}: duplicate tensor name")
        names.add(name)
        n_dims = s.u32(off, f"{where}: n_dims")
        if n_dims > GGML_MAX_DIMS:
            s.fail(f"{where}: bad dimensions: n_dims is {n_dims}, GGML allows at most {GGML_MAX_DIMS}")
        s.need(off + 4, 8 * n_dims, f"{where}: dimensions")
        ne = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
        off += 4 + 8 * n_dims
        type_id = s.u32(off, f"{where}: ggml type")
        rel = s.u64(off + 4, f"{where}: data offset")
        off += 12
        entries.append((name, ne, type_id, rel, where))

    data_start = (off + alignment - 1) // alignment * alignment
    tensors = []
    for name, ne, type_id, rel, where in entries:
        dtype = _SUPPORTED_GGML.get(type_id)
        if dtype is None:
            tname = _ggml_type_name(type_id)
            supported = ", ".join(_ggml_type_name(t) for t in _SUPPORTED_GGML)
            if tname == "unknown":
                s.fail(f"{where}: unknown ggml type id {type_id} (supported: {supported})")
            s.fail(f"{where}: unsupported ggml type {tname} (id {type_id}); tensorgpu supports {supported}")
        numel = 1
        for d in ne:
            numel *= d
        extent = 1
        for d in ne:
            extent *= max(d, 1)
        if extent * max(dtype.gpu_itemsize, 1) >= 1 << 53:  # also for zero-size tensors: no 2**62-wide shapes
            s.fail(f"{where}: bad dimensions: ne = {list(ne)} is impossibly large")
        ne0 = ne[0] if ne else 1  # a 0-d tensor is one element
        if ne0 % dtype.block_size:
            s.fail(f"{where}: bad dimensions: ne[0] = {ne0} (ne = {list(ne)}) is not a multiple of the "
                   f"{dtype.name} block size {dtype.block_size}")
        nbytes = numel // dtype.block_size * (dtype.block_bytes if dtype.is_quant else dtype.itemsize)
        if rel % alignment:
            s.fail(f"{where}: data offset {rel} is not a multiple of the alignment {alignment}")
        start = data_start + rel
        if start + nbytes > size:
            s.fail(f"{where}: data [{start}, {start + nbytes}) ({dtype.name}, ne = {list(ne)}, {nbytes} bytes at "
                   f"data offset {rel}) runs past the end of the file ({size} bytes): truncated or bad offset")
        tensors.append(_TensorEntry(name, tuple(ne), type_id, dtype, rel, start, nbytes))

    # overlapping data means the dimensions disagree with the space the file gives the tensor
    by_off = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    for a, b in zip(by_off, by_off[1:]):
        if a.nbytes and b.nbytes and a.offset + a.nbytes > b.offset:
            s.fail(f"bad dimensions or offsets: tensor {a.name!r} ({a.dtype.name}, ne = {list(a.ne)}) needs {a.nbytes} bytes "
                   f"from offset {a.offset}, but tensor {b.name!r} starts at {b.offset} "
                   f"(only {b.offset - a.offset} bytes between them)")
    for t in tensors:
        if max_binding is not None and t.nbytes > max_binding:
            s.fail(f"tensor {t.name!r} ({t.dtype.name}, numpy shape {t.np_shape}) is {t.nbytes} bytes, over the device's "
                   f"max_storage_buffer_binding_size of {max_binding} bytes (splitting is not supported)")
        if max_buffer is not None and t.nbytes > max_buffer:
            s.fail(f"tensor {t.name!r} is {t.nbytes} bytes, over the device's max_buffer_size of {max_buffer} bytes")
    return _Scan(version, alignment, data_start, kv_types, metadata, tensors)


# ----------------------------------------------------------------------------- loading


class GGUFFile:
    """A loaded GGUF file: metadata and device-resident tensors.

    Attributes:
        path: the file.
        metadata: key -> Python value (str, int, float, bool, or list of those).
        tensors: name -> Tensor, numpy-order shape (ggml's ne reversed), dtype as stored.
        buffers: name -> runtime.Buffer holding the tensor's raw file bytes (what the Tensor wraps).
        tensor_info: name -> (numpy shape, tg dtype, absolute file offset, nbytes).
        file_data_bytes: sum of the tensors' data sizes.
        version, alignment: from the header.
    """

    def __init__(self, path, metadata, tensors, buffers, tensor_info, version, alignment):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.buffers = buffers
        self.tensor_info = tensor_info
        self.file_data_bytes = sum(info[3] for info in tensor_info.values())
        self.version = version
        self.alignment = alignment

    @property
    def device_bytes(self) -> int:
        """Device memory held by this file's buffers, pool size-class rounding included."""
        return sum(b.capacity for b in self.buffers.values())

    @property
    def architecture(self) -> Optional[str]:
        return self.metadata.get("general.architecture")

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's bytes as they sit on the device (equal to the file's bytes)."""
        return runtime.read(self.buffers[name], 0, self.tensor_info[name][3])

    def close(self) -> None:
        """Drop this object's references to the tensors (the file itself is closed after loading);
        device memory is freed once no other Tensor references it."""
        self.tensors = {}
        self.buffers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"GGUFFile({self.path!r}, arch={self.architecture!r}, {len(self.tensor_info)} tensors, "
                f"{self.file_data_bytes} data bytes)")


def _wrap(buf: runtime.Buffer, shape: tuple, dtype: dt.DType):
    """The one place a loaded buffer becomes a Tensor (quant dtypes: the buffer holds raw blocks)."""
    from .tensor import Tensor
    return Tensor.from_buffer(buf, shape, dtype)


def _upload(view: np.ndarray, nbytes: int, bar) -> runtime.Buffer:
    """A Buffer holding `view`'s bytes, written straight from the memory map in chunks; the last
    partial word is zero-padded here so runtime.write never reads the buffer back."""
    buf = runtime.Buffer(max(nbytes, 4))
    try:
        whole = nbytes - nbytes % 4
        for start in range(0, whole, UPLOAD_CHUNK):
            end = min(whole, start + UPLOAD_CHUNK)
            runtime.write(buf, view[start:end], start)
            if bar is not None:
                bar.update(end - start)
        if nbytes % 4:
            tail = bytes(view[whole:nbytes]) + b"\0" * (4 - nbytes % 4)
            runtime.write(buf, tail, whole)
            if bar is not None:
                bar.update(nbytes % 4)
    except BaseException:
        buf = None  # the traceback keeps this frame alive
        raise
    return buf


def load_gguf(path, progress: Optional[bool] = None, *, check_with_gguf_reader: bool = False) -> GGUFFile:
    """Validate a GGUF file completely, then upload each tensor's bytes to the GPU once.

    progress: True / False forces a tqdm bar over bytes on / off; None shows one for files over
    50 MB. check_with_gguf_reader: also parse the file with gguf.GGUFReader and require it to agree
    (slow on large vocabularies: ~2 s for 100k strings, against ~15 ms for our own scan).
    Raises GGUFError (a ValueError) naming the file and what is wrong; on any failure no device
    buffer from this call stays alive.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open GGUF file: {e}") from e
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file: magic bytes are {head!r} ({head.hex(' ')}), "
                        "expected b'GGUF' (47 47 55 46)")
    if size < 24:
        raise GGUFError(f"{path}: truncated in the header: the file has {size} bytes, a GGUF header needs 24")

    dev = runtime.get_device()
    max_binding = dev.max_binding_size
    max_buffer = int(dev.limits.get("max-buffer-size", 0)) or None
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            scan = _scan(mm, size, path, max_binding, max_buffer)
    except GGUFError:
        raise
    except Exception as e:  # a bug in the scan must still surface as a file error, not a crash
        raise GGUFError(f"{path}: cannot parse GGUF file: {type(e).__name__}: {e}") from None
    if check_with_gguf_reader:
        _cross_check(path, scan)
    data = np.memmap(path, mode="r")
    try:
        return _upload_all(path, scan, data, progress)
    finally:
        del data  # releases the memory map


def _flatten(v):
    if isinstance(v, list):
        return [x for item in v for x in (_flatten(item) if isinstance(item, list) else [item])]
    return v


def _same(a, b) -> bool:
    """Equality of decoded metadata in which NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _cross_check(path: str, scan: _Scan) -> None:
    """Parse the (already validated) file with gguf.GGUFReader and require the same contents."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        theirs_meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        theirs = [(t.name, int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
        data_offset = int(reader.data_offset)
    except Exception as e:
        raise GGUFError(f"{path}: gguf.GGUFReader failed on the file: {type(e).__name__}: {e}") from None
    finally:
        reader = None
    mine_meta = {k: _flatten(v) for k, v in scan.metadata.items()}  # GGUFReader flattens nested arrays
    if not _same(mine_meta, theirs_meta) or list(mine_meta) != list(theirs_meta):
        bad = [k for k in set(mine_meta) | set(theirs_meta) if not _same(mine_meta.get(k), theirs_meta.get(k))]
        raise GGUFError(f"{path}: gguf.GGUFReader reads different metadata for {sorted(bad)[:8]}")
    mine = [(t.name, t.type_id, t.offset, t.nbytes) for t in scan.tensors]
    if mine != theirs or (scan.tensors and data_offset != scan.data_start):
        raise GGUFError(f"{path}: gguf.GGUFReader reads different tensor infos or data offset "
                        f"({data_offset} vs {scan.data_start})")


# Byte offsets of the f16 scale fields inside one block, per block type (llama.cpp ggml-common.h).
_SCALE_OFFSETS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
                  "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def _first_nonfinite(view: np.ndarray, dtype: dt.DType) -> Optional[int]:
    """Index of the first NaN/inf value of a float tensor, or of the first block whose scale is
    NaN/inf (quant types: every value of such a block decodes to NaN/inf); None when all finite.
    Reads only the exponent bits, vectorized over the memory map."""
    n = len(view)
    if dtype is dt.float32:
        words = view[: n - n % 4].view("<u4")
        bad = (words & 0x7F800000) == 0x7F800000
    elif dtype in (dt.float16, dt.bfloat16):
        halves = view[: n - n % 2].view("<u2")
        mask = 0x7C00 if dtype is dt.float16 else 0x7F80
        bad = (halves & mask) == mask
    elif dtype.name in _SCALE_OFFSETS:
        blocks = view[: n - n % dtype.block_bytes].reshape(-1, dtype.block_bytes)
        bad = np.zeros(len(blocks), bool)
        for off in _SCALE_OFFSETS[dtype.name]:
            h = blocks[:, off:off + 2].copy().view("<u2").reshape(-1)
            bad |= (h & 0x7C00) == 0x7C00
    else:
        return None
    if not bad.any():
        return None
    return int(np.argmax(bad))


def _upload_all(path, scan, data, progress) -> GGUFFile:
    total = sum(t.nbytes for t in scan.tensors)
    show = progress if progress is not None else len(data) > PROGRESS_THRESHOLD
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"loading {os.path.basename(path)}", leave=False)
    tensors: dict = {}
    buffers: dict = {}
    info: dict = {}
    buf = None
    current = None
    try:
        for t in scan.tensors:
            current = t
            view = data[t.offset: t.offset + t.nbytes]
            bad = _first_nonfinite(view, t.dtype)
            if bad is not None:
                what = f"element {bad}" if not t.dtype.is_quant or t.dtype is dt.bfloat16 else f"the scale of block {bad}"
                raise GGUFError(f"{path}: tensor {t.name!r} ({t.dtype.name}, numpy shape {t.np_shape}, data at file offset "
                                f"{t.offset}) holds a NaN or infinity at {what}: a corrupt file or a wrong type id")
            buf = _upload(view, t.nbytes, bar)
            del view
            buffers[t.name] = buf
            tensors[t.name] = _wrap(buf, t.np_shape, t.dtype)
            info[t.name] = (t.np_shape, t.dtype, t.offset, t.nbytes)
            buf = None
    except BaseException as e:
        # a traceback keeps this frame alive: drop every device reference before it propagates
        tensors.clear()
        buffers.clear()
        buf = None
        gc.collect()
        if isinstance(e, (KeyboardInterrupt, SystemExit, GGUFError)):
            raise
        msg = (f"{path}: uploading tensor {current.name!r} ({current.nbytes} bytes at offset {current.offset}) "
               f"failed: {type(e).__name__}: {e}")
        e.__traceback__ = None  # its frames (Tensor/runtime internals) may still hold the buffer
        raise GGUFError(msg) from e
    finally:
        if bar is not None:
            bar.close()
    return GGUFFile(path, scan.metadata, tensors, buffers, info, scan.version, scan.alignment)


# ----------------------------------------------------------------------------- saving

_SAVE_TYPES = {"f32": "F32", "float32": "F32", "f16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16",
               "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}


def _qtype(spec, name: str):
    import gguf
    key = spec.name if isinstance(spec, dt.DType) else str(spec).lower()
    if key not in _SAVE_TYPES:
        raise ValueError(f"save_gguf: tensor {name!r}: cannot write type {spec!r}; choose one of "
                         f"{', '.join(sorted(set(_SAVE_TYPES)))}")
    return gguf.GGMLQuantizationType[_SAVE_TYPES[key]]


def _value_type(key: str, value):
    """(value, GGUFValueType, sub_type) for a metadata value: str, bool, int (u32, else i64, else
    u64), float (f32), numpy scalars by their dtype, lists/arrays of one kind, or an explicit
    (value, gguf.GGUFValueType) pair."""
    import gguf
    VT = gguf.GGUFValueType
    np_map = {np.dtype(np.uint8): VT.UINT8, np.dtype(np.int8): VT.INT8, np.dtype(np.uint16): VT.UINT16,
              np.dtype(np.int16): VT.INT16, np.dtype(np.uint32): VT.UINT32, np.dtype(np.int32): VT.INT32,
              np.dtype(np.uint64): VT.UINT64, np.dtype(np.int64): VT.INT64, np.dtype(np.float32): VT.FLOAT32,
              np.dtype(np.float64): VT.FLOAT64, np.dtype(np.bool_): VT.BOOL}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], VT):
        v, vt = value
        if vt == VT.ARRAY:
            raise ValueError(f"save_gguf: metadata {key!r}: give arrays as lists, not (value, ARRAY)")
        return v, vt, None
    if isinstance(value, (bool, np.bool_)):
        return bool(value), VT.BOOL, None
    if isinstance(value, str):
        return value, VT.STRING, None
    if isinstance(value, np.generic):
        vt = np_map.get(value.dtype)
        if vt is None:
            raise ValueError(f"save_gguf: metadata {key!r}: numpy type {value.dtype} has no GGUF value type")
        return value.item(), vt, None
    if isinstance(value, int):
        if 0 <= value < 2**32:
            return value, VT.UINT32, None
        if -2**63 <= value < 2**63:
            return value, VT.INT64, None
        if 0 <= value < 2**64:
            return value, VT.UINT64, None
        raise ValueError(f"save_gguf: metadata {key!r}: integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return value, VT.FLOAT32, None
    if isinstance(value, np.ndarray):
        vt = np_map.get(value.dtype)
        if vt is None or value.ndim != 1:
            raise ValueError(f"save_gguf: metadata {key!r}: array of {value.dtype} {value.shape} is not writable; "
                             "use a 1-D array of a numeric dtype")
        value, sub = value.tolist(), vt
    elif isinstance(value, (list, tuple)):
        value = list(value)
        if not value:
            raise ValueError(f"save_gguf: metadata {key!r}: gguf.GGUFWriter cannot write an empty array")
        if all(isinstance(v, str) for v in value):
            sub = VT.STRING
        elif all(isinstance(v, (bool, np.bool_)) for v in value):
            sub, value = VT.BOOL, [bool(v) for v in value]
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
            value = [int(v) for v in value]
            lo, hi = min(value), max(value)
            if -2**31 <= lo and hi < 2**31:
                sub = VT.INT32
            elif -2**63 <= lo and hi < 2**63:
                sub = VT.INT64
            elif lo >= 0 and hi < 2**64:
                sub = VT.UINT64
            else:
                raise ValueError(f"save_gguf: metadata {key!r}: integers outside 64 bits")
        elif all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                 for v in value):
            sub, value = VT.FLOAT32, [float(v) for v in value]
        else:
            kinds = sorted({type(v).__name__ for v in value})
            raise ValueError(f"save_gguf: metadata {key!r}: a list must hold one kind of value (str, bool, int or "
                             f"float), found {', '.join(kinds)}")
    else:
        raise ValueError(f"save_gguf: metadata {key!r}: cannot write a {type(value).__name__} "
                         "(use str, bool, int, float or a list of one of them)")
    if not value:
        raise ValueError(f"save_gguf: metadata {key!r}: gguf.GGUFWriter cannot write an empty array")
    return value, VT.ARRAY, sub


def _tensor_raw_blocks(t) -> Optional[np.ndarray]:
    """The raw GGML bytes of a quantized Tensor as uint8 (..., bytes per row), or None when they
    cannot be read as-is (the Tensor is a strided/offset view of its buffer, or not a tg Tensor)."""
    if hasattr(t, "realize"):
        t.realize()
    node, view = getattr(t, "node", None), getattr(t, "view", None)
    buf = getattr(node, "buffer", None)
    if buf is None or view is None:
        return None
    if not view.is_contiguous or view.offset != 0 or tuple(node.shape) != tuple(t.shape):
        return None
    dtype, shape = t.dtype, tuple(t.shape)
    raw = runtime.read(buf, 0, dtype.nbytes(int(np.prod(shape, dtype=np.int64))))
    row = (shape[-1] // dtype.block_size * dtype.block_bytes) if shape else dtype.block_bytes
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape[:-1] + (row,))


def _prepare_tensor(name: str, t, qspec, explicit: bool):
    """(array, raw_dtype or None) for GGUFWriter.add_tensor."""
    import gguf
    from gguf.quants import quantize as gquantize
    Q = gguf.GGMLQuantizationType
    tdtype = getattr(t, "dtype", None)
    if not isinstance(t, np.ndarray) and isinstance(tdtype, dt.DType) and tdtype.is_quant:
        own = Q(tdtype.ggml_type)
        if qspec is None or _qtype(qspec, name) == own:
            raw = _tensor_raw_blocks(t)
            if raw is not None:
                return raw, own
            if qspec is None:  # a view of a quantized tensor: quantize its values to the same type again
                if own.name in _SAVE_TYPES.values():
                    qspec = own.name.lower()
                else:
                    warnings.warn(f"save_gguf: tensor {name!r} is a view of {tdtype.name} data, which gguf cannot "
                                  "quantize; stored as F32", stacklevel=3)
                    qspec = "f32"
    arr = t if isinstance(t, np.ndarray) else np.asarray(t.numpy())
    if qspec is None:
        if arr.dtype == np.float16 or arr.dtype == np.float32:
            return np.ascontiguousarray(arr), None
        if arr.dtype.kind == "f":
            return np.ascontiguousarray(arr, dtype=np.float32), None
        if arr.dtype.kind in "iu":
            if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
                raise ValueError(f"save_gguf: tensor {name!r}: {arr.dtype} values outside int32")
            return np.ascontiguousarray(arr, dtype=np.int32), None
        raise ValueError(f"save_gguf: tensor {name!r}: cannot write dtype {arr.dtype} (float or int only)")
    q = _qtype(qspec, name)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"save_gguf: tensor {name!r}: cannot quantize dtype {arr.dtype}")
    if q == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32), None
    if q == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16), None
    block = gguf.GGML_QUANT_SIZES[q][0]
    if arr.ndim == 0 or arr.shape[-1] % block:
        msg = (f"save_gguf: tensor {name!r} of shape {arr.shape}: last dimension is not a multiple of the "
               f"{q.name} block size {block}")
        if explicit:
            raise ValueError(msg)
        warnings.warn(msg + "; stored as F32", stacklevel=3)
        return np.ascontiguousarray(arr, dtype=np.float32), None
    return gquantize(np.ascontiguousarray(arr, dtype=np.float32), q), q


def _add_kv(writer, key, value, vtype, sub) -> None:
    """add_key_value, also on gguf releases whose writer has no sub_type (arrays then take the
    type GGUFValueType.get_type gives their first element)."""
    import inspect
    import gguf
    if sub is None or "sub_type" in inspect.signature(writer.add_key_value).parameters:
        writer.add_key_value(key, value, vtype, sub) if sub is not None else writer.add_key_value(key, value, vtype)
        return
    if gguf.GGUFValueType.get_type(value[0]) != sub:
        raise ValueError(f"save_gguf: metadata {key!r}: an array of {sub.name} needs a newer gguf package "
                         "(GGUFWriter.add_key_value with sub_type)")
    writer.add_key_value(key, value, vtype)


def save_gguf(path, tensors: dict, metadata: Optional[dict] = None, quantize=None,
              architecture: Optional[str] = None, progress: bool = False) -> None:
    """Write `tensors` (name -> Tensor or np.ndarray, numpy-order shapes) and `metadata` to a GGUF v3 file.

    quantize: None keeps each tensor's type (float64 -> F32, ints -> I32, quantized Tensors keep
    their raw blocks); a type name ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16", "f32")
    applies to every tensor of 2 or more dimensions (others stay as they are; a tensor whose last
    dimension is not a multiple of the block size stays F32 with a warning); a dict name -> type
    name sets single tensors (1-D included), the rest kept as they are.
    architecture: general.architecture; defaults to metadata["general.architecture"].
    """
    import gguf
    metadata = dict(metadata or {})
    arch = architecture or metadata.get("general.architecture")
    if not arch or not isinstance(arch, str):
        raise ValueError("save_gguf: a GGUF file needs general.architecture: pass architecture= or put it in metadata")
    if isinstance(quantize, dict):
        unknown = set(quantize) - set(tensors)
        if unknown:
            raise ValueError(f"save_gguf: quantize names tensors that are not being saved: {sorted(unknown)}")
    kvs = []
    for key, value in metadata.items():
        if key == "general.architecture" or key.startswith("GGUF."):
            continue
        kvs.append((key,) + _value_type(key, value))
    prepared = []
    for name, t in tensors.items():
        if isinstance(quantize, dict):
            spec, explicit = quantize.get(name), name in quantize
        elif quantize is not None and len(getattr(t, "shape", ())) >= 2:
            spec, explicit = quantize, False
        else:
            spec, explicit = None, False
        prepared.append((name,) + _prepare_tensor(name, t, spec, explicit))

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    try:
        for key, value, vtype, sub in kvs:
            if key == "general.alignment":
                if vtype != gguf.GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
                    raise ValueError(f"save_gguf: general.alignment must be a power-of-two uint32, got {value!r}")
                writer.data_alignment = value
            _add_kv(writer, key, value, vtype, sub)
        for name, arr, raw_dtype in prepared:
            writer.add_tensor(name, arr, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()
