"""GGUF loading and saving: the vendored tiny-neox files against gguf.GGUFReader, every kind of
bad input against a crafted small file (each must raise GGUFError naming the file and the
problem, leaving no device memory behind), and save -> load round trips."""
import gc
import struct
import types
from pathlib import Path

import gguf
import numpy as np
import pytest

import tensorgpu.dtypes as dt
import tensorgpu.gguf as G
from tensorgpu import runtime
from tensorgpu.gguf import GGUFError, load_gguf, save_gguf

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny-neox"
FILES = {"q8_0": TINY / "tiny-neox-q8_0.gguf", "q4_0": TINY / "tiny-neox-q4_0.gguf",
         "seq-f32": TINY / "tiny-neox-seq-f32.gguf"}


def _has_tensor() -> bool:
    try:
        from tensorgpu.tensor import Tensor
    except Exception:
        return False
    return hasattr(Tensor, "from_buffer")


HAS_TENSOR = _has_tensor()
needs_tensor = pytest.mark.skipif(not HAS_TENSOR, reason="tensorgpu.tensor.Tensor.from_buffer not available yet")


class _StubTensor:
    """Stands in for Tensor until tensor.py exists, so loading can be tested on its own."""

    def __init__(self, buf, shape, dtype):
        self.buf, self.shape, self.dtype = buf, tuple(shape), dtype


@pytest.fixture(autouse=True)
def tensor_wrap(monkeypatch):
    if not HAS_TENSOR:
        monkeypatch.setattr(G, "_wrap", lambda buf, shape, dtype: _StubTensor(buf, shape, dtype))


def _live() -> int:
    gc.collect()
    return runtime.live_bytes()


