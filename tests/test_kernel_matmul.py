"""matmul / GEMV kernels against NumPy (float64 reference over the same f32/f16 values).

Tolerance: |gpu - ref| <= RTOL * (|a| @ |b|) + 1e-6 elementwise, i.e. relative to the sum of the
magnitudes of the products (robust to cancellation), with RTOL = 1e-4 (f32 accumulation; f16
inputs are compared with the same f16 values upcast, so only accumulation error remains).
"""
import math

import numpy as np
import pytest

from tensorgpu import debug, dtypes, runtime
from tensorgpu.kernels import matmul as mm
from tensorgpu.kernels.common import Operand

RTOL = 1e-4
F32, F16 = dtypes.float32, dtypes.float16


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(params=[(True, True), (False, False)], ids=["f16+sg", "packed+nosg"])
def paths(request):
    """Both code paths: shader-f16 + subgroups, and packed-u32 f16 + shared-memory reductions."""
    old = (runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups)
    runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups = request.param
    yield request.param
    runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups = old


@pytest.fixture
def tuning():
    """Lets a test change mm.TUNING and restores it."""
    with debug.tuning(mm.TUNING) as knobs:
        yield knobs


_rng = np.random.default_rng(1234)


def rand(*shape, dtype=np.float32):
    return _rng.standard_normal(shape).astype(dtype)


class Base:
    """A contiguous host array uploaded once; `view(v)` makes an Operand for any NumPy view of it
    (slices, transposes, broadcasts, negative steps) with its element strides and offset."""

    def __init__(self, arr):
        self.arr = np.ascontiguousarray(arr)
        self.dtype = dtypes.from_numpy(self.arr.dtype)
        self.buf = runtime.upload(self.arr)

    def view(self, v):
        isz = self.arr.itemsize
        off = v.__array_interface__["data"][0] - self.arr.__array_interface__["data"][0]
        assert off % isz == 0
        return Operand(self.buf, self.dtype, tuple(v.shape), tuple(s // isz for s in v.strides), off // isz)


def op(x):
    base = Base(x)
    return base.view(base.arr)


def run(a_view, a_op, b_view, b_op, epilogue=None, force=None, ref_fn=None):
    shape = np.broadcast_shapes(a_view.shape[:-2], b_view.shape[:-2]) + (a_view.shape[-2], b_view.shape[-1])
    n = math.prod(shape)
    out = runtime.Buffer(max(n, 1) * 4)
    launch = mm.plan(out, a_op, b_op, epilogue, force=force)
    if launch.kind != "empty":
        runtime.dispatch(launch.name, launch.wgsl, launch.bindings, launch.grid)
        for e in launch.extra:   # split-K reduction
            runtime.dispatch(*e)
    got = np.frombuffer(runtime.read(out, 0, n * 4), np.float32).reshape(shape)
    a64, b64 = a_view.astype(np.float64), b_view.astype(np.float64)
    ref = a64 @ b64
    bound = RTOL * (np.abs(a64) @ np.abs(b64)) + 1e-6
    if ref_fn is not None:
        ref = ref_fn(ref)
        bound = bound * 2 + 1e-5
    err = np.abs(got - ref)
    assert got.shape == ref.shape
    assert np.all(err <= bound), (f"{launch.name}: max err {err.max()} (bound {bound.flat[np.argmax(err - bound)]}) "
                                  f"a {a_view.shape} {a_view.dtype} strides {a_op.strides} b {b_view.shape} {b_view.dtype} "
                                  f"strides {b_op.strides}")
    return launch


def make(M, K, N, ta=False, tb=True, da=np.float32, db=np.float32, batch=()):
    """a [*batch, M, K], b [*batch, K, N]; ta/tb store the operand transposed (tb: w [N, K] as for
    x @ w.T, the linear-layer case)."""
    a_store = rand(*batch, K, M, dtype=da) if ta else rand(*batch, M, K, dtype=da)
    b_store = rand(*batch, N, K, dtype=db) if tb else rand(*batch, K, N, dtype=db)
    A, B = Base(a_store), Base(b_store)
    av = np.swapaxes(A.arr, -1, -2) if ta else A.arr
    bv = np.swapaxes(B.arr, -1, -2) if tb else B.arr
    return av, A.view(av), bv, B.view(bv)


class BiasGelu:
    """Hand-written Epilogue: out = gelu_erf(acc + bias[n])."""

    def __init__(self, bias: np.ndarray):
        self.bias = bias.astype(np.float32)
        self.N = len(bias)
        self.operands = [op(self.bias)]

    def wgsl(self, first_binding: int) -> str:
        return f"""@group(0) @binding({first_binding}) var<storage, read> ep_bias: array<f32>;
fn ep_erf(x: f32) -> f32 {{
    // Abramowitz & Stegun 7.1.26, |error| < 1.5e-7
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return sign(x) * y;
}}
fn epilogue(acc: f32, i: u32) -> f32 {{
    let v = acc + ep_bias[i % {self.N}u];
    return 0.5 * v * (1.0 + ep_erf(v * 0.7071067811865476));
}}
"""

    def ref(self, x):
        v = x + self.bias.astype(np.float64)
        return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))


