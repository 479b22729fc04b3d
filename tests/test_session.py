"""Sessions over one resident model: independence, fork, reset, generation controls, bad input.

Uses the small sequential-residual tiny-neox variant (2 layers, 128 wide) where the exact
numbers don't matter, and the q8_0 model where text does.
"""
import gc

import numpy as np
import pytest

import tensorgpu as tg
from models.gpt_neox import ContextOverflowError, GPTNeoX, ModelError
from models.sampling import Sampler, sample_row


@pytest.fixture(scope="module")
def seq(tiny_neox_dir):
    return GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-seq-f32.gguf")


@pytest.fixture(scope="module")
def q8(tiny_neox_dir):
    return GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-q8_0.gguf")


@pytest.fixture(scope="module")
def ref(tiny_neox_dir):
    return np.load(tiny_neox_dir / "reference.npz")


def _greedy(sess, prompt, n):
    return list(sess.generate(prompt, max_new_tokens=n, stop_on_eos=False))


# ----------------------------------------------------------------------------- independence


def test_interleaved_sessions_match_each_alone(q8, ref):
    a_ids, b_ids = ref["p0_ids"], ref["p1_ids"]
    alone_a = _greedy(q8.session(), a_ids, 12)
    alone_b = _greedy(q8.session(), b_ids, 12)
    sa, sb = q8.session(), q8.session()
    ga = sa.generate(a_ids, max_new_tokens=12, stop_on_eos=False)
    gb = sb.generate(b_ids, max_new_tokens=12, stop_on_eos=False)
    got_a, got_b = [], []
    for ta, tb in zip(ga, gb):  # one token of each, alternately
        got_a.append(ta)
        got_b.append(tb)
    assert got_a == alone_a == ref["p0_greedy_ids_q8_0"][:12].tolist()
    assert got_b == alone_b == ref["p1_greedy_ids_q8_0"][:12].tolist()


def test_sessions_share_the_weights(q8):
    s1, s2 = q8.session(max_context=64), q8.session(max_context=64)
    assert s1.model is s2.model
    before = tg.debug.stats()["live_bytes"]
    s3 = q8.session(max_context=64)
    grown = tg.debug.stats()["live_bytes"] - before
    c = q8.config
    cache_bytes = c.n_layer * 2 * c.n_head * 64 * c.head_dim * 2
    assert grown <= cache_bytes + 4096, f"a new session allocated {grown} bytes, its f16 cache is {cache_bytes}"
    del s3


def test_fork_continues_like_the_original(q8, ref):
    ids = ref["p2_ids"]
    base = q8.session()
    base.forward(ids)
    fork = base.fork()
    assert fork.context == base.context and fork.cache[0][0] is not base.cache[0][0]
    want = ref["p2_greedy_ids_q8_0"][:10].tolist()
    assert _greedy(fork, None, 10) == want
    # the fork's writes did not touch the original
    assert _greedy(base, None, 10) == want
    # fork after generation carries the pending token too
    f2 = base.fork()
    assert f2.context == base.context and f2.position == len(ids) + 10


def test_reset_and_generate_continuation(q8, ref):
    ids = ref["p0_ids"]
    want = ref["p0_greedy_ids_q8_0"][:12].tolist()
    s = q8.session()
    first = _greedy(s, ids, 5)
    rest = _greedy(s, None, 7)  # continues from the context, the last yielded token included
    assert first + rest == want
    assert s.position == len(ids) + 12 and s.context[len(ids):] == want
    s.reset()
    assert s.position == 0 and _greedy(s, ids, 12) == want


def test_forward_after_generate_runs_the_pending_token(seq):
    ids = [5, 6, 7, 8]
    s = seq.session(cache_dtype="float32")
    tok = _greedy(s, ids, 1)[0]
    out = s.forward([9]).numpy()            # runs [tok, 9], returns only 9's row
    t = seq.session(cache_dtype="float32")
    want = t.forward(ids + [tok, 9]).numpy()[-1:]
    assert out.shape == (1, seq.config.n_vocab)
    np.testing.assert_allclose(out, want, atol=1e-4)