@pytest.fixture
def fast_gc():
    """Move everything alive now out of the collector's sight, so the many gc.collect() calls of
    a test cost microseconds instead of ~60 ms each."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


# ----------------------------------------------------------------------------- vendored files


README_KEYS = {
    "general.architecture": "gptneox", "general.type": "model", "gptneox.context_length": 512,
    "gptneox.attention.head_count": 4, "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "mpt", "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
    "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 1,
    "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
}
PER_FILE = {
    "q8_0": {"general.name": "tiny-neox", "general.size_label": "5.3M", "gptneox.embedding_length": 256,
             "gptneox.block_count": 4, "gptneox.feed_forward_length": 1024, "gptneox.rope.dimension_count": 16,
             "gptneox.use_parallel_residual": True, "general.file_type": 7},
    "q4_0": {"general.name": "tiny-neox", "general.size_label": "5.3M", "gptneox.embedding_length": 256,
             "gptneox.block_count": 4, "gptneox.feed_forward_length": 1024, "gptneox.rope.dimension_count": 16,
             "gptneox.use_parallel_residual": True, "general.file_type": 2},
    "seq-f32": {"general.name": "tiny-neox-seq", "general.size_label": "1.4M", "gptneox.embedding_length": 128,
                "gptneox.block_count": 2, "gptneox.feed_forward_length": 512, "gptneox.rope.dimension_count": 32,
                "gptneox.use_parallel_residual": False, "general.file_type": 0},
}


@pytest.fixture(scope="module")
def loaded():
    """Each vendored file loaded once (with the stub or the real Tensor)."""
    cache = {}

    def get(which):
        if which not in cache:
            if not HAS_TENSOR:
                orig = G._wrap
                G._wrap = lambda buf, shape, dtype: _StubTensor(buf, shape, dtype)
                try:
                    cache[which] = load_gguf(FILES[which], progress=False)
                finally:
                    G._wrap = orig
            else:
                cache[which] = load_gguf(FILES[which], progress=False)
        return cache[which]
    yield get
    for f in cache.values():
        f.close()


@pytest.mark.parametrize("which", list(FILES))
def test_metadata_matches_gguf_reader(loaded, which):
    f = loaded(which)
    reader = gguf.GGUFReader(FILES[which])
    expected = {k: fld.contents() for k, fld in reader.fields.items() if not k.startswith("GGUF.")}
    assert f.metadata == expected
    assert list(f.metadata) == list(expected)  # file order kept
    for k, v in {**README_KEYS, **PER_FILE[which]}.items():
        assert f.metadata[k] == v and type(f.metadata[k]) is type(v), k
    eps = f.metadata["gptneox.attention.layer_norm_epsilon"]
    assert isinstance(eps, float) and eps == pytest.approx(1e-5)
    tokens = f.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 4096 and tokens[:2] == ["<|endoftext|>", "<|padding|>"] and all(isinstance(t, str) for t in tokens)
    assert f.metadata["tokenizer.ggml.token_type"][:3] == [3, 3, 1]
    assert f.metadata["tokenizer.ggml.merges"][0] == "Ġ t"
    assert f.architecture == "gptneox" and f.version == 3 and f.path == str(FILES[which])


def test_cross_check_with_gguf_reader(monkeypatch):
    f = load_gguf(FILES["q4_0"], progress=False, check_with_gguf_reader=True)
    assert f.metadata["general.file_type"] == 2
    del f

    def broken(path):
        raise IndexError("index 0 is out of bounds for axis 0 with size 0")

    monkeypatch.setattr(gguf, "GGUFReader", broken)
    msg = _expect_error(FILES["seq-f32"], "GGUFReader failed", "IndexError", check_with_gguf_reader=True)
    assert "out of bounds" in msg
    load_gguf(FILES["seq-f32"], progress=False)  # the default path never calls it


@pytest.mark.parametrize("which", list(FILES))
def test_tensor_shapes_dtypes_and_offsets(loaded, which):
    f = loaded(which)
    reader = gguf.GGUFReader(FILES[which])
    assert list(f.tensor_info) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        shape, dtype, offset, nbytes = f.tensor_info[t.name]
        assert shape == tuple(reversed(t.shape.tolist()))
        assert dtype.ggml_type == int(t.tensor_type)
        assert (offset, nbytes) == (t.data_offset, t.n_bytes)
        tensor = f.tensors[t.name]
        assert tuple(tensor.shape) == shape and tensor.dtype is dtype
    assert f.file_data_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    emb = 256 if which != "seq-f32" else 128
    wtype = {"q8_0": dt.q8_0, "q4_0": dt.q4_0, "seq-f32": dt.float32}[which]
    assert f.tensor_info["token_embd.weight"][:2] == ((4096, emb), wtype)
    assert f.tensor_info["blk.0.attn_qkv.weight"][:2] == ((3 * emb, emb), wtype)
    assert f.tensor_info["blk.0.ffn_down.weight"][:2] == ((emb, 4 * emb), wtype)
    assert f.tensor_info["blk.0.attn_norm.weight"][:2] == ((emb,), dt.float32)


@pytest.mark.parametrize("which", ["q8_0", "q4_0"])
def test_device_bytes_equal_file_bytes(loaded, which):
    f = loaded(which)
    data = np.memmap(FILES[which], mode="r")
    for name, (_, _, offset, nbytes) in f.tensor_info.items():
        assert f.raw_bytes(name) == bytes(data[offset:offset + nbytes]), name


def test_memory_close_to_file_size():
    """Weights stay at file size on the device (pool rounding included) and go away on close."""
    before = _live()
    f = load_gguf(FILES["q4_0"], progress=False)
    used = _live() - before
    assert f.file_data_bytes <= used <= 1.05 * f.file_data_bytes, (used, f.file_data_bytes)
    assert f.device_bytes == used
    f.close()
    del f
    assert _live() == before


def test_context_manager_and_progress(capsys):
    before = _live()
    with load_gguf(FILES["seq-f32"], progress=True) as f:
        assert len(f.tensors) == len(f.tensor_info) > 0
    assert f.tensors == {}
    del f
    assert _live() == before
    assert "loading tiny-neox-seq-f32.gguf" in capsys.readouterr().err


@needs_tensor
def test_loaded_tensors_are_tensors(loaded):
    from tensorgpu.tensor import Tensor
    f = loaded("seq-f32")
    reader = gguf.GGUFReader(FILES["seq-f32"])
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.bias")
    x = f.tensors[t.name]
    assert isinstance(x, Tensor)
    np.testing.assert_array_equal(x.numpy(), np.asarray(t.data))


# ----------------------------------------------------------------------------- crafted files


def _small_arrays(rng):
    return {
        "emb.weight": rng.standard_normal((8, 64)).astype(np.float32),        # -> q8_0
        "norm.weight": rng.standard_normal(64).astype(np.float32),            # f32 1-D
        "proj.weight": rng.standard_normal((4, 64)).astype(np.float32),       # -> q4_0
        "half.weight": rng.standard_normal((3, 5)).astype(np.float16),        # f16
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),                    # i32
    }


SMALL_META = {"general.name": "crafted", "test.count": 7, "test.neg": -3, "test.eps": 0.5,
              "test.flag": True, "test.words": ["alpha", "beta", "gamma"], "test.ints": [1, -2, 3],
              "test.floats": [0.25, 1.5]}


@pytest.fixture
def small(tmp_path):
    """A valid file of a few KB: metadata of every common kind and five tensors of five types."""
    arrays = _small_arrays(np.random.default_rng(0))
    path = tmp_path / "small.gguf"
    save_gguf(path, arrays, SMALL_META, quantize={"emb.weight": "q8_0", "proj.weight": "q4_0"}, architecture="test")
    return path


def _layout(path):
    """Absolute offsets of the structures of a valid file, from gguf.GGUFReader."""
    r = gguf.GGUFReader(path)
    kv = {k: f.offset for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ti = {}
    for t in r.tensors:
        o = t.field.offset
        name_len = len(t.name.encode())
        nd = struct.unpack_from("<I", r.data, o + 8 + name_len)[0]
        base = o + 8 + name_len
        ti[t.name] = {"start": o, "n_dims": base, "dims": base + 4, "type": base + 4 + 8 * nd,
                      "offset": base + 8 + 8 * nd, "end": base + 16 + 8 * nd,
                      "data": t.data_offset, "nbytes": t.n_bytes}
    return types.SimpleNamespace(kv=kv, ti=ti, data_offset=r.data_offset, size=len(r.data))


def _patch(path, offset, fmt, *values, out=None):
    raw = bytearray(Path(path).read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    out = out or path
    Path(out).write_bytes(bytes(raw))
    return out


def _expect_error(path, *fragments, **kwargs):
    before = _live()
    with pytest.raises(GGUFError) as ei:
        load_gguf(path, progress=False, **kwargs)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    del ei
    assert _live() == before
    return msg


def test_small_file_loads(small):
    f = load_gguf(small, progress=False)
    assert f.metadata == {"general.architecture": "test", **SMALL_META}
    info = {k: (v[0], v[1]) for k, v in f.tensor_info.items()}
    assert info == {"emb.weight": ((8, 64), dt.q8_0), "norm.weight": ((64,), dt.float32),
                    "proj.weight": ((4, 64), dt.q4_0), "half.weight": ((3, 5), dt.float16),
                    "ids": ((2, 3), dt.int32)}
    data = Path(small).read_bytes()
    for name, (_, _, off, n) in f.tensor_info.items():
        assert f.raw_bytes(name) == data[off:off + n]
    assert f.file_data_bytes == 8 * 2 * 34 + 256 + 4 * 2 * 18 + 30 + 24


def test_wrong_magic(small):
    _patch(small, 0, "4s", b"GGML")
    msg = _expect_error(small, "b'GGML'", "magic")
    assert "47 47 4d 4c" in msg


def test_not_a_gguf_at_all(tmp_path):
    p = tmp_path / "text.gguf"
    p.write_text("hello, this is not a model file at all\n")
    _expect_error(p, "b'hell'")
    p.write_bytes(b"")
    _expect_error(p, "magic")
    _expect_error(tmp_path / "missing.gguf", "cannot open")


@pytest.mark.parametrize("version, fragment", [(1, "version 1"), (4, "version 4"), (0, "version 0"),
                                               (0x03000000, "big-endian")])
def test_unsupported_version(small, version, fragment):
    _patch(small, 4, "<I", version)
    _expect_error(small, fragment)


def test_version_2_accepted(small):
    _patch(small, 4, "<I", 2)
    f = load_gguf(small, progress=False)
    assert f.version == 2 and f.metadata["test.count"] == 7


def test_truncated_everywhere(small, tmp_path, fast_gc):
    """Cut points in the header, every kv, every tensor info, the padding and every tensor's data."""
    lay = _layout(small)
    data = Path(small).read_bytes()
    cuts = {0, 3, 4, 7, 8, 15, 16, 23, 24, 25}
    for off in lay.kv.values():
        cuts.update({off + 1, off + 8, off + 12, off + 13})
    ends = sorted(lay.kv.values())[1:] + [lay.ti[next(iter(lay.ti))]["start"]]
    cuts.update(e - 1 for e in ends)
    for t in lay.ti.values():
        cuts.update({t["start"] + 4, t["n_dims"] + 2, t["dims"] + 3, t["type"], t["offset"] + 7})
        cuts.update({t["data"], t["data"] + 1, t["data"] + t["nbytes"] - 1})
    cuts.add(lay.data_offset - 1)
    data_end = max(t["data"] + t["nbytes"] for t in lay.ti.values())  # the writer pads after it
    cuts = sorted(c for c in cuts if c < data_end - 1) + [data_end - 1]
    assert len(cuts) > 60
    last_data_cut = None
    for cut in cuts:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        msg = _expect_error(p)
        assert "truncated" in msg or "past the end" in msg or "magic" in msg, msg
        if cut >= lay.data_offset:
            last_data_cut = msg
    # data truncation names the tensor, its offsets and the file size
    last = list(lay.ti)[-1]
    assert f"'{last}'" in last_data_cut and str(data_end - 1) in last_data_cut and str(lay.ti[last]["data"]) in last_data_cut


