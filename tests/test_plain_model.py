"""A GPT-NeoX written as a newcomer would (tests/plain_neox.py: plain ops, none of models/'s
code) is as right and as lean as models/gpt_neox.py: reference logits, no compiles in the
steady state, the same kernels per layer. Its speed against the model is a benchmark
(benchmarks/bench_plain_model.py), not a timed test."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu.runtime import STATS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_neox import PlainNeoX  # noqa: E402

TOL = 1e-4      # of the largest |logit|: the q8_0 references are exact for its dequantized weights


@pytest.fixture(scope="module")
def plain(tiny_neox_dir):
    return PlainNeoX(str(tiny_neox_dir / "tiny-neox-q8_0.gguf"))


@pytest.fixture(scope="module")
def ref(tiny_neox_dir):
    return np.load(tiny_neox_dir / "reference.npz")


def _err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def _ids(a):
    return tg.tensor(np.asarray(a, np.int32))


@pytest.mark.parametrize("p", ["p0", "p1", "p2"])
def test_prompt_matches_reference(plain, ref, p):
    ids, want = ref[f"{p}_ids"], ref[f"{p}_logits_q8_0"]
    got = plain.forward(_ids(ids), 0, plain.new_cache(64)).numpy()
    assert _err(got, want) <= TOL


@pytest.mark.parametrize("grow", [False, True], ids=["preallocated", "cat-grown"])
def test_token_by_token_matches_reference(plain, ref, grow):
    ids, want = ref["p1_ids"], ref["p1_logits_q8_0"]
    if grow:
        cache = [(tg.zeros((plain.H, 0, plain.D)), tg.zeros((plain.H, 0, plain.D))) for _ in range(plain.n_layer)]
    else:
        cache = plain.new_cache(64)
    for t, i in enumerate(ids):
        got = plain.forward(_ids([i]), t, cache, grow=grow).numpy()
        assert _err(got[0], want[t]) <= TOL, f"token {t}"


def test_chunks_then_captured_decode_match_reference(plain, ref):
    ids, want = ref["p0_ids"], ref["p0_logits_q8_0"]
    cache = plain.new_cache(64)
    got = plain.forward(_ids(ids[:4]), 0, cache).numpy()
    assert _err(got, want[:4]) <= TOL
    step = tg.capture(lambda tok, pos: plain.forward(tok, pos, cache))
    for t in range(4, len(ids)):
        assert _err(step(_ids([ids[t]]), t).numpy()[0], want[t]) <= TOL, f"token {t}"
    assert STATS["captures_traced"] and len(step.traces) == 1


@pytest.mark.parametrize("captured", [False, True])
def test_decode_compiles_nothing_after_warm_up(plain, captured):
    cache = plain.new_cache(64)
    fwd = tg.capture(lambda tok, pos: plain.forward(tok, pos, cache)) if captured else \
        (lambda tok, pos: plain.forward(tok, pos, cache))
    tok = 7
    for pos in range(12):
        if pos == 3:
            before = dict(tg.debug.stats())
        tok = int(fwd(_ids([tok]), pos).numpy().argmax())
    after = tg.debug.stats()
    assert after["pipelines_compiled"] == before["pipelines_compiled"]
    if captured:
        assert after["captures_traced"] == before["captures_traced"]
        assert after["captures_replayed"] - before["captures_replayed"] == 9


def test_same_kernels_per_layer_as_the_model(plain, tiny_neox_dir):
    from models.gpt_neox import GPTNeoX
    model = GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-q8_0.gguf")

    def kernels(fwd, cache):
        fwd(_ids([5]), 0, cache).numpy()           # warm-up (the folded-norm constants)
        with tg.debug.kernel_log() as log:
            fwd(_ids([9]), 1, cache).numpy()
        return [e.name.split("[")[0] for e in log]
    a = kernels(plain.forward, plain.new_cache(16))
    b = kernels(model.forward, model.new_cache(16, tg.float32))
    assert a == b
    L = plain.n_layer
    assert a.count("gemv_ln2_q8_0") == L and a.count("attention_decode") == L and a.count("gemv2_q8_0") == L
    assert len(a) <= 3 * L + 2, a                    # + embedding, the head


@pytest.mark.skipif(not os.environ.get("TENSORGPU_TINY_NEOX_FULL"), reason="TENSORGPU_TINY_NEOX_FULL not set")
def test_f32_file_matches_reference(ref):
    path = Path(os.environ["TENSORGPU_TINY_NEOX_FULL"]) / "tiny-neox-f32.gguf"
    plain = PlainNeoX(str(path))
    ids, want = ref["p0_ids"], ref["p0_logits"]
    assert _err(plain.forward(_ids(ids), 0, plain.new_cache(64)).numpy(), want) <= TOL
    cache = plain.new_cache(64)
    for t, i in enumerate(ids):
        assert _err(plain.forward(_ids([i]), t, cache).numpy()[0], want[t]) <= TOL
