"""Tiled matmul on tensor cores: wgpu's cooperative matrices, 16x16 f16 fragments accumulated in f32.

Why: prefill and batched decode are compute-bound, and the WGSL f32 FMA tiles (matmul.py) reach
15-21 TFLOP/s on the H200 while its tensor cores do an order of magnitude more. wgpu exposes them
as `coop_mat16x16<f16, A|B>` / `coop_mat16x16<f32, C>` with coopLoad / coopLoadT /
coopMultiplyAdd / coopStoreT (on the H200: coopLoad reads a column-major fragment, coopLoadT a
row-major one; self_test checks both on every adapter before the path is used).

The kernel is matmul's tiled kernel with another inner loop. The tile loads are matmul._tile_load's
(any layout and stride, f32 or f16 operands, quant.py's GGUF block decoders, stacked b parts), with
values rounded to f16 as they are stored into shared memory: a [TM x BK] and b [TN x BK], t-major
with each row padded by TUNING["pad"] (or k-major [BK x T]: TUNING["layout"] = "k").
A workgroup has 4 or 8 subgroups of 32 invocations; subgroup w owns a WM x WN block of the output
tile as (WM/16) x (WN/16) accumulator fragments. Read from the t-major tiles, a's [16 m x 16 k]
fragment is row-major and b's [16 k x 16 n] fragment column-major (the other way round k-major).
After the K loop each fragment goes through a 1 KiB per-subgroup scratch in shared memory, from
which the subgroup's invocations apply the fused epilogue and store (or store raw partial sums for
split-K, reduced by matmul's reduce pass).

Precision: operands rounded to f16 (11-bit significand; f16 and GGUF-quant weights lose nothing
beyond their own dequantization rounding), products and sums in f32. Range: an activation beyond
f16's +-65504 becomes inf (transformer linears see normalized inputs, far inside it; a model that
does not should run with TUNING["enabled"] = False). matmul.plan uses this path
only when an operand is stored in f16 or a quant format (never for f32 x f32, which keeps full f32
precision) and the adapter passed self_test; TUNING["enabled"] = False or TENSORGPU_DISABLE_COOPMAT=1
turns it off. Subgroups are assumed to be 32 consecutive invocations (NVIDIA); self_test fails on
any adapter where that does not hold, and the WGSL tiles are used there."""
from __future__ import annotations

import os

import numpy as np

from . import matmul as mm
from .common import NoEpilogue

# output tile (TM, TN) -> the block (WM, WN) one subgroup computes; subgroups = (TM/WM) * (TN/WN)
COOP_TILES = {
    (16, 64): (16, 16), (32, 64): (16, 32), (64, 64): (32, 32),
    (64, 128): (32, 32), (128, 64): (32, 32), (128, 128): (64, 32),
}

TUNING = {
    "enabled": True,     # use the tensor-core path where plan() allows it
    "min_m": 16,         # rows (M) from which a tiled matmul goes to the tensor cores
    "tile": None,        # force (TM, TN), one of COOP_TILES
    "split_k": None,     # force a split-K factor
    # K step (a multiple of 16) above 64 rows, and up to 64 rows (batched decode). H200 sweep, M = 512,
    # pythia-1.4b's four linears: K step 64 is 1.32x faster than 32 (fewer barriers per FLOP); the
    # decode sizes were measured at 32 only. TENSORGPU_COOP_BK overrides both, for A/B runs.
    "bk": int(os.environ.get("TENSORGPU_COOP_BK", "64")),
    "bk_small": int(os.environ.get("TENSORGPU_COOP_BK", "32")),
    "layout": "t",       # shared tiles t-major [T][BK + pad] ("t") or k-major [BK][T] ("k")
    "pad": 8,            # f16 elements after each t-major row (bank spread of the fragment loads)
    # relative throughput of each tile for the cost model (the same model as matmul._tiled_config)
    "tile_eff": ((128, 128, 1.0), (128, 64, 0.85), (64, 128, 0.85), (64, 64, 0.7),
                 (32, 64, 0.45), (16, 64, 0.3)),
    "target_wgs": 264,   # workgroups to aim for (2 per SM on an H200)
    # subgroup tiles other than COOP_TILES', as "TMxTN:WMxWN+...": e.g. "64x64:16x32" runs a 64x64
    # output tile on 8 subgroups instead of 4 (more loads in flight for the 64-row batched decode
    # tiles, whose K loop is latency-bound: RESULTS.md, seventh session); None: COOP_TILES
    "warp_tiles": None,
    # K-concatenated matmuls (matmul's k_parts) on the tensor cores: generated and tested as if on
    # every CI run, not yet run on a GPU (tests/test_kernel_matmul_coop.py::test_coop_k_parts);
    # until then rewrites.pair_matmuls_in_sum leaves such sums as two matmuls on these adapters
    "k_parts": False,
    "split_min_k": 256,
}

