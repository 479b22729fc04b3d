"""Bandwidth / throughput of the hand-written transformer kernels (softmax, layer_norm,
attention decode and prefill, rope_kv_write, sampling), measured against this adapter's own
copy bandwidth in the same run (tensorgpu.kernels.probe).

Small sizes by default (lavapipe); the H100 sizes with TENSORGPU_BENCH_FULL=1:
  softmax / layer_norm [4096, 4096] f32          GB/s = (read + write bytes) / time, % of copy BW
  attention decode: 1 query vs 2048 keys, 16 heads x 128, f16 KV cache (kv_len in a buffer,
                    cache capacity 2048 and 4096)  GB/s of K+V bytes read, % of copy BW
  batched attention decode (continuous batching): 16 and 64 sequences at ~1024 keys each, 16 heads
                    x 128, f16 slotted caches of capacity 2048: the fused one-dispatch step (the
                    fuse_batched_decode_attention rule's kernel) against the plain code's seven
                    dispatches (rope, rope, 2 scatters, pos + 1, attention, combine)  GB/s, % of copy BW
  attention prefill: 512 queries, causal, 16 heads x 128   GFLOP/s (causal half counted)
  rope_kv_write decode (1 token, 16 x 128) and sample (50k vocab, greedy / top-k+top-p): us
Timing: 300 ms warm-up, then GPU timestamps around a pass of R repetitions of the kernel's
dispatches (probe.gpu_time_per_dispatch); every kernel's result is checked first.
"""
import os

import numpy as np
import pytest

from tensorgpu import dtypes, runtime
from tensorgpu.kernels import probe
from tensorgpu.kernels.probe import recorded
from tensorgpu.kernels.attention import _Plan, attention
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels.layernorm import layer_norm
from tensorgpu.kernels.rope import rope_kv_write
from tensorgpu.kernels.sampling import sample, sample_reference
from tensorgpu.kernels.softmax import softmax

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
ROWS_COLS = [(4096, 4096), (1, 4096), (4096, 50304)] if FULL else [(256, 1024)]
DECODE = [(16, 128, 2048, 2048), (16, 128, 2048, 4096)] if FULL else [(4, 64, 256, 256)]   # (H, D, kv_len, capacity)
PREFILL = [(16, 128, 512)] if FULL else [(2, 64, 64)]                                      # (H, D, seq)
BATCH_DECODE = ([(16, 16, 128, 1024, 2048), (64, 16, 128, 1024, 2048)] if FULL
                else [(4, 4, 64, 100, 256)])                              # (B, H, D, keys ~, capacity)
VOCAB = 50304 if FULL else 4096
COPY_BYTES = (256 << 20) if FULL else (4 << 20)

rng = np.random.default_rng(0)




def measure(benchmark, dispatches, nbytes=None, flop=None, reps: int = 10) -> float:
    t = probe.bench_dispatches(benchmark, dispatches, reps)
    info = {"us": t * 1e6, "dispatches": len(dispatches), "timestamps": probe.has_timestamps(),
            "device": runtime.get_device().name, "clocks": probe.gpu_clocks()}
    if nbytes is not None:
        copy = probe.copy_bandwidth(COPY_BYTES)
        info.update({"bytes": nbytes, "GB/s": nbytes / t / 1e9, "copy_GB/s": copy / 1e9,
                     "pct_of_copy": 100 * nbytes / t / copy})
    if flop is not None:
        info.update({"flop": flop, "GFLOP/s": flop / t / 1e9})
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    return t


