"""`python -m models.quantize IN.gguf OUT.gguf TYPE`: llama-quantize for tensorgpu (GGUF -> GGUF).

TYPE (any case): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M (= Q4_K), Q5_K_S, Q5_K_M (= Q5_K),
Q6_K, F16, F32. Each tensor gets the type llama-quantize would give it (models/quant_mix.py: the
q6_k output matrix, the _M mixes' layer rules, the fallbacks for row lengths 256 does not divide,
1-D tensors kept as they are), and its blocks are the ones ggml's reference quantizer writes
(models/quant_blocks.py), bit for bit. With `--pure` every quantizable tensor gets TYPE's block
type. The file is laid out as llama-quantize lays it out: the input's metadata in its order and
with its value types (raw bytes copied), then general.quantization_version and general.file_type,
tensors by layer then name, each padded to the alignment; a tensor whose type does not change is
copied byte for byte.

A tensor already quantized is dequantized (as gguf.quants.dequantize reads it, bit-identical to
ggml) and quantized again, with a warning, as llama-quantize does with --allow-requantize. The
tensors are read from a memory map and processed in chunks of rows, so memory stays bounded on a
large model; the output goes to OUT.part and is renamed when complete.

Errors (an unknown type, a file that is not GGUF or that holds a type tensorgpu cannot decode, NaN
in a weight, a missing output folder) are one line naming the file and tensor; the command exits 2.
"""
from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .quant_blocks import BLOCK_LAYOUT, quantize_rows, row_bytes
from .quant_mix import (FILE_TYPES, FileType, QuantizeError, TensorSpec, choose_types, describe, model_info,
                        parse_file_type, visit_order)

__all__ = ["quantize", "main", "QuantizeError", "QuantizeReport", "FallbackWarning", "RequantizeWarning"]

PROG = "python -m models.quantize"
GGUF_VERSION = 3
GGML_QNT_VERSION = 2
ROWS_ELEMENTS = 1 << 24       # floats dequantized at once (64 MiB): bounds memory on big matrices
COPY_CHUNK = 64 << 20         # bytes per write of a tensor copied as it is
_DROPPED_KEYS = ("general.quantization_version", "general.file_type", "split.no", "split.count",
                 "split.tensors.count")
# ggml type ids of what a quantized file holds (gguf.GGMLQuantizationType)
_GGML_ID = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13,
            "q6_k": 14, "bf16": 30, "i32": 26}
_DTYPE_NAME = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int32": "i32"}
_QUANTIZED = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")


class FallbackWarning(UserWarning):
    """Tensors whose row length the chosen block type does not divide got another type (as
    llama-quantize's "required fallback quantization")."""


class RequantizeWarning(UserWarning):
    """Tensors of the input were already quantized: quantizing them again loses more than
    quantizing the 16- or 32-bit original would."""


@dataclass
class QuantizeReport:
    """What quantize() wrote."""
    path: str
    file_type: FileType
    types: dict                 # name -> (type, note), in file order
    bytes_in: int               # tensor data of the input
    bytes_out: int              # tensor data of the output
    n_elements: int
    seconds: float
    fallbacks: list = field(default_factory=list)

    def summary(self) -> str:
        mib = 1024 * 1024
        bpw_in = self.bytes_in * 8 / max(self.n_elements, 1)
        bpw_out = self.bytes_out * 8 / max(self.n_elements, 1)
        return (f"model size = {self.bytes_in / mib:.2f} MiB ({bpw_in:.2f} BPW), quant size = "
                f"{self.bytes_out / mib:.2f} MiB ({bpw_out:.2f} BPW) [{describe(self.types)}] "
                f"in {self.seconds:.1f} s")


# ----------------------------------------------------------------------------- reading


def _scan_file(path: str, mm, size: int):
    """The validated structure of the input (tensorgpu's own GGUF scanner: every count and offset
    checked; no device limits apply, nothing is uploaded)."""
    from tensorgpu.gguf import GGUFError, _scan
    try:
        return _scan(mm, size, path, None, None)
    except GGUFError:
        raise
    except Exception as e:  # a bug in the scan must still surface as a file error
        raise GGUFError(f"{path}: cannot parse GGUF file: {type(e).__name__}: {e}") from None