# ----------------------------------------------------------------------------- tiled


@pytest.mark.parametrize("M,K,N", [(5, 3, 7), (67, 45, 131), (64, 64, 64), (130, 36, 129)])
@pytest.mark.parametrize("layout", ["NN", "NT", "TN", "TT"])
def test_tiled_layouts_f32(M, K, N, layout):
    av, ao, bv, bo = make(M, K, N, ta=layout[0] == "T", tb=layout[1] == "T")
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.kind == "tiled"


@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("layout", ["NT", "TN", "NN"])
def test_tiled_tile_sizes_and_vec_modes(tile, layout, tuning):
    tuning["tile"] = tile
    av, ao, bv, bo = make(132, 48, 136, ta=layout[0] == "T", tb=layout[1] == "T")
    launch = run(av, ao, bv, bo)
    assert launch.kind == "tiled" and launch.info["tile"] == (tile, tile)
    want = {"NT": ("vk", "vk"), "TN": ("vt", "vt"), "NN": ("vk", "vt")}[layout]
    assert launch.info["modes"] == want


@pytest.mark.parametrize("da,db", [(np.float16, np.float16), (np.float32, np.float16), (np.float16, np.float32)])
@pytest.mark.parametrize("layout", ["NT", "TN", "NN"])
def test_tiled_f16(paths, da, db, layout):
    av, ao, bv, bo = make(70, 40, 68, ta=layout[0] == "T", tb=layout[1] == "T", da=da, db=db)
    run(av, ao, bv, bo)


def test_tiled_f16_unaligned_scalar(paths):
    # K odd: no vector loads along K; N odd: scalar stores
    av, ao, bv, bo = make(33, 19, 21, tb=True, da=np.float16, db=np.float16)
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.info["modes"] == ("s", "s")


def test_tiled_bk_not_dividing_k(tuning):
    tuning["bk"] = 8
    av, ao, bv, bo = make(40, 21, 36, tb=False)
    run(av, ao, bv, bo, force="tiled")


@pytest.mark.parametrize("tm,tn", [(128, 64), (64, 128), (128, 128), (64, 64)])
@pytest.mark.parametrize("layout", ["NT", "NN"])
def test_tiled_rectangular_tiles(tm, tn, layout, tuning):
    tuning["tile_mn"] = (tm, tn)
    av, ao, bv, bo = make(140, 24, 76, ta=layout[0] == "T", tb=layout[1] == "T")
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.info["tile"] == (tm, tn) and launch.info["split"] == 1