# ----------------------------------------------------------------------------- generation controls


def test_sampling_is_seeded_and_top_k_1_is_greedy(q8, ref):
    ids = ref["p1_ids"]
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.95, stop_on_eos=False)
    a = list(q8.session().generate(ids, seed=7, **kw))
    b = list(q8.session().generate(ids, seed=7, **kw))
    c = list(q8.session().generate(ids, seed=8, **kw))
    assert a == b and a != c
    greedy = ref["p1_greedy_ids_q8_0"][:10].tolist()
    assert list(q8.session().generate(ids, max_new_tokens=10, temperature=0.7, top_k=1, seed=1,
                                      stop_on_eos=False)) == greedy
    assert list(q8.session().generate(ids, max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=1,
                                      stop_on_eos=False)) == greedy


def test_repetition_penalty_changes_a_repetitive_continuation(q8, ref):
    ids = ref["p0_ids"]  # its greedy continuation repeats "the earth" a lot
    plain = _greedy(q8.session(), ids, 24)
    pen = list(q8.session().generate(ids, max_new_tokens=24, repetition_penalty=1.5, stop_on_eos=False))
    assert pen != plain
    assert len(set(pen)) > len(set(plain))


def test_stop_strings_and_ids(q8, ref):
    ids = ref["p0_ids"]
    full = _greedy(q8.session(), ids, 32)
    text = q8.tokenizer.decode(full)
    # stop at the first "earth": the token that completes it is the last one yielded
    got = list(q8.session().generate(ids, max_new_tokens=32, stop=["earth"], stop_on_eos=False))
    assert got == full[:len(got)] and "earth" in q8.tokenizer.decode(got)
    assert "earth" not in q8.tokenizer.decode(got[:-1]) and len(got) < len(full)
    assert text.count("earth") > 1
    got = list(q8.session().generate(ids, max_new_tokens=32, stop=[full[3]], stop_on_eos=False))
    assert got == full[:full.index(full[3]) + 1]
    assert list(q8.session().generate(ids, max_new_tokens=0)) == []


def test_stops_when_the_context_is_full(seq):
    s = seq.session(max_context=8)
    got = list(s.generate([5, 6, 7], max_new_tokens=50, stop_on_eos=False))
    assert len(got) == 5 and s.remaining == 0 and s.position == 8
    with pytest.raises(ContextOverflowError):
        s.forward([1])


def test_generate_stats(q8, ref):
    s = q8.session()
    list(s.generate(ref["p0_ids"], max_new_tokens=4, stop_on_eos=False))
    st = s.last_stats
    assert st["prefill_tokens"] == len(ref["p0_ids"]) and st["decode_tokens"] == 3
    assert st["prefill_s"] > 0 and st["decode_s"] > 0


def test_sampler_on_the_host():
    rng = np.random.default_rng(0)
    row = np.array([0.0, 1.0, 3.0, 2.0])
    assert sample_row(row.copy(), [], 0.0, None, None, None, rng) == 2
    # repetition penalty: 3 / 4 < 2
    assert sample_row(row.copy(), [2], 0.0, None, None, 4.0, rng) == 3
    # top_k=2 only ever picks 2 or 3
    picks = {sample_row(row.copy(), [], 1.0, 2, None, None, rng) for _ in range(200)}
    assert picks == {2, 3}
    # top_p: 0.6 of the mass is token 2 alone
    picks = {sample_row(np.log(np.array([0.1, 0.1, 0.6, 0.2])), [], 1.0, None, 0.5, None, rng) for _ in range(100)}
    assert picks == {2}
    # frequencies follow the softmax
    p = np.array([0.1, 0.2, 0.7])
    counts = np.bincount([sample_row(np.log(p), [], 1.0, None, None, None, rng) for _ in range(3000)], minlength=3)
    assert np.allclose(counts / 3000, p, atol=0.04)
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            Sampler(**{"temperature": 1.0, **bad})


