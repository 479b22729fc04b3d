"""LLaMA-family models (models/llama.py) against references.

* quantized files (vendored q8_0, Q4_K_M, q4_0): logits against a float64 NumPy forward of the
  file's own weights dequantized by gguf-py (tests/llama_ref.py), for the whole prompt, token by
  token and in uneven chunks; greedy continuations against transformers' greedy ids with the
  same dequantized weights, up to the first step the NumPy reference calls a near-tie;
  perplexity against the NumPy NLL.
* f32 files (not vendored; $TENSORGPU_TINY_LLAMA_FULL / $TENSORGPU_TINY_QWEN2_FULL name the
  shared folders): logits against transformers' to 1e-3 of the max logit, greedy ids up to the
  first near-tie of the reference margins.
"""
import os
from pathlib import Path

import numpy as np
import pytest

import llama_ref
import tensorgpu as tg
from models import load
from models.gpt_neox import GPTNeoX
from models.llama import Llama
from models.session import perplexity

ROOT = Path(__file__).resolve().parent.parent / "models"
QUANT = [("tiny-llama", "q8_0"), ("tiny-llama", "q4_k_m"), ("tiny-qwen2", "q8_0"), ("tiny-qwen2", "q4_0")]
REL = 1e-3          # logits: max |error| <= REL * max |logit|
TIE = 0.02          # a top-1/top-2 gap below this is a near-tie: greedy paths may part there


def gguf(name, qtype, folder=ROOT):
    return str(Path(folder) / name / f"{name}-{qtype}.gguf")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name, qtype, folder=ROOT):
        key = gguf(name, qtype, folder)
        if key not in cache:
            cache[key] = load(key)
        return cache[key]
    return get


def refs(name, folder=ROOT):
    return np.load(Path(folder) / name / "reference.npz")


def assert_logits_close(got, want, what):
    err, top = np.abs(got - want).max(), np.abs(want).max()
    assert err <= REL * top, f"{what}: max |logit error| {err:.3g} > {REL} * max |logit| {top:.3g}"


def greedy_agrees(path, prompt, got, want, margins=None):
    """got == want up to the first step where the reference's top-1/top-2 gap is a near-tie
    (margins given: the reference's own; else computed by the NumPy forward at the step where
    the two paths part). Returns the number of steps compared."""
    n = len(want)
    if margins is not None:
        ties = np.nonzero(np.asarray(margins) < TIE)[0]
        n = int(ties[0]) if len(ties) else n
        assert list(got[:n]) == list(want[:n]), f"greedy ids differ before the first near-tie (step {n})"
        return n
    for j in range(n):
        if got[j] != want[j]:
            lg = llama_ref.forward(path, list(prompt) + list(want[:j]))[-1]
            top2 = np.sort(lg)[-2:]
            assert top2[1] - top2[0] < TIE, (f"greedy step {j}: ours {got[j]}, reference {want[j]}, but the "
                                             f"reference's top-1/top-2 gap is {top2[1] - top2[0]:.4f} (no tie)")
            return j
    return n


# ----------------------------------------------------------------------------- loading


def test_load_picks_the_class(models):
    m = models("tiny-llama", "q8_0")
    assert isinstance(m, Llama) and m.config.arch == "llama" and m.config.rope_mode == "normal"
    assert (m.config.n_head, m.config.n_head_kv, m.config.head_dim) == (4, 2, 64)
    assert m.output is not m.token_embd and m.tokenizer.add_bos
    q = models("tiny-qwen2", "q8_0")
    assert q.config.arch == "qwen2" and q.config.rope_mode == "neox" and q.config.rope_base == 1e6
    assert q.output is q.token_embd, "qwen2 has no output.weight: the embedding is the LM head"
    assert q.blk[0].attn_q.bias is not None and m.blk[0].attn_q.bias is None
    assert abs(q.config.norm_eps - 1e-6) < 1e-12 and q.config.n_layer == 3
    assert isinstance(load(ROOT / "tiny-neox" / "tiny-neox-q4_0.gguf"), GPTNeoX)