def test_tensor_offset_past_end(small):
    lay = _layout(small)
    t = lay.ti["proj.weight"]
    _patch(small, t["offset"], "<Q", 1 << 20)
    msg = _expect_error(small, "'proj.weight'", "past the end", str(lay.size), str(1 << 20), "144 bytes")
    assert str(lay.data_offset + (1 << 20)) in msg


def test_misaligned_offset(small):
    t = _layout(small).ti["proj.weight"]
    _patch(small, t["offset"], "<Q", 4)
    _expect_error(small, "'proj.weight'", "alignment")


@pytest.mark.parametrize("type_id, type_name", [(10, "Q2_K"), (16, "IQ2_XXS"), (28, "F64"), (9, "Q8_1")])
def test_unsupported_ggml_type(small, type_id, type_name):
    t = _layout(small).ti["norm.weight"]
    _patch(small, t["type"], "<I", type_id)
    _expect_error(small, "'norm.weight'", f"unsupported ggml type {type_name}", f"id {type_id}")


def test_unknown_ggml_type(small):
    t = _layout(small).ti["ids"]
    _patch(small, t["type"], "<I", 99)
    _expect_error(small, "'ids'", "unknown ggml type id 99")


def test_binding_size_limit(small, monkeypatch):
    dev = runtime.get_device()
    monkeypatch.setitem(dev.limits, "max-storage-buffer-binding-size", 256)
    _expect_error(small, "'emb.weight'", "544 bytes", "256 bytes", "max_storage_buffer_binding_size")