def test_tg_nn_sample_glue_matches_the_reference():
    from tensorgpu.kernels.sampling import sample_reference
    rng = np.random.default_rng(1)
    L = rng.standard_normal((3, 777)).astype(np.float32) * 3
    lg = tg.tensor(L)
    assert tg.nn.sample(lg).item() == np.argmax(L[-1])
    assert tg.nn.sample(lg[0]).item() == np.argmax(L[0])
    assert tg.nn.sample(lg * 2.0).item() == np.argmax(L[-1])        # an unrealized row
    for T, k, p in [(1.0, 0, 1.0), (0.7, 40, 0.9), (1.3, 0, 0.6), (0.5, 256, 1.0)]:
        for u in (0.05, 0.5, 0.97):
            want = sample_reference(L[-1], T, k, p, u)
            assert tg.nn.sample(lg, T, k, p, u=u).item() == want
            assert tg.nn.sample(lg, T, k, p, u=tg.tensor(np.array([u], np.float32))).item() == want
    best = int(np.argmax(L[-1]))
    prev = tg.tensor(np.array([best, 3, 0, 0], np.int32))
    assert tg.nn.sample(lg, repetition_penalty=50.0, prev_tokens=prev, n_prev=1).item() == \
        sample_reference(L[-1], repetition_penalty=50.0, prev_tokens=[best])
    # append: the history grows on the GPU
    hist = tg.tensor(np.array([best, 0, 0, 0], np.int32)).contiguous().realize()
    n = tg.tensor(np.array([1], np.int32)).contiguous().realize()
    tok = tg.nn.sample(lg, repetition_penalty=50.0, prev_tokens=hist, n_prev=n, append=True).item()
    assert tok != best and hist.numpy().tolist()[:2] == [best, tok] and n.item() == 2
    with pytest.raises(ValueError, match="needs u"):
        tg.nn.sample(lg, 1.0)
    with pytest.raises(ValueError, match="prev_tokens"):
        tg.nn.sample(lg, repetition_penalty=1.2)


def test_sampler_gpu_path_uses_the_seeded_stream():
    from tensorgpu.kernels.sampling import sample_reference
    L = np.random.default_rng(2).standard_normal((1, 500)).astype(np.float32)
    u = np.random.default_rng(11).random()
    s = Sampler(temperature=0.9, top_k=30, top_p=0.8, seed=11)
    assert s.pick(tg.tensor(L)) == sample_reference(L[0], 0.9, 30, 0.8, u)
    # numpy logits take the host path, also seeded
    a = [Sampler(1.0, seed=5).pick(L) for _ in range(3)]
    assert len(set(a)) == 1


# ----------------------------------------------------------------------------- bad input


def test_prompt_longer_than_context_leaves_the_session_unchanged(seq):
    s = seq.session(max_context=16, cache_dtype="float32")
    first = s.forward(list(range(2, 12))).numpy()
    with pytest.raises(ContextOverflowError, match="6 left"):
        s.forward(list(range(2, 12)))
    with pytest.raises(ContextOverflowError):
        s.generate(list(range(100, 120)), max_new_tokens=4)
    assert s.position == 10
    # the cache still holds exactly the first 10 tokens: the next logits match a fresh run
    nxt = s.forward([40, 41]).numpy()
    want = seq.session(max_context=16, cache_dtype="float32").forward(list(range(2, 12)) + [40, 41]).numpy()
    np.testing.assert_allclose(np.concatenate([first, nxt]), want, atol=1e-4)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        seq.session(max_context=seq.config.n_ctx + 1)


@pytest.mark.parametrize("bad, exc, msg", [
    ([5, 4096], IndexError, "4096 at index 1 is outside the vocabulary"),
    ([-1], IndexError, "-1 at index 0"),
    ([], ValueError, "empty"),
    ([[1, 2]], ValueError, "1-D"),
    ([1.5], TypeError, "integers"),
    ("hello", TypeError, "encode"),
])
def test_bad_token_ids(seq, bad, exc, msg):
    s = seq.session(max_context=16)
    with pytest.raises(exc, match=msg):
        s.forward(bad)
    assert s.position == 0