_SELF_TEST = """enable f16;
enable wgpu_cooperative_matrix;
@group(0) @binding(0) var<storage, read> a: array<f16>;
@group(0) @binding(1) var<storage, read> at: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    let w = lid / 32u;
    var acc = coop_mat16x16<f32, C>();
    let x = coopLoadT<coop_mat16x16<f16, A>>(&a[w * 256u], 16u);
    let xt = coopLoad<coop_mat16x16<f16, A>>(&at[w * 256u], 16u);
    let y = coopLoadT<coop_mat16x16<f16, B>>(&b[0], 16u);
    acc = coopMultiplyAdd(x, y, acc);
    acc = coopMultiplyAdd(xt, y, acc);
    coopStoreT(acc, &c[w * 256u], 16u);
}
"""


def self_test(dev) -> bool:
    """Whether this adapter computes 2 * A_w @ B right for two subgroups w of a 64-invocation
    workgroup, with row-major (coopLoadT) and column-major (coopLoad) fragment loads: the layout
    semantics and the 32-wide subgroups the kernel relies on."""
    import wgpu
    try:
        rng = np.random.default_rng(7)
        a = rng.standard_normal((2, 16, 16)).astype(np.float16)
        b = rng.standard_normal((16, 16)).astype(np.float16)
        at = np.ascontiguousarray(a.transpose(0, 2, 1))
        d = dev.device
        U = wgpu.BufferUsage
        bufs = [d.create_buffer_with_data(data=x.tobytes(), usage=U.STORAGE) for x in (a, at, b)]
        out = d.create_buffer(size=2 * 256 * 4, usage=U.STORAGE | U.COPY_SRC)
        pipe = d.create_compute_pipeline(layout="auto", compute={
            "module": d.create_shader_module(code=_SELF_TEST), "entry_point": "main"})
        bg = d.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=[
            {"binding": i, "resource": {"buffer": x}} for i, x in enumerate(bufs + [out])])
        enc = d.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, bg)
        cp.dispatch_workgroups(1)
        cp.end()
        d.queue.submit([enc.finish()])
        got = np.frombuffer(d.queue.read_buffer(out), np.float32).reshape(2, 16, 16)
        want = 2 * (a.astype(np.float32) @ b.astype(np.float32))
        return bool(np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max())))
    except Exception:   # noqa: BLE001 -- any refusal (parse, validation, driver) means "not here"
        return False


