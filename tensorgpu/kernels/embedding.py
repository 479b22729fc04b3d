"""Embedding row gather: out[i, :] = table[ids[i], :] as float32.

Why a dedicated kernel: the ids live on the GPU (in a pipelined decode loop they are the
sampler's output of the previous step), so the gather can't be a host-side slice. Ids are
validated on the host by the caller when they are known there; the kernel itself never
reads out of bounds: an id outside [0, vocab) yields a row of zeros.

Tables: float32, float16 (array<f16> with shader-f16, packed u32 otherwise), or any GGML block
type / bf16 that kernels/quant.py decodes (its `dq4` block decoder is reused, so a quantized
row is decoded bit-identically to gguf.quants.dequantize).
"""
from __future__ import annotations

from .. import dtypes
from ..runtime import Buffer, dispatch, grid_for
from .common import Operand, epilogue_bindings
from .nn_wgsl import Reader, check_out, distinct, enable_f16, epilogue_or_default

WG = 256


def _float_source(table_dtype, table_offset: int, n: int, vocab: int, dim: int, ids_offset: int, ep) -> tuple:
    vec = dim % 4 == 0 and table_offset % 4 == 0
    op = Operand(None, table_dtype, (vocab, dim), (dim, 1), table_offset)
    rd = Reader("tbl", op, 1, vec)
    V = 4 if vec else 1
    items = n * (dim // V)
    per_row = dim // V
    if vec:
        load = f"tbl_at4({table_offset}u + u32(id) * {dim}u + j * 4u)"
        store = ("let e0 = i * {dim}u + j * 4u; let a = select(vec4<f32>(0.0), {load}, ok); "
                 "out[t] = vec4<f32>(epilogue(a.x, e0), epilogue(a.y, e0 + 1u), epilogue(a.z, e0 + 2u), epilogue(a.w, e0 + 3u));")
    else:
        load = f"tbl_at({table_offset}u + u32(id) * {dim}u + j)"
        store = "let a = select(0.0, {load}, ok); out[t] = epilogue(a, i * {dim}u + j);"
    src = f"""{enable_f16(rd)}@group(0) @binding(0) var<storage, read> ids: array<i32>;
{rd.decl()}
@group(0) @binding(2) var<storage, read_write> out: array<{'vec4<f32>' if vec else 'f32'}>;
{ep.wgsl(3)}
@compute @workgroup_size({WG})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{
  let t = gid.x + gid.y * nwg.x * {WG}u;
  if (t >= {items}u) {{ return; }}
  let i = t / {per_row}u;
  let j = t % {per_row}u;
  let id = ids[{ids_offset}u + i];
  let ok = id >= 0 && id < {vocab};
  var a_id = select(0, id, ok);
  {store.format(dim=dim, load=load.replace("u32(id)", "u32(a_id)"))}
}}
"""
    return src, items


def _quant_source(table_dtype, n: int, vocab: int, dim: int, ids_offset: int, ep) -> tuple:
    try:
        from .quant import _format_wgsl  # the block decoders (dq4) of the quantized matmul
    except ImportError as e:  # pragma: no cover - quant.py ships with tensorgpu
        raise NotImplementedError(f"embedding: {table_dtype.name} tables need kernels/quant.py's block decoders") from e
    bf16 = table_dtype is dtypes.bfloat16
    if not bf16 and dim % table_dtype.block_size:
        raise ValueError(f"embedding: a {table_dtype.name} table row of dim={dim} is not a whole number of "
                         f"{table_dtype.block_size}-element blocks")
    row_bytes = dim * 2 if bf16 else dim // table_dtype.block_size * table_dtype.block_bytes
    groups = -(-dim // 4)
    items = n * groups
    if bf16:
        dq = "dq4(rb, 4u * j)"
    else:
        gpb = table_dtype.block_size // 4
        dq = f"dq4(rb + (j / {gpb}u) * {table_dtype.block_bytes}u, j % {gpb}u)"
    if dim % 4 == 0:
        store = ("let e0 = i * {dim}u + j * 4u; "
                 "out[t] = vec4<f32>(epilogue(a.x, e0), epilogue(a.y, e0 + 1u), epilogue(a.z, e0 + 2u), epilogue(a.w, e0 + 3u));").format(dim=dim)
        otype = "vec4<f32>"
    else:
        store = (f"for (var c = 0u; c < 4u; c = c + 1u) {{ if (4u * j + c < {dim}u) {{ "
                 f"out[i * {dim}u + 4u * j + c] = epilogue(a[c], i * {dim}u + 4u * j + c); }} }}")
        otype = "f32"
    src = f"""@group(0) @binding(0) var<storage, read> ids: array<i32>;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<{otype}>;
{ep.wgsl(3)}
{_format_wgsl(table_dtype, True, dim, False)}
@compute @workgroup_size({WG})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{
  let t = gid.x + gid.y * nwg.x * {WG}u;
  if (t >= {items}u) {{ return; }}
  let i = t / {groups}u;
  let j = t % {groups}u;
  let id = ids[{ids_offset}u + i];
  let ok = id >= 0 && id < {vocab};
  let rb = u32(select(0, id, ok)) * {row_bytes}u;
  var a = vec4<f32>(0.0);
  if (ok) {{ a = {dq}; }}
  {store}
}}
"""
    return src, items


def embedding(out: Buffer, ids: Buffer, table: Buffer, table_dtype, n: int, vocab: int, dim: int,
              ids_offset: int = 0, table_offset: int = 0, epilogue=None) -> None:
    """out[i, :] = table[ids[ids_offset + i], :] for i < n, contiguous float32 [n, dim].

    ids: int32 Buffer. table: Buffer holding [vocab, dim] row-major, starting at element
    `table_offset` (float tables only) in float32, float16, bf16 or a GGML block type.
    An id outside [0, vocab) gives a zero row (validate ids on the host to raise instead).
    epilogue(acc, i*dim + c) is applied at the store."""
    table_dtype = dtypes.as_dtype(table_dtype)
    fn = "embedding"
    if n < 0 or vocab < 0 or dim < 0:
        raise ValueError(f"embedding: n={n}, vocab={vocab}, dim={dim} must be >= 0")
    if table_dtype not in (dtypes.float32, dtypes.float16) and not table_dtype.is_quant:
        raise TypeError(f"embedding: table dtype {table_dtype} is not a float or GGML block type")
    if ids.nbytes < 4 * (ids_offset + n):
        raise ValueError(f"embedding: ids holds {ids.nbytes // 4} int32 values, needs ids_offset+n={ids_offset + n}")
    if table_dtype.is_quant and table_dtype is not dtypes.bfloat16 and dim % table_dtype.block_size:
        raise ValueError(f"embedding: a {table_dtype.name} table row of dim={dim} is not a whole number of "
                         f"{table_dtype.block_size}-element blocks")
    need = table_dtype.nbytes(vocab * dim) if table_dtype.is_quant else (table_offset + vocab * dim) * table_dtype.gpu_itemsize
    if table.nbytes < need:
        raise ValueError(f"embedding: table buffer holds {table.nbytes} bytes, a {table_dtype.name} [{vocab}, {dim}] "
                         f"table needs {int(need)}")
    if n == 0 or dim == 0:
        return
    check_out("out", out, 4 * n * dim, fn)
    ep = epilogue_or_default(epilogue)
    distinct(fn, out=out, ids=ids, table=table, **{f"epilogue{i}": o.buffer for i, o in enumerate(ep.operands)})
    if table_dtype in (dtypes.float32, dtypes.float16):
        src, items = _float_source(table_dtype, table_offset, n, vocab, dim, ids_offset, ep)
    elif table_dtype.is_quant:
        if table_offset:
            raise ValueError(f"embedding: table_offset must be 0 for a {table_dtype.name} table")
        src, items = _quant_source(table_dtype, n, vocab, dim, ids_offset, ep)
    else:
        raise TypeError(f"embedding: table dtype {table_dtype} is not a float or GGML block type")
    dispatch(f"embedding_{table_dtype.name}[{n}x{dim}]", src,
             [(ids, "read"), (table, "read"), (out, "rw")] + epilogue_bindings(ep), grid_for(-(-items // WG)))