def test_dim0_not_multiple_of_block(small):
    t = _layout(small).ti["emb.weight"]
    _patch(small, t["dims"], "<Q", 48)  # q8_0 blocks are 32 wide
    _expect_error(small, "'emb.weight'", "bad dimensions", "ne[0] = 48", "block size 32")


def test_dims_product_exceeds_data(small):
    t = _layout(small).ti["emb.weight"]
    _patch(small, t["dims"] + 8, "<Q", 9)  # 9 rows need 612 bytes; the next tensor starts 544 bytes on
    _expect_error(small, "bad dimensions", "'emb.weight'", "612 bytes", "'norm.weight'")


def test_too_many_dims(small):
    t = _layout(small).ti["ids"]
    _patch(small, t["n_dims"], "<I", 7)
    _expect_error(small, "'ids'", "n_dims is 7")


@pytest.mark.parametrize("where", ["tensor_count", "kv_count", "array_len", "string_len", "key_len", "name_len"])
def test_absurd_counts_fail_fast(small, where):
    lay = _layout(small)
    off = {"tensor_count": 8, "kv_count": 16,
           "array_len": lay.kv["test.words"] + 8 + len("test.words") + 4 + 4,
           "string_len": lay.kv["general.name"] + 8 + len("general.name") + 4,
           "key_len": lay.kv["test.count"], "name_len": lay.ti["ids"]["start"]}[where]
    for value in (1 << 60, (1 << 64) - 1, 1 << 40):
        _patch(small, off, "<Q", value)
        _expect_error(small)


