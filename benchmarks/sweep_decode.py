"""Decode-kernel sweeps on real model shapes (GPU machine): GEMV per weight format and launch
shape, attention decode per context length. Not a pytest suite: a quick table for tuning.

Each GEMV case rotates over enough copies of the weight (> 120 MB together) that the H100's
50 MB L2 cannot serve repeats, and times back-to-back dependent dispatches (each writes the same
output buffer, so they serialise like a decode step does) with GPU timestamps.

    python benchmarks/sweep_decode.py gemv_f16 new_q4_0 new_q8_0 new_q4_0+ln knobs_q4_k ab attn
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorgpu import debug, dtypes, runtime  # noqa: E402
from tensorgpu.kernels import gemv as gm, matmul as mm, probe  # noqa: E402
from tensorgpu.kernels.common import Operand  # noqa: E402
from tensorgpu.testing import random_blocks  # noqa: E402

SHAPES = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192),        # pythia-1.4b qkv/out/up/down
          (7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240)]      # redpajama-3b
if os.environ.get("GEMV_SHAPES"):   # e.g. "4096x4096,8192x2048" (N x K): the GEMV shapes
    SHAPES = [tuple(int(v) for v in p.split("x")) for p in os.environ["GEMV_SHAPES"].split(",")]


def _copies(nbytes: int) -> int:
    return max(2, -(-(120 << 20) // nbytes))


def _time(dispatches, reps=None) -> float:
    one = max(probe.gpu_time(dispatches, 1), 1e-6)
    reps = reps or max(1, min(200, int(0.02 / one)))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.08:
        probe.gpu_time(dispatches, reps)
    return min(probe.gpu_time(dispatches, reps) for _ in range(3)) / (reps * len(dispatches))


def _x(K):
    return runtime.upload(np.random.default_rng(1).standard_normal(K).astype(np.float32))


def gemv_f16(cfgs):
    rng = np.random.default_rng(0)
    for N, K in SHAPES:
        nbytes = N * K * 2
        ws = [runtime.upload((rng.standard_normal((N, K)) * 0.02).astype(np.float16)) for _ in range(_copies(nbytes))]
        x = _x(K)
        out = runtime.Buffer(N * 4)
        res = []
        for cols, threads in cfgs:
            with debug.tuning(mm.TUNING, gemv_cols=cols, gemv_threads=threads):
                ds = []
                for w in ws:
                    l = mm.plan(out, Operand(x, dtypes.float32, (1, K), (K, 1)), Operand(w, dtypes.float16, (K, N), (1, K)))
                    ds.append(runtime.dispatch(l.name, l.wgsl, l.bindings, l.grid))
                runtime.flush()
                t = _time(ds)
            res.append(f"c{cols}t{threads}:{t * 1e6:.1f}us/{nbytes / t / 1e9:.0f}")
        print(f"f16 {N}x{K} ({nbytes >> 20} MB): " + "  ".join(res), flush=True)


def _qweights(dt, N, K, rng):
    """GGUF bytes of a random [N, K] weight of block type dt."""
    return random_blocks(dt, (N, K), 0.02, rng).reshape(-1)


def gemv_new(dtname, cfgs, ln=False):
    """kernels/gemv.py over (threads, rows[, hoist_regs]) configs (None/"-": the default); ln: with
    the fused layer norm."""
    dt = dtypes.float16 if dtname == "f16" else dtypes.as_dtype(dtname)
    rng = np.random.default_rng(0)
    for N, K in SHAPES:
        if ln and K > 4096:
            continue
        if dt is dtypes.float16:
            arrs = [(rng.standard_normal((N, K)) * 0.02).astype(np.float16) for _ in range(1)]
            nbytes = N * K * 2
            ws = [Operand(runtime.upload(arrs[0]), dt, (N, K), (K, 1)) for _ in range(_copies(nbytes))]
        else:
            raw = _qweights(dt, N, K, rng)
            nbytes = raw.nbytes
            ws = [runtime.upload(raw) for _ in range(_copies(nbytes))]
        x = Operand(_x(K), dtypes.float32, (1, K), (K, 1))
        lnp = (Operand(_x(K), dtypes.float32, (K,), (1,)), Operand(_x(K), dtypes.float32, (K,), (1,)), 1e-5) if ln else None
        out = runtime.Buffer(N * 4)
        res = []
        for cfg in cfgs:
            threads, rows = cfg[:2]
            hoist = {"hoist_regs": cfg[2]} if len(cfg) > 2 and cfg[2] is not None else {}
            with debug.tuning(gm.TUNING, threads=threads, rows=rows, **hoist), runtime_log() as ds:
                for w in ws:
                    gm.gemv(out, x, w, dt, N, K, None, lnp)
            runtime.flush()
            t = _time(ds)
            tag = f"t{threads}r{rows}" + "".join(f"{k}{v}" for k, v in zip("h", cfg[2:]))
            res.append(f"{tag}:{t * 1e6:.1f}us/{nbytes / t / 1e9:.0f}")
        print(f"new{'+ln' if ln else ''} {dtname} {N}x{K} ({nbytes >> 20} MB): " + "  ".join(res), flush=True)


def gemv_knobs(dtname, cfgs):
    """kernels/gemv.py over sets of gemv.TUNING overrides ("threads=256,rows=2", "probe=1",
    "default"): the probes split a GEMV's time into weight loads, decode and x (see gemv.TUNING)."""
    dt = dtypes.as_dtype(dtname)
    rng = np.random.default_rng(0)
    for N, K in SHAPES:
        raw = _qweights(dt, N, K, rng)
        ws = [runtime.upload(raw) for _ in range(_copies(raw.nbytes))]
        x = Operand(_x(K), dtypes.float32, (1, K), (K, 1))
        out = runtime.Buffer(N * 4)
        res = []
        for cfg in cfgs:
            knobs = {k: int(v) for k, v in (kv.split("=") for kv in cfg.split(",") if "=" in kv)}
            with debug.tuning(gm.TUNING, **knobs), runtime_log() as ds:
                for w in ws:
                    gm.gemv(out, x, w, dt, N, K)
            runtime.flush()
            t = _time(ds)
            res.append(f"{cfg}:{t * 1e6:.1f}us/{raw.nbytes / t / 1e9:.0f}")
        print(f"knobs {dtname} {N}x{K} ({raw.nbytes >> 20} MB): " + "  ".join(res), flush=True)