def warp_tile(TM: int, TN: int) -> tuple:
    """(WM, WN): the output block one subgroup owns in a TM x TN tile (TUNING["warp_tiles"], else
    COOP_TILES): multiples of 16 dividing the tile, 8 subgroups at most."""
    spec = TUNING.get("warp_tiles")
    if spec:
        for item in str(spec).split("+"):
            tile, _, warp = item.partition(":")
            if tuple(int(v) for v in tile.split("x")) == (TM, TN):
                WM, WN = (int(v) for v in warp.split("x"))
                if WM % 16 or WN % 16 or TM % WM or TN % WN or (TM // WM) * (TN // WN) > 8:
                    raise ValueError(f"matmul_coop: warp tile {WM}x{WN} for the {TM}x{TN} tile: multiples of 16 "
                                     f"that divide it, at most 8 subgroups")
                return WM, WN
    return COOP_TILES[(TM, TN)]


def eligible(c) -> bool:
    """Whether plan() sends this tiled matmul to the tensor cores (see the module docstring)."""
    if not TUNING["enabled"] or c.M < int(TUNING["min_m"]) or not c.dev.has_coopmat:
        return False
    if c.kparts and not TUNING["k_parts"]:
        return False
    f16 = mm.dtypes.float16
    return c.A.dtype is f16 or c.B.dtype is f16 or c.b_binding is not None or \
        any(pm.dtype is f16 or pb is not None for pm, pb, _ in c.parts)


def takes(M: int, dtypes_: tuple) -> bool:
    """Whether a tiled matmul of M rows whose operands have these dtypes would run here (the
    adapter, the switches and eligible()'s dtype rule, without planning it)."""
    f16 = mm.dtypes.float16
    return (bool(TUNING["enabled"]) and M >= int(TUNING["min_m"]) and mm.runtime.get_device().has_coopmat
            and any(d is f16 or d.is_quant for d in dtypes_))


def config(c) -> tuple:
    """(TM, TN, BK, S, KC): output tile, K step, split-K factor and K steps per split, by
    matmul's tile cost model (_best_tile) (tile efficiency x fill of the target workgroup count x wave
    quantization x useful share, -3% per extra split) over COOP_TILES."""
    M, N, K, nb = c.M, c.N, c.K, c.nb
    knob = "bk" if M > 64 else "bk_small"
    BK = int(TUNING[knob])
    if BK <= 0 or BK % 16:
        raise ValueError(f"matmul_coop: TUNING[{knob!r}] = {BK}; the K step must be a positive multiple of 16")
    KT = -(-K // BK)
    max_s = max(1, c.dev.max_binding_size // max(1, nb * M * N * 4))
    smem = c.dev.max_workgroup_storage

    row = BK + (int(TUNING["pad"]) if TUNING["layout"] == "t" else 0)

    def fits(tm, tn):
        wm, wn = warp_tile(tm, tn)
        warps = (tm // wm) * (tn // wn)
        return row * (tm + tn) * 2 + warps * 1024 <= smem

    forced = TUNING.get("tile")
    S = TUNING.get("split_k")
    if forced:
        TM, TN = (int(x) for x in forced)
        if (TM, TN) not in COOP_TILES:
            raise ValueError(f"matmul_coop: tile {TM}x{TN} is not one of {sorted(COOP_TILES)}")
        S = int(S or 1)
    else:
        best = mm._best_tile(c, [(int(tm), int(tn), eff, BK) for tm, tn, eff in TUNING["tile_eff"]
                                 if (int(tm), int(tn)) in COOP_TILES and fits(int(tm), int(tn))],
                             S, max_s, int(TUNING["target_wgs"]), int(TUNING["split_min_k"]))
        TM, TN, S = best or (16, 64, 1)
    S, KC = mm._split_steps(KT, S, max_s)
    return TM, TN, BK, S, KC


def gen(c):
    """(name, WGSL body, grid, info) of the tensor-core tiled kernel for matmul._Ctx c."""
    _u = mm._u
    M, N = c.M, c.N
    TM, TN, BK, S, KC = config(c)
    WM, WN = warp_tile(TM, TN)
    WX = TN // WN                       # subgroups along n
    NW = (TM // WM) * WX
    NT = 32 * NW
    FM, FN = WM // 16, WN // 16
    gm, gn = -(-M // TM), -(-N // TN)
    total = gm * gn * c.nb * S
    if S > 1:
        c.ep = NoEpilogue()
    tmaj = TUNING["layout"] == "t"
    SK = BK + int(TUNING["pad"]) if tmaj else 0     # t-major row stride (f16 elements)
    moda, modb, regs, loads, stores = mm._tile_loads(c, TM, TN, BK, NT, a_lanes=1, b_lanes=1, cast="f16", tmajor=SK)
    s = ["enable f16;\nenable wgpu_cooperative_matrix;\n",
         f"var<workgroup> mm_As: array<f16, {(SK or BK) * TM}>;\n",
         f"var<workgroup> mm_Bs: array<f16, {(SK or BK) * TN}>;\n",
         f"var<workgroup> mm_Cs: array<f32, {NW * 256}>;\n",
         mm._tile_prologue(c, TM, TN, BK, S, KC, NT),
         f"    let w = lid / 32u;\n    let wm0 = (w / {WX}u) * {WM}u;\n    let wn0 = (w % {WX}u) * {WN}u;\n"]
    for i in range(FM):
        for j in range(FN):
            s.append(f"    var acc{i}_{j} = coop_mat16x16<f32, C>();\n")
    s.append(mm._k_loop_head(BK, regs, loads, stores))
    for kf in range(BK // 16):
        s.append("        {\n")
        for i in range(FM):
            if tmaj:   # a's [16 m x 16 k] fragment: row-major, stride SK
                s.append(f"            let fa{i} = coopLoadT<coop_mat16x16<f16, A>>(&mm_As[(wm0 + {16 * i}u) * {SK}u + {kf * 16}u], {SK}u);\n")
            else:      # column-major, stride TM
                s.append(f"            let fa{i} = coopLoad<coop_mat16x16<f16, A>>(&mm_As[{kf * 16 * TM + 16 * i}u + wm0], {TM}u);\n")
        for j in range(FN):
            if tmaj:   # b's [16 k x 16 n] fragment: column-major, stride SK
                s.append(f"            let fb{j} = coopLoad<coop_mat16x16<f16, B>>(&mm_Bs[(wn0 + {16 * j}u) * {SK}u + {kf * 16}u], {SK}u);\n")
            else:      # row-major, stride TN
                s.append(f"            let fb{j} = coopLoadT<coop_mat16x16<f16, B>>(&mm_Bs[{kf * 16 * TN + 16 * j}u + wn0], {TN}u);\n")
        for i in range(FM):
            for j in range(FN):
                s.append(f"            acc{i}_{j} = coopMultiplyAdd(fa{i}, fb{j}, acc{i}_{j});\n")
        s.append("        }\n")
    s.append("        workgroupBarrier();\n    }\n")
    # epilogue: each fragment through the subgroup's scratch; lane l takes row l / 2, 8 columns
    s.append(mm._out_base(c, S))
    s.append("    let lane = lid % 32u;\n    let er = lane / 2u;\n    let ec = (lane % 2u) * 8u;\n"
             "    let cs = w * 256u + er * 16u + ec;\n")
    for i in range(FM):
        for j in range(FN):
            s.append(f"    coopStoreT(acc{i}_{j}, &mm_Cs[w * 256u], 16u);\n    workgroupBarrier();\n")
            s.append(f"    {{ let m = at0 + wm0 + {16 * i}u + er;\n")
            if M % TM:
                s.append(f"      if (m < {_u(M)}) {{\n")
            for q in range(2):
                s.append(f"        {{ let n = bt0 + wn0 + {16 * j + 4 * q}u + ec; let o = ob + m * {_u(N)} + n;\n"
                         f"          let v = vec4<f32>(mm_Cs[cs + {4 * q}u], mm_Cs[cs + {4 * q + 1}u], "
                         f"mm_Cs[cs + {4 * q + 2}u], mm_Cs[cs + {4 * q + 3}u]);\n" + mm._store4(c, S, TN))
            if M % TM:
                s.append("      }\n")
            s.append("    }\n    workgroupBarrier();\n")
    s.append("}\n")
    name = (f"matmul_coop_{c.dtag()}_t{TM}x{TN}_{moda}{modb}_k{BK}" + ("" if tmaj else "_kmaj")
            + (f"_s{S}" if S > 1 else ""))
    if (WM, WN) != COOP_TILES[(TM, TN)]:
        name += f"_w{WM}x{WN}"
    if c.parts:
        name += f"_x{len(c.parts) + 1}"
    if c.kparts:
        name += f"_kc{len(c.kparts) + 1}"
    info = {"tile": (TM, TN), "warp_tile": (WM, WN), "threads": NT, "modes": (moda, modb), "bk": BK,
            "split": S, "coop": True}
    return name, "".join(s), mm.runtime.grid_for(total), info