def test_nested_array_length_checked(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "n.gguf", "test")
    w.add_key_value("nested", [[1, 2], [3, 4]], gguf.GGUFValueType.ARRAY)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert load_gguf(tmp_path / "n.gguf", progress=False).metadata["nested"] == [[1, 2], [3, 4]]
    # GGUFReader flattens nested arrays; the cross-check allows for that
    assert load_gguf(tmp_path / "n.gguf", progress=False, check_with_gguf_reader=True).metadata["nested"] == [[1, 2], [3, 4]]
    lay = _layout(tmp_path / "n.gguf")
    inner = lay.kv["nested"] + 8 + len("nested") + 4 + 12 + 4  # first inner array's length field
    _patch(tmp_path / "n.gguf", inner, "<Q", 1 << 61)
    _expect_error(tmp_path / "n.gguf", "'nested'")


def test_duplicates_and_encoding(small, tmp_path):
    lay = _layout(small)
    data = Path(small).read_bytes()
    # rename key "test.neg" -> "test.eps" (same length): duplicate key
    p = tmp_path / "dupkey.gguf"
    p.write_bytes(data.replace(b"test.neg", b"test.eps", 1))
    _expect_error(p, "'test.eps'", "twice")
    # rename tensor "proj.weight" -> "half.weight" (same length): duplicate tensor name
    p = tmp_path / "duptensor.gguf"
    raw = bytearray(data)
    o = lay.ti["proj.weight"]["start"] + 8
    raw[o:o + len("proj.weight")] = b"half.weight"
    p.write_bytes(bytes(raw))
    _expect_error(p, "'half.weight'", "duplicate tensor name")
    # invalid UTF-8 in a key and in a string value
    p = tmp_path / "badkey.gguf"
    p.write_bytes(data.replace(b"test.flag", b"test.\xff\xfeag", 1))
    _expect_error(p, "UTF-8")
    p = tmp_path / "badval.gguf"
    p.write_bytes(data.replace(b"crafted", b"craf\xc3\x28d", 1))
    _expect_error(p, "'general.name'", "UTF-8")


def test_unknown_value_type_and_bad_alignment(small, tmp_path):
    lay = _layout(small)
    _patch(small, lay.kv["test.count"] + 8 + len("test.count"), "<I", 13, out=tmp_path / "vt.gguf")
    _expect_error(tmp_path / "vt.gguf", "'test.count'", "unknown value type 13")
    for align, frag in ((48, "not a power of two"), (0, "not a power of two")):
        save_gguf(tmp_path / "a.gguf", {"x": np.ones(4, np.float32)}, {"general.alignment": 64}, architecture="t")
        assert load_gguf(tmp_path / "a.gguf", progress=False).alignment == 64
        off = _layout(tmp_path / "a.gguf").kv["general.alignment"] + 8 + len("general.alignment") + 4
        _patch(tmp_path / "a.gguf", off, "<I", align)
        _expect_error(tmp_path / "a.gguf", frag)


def test_failed_upload_frees_everything(small, monkeypatch):
    """A failure after some tensors are on the device (here: the Tensor wrapper) frees them all."""
    calls = []
    orig = G._wrap

    def flaky(buf, shape, dtype):
        calls.append(shape)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return orig(buf, shape, dtype)

    monkeypatch.setattr(G, "_wrap", flaky)
    _expect_error(small, "'proj.weight'", "device lost")
    assert len(calls) == 3

    monkeypatch.setattr(G, "_wrap", orig)
    real_write = runtime.write

    def failing_write(buf, data, offset=0):
        if len(calls) >= 5:
            raise MemoryError("out of device memory")
        calls.append(None)
        return real_write(buf, data, offset)

    monkeypatch.setattr(runtime, "write", failing_write)
    _expect_error(small, "out of device memory")