class runtime_log:
    """Collect the Dispatch objects queued inside the block."""

    def __enter__(self):
        self.ds = []
        runtime._recorders.append(self.ds.append)
        return self.ds

    def __exit__(self, *a):
        runtime._recorders.remove(self.ds.append)


def attn(cases=((16, 128, 32), (32, 80, 80))):
    """rope_attention_decode alone: per (heads, head_dim) over cache capacity x context length."""
    from tensorgpu.kernels.attention import rope_attention_decode
    rng = np.random.default_rng(0)
    for H, D, rot in cases:
        res = []
        for max_ctx in (168, 2048):
            kc = runtime.upload(rng.standard_normal((H, max_ctx, D)).astype(np.float16))
            vc = runtime.upload(rng.standard_normal((H, max_ctx, D)).astype(np.float16))
            qkv = runtime.upload(rng.standard_normal(3 * H * D).astype(np.float32))
            out = runtime.Buffer(4 * H * D)
            for kvl in (40, 160, 1024, 2048):
                if kvl > max_ctx:
                    continue
                pos = runtime.upload(np.array([kvl - 1], np.int32))
                kl = runtime.upload(np.array([kvl], np.int32))
                with runtime_log() as ds:
                    rope_attention_decode(out, kc, vc, Operand(qkv, dtypes.float32, (1, 3, H, D), (3 * H * D, H * D, D, 1)),
                                          pos, kl, H, D, rot, max_ctx)
                runtime.flush()
                t = _time(list(ds) * 4)
                from tensorgpu.kernels.attention import attention
                from tensorgpu.kernels.rope import rope_kv_write
                qo = runtime.Buffer(4 * H * D)
                with runtime_log() as ds2:
                    rope_kv_write(qo, kc, vc, Operand(qkv, dtypes.float32, (1, 3, H, D), (3 * H * D, H * D, D, 1)),
                                  pos, 1, H, D, rot, max_ctx)
                    f16 = dtypes.float16
                    attention(out, Operand(qo, dtypes.float32, (H, 1, D), (D, D, 1)),
                              Operand(kc, f16, (H, max_ctx, D), (max_ctx * D, D, 1)),
                              Operand(vc, f16, (H, max_ctx, D), (max_ctx * D, D, 1)), kl, out_layout="sbd")
                runtime.flush()
                t2 = _time(list(ds2) * 4) * len(ds2)
                res.append(f"cap{max_ctx}/kv{kvl}:{t * 1e6:.1f}us(old {t2 * 1e6:.1f})")
        print(f"attention_decode H={H} D={D}: " + "  ".join(res), flush=True)