@pytest.mark.parametrize("split,M,K,N", [(2, 70, 64, 68), (3, 33, 100, 21), (4, 64, 36, 64), (5, 9, 80, 130)])
def test_tiled_split_k(paths, split, M, K, N, tuning):
    # partial sums in a scratch buffer, summed (epilogue applied once) by a second kernel;
    # K % 16 != 0 and K steps not dividing by the split factor leave a short last split
    tuning["split_k"] = split
    tuning["tile_mn"] = (64, 64)
    av, ao, bv, bo = make(M, K, N, tb=True, da=np.float16 if M % 2 else np.float32, db=np.float16)
    ep = BiasGelu(rand(N))
    launch = run(av, ao, bv, bo, epilogue=ep, force="tiled", ref_fn=ep.ref)
    KT = -(-K // 16)
    assert launch.info["split"] == -(-KT // -(-KT // split)) > 1 and len(launch.extra) == 1
    assert "ep_bias" not in launch.wgsl and "ep_bias" in launch.extra[0][1]


def test_tiled_split_k_batched(tuning):
    tuning["split_k"] = 2
    av, ao, bv, bo = make(20, 64, 12, tb=False, batch=(3,))
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.info["split"] == 2


def test_tiled_auto_split_for_prefill_shapes(tuning):
    # few output tiles and a long K: the planner splits K (plan only; nothing runs)
    a = Operand(runtime.Buffer(512 * 8192 * 4), dtypes.float32, (512, 8192), (8192, 1), 0)
    b = Operand(runtime.Buffer(2048 * 8192 * 2), dtypes.float16, (8192, 2048), (1, 8192), 0)
    launch = mm.plan(runtime.Buffer(512 * 2048 * 4), a, b)
    tiles = -(-512 // launch.info["tile"][0]) * -(-2048 // launch.info["tile"][1])
    assert launch.kind == "tiled" and tiles * launch.info["split"] >= 128


# ----------------------------------------------------------------------------- GEMV


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("K", [1, 7, 64, 257, 1000])
@pytest.mark.parametrize("N", [1, 33])
def test_gemv_linear_f32(M, K, N):
    av, ao, bv, bo = make(M, K, N, tb=True)
    launch = run(av, ao, bv, bo)
    assert launch.kind == ("gemv_k" if K > 1 or N == 1 else "gemv_n")


@pytest.mark.parametrize("M,K,N", [(1, 64, 40), (3, 200, 9), (1, 1000, 5)])
@pytest.mark.parametrize("dt", [np.float32, np.float16])
def test_gemv_paths(all_paths, M, K, N, dt):
    """f16 on the shader-f16 and packed paths, subgroup and shared-memory reductions."""
    av, ao, bv, bo = make(M, K, N, tb=True, da=dt, db=dt)
    launch = run(av, ao, bv, bo)
    assert launch.info["subgroups"] == (all_paths[1])
    want_w = 8 if (dt == np.float16 and K % 8 == 0) else 4 if K % 4 == 0 else 1
    assert launch.info["W"] == want_w


@pytest.mark.parametrize("K", [12, 13])
def test_gemv_f16_width4_and_tail(all_paths, K):
    # K % 8 == 4 -> 4-wide f16 loads (vec4<f16> or vec2<u32>); K == 13 -> scalar
    av, ao, bv, bo = make(2, K, 20, tb=True, da=np.float16, db=np.float16)
    launch = run(av, ao, bv, bo)
    assert launch.info["W"] == (4 if K == 12 else 1)


def test_gemv_mixed_dtypes(paths):
    av, ao, bv, bo = make(2, 96, 17, tb=True, da=np.float32, db=np.float16)
    assert run(av, ao, bv, bo).info["W"] == 8
    av, ao, bv, bo = make(1, 96, 17, tb=True, da=np.float16, db=np.float32)
    assert run(av, ao, bv, bo).info["W"] == 4


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("dt", [np.float32, np.float16])
def test_gemv_n_major(paths, M, dt):
    """x @ w with w stored [K, N]: adjacent threads own adjacent columns."""
    for K, N in [(50, 70), (9, 3)]:
        av, ao, bv, bo = make(M, K, N, tb=False, da=dt, db=dt)
        assert run(av, ao, bv, bo).kind == "gemv_n"


def test_gemv_long_k():
    av, ao, bv, bo = make(1, 16384, 8, tb=True)
    launch = run(av, ao, bv, bo)
    assert launch.kind == "gemv_k" and launch.info["threads"] == 256


@pytest.mark.parametrize("cols,threads", [(1, 64), (2, 128), (4, 256), (3, 64)])
def test_gemv_tuning_knobs(cols, threads, tuning):
    tuning["gemv_cols"], tuning["gemv_threads"] = cols, threads
    av, ao, bv, bo = make(2, 520, 11, tb=True)
    launch = run(av, ao, bv, bo)
    assert launch.info["cols"] == cols and launch.info["threads"] == threads


def test_gemv_2d_grid():
    """More than 65,535 workgroups: the launch is 2-D and every column is still written once."""
    N = 70001
    av, ao, bv, bo = make(1, 4, N, tb=True)
    launch = run(av, ao, bv, bo)
    assert launch.kind == "gemv_k" and launch.grid[1] > 1 and launch.grid[0] * launch.grid[1] >= N


def test_tiled_2d_grid(tuning):
    # a batch of 1-row-tile products, past 65,535 workgroups with the 64 tile
    tuning["tile"] = 64
    av, ao, bv, bo = make(5, 2, 3, batch=(65600,))
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.grid[1] > 1


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("M", [1, 3, 40])
def test_batch_broadcast(paths, M):
    """b broadcast over batch with stride 0 (one weight for every batch), a batched [2, 3, M, K]."""
    K, N = 24, 20
    A, W = Base(rand(2, 3, M, K)), Base(rand(N, K, dtype=np.float16))
    wv = np.broadcast_to(W.arr.T, (2, 3, K, N))
    assert wv.strides[0] == 0
    run(A.arr, A.view(A.arr), wv, W.view(wv))


@pytest.mark.parametrize("M", [2, 33])
def test_batch_both_strided(M):
    """Batched, a transposed per batch and b permuted from a [K, B, N] layout (head-major attention)."""
    B_, K, N = 3, 16, 12
    A = Base(rand(B_, K, M))
    Bb = Base(rand(K, B_, N))
    av = np.swapaxes(A.arr, 1, 2)
    bv = np.transpose(Bb.arr, (1, 0, 2))
    run(av, A.view(av), bv, Bb.view(bv))


@pytest.mark.parametrize("M", [1, 4, 37])
def test_sliced_with_offsets(paths, M):
    """Slices of bigger tensors: offset, row stride > K, column step."""
    A = Base(rand(M + 3, 50))
    W = Base(rand(40, 72, dtype=np.float16))
    av = A.arr[2:2 + M, 5:5 + 32]                # offset 105, row stride 50
    bv = W.arr[1:33, 3:3 + 2 * 19:2]              # [32, 19] with column step 2
    run(av, A.view(av), bv, W.view(bv))
    bv2 = W.arr[4:4 + 19, 8:8 + 32].T             # x @ w.T of a slice, offset 296: vector loads
    launch = run(av, A.view(av), bv2, W.view(bv2))
    if M <= mm.GEMV_MAX_M:
        assert launch.kind == "gemv_k" and launch.info["W"] == 8
    else:
        assert launch.info["modes"] == ("s", "vk")


def test_negative_strides():
    A, W = Base(rand(6, 20)), Base(rand(20, 9))
    av, bv = A.arr[::-1, ::-1], W.arr[::-1, :]
    run(av, A.view(av), bv, W.view(bv))
    av1 = A.arr[::-2]                             # M = 3 GEMV
    run(av1, A.view(av1), bv, W.view(bv))


@pytest.mark.parametrize("M", [1, 20])
def test_same_buffer_for_a_and_b(M):
    """x @ x.T and q @ k.T from one fused buffer: bound once, read through two views."""
    X = Base(rand(M + 8, 32))
    av = X.arr[:M]
    bv = X.arr[M:M + 8].T
    run(av, X.view(av), bv, X.view(bv))
    run(X.arr, X.view(X.arr), X.arr.T, X.view(X.arr.T))


# ----------------------------------------------------------------------------- epilogue, edges


@pytest.mark.parametrize("M,force", [(1, None), (3, "gemv_n"), (40, None), (6, "naive")])
def test_epilogue_bias_gelu(paths, M, force):
    K, N = 36, 44
    av, ao, bv, bo = make(M, K, N, tb=True)
    ep = BiasGelu(rand(N))
    launch = run(av, ao, bv, bo, epilogue=ep, force=force, ref_fn=ep.ref)
    assert "ep_bias" in launch.wgsl and len(launch.bindings) == 4


class F16Bias:
    """An epilogue that brings its own `enable f16;` (an f16 bias): the kernel must hoist it."""

    def __init__(self, bias: np.ndarray):
        self.bias = bias.astype(np.float16)
        self.N = len(bias)
        self.operands = [op(self.bias)]

    def wgsl(self, first_binding: int) -> str:
        if runtime.get_device().has_f16:
            return (f"enable f16;\n@group(0) @binding({first_binding}) var<storage, read> ep_b: array<f16>;\n"
                    f"fn epilogue(acc: f32, i: u32) -> f32 {{ return acc + f32(ep_b[i % {self.N}u]); }}\n")
        return (f"@group(0) @binding({first_binding}) var<storage, read> ep_b: array<u32>;\n"
                f"fn epilogue(acc: f32, i: u32) -> f32 {{ let j = i % {self.N}u; "
                f"return acc + unpack2x16float(ep_b[j >> 1u])[j & 1u]; }}\n")

    def ref(self, x):
        return x + self.bias.astype(np.float64)


@pytest.mark.parametrize("M,dt", [(1, np.float16), (2, np.float32), (20, np.float16)])
def test_epilogue_with_enable_directive(paths, M, dt):
    av, ao, bv, bo = make(M, 40, 12, tb=True, da=dt, db=dt)
    ep = F16Bias(rand(12))
    launch = run(av, ao, bv, bo, epilogue=ep, ref_fn=ep.ref)
    assert launch.wgsl.count("enable f16;") == (1 if paths[0] else 0)
    assert launch.wgsl.startswith("enable f16;") == paths[0]


@pytest.mark.parametrize("force", [None, "gemv_k", "gemv_n", "tiled"])
def test_every_path_on_one_awkward_shape(force):
    av, ao, bv, bo = make(3, 29, 31, tb=True, da=np.float16)
    run(av, ao, bv, bo, force=force)


def test_k_zero_gives_epilogue_of_zero():
    M, N = 3, 5
    a, b = np.zeros((M, 0), np.float32), np.zeros((0, N), np.float32)
    A, B = Base(np.zeros(4, np.float32)), Base(np.zeros(4, np.float32))
    ao = Operand(A.buf, F32, (M, 0), (0, 1), 0)
    bo = Operand(B.buf, F32, (0, N), (N, 1), 0)
    ep = BiasGelu(rand(N))
    launch = run(a, ao, b, bo, epilogue=ep, ref_fn=ep.ref)
    assert launch.kind == "naive"


def test_empty_output_is_a_noop():
    out = runtime.Buffer(4)
    a = Operand(runtime.Buffer(16), F32, (0, 4), (4, 1), 0)
    b = op(rand(4, 3))
    assert mm.plan(out, a, b).kind == "empty"
    before = runtime.pending_count()
    mm.matmul(out, a, b)
    assert runtime.pending_count() == before


def test_errors_name_shapes():
    a, b = op(rand(2, 3)), op(rand(4, 5))
    out = runtime.Buffer(64)
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(4, 5\)"):
        mm.matmul(out, a, b)
    with pytest.raises(ValueError, match="batch"):
        mm.matmul(out, op(rand(2, 2, 3)), op(rand(3, 3, 5)))
    with pytest.raises(ValueError, match="output buffer holds 8 bytes"):
        mm.matmul(runtime.Buffer(8), op(rand(2, 3)), op(rand(3, 5)))
    ints = Operand(runtime.upload(np.zeros(6, np.int32)), dtypes.int32, (3, 2), (2, 1), 0)
    with pytest.raises(TypeError, match="int32"):
        mm.matmul(out, op(rand(2, 3)), ints)
    with pytest.raises(ValueError, match="also an input"):
        mm.matmul(a.buffer, a, op(rand(3, 1)))
    bad = Operand(b.buffer, F32, (4, 5), (5, 1), 3)   # runs past the buffer's 20 elements
    with pytest.raises(ValueError, match="reaches elements"):
        mm.matmul(out, op(rand(2, 4)), bad)


# ----------------------------------------------------------------------------- small-M tiles (batched decode)

SMALL_TILES = [(16, 64), (16, 128), (32, 64), (32, 128)]
OLD_TILES = ((128, 128), (128, 64), (64, 128), (64, 64))
PYTHIA_NK = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]   # pythia-1.4b's linears, (N, K)


class BiasResidual:
    """Hand-written Epilogue: out = acc + bias[n] + res[i] (a linear layer's bias and the residual
    stream, as the model's output projections fuse them)."""

    def __init__(self, bias: np.ndarray, res: np.ndarray):
        self.bias, self.res = bias.astype(np.float32), res.astype(np.float32)
        self.N = len(bias)
        self.operands = [op(self.bias), op(self.res)]

    def wgsl(self, first_binding: int) -> str:
        return (f"@group(0) @binding({first_binding}) var<storage, read> ep_bias: array<f32>;\n"
                f"@group(0) @binding({first_binding + 1}) var<storage, read> ep_res: array<f32>;\n"
                f"fn epilogue(acc: f32, i: u32) -> f32 {{ return acc + ep_bias[i % {self.N}u] + ep_res[i]; }}\n")

    def ref(self, x):
        return x + self.bias.astype(np.float64) + self.res.astype(np.float64).reshape(x.shape)


@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("layout", ["NT", "TN", "NN", "TT"])
@pytest.mark.parametrize("da,db", [(np.float32, np.float32), (np.float16, np.float16), (np.float32, np.float16)],
                         ids=["f32", "f16", "f32xf16"])
def test_small_tiles_layouts_and_dtypes(paths, tuning, tile, layout, da, db):
    """Every 16/32-row tile on every operand layout (vector loads along K, along M/N, scalar),
    f32 and f16 (shader-f16 and packed), M and N not multiples of the tile (2 row tiles for M),
    K not a multiple of 16."""
    tuning["tile_mn"] = tile
    M, N, K = tile[0] + 5, tile[1] + 12, 52
    av, ao, bv, bo = make(M, K, N, ta=layout[0] == "T", tb=layout[1] == "T", da=da, db=db)
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.info["tile"] == tile and launch.info["block"] == mm.TILE_BLOCKS[tile]
    assert launch.info["threads"] == 128 and "@workgroup_size(128)" in launch.wgsl


@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("M,N,K", [(1, 3, 5), (7, 33, 19), (16, 64, 64), (33, 130, 100)])
def test_small_tiles_odd_edges(tuning, tile, M, N, K):
    """Odd M / N / K (scalar loads and stores where K or N is odd), one row, exact multiples."""
    tuning["tile_mn"] = tile
    av, ao, bv, bo = make(M, K, N, tb=True)
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.info["tile"] == tile


@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("split", [1, 3])
def test_small_tiles_epilogues(paths, tuning, tile, split):
    """bias + gelu and bias + residual epilogues, in the store (no split) or in the split-K
    reduce pass (3 partials, the last one short: K = 136 is 5 steps of bk_small = 32, the last
    partial, and 9 steps of 16)."""
    tuning.update(tile_mn=tile, split_k=split)
    M, N, K = 2 * tile[0] - 3, 90, 136
    av, ao, bv, bo = make(M, K, N, tb=True, db=np.float16)
    for ep in (BiasGelu(rand(N)), BiasResidual(rand(N), rand(M, N))):
        launch = run(av, ao, bv, bo, epilogue=ep, force="tiled", ref_fn=ep.ref)
        assert launch.info["tile"] == tile and launch.info["split"] == split
        assert len(launch.extra) == (split > 1)


@pytest.mark.parametrize("tile,block", [((16, 64), (1, 4)), ((16, 64), (4, 4)), ((16, 128), (1, 8)),
                                        ((16, 128), (4, 4)), ((32, 64), (2, 4)), ((32, 128), (2, 8)),
                                        ((32, 128), (8, 8)), ((64, 64), (8, 4))], ids=str)
@pytest.mark.parametrize("layout", ["NT", "TN"])
def test_register_blocks(tuning, tile, block, layout):
    """TUNING["tile_blocks"]: 1, 2, 4 and 8 rows per thread (a's shared tile as f32, vec2, vec4
    elements; two vec4 reads for 8), 4 or 8 columns, 32..256 threads."""
    tuning.update(tile_mn=tile, tile_blocks=((tile, block),))
    M, N, K = tile[0] + 3, tile[1] + 4, 40
    av, ao, bv, bo = make(M, K, N, ta=layout[0] == "T", tb=layout[1] == "T")
    launch = run(av, ao, bv, bo, force="tiled")
    threads = (tile[0] // block[0]) * (tile[1] // block[1])
    assert launch.info["block"] == block and launch.info["threads"] == threads
    assert f"@workgroup_size({threads})" in launch.wgsl and f"_r{block[0]}x{block[1]}_" in launch.name


@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_small_tiles_batched_and_aliased(tuning, tile):
    """A batch of products (b broadcast with stride 0), and a and b views of one buffer (scalar loads)."""
    tuning["tile_mn"] = tile
    A, W = Base(rand(3, 20, 24)), Base(rand(36, 24, dtype=np.float16))
    wv = np.broadcast_to(W.arr.T, (3, 24, 36))
    run(A.arr, A.view(A.arr), wv, W.view(wv), force="tiled")
    X = Base(rand(tile[0] + 40, 32))
    av, bv = X.arr[:tile[0] - 1], X.arr[tile[0]:tile[0] + 40].T
    run(av, X.view(av), bv, X.view(bv), force="tiled")


def _plan_info(M, N, K, wdt=F16, **knobs):
    """The tiled plan of x [M, K] f32 @ w.T (w [N, K] of wdt), under knobs: (tile, split, kernel name)."""
    a = Operand(runtime.Buffer(M * K * 4), F32, (M, K), (K, 1), 0)
    b = Operand(runtime.Buffer(N * K * wdt.itemsize), wdt, (K, N), (1, K), 0)
    with debug.tuning(mm.TUNING, **knobs):
        launch = mm.plan(runtime.Buffer(M * N * 4), a, b, force="tiled")
    return launch.info["tile"], launch.info["split"], launch.name


@pytest.mark.parametrize("M", [16, 32, 64])
@pytest.mark.parametrize("N,K", PYTHIA_NK, ids=str)
def test_cost_model_small_m_at_pythia_shapes(M, N, K):
    """Batched decode of B = 16/32/64 sequences at pythia-1.4b's linears (plan only; nothing runs),
    what the H200 small-M sweep measured best: B = 16 and 32 take a tile of exactly B rows (the
    64-row choice before them was 1.2-1.6x slower), with no more split-K partials than it and a
    workgroup count that fills the GPU (128..512); B = 64 keeps the 64-row tiles."""
    (tm, tn), split, _ = _plan_info(M, N, K)
    (old_tm, old_tn), old_split, _ = _plan_info(M, N, K, tile_candidates=OLD_TILES)
    tiles = (M // tm) * -(-N // tn)
    assert old_tm == 64 and 128 <= tiles * split <= 512, (tm, tn, split)
    if M < 64:
        assert tm == M and split <= old_split
    else:
        assert (tm, tn, split) == (old_tm, old_tn, old_split)


@pytest.mark.parametrize("M", [65, 96, 128, 256, 512, 1024, 2048])
@pytest.mark.parametrize("N,K", PYTHIA_NK + [(4096, 4096), (11008, 4096), (4096, 11008), (64, 64), (131, 45)], ids=str)
def test_cost_model_prefill_unchanged(M, N, K):
    """Past small_tile_max_m rows the small tiles are no candidates: prefill plans exactly the
    kernel it did with the 64/128 tiles alone."""
    assert _plan_info(M, N, K) == _plan_info(M, N, K, tile_candidates=OLD_TILES)


def test_tile_candidates_still_choose_the_split():
    """One candidate tile (a benchmark sweep) keeps the planned split-K; tile_mn forces no split."""
    assert _plan_info(16, 2048, 2048, tile_candidates=((16, 128),))[:2] == ((16, 128), 8)
    assert _plan_info(16, 2048, 2048, tile_mn=(16, 128))[:2] == ((16, 128), 1)


@pytest.mark.parametrize("knobs,match", [
    ({"tile_mn": (48, 64)}, r"output tile 48x64 is not one of.*16x64"),
    ({"tile_mn": (16, 32)}, r"output tile 16x32"),
    ({"tile": 32}, r"output tile 32x32"),
    ({"tile_candidates": ((16, 256),)}, r"output tile 16x256.*tile_candidates"),
    ({"tile_mn": (16, 64), "tile_blocks": (((16, 64), (3, 4)),)}, r"register block 3x4 for output tile 16x64"),
    ({"tile_mn": (16, 64), "tile_blocks": (((16, 64), (2, 2)),)}, r"register block 2x2"),
    ({"tile_mn": (16, 64), "tile_blocks": (((16, 64), (8, 8)),)}, r"8x8 .* \(this gives 16\)"),
    ({"tile_eff": ((64, 64, 0.6),), "tile_candidates": ((16, 64),)}, r"16x64, which has no TUNING\['tile_eff'\]"),
    ({"bk_small": 6}, r"TUNING\['bk_small'\] = 6.*multiple of 4"),
    ({"tile_mn": (64, 64), "bk": 0}, r"TUNING\['bk'\] = 0"),
])
def test_bad_tile_knobs_name_the_knob(knobs, match):
    with pytest.raises(ValueError, match=match):
        _plan_info(20, 64, 64, **knobs)


@pytest.mark.parametrize("bk_small", [8, 16, 32, None])
def test_bk_small_is_the_small_tiles_k_step(tuning, bk_small):
    """The 16/32-row tiles stage K in steps of bk_small (None: bk); the 64/128-row tiles keep bk."""
    tuning["bk_small"] = bk_small
    av, ao, bv, bo = make(20, 72, 40, tb=True)
    want = bk_small or mm.TUNING["bk"]
    launch = run(av, ao, bv, bo, force="tiled")
    assert launch.info["tile"][0] in (16, 32) and launch.info["bk"] == want and f"_k{want}" in launch.name
    assert _plan_info(512, 2048, 2048)[2] == _plan_info(512, 2048, 2048, bk_small=8)[2]


@pytest.mark.parametrize("bk", [16, 32, 64])
def test_tile_fits_shared_memory_by_its_footprint(bk):
    """A forced 128x128 tile stays 128x128 while a [bk x 128] + [bk x 128] f32 stage fits the
    adapter's workgroup storage, and falls back to 64x64 past it."""
    fits = bk * 256 * 4 <= runtime.get_device().max_workgroup_storage
    assert _plan_info(200, 200, 256, tile_mn=(128, 128), bk=bk)[0] == ((128, 128) if fits else (64, 64))


def test_split_partials_fit_one_binding(tuning):
    """The split-K partials (S copies of the output, one scratch binding) never pass the adapter's
    max_storage_buffer_binding_size: a prefill whose wave-quantization term asks for 2 splits of a
    big output (2048 x 11008, LLaMA-7B's mlp up) takes fewer where they would not fit, and a
    forced split_k is clamped the same way (plan only; nothing runs)."""
    lim = runtime.get_device().max_binding_size
    M, N, K = 2048, 11008, 4096
    cap = max(1, lim // (M * N * 4))
    _, split, _ = _plan_info(M, N, K)
    assert split <= cap
    _, forced, _ = _plan_info(M, N, K, split_k=8)
    assert forced == min(8, cap)


# ----------------------------------------------------------------------------- stacked right operands


def run_stacked(a_view, a_op, parts, epilogue=None, ref_fn=None):
    """mm.plan with b_parts: a @ [b_0 | b_1 | ...] against NumPy (same tolerance as `run`)."""
    Ns = [bv.shape[1] for bv, _ in parts]
    M, N = a_view.shape[0], sum(Ns)
    out = runtime.Buffer(M * N * 4)
    launch = mm.plan(out, a_op, parts[0][1], epilogue, b_parts=[(bo, None) for _, bo in parts[1:]])
    runtime.dispatch(launch.name, launch.wgsl, launch.bindings, launch.grid)
    for e in launch.extra:
        runtime.dispatch(*e)
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
    a64 = a_view.astype(np.float64)
    b64 = np.concatenate([bv.astype(np.float64) for bv, _ in parts], axis=1)
    ref, bound = a64 @ b64, RTOL * (np.abs(a64) @ np.abs(b64)) + 1e-6
    if ref_fn is not None:
        ref, bound = ref_fn(ref), bound * 2 + 1e-5
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"{launch.name}: max err {err.max()}"
    return launch


@pytest.mark.parametrize("M,K,Ns", [(40, 64, (128, 128, 64)), (130, 96, (256, 128)), (17, 48, (128, 128, 7)),
                                    (200, 2048 // 16, (384, 128, 128))], ids=str)
@pytest.mark.parametrize("db", [np.float32, np.float16], ids=["f32", "f16"])
def test_stacked_parts(paths, M, K, Ns, db):
    """Two or three weights [N_j, K] read as w.T side by side: one tiled kernel writing
    [M, sum(N_j)] (the last part's columns need not fill a tile), f32 and f16 weights, both
    code paths."""
    a = rand(M, K)
    parts = []
    for n in Ns:
        W = Base(rand(n, K, dtype=db))
        parts.append((W.arr.T, W.view(W.arr.T)))
    launch = run_stacked(a, op(a), parts)
    assert launch.kind == "tiled" and launch.name.endswith(f"_x{len(Ns)}")
    assert len(launch.bindings) == 2 + len(Ns)           # out (or the partials), a, each weight


@pytest.mark.parametrize("tile,split", [((128, 128), 1), ((64, 128), 3), ((64, 64), 2), ((16, 64), 1)], ids=str)
def test_stacked_tiles_split_k_and_epilogue(tuning, tile, split):
    """Forced tile shapes and split-K (the reduce pass applies the epilogue over the stacked
    columns); a strided x."""
    tuning.update(tile_mn=tile, split_k=split)
    M, K, Ns = 67, 160, (128, 128, 40)
    X = Base(rand(M, 2 * K))
    av = X.arr[:, ::2]
    parts = [(W.arr.T, W.view(W.arr.T)) for W in (Base(rand(n, K)) for n in Ns)]
    ep = BiasGelu(rand(sum(Ns)))
    launch = run_stacked(av, X.view(av), parts, epilogue=ep, ref_fn=ep.ref)
    assert launch.info["tile"] == tile and launch.info["split"] == split


def test_stacked_parts_of_other_alignment_load_one_way():
    """A part at an odd element offset cannot take vector loads: every part then loads
    scalars (one shared-memory layout), with the same values."""
    M, K, Ns = 33, 64, (128, 64)
    W0 = Base(rand(Ns[0], K))
    W1 = Base(rand(Ns[1] * K + 1))
    w1 = W1.arr[1:].reshape(Ns[1], K)
    a = rand(M, K)
    launch = run_stacked(a, op(a), [(W0.arr.T, W0.view(W0.arr.T)), (w1.T, W1.view(w1.T))])
    assert launch.info["modes"][1] == "s", launch.name
    launch = run_stacked(a, op(a), [(W0.arr.T, W0.view(W0.arr.T)), (W0.arr[:64].T, W0.view(W0.arr[:64].T))])
    assert launch.info["modes"][1] == "vk", launch.name


def test_stacked_errors_name_the_operand():
    a = op(rand(20, 32))
    W = [Base(rand(n, 32)) for n in (100, 128)]
    bs = [w.view(w.arr.T) for w in W]
    out = runtime.Buffer(20 * 228 * 4)
    with pytest.raises(ValueError, match=r"multiple of 128"):
        mm.plan(out, a, bs[0], b_parts=[(bs[1], None)])
    with pytest.raises(ValueError, match="tiled path only"):
        mm.plan(out, a, bs[1], force="gemv_k", b_parts=[(bs[0], None)])
    h = Base(rand(64, 32, dtype=np.float16))
    with pytest.raises(TypeError, match=r"b_parts\[0\]"):
        mm.plan(out, a, bs[1], b_parts=[(h.view(h.arr.T), None)])
    with pytest.raises(ValueError, match=r"\[K, N_j\]"):
        mm.plan(out, a, bs[1], b_parts=[(op(rand(16, 64)), None)])
    with pytest.raises(ValueError, match="output buffer holds"):
        mm.plan(runtime.Buffer(64), a, bs[1], b_parts=[(bs[0], None)])


# ----------------------------------------------------------------------------- K-concatenated operands


def run_kparts(pairs, epilogue=None, ref_fn=None, **plan_kw):
    """mm.plan with k_parts: a_0 @ b_0 + a_1 @ b_1 + ... against NumPy (same tolerance as `run`)."""
    (a0v, a0o, b0v, b0o), rest = pairs[0], pairs[1:]
    M, N = a0v.shape[0], b0v.shape[1]
    out = runtime.Buffer(M * N * 4)
    launch = mm.plan(out, a0o, b0o, epilogue, k_parts=[(ao, bo, None) for _, ao, _, bo in rest], **plan_kw)
    runtime.dispatch(launch.name, launch.wgsl, launch.bindings, launch.grid)
    for e in launch.extra:
        runtime.dispatch(*e)
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float64 if False else np.float32).reshape(M, N)
    ref = sum(av.astype(np.float64) @ bv.astype(np.float64) for av, _, bv, _ in pairs)
    bound = RTOL * sum(np.abs(av.astype(np.float64)) @ np.abs(bv.astype(np.float64)) for av, _, bv, _ in pairs) + 1e-6
    if ref_fn is not None:
        ref, bound = ref_fn(ref), bound * 2 + 1e-5
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"{launch.name}: max err {err.max()}"
    return launch


@pytest.mark.parametrize("split", [None, 1, 3])
@pytest.mark.parametrize("M,Ks,N,dts", [(70, (128, 200), 66, (np.float32, np.float32)),
                                         (33, (64, 80), 130, (np.float16, np.float16)),
                                         (128, (256, 1024), 256, (np.float32, np.float16)),
                                         (40, (64, 128, 72), 64, (np.float32, np.float32))], ids=str)
def test_k_parts(paths, tuning, M, Ks, N, dts, split):
    """a_0 @ b_0 + a_1 @ b_1 (+ a_2 @ b_2) as one tiled matmul over the concatenated K: ragged
    M, N and last K, f16 and f32 operands, with and without split-K (splits crossing parts)."""
    if split:
        tuning.update(split_k=split, tile_mn=(64, 64))
    pairs = [make(M, k, N, tb=True, da=dts[0], db=dts[1]) for k in Ks]
    ep = BiasGelu(rand(N))
    launch = run_kparts(pairs, epilogue=ep, ref_fn=ep.ref, force="tiled")
    assert launch.name.endswith(f"_kc{len(Ks)}") and launch.kind == "tiled"


def test_k_parts_strided_and_mixed_load_modes(tuning):
    """A transposed left operand beside a row-major one, and a right operand stored [K, N]: the
    parts load differently, so every part falls back to the same (scalar) shared-memory layout."""
    p0 = make(48, 128, 96, ta=True, tb=True)
    p1 = make(48, 64, 96, ta=False, tb=False)
    run_kparts([p0, p1], force="tiled")


def test_k_parts_refused_with_reasons():
    a, ao, b, bo = make(16, 100, 32)
    a1, ao1, b1, bo1 = make(16, 64, 32)
    out = runtime.Buffer(16 * 32 * 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        mm.plan(out, ao, bo, k_parts=[(ao1, bo1, None)])          # K_0 = 100: a K step would straddle
    a2, ao2, b2, bo2 = make(16, 64, 40)
    with pytest.raises(ValueError, match=r"N=32"):
        mm.plan(out, ao1, bo1, k_parts=[(ao2, bo2, None)])
    with pytest.raises(ValueError, match="tiled path only"):
        mm.plan(out, ao1, bo1, force="gemv_k", k_parts=[(ao1, bo1, None)])
    with pytest.raises(ValueError, match="do not combine"):
        mm.plan(out, ao1, bo1, b_parts=[(bo1, None)], k_parts=[(ao1, bo1, None)])