def test_bad_generate_arguments(q8):
    s = q8.session(max_context=32)
    with pytest.raises(ValueError, match="empty prompt"):
        s.generate("", max_new_tokens=3)
    with pytest.raises(ValueError, match="empty prompt"):
        s.generate([], max_new_tokens=3)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        s.generate([99999], max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        s.generate("hi", temperature=-0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.generate("hi", max_new_tokens=-1)
    assert s.position == 0


# -- bad files: variants of the seq model written with tg.save_gguf


@pytest.fixture(scope="module")
def seq_parts(tiny_neox_dir):
    import gguf

    from models.tokenizer import read_gguf_metadata
    path = tiny_neox_dir / "tiny-neox-seq-f32.gguf"
    md = read_gguf_metadata(path)
    r = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))) for t in r.tensors}
    return md, tensors


def _write(tmp_path, md, tensors, name="bad.gguf"):
    path = tmp_path / name
    tg.save_gguf(path, tensors, md)
    return path


def _no_leak(fn):
    gc.collect()
    before = tg.debug.stats()["live_bytes"]
    fn()
    gc.collect()
    assert tg.debug.stats()["live_bytes"] <= before + 4096, "a failed load left tensors on the device"


def test_other_architecture_is_named(tmp_path, seq_parts):
    md, tensors = seq_parts
    md = {k.replace("gptneox.", "llama."): v for k, v in md.items()}
    md["general.architecture"] = "llama"
    path = _write(tmp_path, md, tensors)

    def load():
        with pytest.raises(ModelError, match="'llama'"):
            GPTNeoX.from_gguf(path)
    _no_leak(load)


def test_missing_metadata_keys_are_named(tmp_path, seq_parts):
    md, tensors = seq_parts
    md = {k: v for k, v in md.items() if k not in ("gptneox.rope.dimension_count", "gptneox.block_count")}
    path = _write(tmp_path, md, tensors)

    def load():
        with pytest.raises(ModelError, match="gptneox.block_count.*gptneox.rope.dimension_count"):
            GPTNeoX.from_gguf(path)
    _no_leak(load)


def test_missing_tensors_are_named(tmp_path, seq_parts):
    md, tensors = seq_parts
    tensors = {k: v for k, v in tensors.items() if k not in ("blk.1.ffn_up.bias", "output.weight")}
    path = _write(tmp_path, md, tensors)

    def load():
        with pytest.raises(ModelError, match="missing required tensor") as e:
            GPTNeoX.from_gguf(path)
        assert "blk.1.ffn_up.bias" in str(e.value) and "output.weight" in str(e.value)
    _no_leak(load)


def test_wrong_tensor_shape_is_named(tmp_path, seq_parts):
    md, tensors = seq_parts
    tensors = dict(tensors)
    tensors["blk.0.attn_qkv.weight"] = tensors["blk.0.attn_qkv.weight"][:300]
    with pytest.raises(ModelError, match=r"blk.0.attn_qkv.weight is \(300, 128\).*expected \(384, 128\)"):
        GPTNeoX.from_gguf(_write(tmp_path, md, tensors))


def test_bad_metadata_values(tmp_path, seq_parts):
    md, tensors = seq_parts
    with pytest.raises(ModelError, match="not divisible"):
        GPTNeoX.from_gguf(_write(tmp_path, {**md, "gptneox.attention.head_count": 3}, tensors, "a.gguf"))
    with pytest.raises(ModelError, match="rope.dimension_count"):
        GPTNeoX.from_gguf(_write(tmp_path, {**md, "gptneox.rope.dimension_count": 33}, tensors, "b.gguf"))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(tg.GGUFError, match="not a GGUF file"):
        GPTNeoX.from_gguf(p)
    with pytest.raises(tg.GGUFError):
        GPTNeoX.from_gguf(tmp_path / "missing.gguf")


def test_model_without_tokenizer(tmp_path, seq_parts):
    md, tensors = seq_parts
    md = {k: v for k, v in md.items() if not k.startswith("tokenizer.")}
    m = GPTNeoX.from_gguf(_write(tmp_path, md, tensors))
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        m.session().generate("text")
    assert len(list(m.session().generate([5, 6], max_new_tokens=3))) == 3