def ab(shapes=((6144, 2048), (10240, 2560), (2560, 10240))):
    """Same-run A/B of the decode GEMV: plain, with the fused norm, norm without weight."""
    rng = np.random.default_rng(0)
    for dtname in ("f16", "q8_0", "q4_0"):
        dt = dtypes.float16 if dtname == "f16" else dtypes.as_dtype(dtname)
        for N, K in shapes:
            if dt is dtypes.float16:
                nbytes = N * K * 2
                arr = (rng.standard_normal((N, K)) * 0.02).astype(np.float16)
                ws = [Operand(runtime.upload(arr), dt, (N, K), (K, 1)) for _ in range(_copies(nbytes))]
            else:
                raw = _qweights(dt, N, K, rng)
                nbytes = raw.nbytes
                ws = [runtime.upload(raw) for _ in range(_copies(nbytes))]
            x = Operand(_x(K), dtypes.float32, (1, K), (K, 1))
            g_ = Operand(_x(K), dtypes.float32, (K,), (1,))
            res = []
            for tag, lnp, cfg in (("plain", None, (None, None, True)), ("plain_old", None, (None, None, False)),
                                  ("ln", (g_, g_, 1e-5), (None, None, True)), ("ln_old", (g_, g_, 1e-5), (None, None, False)),
                                  ("plain_r1", None, (None, 1, True)), ("ln_r1", (g_, g_, 1e-5), (None, 1, True)),
                                  ("plain_r4", None, (None, 4, True)), ("ln_r4", (g_, g_, 1e-5), (None, 4, True))):
                if K > 4096 and lnp is not None:
                    continue
                out = runtime.Buffer(N * 4)
                with debug.tuning(gm.TUNING, threads=cfg[0], rows=cfg[1], hoist=cfg[2]), runtime_log() as ds:
                    for w in ws:
                        gm.gemv(out, x, w, dt, N, K, None, lnp)
                runtime.flush()
                t = _time(list(ds))
                res.append(f"{tag}:{t * 1e6:.1f}us")
            print(f"ab {dtname} {N}x{K} ({nbytes >> 20} MB): " + "  ".join(res), flush=True)


def main(argv):
    what = argv or ["gemv_f16", "new_q4_0", "new_q8_0"]
    print("device:", runtime.get_device().describe().get("name"), probe.gpu_clocks(), flush=True)
    cb = min(256 << 20, runtime.get_device().max_binding_size // 2)
    print(f"copy bandwidth {probe.copy_bandwidth(cb) / 1e9:.0f} GB/s", flush=True)
    fcfg = [tuple(None if v == "-" else int(v) for v in p.split(",")) for p in
            os.environ.get("F16_CFGS", "-,-;1,256;2,128;2,256;4,128;4,256;8,128;8,256").split(";")]
    ncfg = [tuple(None if v == "-" else int(v) for v in p.split(",")) for p in
            os.environ.get("NEW_CFGS", "-,-;64,2;128,1;128,2;128,4;256,2;256,4").split(";")]
    for w in what:
        if w == "ab":
            ab()
        elif w == "attn":
            attn()
        elif w.startswith("knobs_"):
            gemv_knobs(w.split("_", 1)[1], os.environ.get("KNOB_CFGS", "default;probe=1;probe=2").split(";"))
        elif w.startswith("new_"):
            gemv_new(w.split("_", 1)[1].replace("+ln", ""), ncfg, ln=w.endswith("+ln"))
        elif w == "gemv_f16":
            gemv_f16(fcfg)
        else:
            raise SystemExit(f"unknown sweep {w!r}: gemv_f16 (matmul.py's one-row GEMV), new_<type>[+ln] "
                             f"(gemv.py, which also serves one-row quantized x @ w.T), knobs_<type> (gemv.py over KNOB_CFGS), ab, attn")
    print("clocks after:", probe.gpu_clocks(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
