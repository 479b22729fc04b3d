"""Inputs that used to be taken silently (wrong rows, wrapped ids, truncated or flattened
prompts, runs past the context) are errors at the call, naming the value and the limit."""
import numpy as np
import pytest

import tensorgpu as tg
from models.gpt_neox import ContextOverflowError, GPTNeoX


@pytest.fixture(scope="module")
def seq(tiny_neox_dir):
    return GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-seq-f32.gguf")


@pytest.mark.parametrize("bad", [5000, -1])
def test_embedding_refuses_out_of_range_ids_of_host_made_tensors(bad):
    table = tg.tensor(np.ones((4096, 8), np.float32))
    with pytest.raises(IndexError, match=f"id {bad} is out of range for a table of 4096 rows"):
        tg.nn.embedding(tg.tensor([1, bad]), table)                   # was a zero row
    with pytest.raises(IndexError, match=f"id {bad}"):
        tg.nn.embedding([bad], table)
    with pytest.raises(TypeError, match="integers"):
        tg.nn.embedding([1.5], table)


def test_embedding_forgets_the_host_range_after_an_in_place_write():
    table = tg.tensor(np.arange(32, dtype=np.float32).reshape(8, 4))
    ids = tg.tensor(np.array([9, 1], np.int32))                       # out of range as uploaded
    ids[0] = tg.tensor(np.array(2, np.int32))
    ids.realize()
    np.testing.assert_array_equal(tg.nn.embedding(ids, table).numpy()[0], [8, 9, 10, 11])


def test_uint64_values_past_uint32_warn_or_are_refused():
    """Implicitly stored as uint32 (issue 16: as documented, with a one-time warning naming the
    values, no longer silently); an explicit dtype=tg.uint32 request for them is refused."""
    tg.dtypes._WARNED.discard(("uint64", "uint32"))
    with pytest.warns(tg.dtypes.DtypeConversionWarning, match=r"4294967301\.\.4294967301 do not fit uint32"):
        tg.tensor(np.array([2**32 + 5], np.uint64))
    with pytest.raises(OverflowError, match=r"4294967301\.\.4294967301 do not fit uint32"):
        tg.tensor(np.array([2**32 + 5], np.uint64), dtype=tg.uint32)


def test_sample_refuses_u_outside_the_unit_interval():
    logits = tg.tensor(np.zeros((1, 8), np.float32))
    for u in (1.5, -0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"u must be a uniform number in \[0, 1\)"):
            tg.nn.sample(logits, 1.0, u=u)


def test_generate_checks_its_prompt_as_forward_does(seq):
    s = seq.session(max_context=16)
    with pytest.raises(TypeError, match="integers"):
        s.generate([1.7])                                             # was truncated to 1
    with pytest.raises(ValueError, match="1-D"):
        s.generate([[1, 2], [3, 4]])                                  # was flattened
    with pytest.raises(ValueError, match="not a finite number"):
        s.forward([float("inf")])                                     # was "token id -9223372036854775808"
    with pytest.raises(ValueError, match="not a finite number"):
        s.generate([float("nan")])
    assert s.position == 0


def test_generate_none_on_a_full_context_raises(seq):
    s = seq.session(max_context=8)
    got = list(s.generate([5, 6, 7], max_new_tokens=50, stop_on_eos=False))
    assert len(got) == 5 and s.remaining == 0
    with pytest.raises(ContextOverflowError, match="no room to generate: the session holds 8 of max_context 8"):
        s.generate(None, max_new_tokens=4)                           # ran on at 17/16, 18/16, ...
    with pytest.raises(ContextOverflowError):
        s.generate([1], max_new_tokens=1)
    assert s.position == 8
    s.reset()
    assert len(list(s.generate([5, 6, 7], max_new_tokens=2, stop_on_eos=False))) == 2


def test_a_prompt_that_fills_the_context_leaves_no_room_to_generate(seq):
    s = seq.session(max_context=8)
    with pytest.raises(ContextOverflowError, match="the prompt adds 8"):
        s.generate(list(range(8)), max_new_tokens=3)
    assert list(s.generate(list(range(7)), max_new_tokens=3, stop_on_eos=False)).__len__() == 1


def test_session_names_context_length_when_the_cache_cannot_fit(seq):
    import dataclasses
    big = GPTNeoX(dataclasses.replace(seq.config, n_ctx=1 << 24), seq.tensors, seq.tokenizer, seq.path)
    with pytest.raises(ValueError, match=r"max_context \(the model's context_length\) = 16777216: the KV cache needs"):
        big.session()