# ----------------------------------------------------------------------------- bucketed prompt lengths


def _exact_logits(model, ids, p_ids=()):
    """model.forward without padding or capture, after the prefix p_ids."""
    cache = model.new_cache(model.config.n_ctx)
    allids = list(p_ids) + list(ids)
    p = len(p_ids)
    if p:
        model.forward(tg.tensor(np.asarray(p_ids, np.int32)), 0, cache).realize()
    return model.forward(tg.tensor(np.asarray(allids[p:], np.int32)), p, cache).numpy()


@pytest.mark.parametrize("T", [5, 7, 37, 100])
def test_padded_forward_equals_the_exact_one(q8, T):
    """A prompt padded to its bucket gives the same logits (all rows, and the last row) as the
    unpadded forward, also after a prefix (positions and kv_len offset). Tolerance: the two
    shapes sum in different orders and the f16 cache rounds K/V (the model tests' f16 bound)."""
    from models.session import bucket_length
    assert bucket_length(T) > T
    ids = (np.arange(T) * 37 + 11) % q8.config.n_vocab
    want = _exact_logits(q8, ids)
    s = q8.session()
    np.testing.assert_allclose(s.forward(ids).numpy(), want, rtol=1e-3, atol=1e-3)
    s2 = q8.session()
    np.testing.assert_allclose(s2.forward(ids, last_only=True).numpy(), want[-1:], rtol=1e-3, atol=1e-3)
    s2_more = s2.forward(ids[:3]).numpy()                       # continues after the padded prompt
    want2 = _exact_logits(q8, ids[:3], p_ids=list(ids))
    np.testing.assert_allclose(s2_more, want2, rtol=1e-3, atol=1e-3)


def test_lengths_of_one_bucket_compile_nothing_new(q8):
    s = q8.session()
    s.forward(np.arange(40) % 100, last_only=True).numpy()     # bucket 48: traced + compiled
    s0 = tg.debug.stats()
    for T in (41, 45, 47):
        s.reset()
        s.forward(np.arange(T) % 100, last_only=True).numpy()
    d = {k: tg.debug.stats()[k] - s0[k] for k in ("pipelines_compiled", "captures_traced")}
    assert d == {"pipelines_compiled": 0, "captures_traced": 0}


def test_no_padding_past_the_context(q8):
    s = q8.session(max_context=40)
    ids = np.arange(37) % 100                                  # bucket 48 > 40: runs at 37
    np.testing.assert_allclose(s.forward(ids, last_only=True).numpy(), _exact_logits(q8, ids)[-1:], rtol=1e-3, atol=1e-3)
    assert s.position == 37


# ----------------------------------------------------------------------------- context shift, truncate, stop reasons