@pytest.mark.parametrize("rows,cols", ROWS_COLS, ids=lambda s: str(s))
def test_softmax(benchmark, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    xb, out = runtime.upload(x), runtime.Buffer(4 * rows * cols)
    ds = recorded(lambda: softmax(out, Operand(xb, dtypes.float32, (rows, cols), (cols, 1)), rows, cols))
    got = np.frombuffer(runtime.read(out, 0, 4 * cols), np.float32)
    e = np.exp(x[0].astype(np.float64) - x[0].max())
    assert np.allclose(got, e / e.sum(), rtol=1e-5, atol=1e-7)
    measure(benchmark, ds, nbytes=2 * 4 * rows * cols)


@pytest.mark.parametrize("stacked", [False, True], ids=["one", "stacked"])
@pytest.mark.parametrize("rows,cols", ROWS_COLS, ids=lambda s: str(s))
def test_layer_norm(benchmark, rows, cols, stacked):
    """stacked: the second weight/bias of the same rows in the same dispatch (GPT-NeoX's two
    norms of one x): one read of x, two writes."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    w, b = rng.standard_normal(cols).astype(np.float32), rng.standard_normal(cols).astype(np.float32)
    n_out = 2 if stacked else 1
    xb, wb, bb, out = runtime.upload(x), runtime.upload(w), runtime.upload(b), runtime.Buffer(4 * n_out * rows * cols)
    w2b, b2b = runtime.upload(-w), runtime.upload(b + 1)
    op = lambda buf, shape, strides: Operand(buf, dtypes.float32, shape, strides)  # noqa: E731
    stack = (op(w2b, (cols,), (1,)), op(b2b, (cols,), (1,))) if stacked else None
    ds = recorded(lambda: layer_norm(out, op(xb, (rows, cols), (cols, 1)), op(wb, (cols,), (1,)), op(bb, (cols,), (1,)),
                                     rows, cols, 1e-5, stack=stack))
    r = x[0].astype(np.float64)
    nrm = (r - r.mean()) / np.sqrt(r.var() + 1e-5)
    got = np.frombuffer(runtime.read(out, 0, 4 * cols), np.float32)
    assert np.allclose(got, nrm * w + b, rtol=1e-4, atol=1e-5)
    if stacked:
        got = np.frombuffer(runtime.read(out, 4 * rows * cols, 4 * cols), np.float32)
        assert np.allclose(got, nrm * -w + b + 1, rtol=1e-4, atol=1e-5)
    measure(benchmark, ds, nbytes=(1 + n_out) * 4 * rows * cols + 8 * n_out * cols)


@pytest.mark.parametrize("H,D,kvl,cap", DECODE, ids=lambda s: str(s))
def test_attention_decode(benchmark, H, D, kvl, cap):
    q = rng.standard_normal((H, 1, D)).astype(np.float32)
    k = rng.standard_normal((H, cap, D)).astype(np.float16)
    v = rng.standard_normal((H, cap, D)).astype(np.float16)
    qb, kb, vb = runtime.upload(q), runtime.upload(k), runtime.upload(v)
    n = runtime.upload(np.array([kvl], np.int32))
    out = runtime.Buffer(4 * H * D)
    kv = lambda buf: Operand(buf, dtypes.float16, (H, cap, D), (cap * D, D, 1))  # noqa: E731
    ds = recorded(lambda: attention(out, Operand(qb, dtypes.float32, (H, 1, D), (D, D, 1)), kv(kb), kv(vb), n))
    got = np.frombuffer(runtime.read(out), np.float32)[:H * D].reshape(H, D)
    s = np.einsum("hd,hkd->hk", q[:, 0].astype(np.float64), k[:, :kvl].astype(np.float64)) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hk,hkd->hd", p / p.sum(-1, keepdims=True), v[:, :kvl].astype(np.float64))
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5)
    benchmark.extra_info["splits"] = _Plan(H, 1, cap, D).NSPLIT
    measure(benchmark, ds, nbytes=2 * H * kvl * D * 2)


def _np_rope_neox(x, pos, base=10000.0):
    from tensorgpu.kernels.rope import inv_freq
    D = x.shape[-1]
    ang = (np.float32(pos) * inv_freq(D, base)).astype(np.float64)
    a, b = x[..., :D // 2].astype(np.float64), x[..., D // 2:].astype(np.float64)
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("B,H,D,ctx,cap", BATCH_DECODE, ids=lambda s: str(s))
def test_attention_decode_batch(benchmark, monkeypatch, fused, B, H, D, ctx, cap):
    """Continuous batching's decode attention: B sequences, one token each, at positions around
    ctx in slotted f16 caches [B, H, cap, D]. fused: rope_attention_decode's batch form (one
    dispatch: both ropes, both cache writes, the key lengths, attention and combine); plain: the
    same plain code with the rule off (rope, rope, scatter, scatter, pos + 1, attention, combine)."""
    import tensorgpu as tg
    from tensorgpu import rewrites
    from tensorgpu.kernels.attention import rope_attention_decode
    qkv = rng.standard_normal((B, 3, H, D)).astype(np.float32)
    K = rng.standard_normal((B, H, cap, D)).astype(np.float16)
    V = rng.standard_normal((B, H, cap, D)).astype(np.float16)
    pos = np.array([max(0, ctx - 1 - (7 * b) % 32) for b in range(B)], np.int32)
    if fused:
        kc, vc, out, pb = runtime.upload(K), runtime.upload(V), runtime.Buffer(4 * B * H * D), runtime.upload(pos)
        ds = recorded(lambda: rope_attention_decode(out, kc, vc, Operand(runtime.upload(qkv), dtypes.float32, qkv.shape,
                                                                         (3 * H * D, H * D, D, 1)),
                                                    pb, None, H, D, D, cap))
        got = np.frombuffer(runtime.read(out), np.float32)[:B * H * D].reshape(B, H, D)
    else:
        monkeypatch.setattr(rewrites, "RULES", [r for r in rewrites.RULES
                                                if r is not rewrites.fuse_batched_decode_attention])
        kc, vc = tg.tensor(K).contiguous().realize(), tg.tensor(V).contiguous().realize()
        t, p = tg.tensor(qkv), tg.tensor(pos)
        q, k = tg.nn.rope(t[:, 0], p, D), tg.nn.rope(t[:, 1], p, D)
        tg.put_along_axis(kc, p[:, None, None, None], k[:, :, None, :], axis=2)
        tg.put_along_axis(vc, p[:, None, None, None], t[:, 2][:, :, None, :], axis=2)
        a = tg.nn.scaled_dot_product_attention(q[:, :, None, :], kc, vc, causal=True, kv_len=p + 1)
        ds = recorded(lambda: a.realize())
        got = a.numpy().reshape(B, H, D)
    # sequence 0 against NumPy: its new row written, its first pos + 1 keys attended
    p0 = int(pos[0])
    K[0, :, p0] = _np_rope_neox(qkv[0, 1], p0).astype(np.float16)
    V[0, :, p0] = qkv[0, 2].astype(np.float16)
    qr = _np_rope_neox(qkv[0, 0], p0)
    sc = np.einsum("hd,hkd->hk", qr, K[0, :, :p0 + 1].astype(np.float64)) / np.sqrt(D)
    e = np.exp(sc - sc.max(-1, keepdims=True))
    want = np.einsum("hk,hkd->hd", e / e.sum(-1, keepdims=True), V[0, :, :p0 + 1].astype(np.float64))
    assert np.allclose(got[0], want, rtol=2e-3, atol=2e-3)
    benchmark.extra_info["kernels"] = len(ds)
    measure(benchmark, ds, nbytes=2 * 2 * H * D * int((pos + 1).sum()))


@pytest.mark.parametrize("H,D,S", PREFILL, ids=lambda s: str(s))
def test_attention_prefill(benchmark, H, D, S):
    q = rng.standard_normal((H, S, D)).astype(np.float32)
    k = rng.standard_normal((H, S, D)).astype(np.float16)
    v = rng.standard_normal((H, S, D)).astype(np.float16)
    qb, kb, vb, out = runtime.upload(q), runtime.upload(k), runtime.upload(v), runtime.Buffer(4 * H * S * D)
    op = lambda buf, dt: Operand(buf, dt, (H, S, D), (S * D, D, 1))  # noqa: E731
    ds = recorded(lambda: attention(out, op(qb, dtypes.float32), op(kb, dtypes.float16), op(vb, dtypes.float16), S,
                                    out_layout="sbd"))
    got = np.frombuffer(runtime.read(out, 0, 4 * H * D), np.float32).reshape(H, D)   # query 0 sees key 0 only
    assert np.allclose(got, v[:, 0].astype(np.float32), rtol=1e-3, atol=1e-3)
    benchmark.extra_info["splits"] = _Plan(H, S, S, D).NSPLIT
    measure(benchmark, ds, flop=4 * H * D * S * (S + 1) / 2)


def test_rope_kv_write_decode(benchmark):
    H, D, ctx = (16, 128, 2048) if FULL else (4, 64, 128)
    qkv = runtime.upload(rng.standard_normal((1, 3, H, D)).astype(np.float32))
    kc, vc, qo = runtime.Buffer(2 * H * ctx * D), runtime.Buffer(2 * H * ctx * D), runtime.Buffer(4 * H * D)
    pos = runtime.upload(np.array([ctx // 2], np.int32))
    ds = recorded(lambda: rope_kv_write(qo, kc, vc, Operand(qkv, dtypes.float32, (1, 3, H, D), (3 * H * D, H * D, D, 1)),
                                        pos, 1, H, D, D // 4, ctx))
    measure(benchmark, ds)


@pytest.mark.parametrize("mode", ["greedy", "topk40_topp0.9", "topp0.9"])
def test_sample(benchmark, mode):
    l = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    lb, out, u = runtime.upload(l), runtime.Buffer(4), runtime.upload(np.array([0.37], np.float32))
    kw = {"greedy": {}, "topk40_topp0.9": dict(temperature=0.8, top_k=40, top_p=0.9, rand=u),
          "topp0.9": dict(temperature=0.8, top_p=0.9, rand=u)}[mode]
    ds = recorded(lambda: sample(out, lb, VOCAB, **kw))
    got = int(np.frombuffer(runtime.read(out), np.int32)[0])
    assert got == sample_reference(l, kw.get("temperature", 0.0), kw.get("top_k", 0), kw.get("top_p", 1.0), 0.37)
    measure(benchmark, ds)