def _kv_records(mm, size: int, path: str, n_kv: int) -> list:
    """[(key, raw bytes of the whole key-value record)] in file order, so they are written back
    with their exact value types (an array's element type included)."""
    from tensorgpu.gguf import _Scanner
    s = _Scanner(mm, size, path)
    off, out = 24, []
    for i in range(n_kv):
        start = off
        key, off = s.string(off, f"metadata key #{i}")
        vtype = s.u32(off, f"metadata key {key!r} (value type)")
        _, off = s.value(off + 4, vtype, f"metadata value of {key!r}")
        out.append((key, bytes(mm[start:off])))
    return out


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _u32_record(key: str, value: int) -> bytes:
    return _gguf_string(key) + struct.pack("<II", 4, value)   # GGUF value type 4: uint32


def _type_name(entry) -> str:
    return _DTYPE_NAME.get(entry.dtype.name, entry.dtype.name)


def _to_float32(raw: np.ndarray, type_name: str, rows: int, ne0: int, name: str) -> np.ndarray:
    """float32 [rows, ne0] of `rows` rows of a tensor's raw bytes."""
    if type_name == "f32":
        return raw.view("<f4").reshape(rows, ne0)
    if type_name == "f16":
        return raw.view("<f2").reshape(rows, ne0).astype(np.float32)
    if type_name in _QUANTIZED or type_name == "bf16":
        import gguf
        q = gguf.GGMLQuantizationType(_GGML_ID[type_name])
        return np.asarray(gguf.quants.dequantize(raw.reshape(rows, -1), q), dtype=np.float32).reshape(rows, ne0)
    raise QuantizeError(f"tensor {name!r} is {type_name}, which cannot be converted to a float type")


# ----------------------------------------------------------------------------- writing


def _check_finite(x: np.ndarray, name: str, path: str, first_row: int) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise QuantizeError(f"{path}: tensor {name!r} holds {x[r, c]} at row {first_row + r}, column {c}: "
                            "cannot quantize NaN or infinity")


def _check_blocks(out: np.ndarray, type_name: str, name: str, path: str, first: int) -> None:
    """A block whose f16 scale overflowed (values beyond 65504 times the type's range) would decode
    to infinities: llama-quantize's row validation refuses it, and so does this."""
    from tensorgpu import dtypes
    from tensorgpu.gguf import _first_nonfinite
    dt = {"f16": dtypes.float16, "f32": dtypes.float32}.get(type_name) or getattr(dtypes, type_name)
    bad = _first_nonfinite(out.reshape(-1), dt)
    if bad is not None:
        why = "beyond f16's range" if type_name == "f16" else "too large for the block's f16 scale"
        what = "element" if type_name in ("f16", "f32") else "block"
        raise QuantizeError(f"{path}: tensor {name!r}: {what} {first + bad} does not fit {type_name} (values {why})")


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass
class _Plan:
    name: str
    entry: object          # tensorgpu.gguf._TensorEntry of the input
    src: str
    dst: str
    nbytes: int            # output bytes
    offset: int = 0        # output data offset


def _header(records: list, plans: list, ft: FileType, alignment: int) -> bytes:
    kvs = [raw for key, raw in records if key not in _DROPPED_KEYS]
    kvs.append(_u32_record("general.quantization_version", GGML_QNT_VERSION))
    kvs.append(_u32_record("general.file_type", ft.ftype))
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(plans), len(kvs))] + kvs
    for p in plans:
        ne = list(p.entry.ne) or [1]
        spec = TensorSpec(p.name, tuple(ne), p.dst)
        ne = ne[:spec.n_dims]                       # ggml_n_dims: trailing 1s are not written
        parts.append(_gguf_string(p.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, _GGML_ID[p.dst], p.offset))
    head = b"".join(parts)
    return head + b"\0" * (_pad(len(head), alignment) - len(head))