def test_no_buffers_after_validation_failure(small):
    before_alloc = runtime.STATS["buffers_allocated"]
    before = _live()
    t = _layout(small).ti["ids"]
    _patch(small, t["type"], "<I", 99)
    with pytest.raises(GGUFError):
        load_gguf(small, progress=False)
    assert _live() == before
    assert runtime.STATS["buffers_allocated"] == before_alloc  # validation runs before any upload


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("qname", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16", "f32"])
def test_save_quantized_round_trip(tmp_path, qname):
    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((6, 64)).astype(np.float32), "b": rng.standard_normal(64).astype(np.float32),
              "w3": rng.standard_normal((2, 3, 32)).astype(np.float32)}
    p = tmp_path / f"{qname}.gguf"
    save_gguf(p, arrays, {"general.name": qname}, quantize=qname, architecture="test")
    f = load_gguf(p, progress=False)
    q = gguf.GGMLQuantizationType[qname.upper()]
    for name in ("w", "w3"):
        shape, dtype, _, _ = f.tensor_info[name]
        assert shape == arrays[name].shape and dtype.ggml_type == int(q)
        if qname == "f16":
            expect = arrays[name].astype(np.float16).tobytes()
        elif qname == "f32":
            expect = arrays[name].tobytes()
        else:
            expect = gguf.quants.quantize(arrays[name], q).tobytes()
        assert f.raw_bytes(name) == expect
    assert f.tensor_info["b"][1] is dt.float32 and f.raw_bytes("b") == arrays["b"].tobytes()
    assert f.metadata == {"general.architecture": "test", "general.name": qname}
    # reading it back with the gguf package gives the same blocks
    r = {t.name: t for t in gguf.GGUFReader(p).tensors}
    assert bytes(np.asarray(r["w"].data)) == f.raw_bytes("w")


def test_save_per_tensor_quantize_and_fallback(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"a": rng.standard_normal((4, 64)).astype(np.float32), "b": rng.standard_normal(64).astype(np.float32),
              "odd": rng.standard_normal((4, 33)).astype(np.float32), "f64": rng.standard_normal((2, 2)),
              "i64": np.arange(4, dtype=np.int64)}
    p = tmp_path / "t.gguf"
    save_gguf(p, arrays, {}, quantize={"b": "q8_0"}, architecture="test")
    f = load_gguf(p, progress=False)
    assert [f.tensor_info[n][1] for n in arrays] == [dt.float32, dt.q8_0, dt.float32, dt.float32, dt.int32]
    assert f.raw_bytes("b") == gguf.quants.quantize(arrays["b"], gguf.GGMLQuantizationType.Q8_0).tobytes()
    assert f.raw_bytes("f64") == arrays["f64"].astype(np.float32).tobytes()
    with pytest.warns(UserWarning) as rec:
        save_gguf(p, arrays, {}, quantize="q4_0", architecture="test")
    assert sorted(str(w.message).split("'")[1] for w in rec) == ["f64", "odd"]
    f = load_gguf(p, progress=False)
    # 2-D weights quantized; 1-D and rows not a multiple of 32 ("odd", "f64") stay as they are
    assert [f.tensor_info[n][1] for n in arrays] == [dt.q4_0, dt.float32, dt.float32, dt.float32, dt.int32]
    with pytest.raises(ValueError, match="'odd'.*block size 32"):
        save_gguf(p, arrays, {}, quantize={"odd": "q4_0"}, architecture="test")
    with pytest.raises(ValueError, match="q3_k"):
        save_gguf(p, arrays, {}, quantize="q3_k", architecture="test")
    with pytest.raises(ValueError, match="not being saved"):
        save_gguf(p, arrays, {}, quantize={"nope": "q8_0"}, architecture="test")
    with pytest.raises(ValueError, match="architecture"):
        save_gguf(p, arrays, {})