@pytest.mark.parametrize("top_k", [None, 300], ids=["gpu-sampling", "host-sampling"])
def test_context_shift_continues_as_a_fresh_session_of_the_shifted_context(seq, top_k):
    """llama-cli's shift: keep the first `keep` tokens, drop half of the rest, run what is left
    again. The tokens after the shift are those of a new session given that shifted context."""
    C, keep, prompt = 16, 3, [5, 6, 7, 8, 9]
    s = seq.session(max_context=C)
    got = list(s.generate(prompt, max_new_tokens=30, top_k=top_k, stop_on_eos=False, context_shift=True, keep=keep))
    assert len(got) == 30 and s.last_stats["stop"] == "length" and s.last_stats["context_shifts"] >= 2
    # without the shift it stops when the context is full
    r = seq.session(max_context=C)
    first = list(r.generate(prompt, max_new_tokens=30, top_k=top_k, stop_on_eos=False))
    assert r.last_stats["stop"] == "context" and len(first) == C - len(prompt) and got[:len(first)] == first
    ctx = r.context                                   # the full context at the shift
    shifted = ctx[:keep] + ctx[keep + (C - keep) // 2:]
    assert len(shifted) == C - (C - keep) // 2
    fresh = seq.session(max_context=C)
    after = list(fresh.generate(shifted, max_new_tokens=30, top_k=top_k, stop_on_eos=False))
    assert got[len(first):len(first) + len(after)] == after
    assert s.last_stats["decode_tokens"] == 29 and s.last_stats["decode_s"] > 0


def test_context_shift_arguments(seq):
    s = seq.session(max_context=16)
    for keep in (-1, 15, 1.0, True):
        with pytest.raises(ValueError, match="keep must be an int in"):
            s.generate([1, 2], context_shift=True, keep=keep)
    assert s.position == 0
    s.generate([1, 2], keep=99)      # keep means nothing without a shift


def test_stop_reasons(seq):
    s = seq.session(max_context=12)
    full = list(s.generate([5, 6, 7], max_new_tokens=3, stop_on_eos=False))
    assert s.last_stats["stop"] == "length"
    s.reset()
    assert list(s.generate([5, 6, 7], max_new_tokens=9, stop=[full[1]], stop_on_eos=False)) == full[:2]
    assert s.last_stats["stop"] == "stop"
    s.reset()
    assert len(list(s.generate([5, 6, 7], max_new_tokens=50, stop_on_eos=False))) == 9
    assert s.last_stats["stop"] == "context" and s.remaining == 0
    tok, eos = seq.tokenizer, seq.tokenizer.eos_id
    tok.eos_id = full[0]                       # the first greedy token as "EOS"
    try:
        s.reset()
        assert list(s.generate([5, 6, 7], max_new_tokens=5)) == full[:1] and s.last_stats["stop"] == "eos"
    finally:
        tok.eos_id = eos


def test_stop_string_spanning_tokens_is_found_with_a_bounded_tail(q8, ref):
    from models.session import _StopText
    tok = q8.tokenizer
    ids = ref["p0_greedy_ids_q8_0"][:32].tolist()
    text = tok.decode(ids)
    target = text[text.index("earth") - 3:text.index("earth") + 3]   # crosses a token boundary
    st = _StopText(tok, [target, "zz"])
    hit = next(i for i, t in enumerate(ids) if st.hit(t))
    assert target in tok.decode(ids[:hit + 1]) and target not in tok.decode(ids[:hit])
    assert len(st.tail) <= len(target) - 1


def test_truncate_then_generate_equals_a_session_of_the_prefix(q8, ref):
    ids = ref["p1_ids"].tolist()
    s = q8.session(max_context=64)
    list(s.generate(ids, max_new_tokens=6, stop_on_eos=False))
    ctx = s.context
    s.truncate(len(ids) - 2)
    assert s.context == ids[:-2] and s.position == len(ids) - 2
    got = list(s.generate([7, 8], max_new_tokens=5, stop_on_eos=False))
    want = list(q8.session(max_context=64).generate(ids[:-2] + [7, 8], max_new_tokens=5, stop_on_eos=False))
    assert got == want
    s.truncate(1000)                  # longer than the context: nothing changes
    assert s.context[:len(ids) - 2] == ctx[:len(ids) - 2]
    with pytest.raises(ValueError, match="truncate"):
        s.truncate(-1)


def test_perplexity_uncertainty_and_running_values():
    """llama-perplexity's estimate: ppl * sqrt(var(nll) / (n - 1)); running values per window."""
    from models.session import Perplexity
    rng = np.random.default_rng(0)
    nll = rng.gamma(2.0, 2.0, size=(5, 31))
    r = Perplexity(float(np.exp(nll.mean())), float(nll.sum()), nll.size, 5, nll)
    x = nll[:, 15:].ravel()
    assert r.uncertainty(16) == pytest.approx(np.exp(x.mean()) * np.std(x) / np.sqrt(x.size - 1), rel=1e-12)
    assert r.running(16)[-1] == pytest.approx(r.ppl_from(16), rel=1e-12)
    assert r.running(1)[1] == pytest.approx(np.exp(nll[:2].mean()), rel=1e-12)
    assert np.isnan(Perplexity(1.0, 0.0, 1, 1, np.zeros((1, 1))).uncertainty())