def _write_tensor(f, data, p: _Plan, path: str, bar) -> None:
    """Convert one tensor and write it (chunks of rows), or copy its bytes when its type stays."""
    e = p.entry
    raw = data[e.offset: e.offset + e.nbytes]
    if p.src == p.dst:
        for start in range(0, e.nbytes, COPY_CHUNK):   # straight from the memory map, no copy in memory
            f.write(raw[start:start + COPY_CHUNK])
        if bar is not None:
            bar.update(int(np.prod(e.ne, dtype=np.int64)))
        return
    ne0 = e.ne[0] if e.ne else 1
    rows = int(np.prod(e.ne, dtype=np.int64)) // max(ne0, 1) if ne0 else 0
    in_row = e.nbytes // rows if rows else 0
    step = max(1, ROWS_ELEMENTS // max(ne0, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = _to_float32(np.asarray(raw[r0 * in_row: r1 * in_row]), p.src, r1 - r0, ne0, p.name)
        _check_finite(x, p.name, path, r0)
        out = quantize_rows(x, p.dst)
        _check_blocks(out, p.dst, p.name, path, r0 * (ne0 // BLOCK_LAYOUT[p.dst][0]))
        f.write(out.tobytes())
        if bar is not None:
            bar.update((r1 - r0) * ne0)


def _plan(src: str, scan, ft: FileType, pure: bool):
    """(types, plans in file order with their output offsets): what each tensor becomes."""
    info = model_info(scan.metadata, src)
    by_name = {e.name: e for e in scan.tensors}
    specs = [TensorSpec(e.name, tuple(e.ne) or (1,), _type_name(e)) for e in scan.tensors]
    types = choose_types(specs, ft, info, pure=pure)
    plans, off = [], 0
    for n in visit_order(by_name):
        e, (dst_type, _) = by_name[n], types[n]
        if dst_type != _type_name(e) and dst_type not in BLOCK_LAYOUT:
            raise QuantizeError(f"{src}: tensor {n!r}: cannot write type {dst_type}")
        ne0 = e.ne[0] if e.ne else 1
        nbytes = e.nbytes if dst_type == _type_name(e) else \
            row_bytes(dst_type, ne0) * (int(np.prod(e.ne, dtype=np.int64)) // max(ne0, 1))
        plans.append(_Plan(n, e, _type_name(e), dst_type, nbytes, off))
        off += _pad(nbytes, scan.alignment)
    return types, plans


def _warn_about(src: str, types: dict, plans: list) -> list:
    """Warnings llama-quantize gives too: requantized tensors, fallback types. Returns the fallbacks."""
    requant = [p for p in plans if p.src != p.dst and p.src in _QUANTIZED]
    if requant:
        kinds = ", ".join(sorted({p.src for p in requant}))
        warnings.warn(f"{src}: requantizing {len(requant)} tensor(s) already in {kinds}: this can severely "
                      "reduce quality compared to quantizing from 16 or 32 bits", RequantizeWarning, stacklevel=3)
    fallbacks = [f"{n}: {note}" for n, (_, note) in types.items() if note]
    if fallbacks:
        more = f"; and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else ""
        warnings.warn(f"{len(fallbacks)} of {len(plans)} tensors needed a fallback type: "
                      f"{'; '.join(fallbacks[:4])}{more}", FallbackWarning, stacklevel=3)
    return fallbacks


def _write_file(tmp: str, src: str, header: bytes, plans: list, alignment: int, desc, progress: bool) -> None:
    bar = None
    data = np.memmap(src, mode="r")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=sum(int(np.prod(p.entry.ne, dtype=np.int64)) for p in plans), unit="w",
                           unit_scale=True, desc=desc, leave=False)
            for p in plans:
                if bar is not None:
                    bar.set_postfix_str(f"{p.name} {p.src}->{p.dst}", refresh=False)
                _write_tensor(f, data, p, src, bar)
                f.write(b"\0" * (_pad(p.nbytes, alignment) - p.nbytes))
    finally:
        if bar is not None:
            bar.close()
        del data


def quantize(src_path, dst_path, ftype, progress: bool = True, *, pure: bool = False) -> QuantizeReport:
    """Quantize the GGUF file `src_path` to `dst_path` as llama-quantize does for file type `ftype`
    (a name such as "Q4_K_M" or "q8_0", any case, or a FileType). pure: every quantizable tensor
    gets the type's block type (llama-quantize --pure). Shows a tqdm bar when progress is true.
    Warns (RequantizeWarning, FallbackWarning) as llama-quantize does; raises QuantizeError or
    tensorgpu.gguf.GGUFError (both ValueError) naming the file and tensor; leaves no partial output."""
    from tensorgpu.gguf import GGUFError
    t0 = time.perf_counter()
    ft = ftype if isinstance(ftype, FileType) else parse_file_type(ftype)
    src, dst = os.fspath(src_path), os.fspath(dst_path)
    out_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(out_dir):
        raise QuantizeError(f"cannot write {dst}: folder {out_dir} does not exist")
    if os.path.isdir(dst):
        raise QuantizeError(f"cannot write {dst}: it is a folder; give the output file's name")
    try:
        size = os.path.getsize(src)
        with open(src, "rb") as fin:
            if os.path.exists(dst) and os.path.samefile(src, dst):
                raise QuantizeError(f"{dst}: the output would overwrite the input; choose another file name")
            if size < 24:
                raise GGUFError(f"{src}: not a GGUF file: {size} bytes, shorter than a GGUF header")
            with mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                scan = _scan_file(src, mm, size)
                records = _kv_records(mm, size, src, len(scan.kv_types))
    except OSError as e:
        raise QuantizeError(f"cannot read {src}: {e.strerror or e}") from None
    split = scan.metadata.get("split.count", 1)
    if isinstance(split, int) and split > 1:
        raise QuantizeError(f"{src}: a split GGUF ({split} files); merge it first (llama-gguf-split --merge)")
    types, plans = _plan(src, scan, ft, pure)
    fallbacks = _warn_about(src, types, plans)
    tmp = dst + ".part"
    try:
        _write_file(tmp, src, _header(records, plans, ft, scan.alignment), plans, scan.alignment,
                    f"{os.path.basename(dst)} ({ft.name})", progress)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return QuantizeReport(dst, ft, {p.name: types[p.name] for p in plans}, sum(e.nbytes for e in scan.tensors),
                          sum(p.nbytes for p in plans), sum(int(np.prod(p.entry.ne, dtype=np.int64)) for p in plans),
                          time.perf_counter() - t0, fallbacks)


# ----------------------------------------------------------------------------- command line


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    types = "\n".join(f"  {ft.name:<7} general.file_type {ft.ftype:>2}: {ft.about}" for ft in FILE_TYPES.values())
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize a GGUF model file as llama-quantize does (same per-tensor types, same blocks).",
        epilog=f"types (any case; Q4_K and Q5_K mean Q4_K_M and Q5_K_M):\n{types}")
    ap.add_argument("input", metavar="IN.gguf", help="GGUF file to quantize (f32/f16/bf16, or already quantized: "
                                                     "those tensors are dequantized first, with a warning)")
    ap.add_argument("output", metavar="OUT.gguf", help="GGUF file to write (its folder must exist)")
    ap.add_argument("type", metavar="TYPE", help="target type, e.g. Q4_K_M or q8_0 (list below)")
    ap.add_argument("--pure", action="store_true", help="no k-quant mix: every quantizable tensor gets TYPE's block "
                                                        "type (as llama-quantize --pure)")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="accepted for llama-quantize compatibility; requantizing is always allowed (with a warning)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """The command line (also `tensorgpu quantize`, prog naming it); returns the exit status (0, 2
    for a bad input, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = _parser(prog).parse_args(argv)
    except SystemExit as e:   # --help (0) or a usage error (2): argparse already printed
        return int(e.code or 0)
    from tensorgpu.gguf import GGUFError
    try:
        ft = parse_file_type(a.type)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *args, **kw: print(f"warning: {msg}", file=sys.stderr)
            report = quantize(a.input, a.output, ft, progress=not a.no_progress, pure=a.pure)
    except (GGUFError, QuantizeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    print(f"{a.output}: {report.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