def test_kv_cache_is_sized_by_kv_heads(models):
    m = models("tiny-llama", "q8_0")
    s = m.session(max_context=40)
    assert len(s.cache) == 2 and s.cache[0][0].shape == (2, 40, 64) and s.cache[0][0].dtype is tg.float16


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_decode_step_kernels_per_layer(models, name):
    """A captured decode step of plain LLaMA / Qwen2 code: each RMSNorm folded into the GEMVs
    that read it (fold_rms_norm_into_gemv), q/k/v (with Qwen2's biases) and gate/up stacked
    (stack_sibling_rms_gemvs), rope + both cache writes + grouped-query attention in one kernel
    (fuse_decode_attention_gqa), silu(gate) * up computed as the down projection loads its row
    (fold_glu_into_gemv); per layer qkv, attention, output, gate+up, down: 5 dispatches (was 16),
    plus input copy, embedding, head and argmax."""
    import numpy as np
    m = models(name, "q8_0")
    cache = m.new_cache(32)
    step = tg.capture(lambda tok, p: m.forward(tok, p, cache).argmax(-1))
    with tg.debug.kernel_log() as log:
        step(tg.tensor(np.array([5], np.int32)), 0).numpy()
    names = [e.name.split("[")[0] for e in log]
    L = m.config.n_layer
    assert names.count("attention_decode_gqa") == L, names
    assert names.count("gemv_rms3_q8_0") == L and names.count("gemv_rms2_q8_0") == L, names
    assert names.count("gemv_rms_q8_0") == 1, names               # the head
    assert names.count("gemv_q8_0") == L, names                  # output (+ residual)
    assert names.count("gemv_glu_q8_0") == L, names              # down (+ residual)
    assert len(names) == 5 * L + 4, names


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_prompt_kernels_per_layer(models, name):
    """A prompt forward (32 tokens, the last row's logits) of plain LLaMA / Qwen2 code: each
    RMSNorm one row kernel (schedule.RowCores), q, k and v one matmul (stack_sibling_matmuls,
    Qwen2's biases in its store), rope(q), rope(k) and both cache writes one rope_kv_write
    (fuse_rope_cache_write_gqa); per layer norm, qkv, rope_kv_write, attention (+ its
    combine), output, norm, gate, up, down (+ its split-K reduce): 10-11 dispatches (was 18).
    The final norm and the vocabulary projection run for the last row only, as one GEMV
    (rows_before_linear, fold_rms_norm_into_gemv)."""
    m = models(name, "q8_0")
    cache = m.new_cache(64)
    T = 32
    ids = tg.tensor((np.arange(T) * 7 % m.config.n_vocab).astype(np.int32))
    with tg.debug.kernel_log() as log:
        m.forward(ids, 0, cache)[T - 1:T].contiguous().numpy()
    names = [e.name.split("[")[0] for e in log]
    L = m.config.n_layer
    assert names[0].startswith("embedding") and names[-1] == "gemv_rms_q8_0", names
    layers = names[1:-1]
    assert layers.count("rope_kv_write") == L and layers.count("attention_tiled") == L, names
    assert sum(n.startswith("RE_") for n in layers) == 2 * L, names              # the two norms
    assert not any(n.startswith(("R_", "E_", "rope")) and n != "rope_kv_write" for n in layers), names
    mm = [n for n in layers if n.startswith("matmul") and not n.startswith("matmul_splitk_reduce")]
    assert sum(n.endswith("_x3") for n in mm) == L and len(mm) == 5 * L, names   # qkv o gate up down
    assert len(layers) <= 11 * L, names


# ----------------------------------------------------------------------------- quantized files vs NumPy