def test_save_metadata_types(tmp_path):
    VT = gguf.GGUFValueType
    meta = {"s": "text", "b": False, "u": 5, "neg": -5, "big": 1 << 40, "huge": (1 << 64) - 1, "f": 0.1,
            "ls": ["a", "b"], "li": [1, 2], "lbig": [1, 1 << 40], "lf": [1.0, 2], "lb": [True, False],
            "np8": np.uint8(3), "npf64": np.float64(0.1), "arr": np.array([1, 2], np.uint16),
            "explicit": (7, VT.UINT64)}
    p = tmp_path / "m.gguf"
    save_gguf(p, {}, meta, architecture="test")
    r = gguf.GGUFReader(p)
    types_ = {k: f.types for k, f in r.fields.items()}
    expect = {"s": [VT.STRING], "b": [VT.BOOL], "u": [VT.UINT32], "neg": [VT.INT64], "big": [VT.INT64],
              "huge": [VT.UINT64], "f": [VT.FLOAT32], "ls": [VT.ARRAY, VT.STRING], "li": [VT.ARRAY, VT.INT32],
              "lbig": [VT.ARRAY, VT.INT64], "lf": [VT.ARRAY, VT.FLOAT32], "lb": [VT.ARRAY, VT.BOOL],
              "np8": [VT.UINT8], "npf64": [VT.FLOAT64], "arr": [VT.ARRAY, VT.UINT16], "explicit": [VT.UINT64]}
    for k, v in expect.items():
        assert types_[k] == v, k
    m = load_gguf(p, progress=False).metadata
    assert m["neg"] == -5 and m["huge"] == (1 << 64) - 1 and m["f"] == pytest.approx(0.1) and m["npf64"] == 0.1
    assert m["lb"] == [True, False] and m["arr"] == [1, 2] and m["explicit"] == 7 and m["ls"] == ["a", "b"]
    for bad, match in (({"e": []}, "empty"), ({"mix": [1, "a"]}, "one kind"), ({"o": object()}, "cannot write"),
                       ({"x": 1 << 70}, "64 bits")):
        with pytest.raises(ValueError, match=match):
            save_gguf(p, {}, bad, architecture="test")


def test_tiny_neox_metadata_round_trip(tmp_path):
    """Loaded metadata saved again has the same values and the same GGUF value types."""
    src = load_gguf(FILES["q4_0"], progress=False)
    p = tmp_path / "meta.gguf"
    save_gguf(p, {"token_embd.weight": np.zeros((2, 32), np.float32)}, src.metadata)
    again = load_gguf(p, progress=False)
    assert again.metadata == src.metadata and list(again.metadata) == list(src.metadata)
    t_src = {k: f.types for k, f in gguf.GGUFReader(FILES["q4_0"]).fields.items() if not k.startswith("GGUF.")}
    t_new = {k: f.types for k, f in gguf.GGUFReader(p).fields.items() if not k.startswith("GGUF.")}
    assert t_new == t_src


@needs_tensor
def test_save_quantized_view_requantizes(tmp_path):
    """A slice of a quantized Tensor is not its whole buffer: it is dequantized and quantized again."""
    pytest.importorskip("tensorgpu.kernels.quant")
    src = load_gguf(FILES["q8_0"], progress=False)
    emb = src.tensors["token_embd.weight"]
    p = tmp_path / "view.gguf"
    save_gguf(p, {"rows": emb[2:4]}, {}, architecture="test")
    f = load_gguf(p, progress=False)
    assert f.tensor_info["rows"][:2] == ((2, 256), dt.q8_0)
    row = 256 // 32 * 34
    blocks = np.frombuffer(src.raw_bytes("token_embd.weight")[2 * row:4 * row], np.uint8).reshape(2, row)
    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    assert f.raw_bytes("rows") == gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0).tobytes()


@needs_tensor
def test_save_loaded_tensors_bit_identical(tmp_path):
    """Quantized Tensors are written from their raw blocks: the file's blocks come back unchanged."""
    src = load_gguf(FILES["q4_0"], progress=False)
    names = ["token_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "output_norm.weight"]
    p = tmp_path / "rt.gguf"
    save_gguf(p, {n: src.tensors[n] for n in names}, src.metadata)
    again = load_gguf(p, progress=False)
    for n in names:
        assert again.tensor_info[n][:2] == src.tensor_info[n][:2]
        assert again.raw_bytes(n) == src.raw_bytes(n), n
