"""The tensor-core matmul (kernels/matmul_coop.py) and the library unlock it needs (wgpu_unlock.py).

On an adapter with cooperative matrices (an NVIDIA GPU through Vulkan) the kernel tests compare
against NumPy with f16 tolerance: both operands rounded to f16 (a conversion may round toward zero,
2^-10 relative each), f32 accumulation, so |gpu - ref| <= 2.5e-3 * (|a| @ |b|) + 1e-5 elementwise.
Elsewhere (lavapipe in CI) they are skipped, and the tests of the fallback check that nothing
reaches the tensor-core path; the unlock tests run everywhere."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from tensorgpu import debug, dtypes, runtime, wgpu_unlock
from tensorgpu.kernels import matmul as mm
from tensorgpu.kernels import matmul_coop as coop
from tensorgpu.kernels import quant

from test_kernel_matmul import Base, BiasGelu, make, rand

COOP_RTOL = 2.5e-3
F16 = dtypes.float16

needs_coop = pytest.mark.skipif(not runtime.get_device().has_coopmat,
                                reason="the adapter has no cooperative matrices (tensor cores)")


@pytest.fixture
def knobs():
    with debug.tuning(coop.TUNING) as k:
        yield k


def run(av, ao, bv, bo, epilogue=None, ref_fn=None, force=None):
    shape = np.broadcast_shapes(av.shape[:-2], bv.shape[:-2]) + (av.shape[-2], bv.shape[-1])
    n = int(np.prod(shape))
    out = runtime.Buffer(n * 4)
    launch = mm.plan(out, ao, bo, epilogue, force=force)
    runtime.dispatch(launch.name, launch.wgsl, launch.bindings, launch.grid)
    for e in launch.extra:
        runtime.dispatch(*e)
    got = np.frombuffer(runtime.read(out, 0, n * 4), np.float32).reshape(shape)
    a64, b64 = av.astype(np.float64), bv.astype(np.float64)
    ref, bound = a64 @ b64, COOP_RTOL * (np.abs(a64) @ np.abs(b64)) + 1e-5
    if ref_fn is not None:
        ref, bound = ref_fn(ref), bound * 2
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"{launch.name}: max err {err.max()} a {av.shape} b {bv.shape}"
    return launch


# ----------------------------------------------------------------------------- the library unlock


def test_unlock_writes_a_verified_patched_copy(tmp_path):
    src = wgpu_unlock.shipped_library()
    if src is None or hashlib.sha256(open(src, "rb").read()).hexdigest() not in wgpu_unlock.KNOWN_BUILDS:
        pytest.skip("not the wgpu-native build the unlock knows")
    path, reason = wgpu_unlock.patched_copy(src, str(tmp_path))
    assert reason == "patched" and path.startswith(str(tmp_path))
    want, edits = wgpu_unlock.KNOWN_BUILDS[hashlib.sha256(open(src, "rb").read()).hexdigest()]
    data = open(path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == want
    assert all(data[off:off + 2].hex() == new for off, _, new in edits)
    # the original is untouched, and a second call reuses the verified copy
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() in wgpu_unlock.KNOWN_BUILDS
    assert wgpu_unlock.patched_copy(src, str(tmp_path)) == (path, "patched")


def test_unlock_refuses_an_unknown_build(tmp_path):
    fake = tmp_path / "libwgpu_native-release.so"
    fake.write_bytes(b"\x7fELF not the known library")
    path, reason = wgpu_unlock.patched_copy(str(fake), str(tmp_path))
    assert path is None and "unknown wgpu-native build" in reason


def test_unlock_refuses_unexpected_bytes(tmp_path, monkeypatch):
    fake = tmp_path / "lib.so"
    fake.write_bytes(bytes(64))
    digest = hashlib.sha256(bytes(64)).hexdigest()
    monkeypatch.setitem(wgpu_unlock.KNOWN_BUILDS, digest, ("0" * 64, ((16, "7528", "9090"),)))
    path, reason = wgpu_unlock.patched_copy(str(fake), str(tmp_path))
    assert path is None and "0x10" in reason and "expected 7528" in reason


def test_unlock_is_off_when_disabled_or_the_user_chose_a_library():
    code = "from tensorgpu import wgpu_unlock as u; print(u.STATE['patched'], u.STATE['reason'])"
    env = {k: v for k, v in os.environ.items() if k != "WGPU_LIB_PATH"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, TENSORGPU_DISABLE_COOPMAT="1"),
                         capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("False TENSORGPU_DISABLE_COOPMAT")
    lib = wgpu_unlock.shipped_library()
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, WGPU_LIB_PATH=lib),
                         capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("False WGPU_LIB_PATH is set by the user")


# ----------------------------------------------------------------------------- the fallback


@pytest.mark.skipif(runtime.get_device().has_coopmat, reason="this adapter has tensor cores")
def test_without_cooperative_matrices_every_matmul_stays_wgsl():
    av, ao, bv, bo = make(64, 64, 64, tb=True, da=np.float16, db=np.float16)
    out = runtime.Buffer(64 * 64 * 4)
    assert mm.plan(out, ao, bo).kind == "tiled"
    with pytest.raises(ValueError, match="force='coop' needs an adapter with cooperative matrices"):
        mm.plan(out, ao, bo, force="coop")


def test_f32_times_f32_never_takes_the_tensor_cores():
    av, ao, bv, bo = make(128, 64, 128, tb=True)
    assert mm.plan(runtime.Buffer(128 * 128 * 4), ao, bo).kind == "tiled"


# ----------------------------------------------------------------------------- the kernel (tensor cores)


@needs_coop
@pytest.mark.parametrize("M,K,N", [(16, 64, 64), (67, 45, 131), (130, 96, 200), (512, 256, 384)])
@pytest.mark.parametrize("layout", ["NN", "NT", "TN", "TT"])
@pytest.mark.parametrize("da", [np.float32, np.float16], ids=["a32", "a16"])
def test_coop_layouts_and_edges(M, K, N, layout, da):
    av, ao, bv, bo = make(M, K, N, ta=layout[0] == "T", tb=layout[1] == "T", da=da, db=np.float16)
    assert run(av, ao, bv, bo).kind == "coop"


@needs_coop
@pytest.mark.parametrize("tile", sorted(coop.COOP_TILES))
@pytest.mark.parametrize("split", [1, 3])
def test_coop_every_tile_and_split(knobs, tile, split):
    knobs["tile"], knobs["split_k"] = tile, split
    av, ao, bv, bo = make(70, 400, 150, tb=True, db=np.float16)   # K: 7 steps of 64, 13 of 32
    launch = run(av, ao, bv, bo)
    assert launch.info["tile"] == tile and launch.info["split"] == split


@needs_coop
@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
@pytest.mark.parametrize("tile", [(16, 64), (64, 128), (128, 128)])
def test_coop_k_major_shared_layout(knobs, layout, tile):
    knobs["layout"], knobs["tile"] = "k", tile
    av, ao, bv, bo = make(70, 96, 150, ta=layout[0] == "T", tb=layout[1] == "T", db=np.float16)
    assert "_kmaj" in run(av, ao, bv, bo).name


@needs_coop
@pytest.mark.parametrize("bk", [16, 32, 64])
@pytest.mark.parametrize("M", [40, 200])
def test_coop_k_steps(knobs, bk, M):
    knobs["bk"] = knobs["bk_small"] = bk
    av, ao, bv, bo = make(M, 200, 136, tb=True, db=np.float16)
    assert run(av, ao, bv, bo).info["bk"] == bk


def test_coop_bad_k_step_names_the_knob(knobs):
    from types import SimpleNamespace
    knobs["bk"] = 40
    c = SimpleNamespace(M=128, N=64, K=64, nb=1, dev=runtime.get_device())
    with pytest.raises(ValueError, match=r"TUNING\['bk'\] = 40"):
        coop.config(c)


@needs_coop
@pytest.mark.parametrize("split", [1, 2])
def test_coop_epilogue(knobs, split):
    knobs["split_k"] = split
    knobs["tile"] = (64, 64)
    av, ao, bv, bo = make(40, 128, 44, tb=True, db=np.float16)
    ep = BiasGelu(rand(44))
    run(av, ao, bv, bo, epilogue=ep, ref_fn=ep.ref)


@needs_coop
def test_coop_batched_broadcast_and_aliased():
    av, ao, bv, bo = make(33, 64, 48, tb=False, da=np.float16, db=np.float16, batch=(3,))
    run(av, ao, bv, bo)
    base = Base(rand(96, 64, dtype=np.float16))      # a and b views of one f16 buffer
    a, b = base.arr[:48], base.arr[48:].T
    run(a, base.view(a), b, base.view(b))


@needs_coop
@pytest.mark.parametrize("dt", [dtypes.q4_0, dtypes.q8_0, dtypes.q4_k, dtypes.q6_k], ids=lambda d: d.name)
def test_coop_quant_weights(dt):
    from test_kernel_quant import random_blocks, ref_dequant, x_operand
    M, N, K = 67, 96, 512
    raw = random_blocks(dt, N * K // dt.block_size)
    W = ref_dequant(dt, raw).reshape(N, K).astype(np.float64)
    x = np.random.default_rng(3).standard_normal((M, K)).astype(np.float32)
    xop, _ = x_operand(x)
    out = runtime.Buffer(M * N * 4)
    launch = quant.plan_matmul(out, xop, runtime.upload(raw), dt, N, K)
    for p in launch.passes:
        runtime.dispatch(*p)
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
    bound = COOP_RTOL * (np.abs(x.astype(np.float64)) @ np.abs(W).T) + 1e-5
    assert "coop" in " ".join(str(p[0]) for p in launch.passes)
    assert np.all(np.abs(got - x @ W.T) <= bound)


@needs_coop
def test_coop_stacked_parts():
    x = rand(40, 64)
    ws = [rand(64, n, dtype=np.float16) for n in (128, 128, 72)]
    out = runtime.Buffer(40 * 328 * 4)
    ops = [Base(w) for w in ws]
    xo = Base(x)
    launch = mm.plan(out, xo.view(xo.arr), ops[0].view(ops[0].arr),
                     b_parts=[(o.view(o.arr), None) for o in ops[1:]])
    assert launch.kind == "coop"
    runtime.dispatch(launch.name, launch.wgsl, launch.bindings, launch.grid)
    for e in launch.extra:
        runtime.dispatch(*e)
    got = np.frombuffer(runtime.read(out, 0, 40 * 328 * 4), np.float32).reshape(40, 328)
    w = np.concatenate(ws, axis=1).astype(np.float64)
    assert np.all(np.abs(got - x @ w) <= COOP_RTOL * (np.abs(x) @ np.abs(w)) + 1e-5)


@needs_coop
def test_coop_off_switch_gives_the_wgsl_tiles(knobs):
    knobs["enabled"] = False
    av, ao, bv, bo = make(64, 64, 64, tb=True, db=np.float16)
    assert mm.plan(runtime.Buffer(64 * 64 * 4), ao, bo).kind == "tiled"


@needs_coop
def test_coop_prompt_logits_of_the_bundled_model(tiny_neox_dir, knobs):
    """The whole model with its prompt matmuls on the tensor cores against the WGSL path (which
    test_gpt_neox holds to the HF reference logits within 1e-3): 200 held-out tokens of the q8_0
    file agree within f16 tolerance (5e-3 of the largest logit), with the same top token wherever
    the top two differ by more than 0.05."""
    from models.gpt_neox import GPTNeoX
    model = GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-q8_0.gguf")
    ids = [int(t) for t in np.load(tiny_neox_dir / "reference.npz")["heldout_ids"][:200]]
    with debug.kernel_log() as log:
        got = model.session().forward(ids).numpy()
    assert any(e.name.startswith("matmul_coop") for e in log), "no matmul ran on the tensor cores"
    knobs["enabled"] = False
    want = model.session().forward(ids).numpy()
    err = np.abs(got - want).max()
    assert err <= 5e-3 * np.abs(want).max(), f"max |dlogit| {err:.3e} (max logit {np.abs(want).max():.2f})"
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() > 100 and (got.argmax(-1) == want.argmax(-1))[clear].all()


# ----------------------------------------------------------------------------- the generator, on any adapter


@pytest.fixture
def as_if_coop(monkeypatch):
    """Plans as on an adapter with tensor cores (generation only: nothing is dispatched), so CI
    walks every generator path that NVIDIA runs."""
    monkeypatch.setattr(runtime.Device, "has_coopmat", property(lambda self: True))


@pytest.mark.parametrize("layout,modes", [("NT", ("vk", "vk")), ("TN", ("vt", "vt")), ("NN", ("vk", "vt"))])
@pytest.mark.parametrize("kmajor", [False, True], ids=["tmajor", "kmajor"])
def test_generated_kernel_shape(as_if_coop, knobs, layout, modes, kmajor):
    if kmajor:
        knobs["layout"] = "k"
    av, ao, bv, bo = make(200, 96, 136, ta=layout[0] == "T", tb=layout[1] == "T", db=np.float16)
    la = mm.plan(runtime.Buffer(200 * 136 * 4), ao, bo, BiasGelu(rand(136)))
    assert la.kind == "coop" and la.info["modes"] == modes
    head = la.wgsl.splitlines()[:2]
    assert head == ["enable f16;", "enable wgpu_cooperative_matrix;"]       # hoisted above every declaration
    assert la.wgsl.count("enable ") == 2
    TM, TN = la.info["tile"]
    a_load, b_load = ("coopLoad<", "coopLoadT<") if kmajor else ("coopLoadT<", "coopLoad<")
    assert f"{a_load}coop_mat16x16<f16, A>>" in la.wgsl and f"{b_load}coop_mat16x16<f16, B>>" in la.wgsl
    assert "coopStoreT(acc0_0, &mm_Cs[w * 256u], 16u);" in la.wgsl and "epilogue(v.x, o)" in la.wgsl
    assert la.info["threads"] == 32 * (TM // coop.COOP_TILES[(TM, TN)][0]) * (TN // coop.COOP_TILES[(TM, TN)][1])


def test_generated_split_quant_parts_and_aliased(as_if_coop, knobs):
    from test_kernel_quant import random_blocks, x_operand
    knobs["split_k"] = 2
    x = rand(64, 512)
    xop, _ = x_operand(x)
    raw = random_blocks(dtypes.q4_0, 96 * 512 // 32)
    la = quant.plan_matmul(runtime.Buffer(64 * 96 * 4), xop, runtime.upload(raw), dtypes.q4_0, 96, 512)
    names = [p[0] for p in la.passes]
    assert names[0].startswith("matmul_coop_f32q4_0") and names[0].endswith("_s2") and "splitk" in names[1]
    ws = [Base(rand(64, n, dtype=np.float16)) for n in (128, 72)]
    xo = Base(rand(40, 64))
    la = mm.plan(runtime.Buffer(40 * 200 * 4), xo.view(xo.arr), ws[0].view(ws[0].arr), b_parts=[(ws[1].view(ws[1].arr), None)])
    assert la.kind == "coop" and la.name.endswith("_x2")
    base = Base(rand(96, 64, dtype=np.float16))
    a, b = base.arr[:48], base.arr[48:].T
    assert mm.plan(runtime.Buffer(48 * 48 * 4), base.view(a), base.view(b)).kind == "coop"


def test_min_rows_and_f32_keep_the_wgsl_tiles(as_if_coop):
    av, ao, bv, bo = make(8, 64, 64, tb=True, db=np.float16)
    assert mm.plan(runtime.Buffer(8 * 64 * 4), ao, bo, force="tiled").kind == "tiled"     # M < min_m
    av, ao, bv, bo = make(128, 64, 64, tb=True)
    assert mm.plan(runtime.Buffer(128 * 64 * 4), ao, bo).kind == "tiled"                  # f32 x f32


def test_config_fits_the_adapters_shared_memory(as_if_coop, monkeypatch):
    from types import SimpleNamespace
    small = SimpleNamespace(max_workgroup_storage=16384, max_binding_size=1 << 30)
    TM, TN, BK, S, KC = coop.config(SimpleNamespace(M=512, N=2048, K=2048, nb=1, dev=small))
    row = BK + coop.TUNING["pad"]
    warps = (TM // coop.COOP_TILES[(TM, TN)][0]) * (TN // coop.COOP_TILES[(TM, TN)][1])
    assert row * (TM + TN) * 2 + warps * 1024 <= 16384


def test_unlock_falls_back_to_a_private_temporary_directory(monkeypatch):
    src = wgpu_unlock.shipped_library()
    if src is None or hashlib.sha256(open(src, "rb").read()).hexdigest() not in wgpu_unlock.KNOWN_BUILDS:
        pytest.skip("not the wgpu-native build the unlock knows")
    monkeypatch.setattr(wgpu_unlock, "_cache_dir", lambda: "/proc/no-such-dir/tensorgpu")   # not writable
    path, reason = wgpu_unlock.patched_copy(src)
    try:
        assert reason == "patched" and os.path.basename(os.path.dirname(path)).startswith("tensorgpu-")
        assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0      # private to this user
    finally:
        import shutil
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def test_generated_warp_tile_override(as_if_coop, knobs):
    """TUNING["warp_tiles"] runs a tile on more (smaller) subgroup blocks: 8 subgroups of 16x32 for
    the 64x64 tile, named so a profile tells it apart; a block that does not divide the tile, or
    more than 8 subgroups, is refused by name."""
    knobs.update(tile=(64, 64), split_k=2, warp_tiles="64x64:16x32+64x128:32x64")
    av, ao, bv, bo = make(64, 256, 128, tb=True, db=np.float16)
    la = mm.plan(runtime.Buffer(64 * 128 * 4), ao, bo)
    assert la.kind == "coop" and la.info["warp_tile"] == (16, 32) and la.info["threads"] == 256
    assert "_w16x32" in la.name and "var acc0_1 = coop_mat16x16<f32, C>();" in la.wgsl
    assert "acc1_0" not in la.wgsl                                  # one 16-row fragment per subgroup
    knobs["tile"] = (64, 128)
    la = mm.plan(runtime.Buffer(64 * 128 * 4), ao, bo)
    assert la.info["warp_tile"] == (32, 64) and la.info["threads"] == 128 and "_w32x64" in la.name
    knobs["tile"] = (128, 128)                                      # not overridden: COOP_TILES' block
    la = mm.plan(runtime.Buffer(64 * 128 * 4), ao, bo)
    assert la.info["warp_tile"] == coop.COOP_TILES[(128, 128)] and "_w" not in la.name.split("_k")[-1]
    for bad in ("64x64:24x32", "64x64:16x16"):
        knobs.update(tile=(64, 64), warp_tiles=bad)
        with pytest.raises(ValueError, match="warp tile"):
            mm.plan(runtime.Buffer(64 * 128 * 4), ao, bo)


@needs_coop
@pytest.mark.parametrize("tile,warps", [((64, 64), "16x32"), ((64, 128), "16x64"), ((32, 64), "16x16")])
def test_coop_warp_tile_override(knobs, tile, warps):
    knobs.update(tile=tile, split_k=2, warp_tiles=f"{tile[0]}x{tile[1]}:{warps}")
    av, ao, bv, bo = make(70, 200, 150, tb=True, db=np.float16)
    ep = BiasGelu(rand(150))
    la = run(av, ao, bv, bo, epilogue=ep, ref_fn=ep.ref)
    assert f"_w{warps}" in la.name


def test_generated_k_parts(as_if_coop, knobs):
    """A K-concatenated matmul (matmul's k_parts) goes to the tensor cores like any tiled one:
    each part's tile loads behind a uniform branch on k0, the second part's at k0 - K_0."""
    pairs = [make(64, k, 96, tb=True, db=np.float16) for k in (128, 192)]
    la = mm.plan(runtime.Buffer(64 * 96 * 4), pairs[0][1], pairs[0][3], k_parts=[(pairs[1][1], pairs[1][3], None)])
    assert la.kind == "tiled"                  # TUNING["k_parts"] off: the WGSL tiles until run on a GPU
    knobs["k_parts"] = True
    la = mm.plan(runtime.Buffer(64 * 96 * 4), pairs[0][1], pairs[0][3], k_parts=[(pairs[1][1], pairs[1][3], None)])
    assert la.kind == "coop" and la.name.endswith("_kc2")
    assert "if (k0 < 128u)" in la.wgsl and "(k0 - 128u)" in la.wgsl and "mm_a1" in la.wgsl and "mm_b1" in la.wgsl


@needs_coop
@pytest.mark.parametrize("split", [1, 3])
def test_coop_k_parts(knobs, split):
    knobs.update(tile=(64, 64), split_k=split, k_parts=True)
    pairs = [make(70, k, 150, tb=True, db=np.float16) for k in (128, 200)]
    M, N = 70, 150
    out = runtime.Buffer(M * N * 4)
    la = mm.plan(out, pairs[0][1], pairs[0][3], k_parts=[(pairs[1][1], pairs[1][3], None)])
    runtime.dispatch(la.name, la.wgsl, la.bindings, la.grid)
    for e in la.extra:
        runtime.dispatch(*e)
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
    a64 = [(av.astype(np.float64), bv.astype(np.float64)) for av, _, bv, _ in pairs]
    ref = sum(a @ b for a, b in a64)
    bound = COOP_RTOL * sum(np.abs(a) @ np.abs(b) for a, b in a64) + 1e-5
    assert la.kind == "coop" and np.all(np.abs(got - ref) <= bound)