@pytest.mark.parametrize("name,qtype", QUANT)
def test_quant_logits_match_numpy(models, name, qtype):
    m, path = models(name, qtype), gguf(name, qtype)
    ids = refs(name)["p1_ids"]
    got = m.session(cache_dtype=tg.float32).forward(ids).numpy()
    assert got.shape == (len(ids), 4096)
    assert_logits_close(got, llama_ref.forward(path, ids), f"{name} {qtype}")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_token_by_token_and_uneven_chunks(models, name):
    """The KV cache path: one token at a time, then chunks of 3, 1 and the rest, all equal to
    the whole-prompt reference (f32 cache: the tolerance is the logits', not the f16 cache's)."""
    m, path = models(name, "q8_0"), gguf(name, "q8_0")
    ids = refs(name)["p3_ids"]
    want = llama_ref.forward(path, ids)
    s = m.session(cache_dtype=tg.float32)
    rows = [s.forward(ids[i:i + 1]).numpy() for i in range(4)]
    for a, b in ((4, 7), (7, 8), (8, len(ids))):
        rows.append(s.forward(ids[a:b]).numpy())
    assert_logits_close(np.concatenate(rows), want, f"{name} chunked")
    assert s.position == len(ids)
    # the default f16 cache stays close too (looser: K/V rounded to f16)
    got = m.session().forward(ids).numpy()
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("name,qtype", QUANT)
def test_greedy_matches_reference(models, name, qtype):
    m, path, r = models(name, qtype), gguf(name, qtype), refs(name)
    prompt, want = r["p0_ids"], r[f"p0_greedy_ids_{qtype}"]
    got = list(m.session().generate(prompt.tolist(), max_new_tokens=len(want), stop_on_eos=False))
    assert greedy_agrees(path, prompt, got, want) >= 4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_perplexity_matches_numpy(models, name):
    """Held-out text (never trained on): 2 windows of 96 tokens, every token after the first scored."""
    m, path = models(name, "q8_0"), gguf(name, "q8_0")
    ids = refs(name)["heldout20k_ids"][:192]
    r = perplexity(m, ids, ctx=96, cache_dtype=tg.float32)
    want = np.concatenate([llama_ref.nll(path, ids[w * 96:(w + 1) * 96]) for w in range(2)])
    np.testing.assert_allclose(r.nll.reshape(-1), want, atol=2e-3)
    assert abs(r.ppl - np.exp(want.mean())) <= 1e-4 * r.ppl
    assert 20 < r.ppl < 2000     # a trained model, not noise (uniform would be 4096)


def test_generate_text(models):
    """Text in, text out, through the tokenizer (BOS added as the file says)."""
    m = models("tiny-llama", "q8_0")
    toks = list(m.session().generate("In the beginning God created", max_new_tokens=6, stop_on_eos=False))
    assert len(toks) == 6 and m.tokenizer.decode(toks).strip()


# ----------------------------------------------------------------------------- f32 files vs transformers


def full_dir(name):
    env = f"TENSORGPU_{name.upper().replace('-', '_')}_FULL"
    value = os.environ.get(env)
    if not value or not Path(value).is_dir():
        pytest.skip(f"{env} not set (folder with {name}'s f32 GGUF and full reference.npz)")
    return Path(value)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_f32_matches_transformers(name):
    d = full_dir(name)
    m = load(d / f"{name}-f32.gguf")
    r = np.load(d / "reference.npz")
    for p in range(4):
        ids, want = r[f"p{p}_ids"], r[f"p{p}_logits"]
        assert_logits_close(m.session(cache_dtype=tg.float32).forward(ids).numpy(), want, f"{name} p{p} whole")
    ids, want = r["p2_ids"], r["p2_logits"]
    s = m.session(cache_dtype=tg.float32)
    got = [s.forward(ids[i:i + 1]).numpy() for i in range(3)] + [s.forward(ids[3:5]).numpy(),
                                                                  s.forward(ids[5:]).numpy()]
    assert_logits_close(np.concatenate(got), want, f"{name} p2 token by token, then chunks")
    for p in range(4):
        g = list(m.session().generate(r[f"p{p}_ids"].tolist(), max_new_tokens=32, stop_on_eos=False))
        greedy_agrees(None, None, g, r[f"p{p}_greedy_ids"], r[f"p{p}_greedy_margins"])


# ----------------------------------------------------------------------------- command line


def test_python_m_models_generate():
    """The README's command: `python -m models generate --model models/tiny-llama/...`."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "models", "generate", "--model", gguf("tiny-llama", "q8_0"),
                        "--prompt", "In the beginning God created", "-n", "8", "--no-warmup"],
                       capture_output=True, text=True, cwd=ROOT.parent, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("In the beginning God created ") and len(r.stdout) > 32
    assert "Llama(tiny-llama-q8_0.gguf: llama" in r.stderr and "decode:" in r.stderr


def test_cli_names_an_unsupported_architecture(tmp_path, capsys):
    from models.cli import main
    from models.tokenizer import read_gguf_metadata
    md = {k: v for k, v in read_gguf_metadata(gguf("tiny-qwen2", "q8_0")).items() if not k.startswith("qwen2.")}
    md["general.architecture"] = "mamba"
    tg.save_gguf(tmp_path / "m.gguf", {"token_embd.weight": np.zeros((4096, 8), np.float32)}, md)
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "'mamba' is not supported" in err and "gptneox, llama, qwen2" in err
