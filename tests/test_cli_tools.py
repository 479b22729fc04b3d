"""`tensorgpu perplexity`, `convert`, `export-hf` and `bench`, as a user runs them (subprocesses
for the outputs; in-process models.cli.main for the error matrices: one `error:` line, exit 2)."""
import json
import re

import numpy as np
import pytest

from cli_util import ROOT, one_error_line, tensorgpu
from models import cli

TINY = ROOT / "models" / "tiny-neox"
SEQ = TINY / "tiny-neox-seq-f32.gguf"


def _main(capsys, argv):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error(rc, err) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0]


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_prints_running_values_and_ppl_with_its_uncertainty():
    p = tensorgpu("perplexity", "-f", TINY / "heldout.txt", "--ctx", "64", "--chunks", "3", "--llamacpp", "-m", SEQ)
    assert p.returncode == 0, p.stderr
    running, final = p.stdout.splitlines()
    vals = [float(v) for v in re.fullmatch(r"\[1\]([\d.]+),\[2\]([\d.]+),\[3\]([\d.]+)", running).groups()]
    m = re.fullmatch(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", final)
    assert m and float(m[1]) == vals[-1]
    assert "3 windows of 64" in p.stderr and "perplexity: 100%" in p.stderr   # the tqdm bar
    # the same numbers from the scores themselves: positions 33..63 of each window (llama-perplexity's)
    from models import load
    from models.session import perplexity
    model = load(SEQ)
    ids = model.tokenizer.encode((TINY / "heldout.txt").read_text(encoding="utf-8"))
    nll = perplexity(model, ids, 64, max_windows=3).nll[:, 32:]
    want = [np.exp(nll[:k + 1].mean()) for k in range(3)]
    np.testing.assert_allclose(vals, want, rtol=2e-4)
    x = nll.ravel()
    assert float(m[2]) == pytest.approx(np.exp(x.mean()) * x.std() / np.sqrt(x.size - 1), rel=1e-3)
    assert 1000 < float(m[1]) < 1e5    # an untrained model: about the vocabulary's 4096


@pytest.mark.parametrize("args,msg", [
    (["--chunks", "0"], "--chunks must be a number of windows >= 1, or -1 for all of them; got 0"),
    (["--chunks", "-5"], "got -5"),
    (["--ctx", "2", "--llamacpp"], "--llamacpp scores positions ctx/2+1 .. ctx-1 of each window, none when --ctx is 2"),
    (["--ctx", "1"], "--ctx: must be >= 2, got 1"),
    (["--ctx", "4096"], "--ctx 4096 exceeds the model's context length 512"),
])
def test_perplexity_argument_errors(capsys, args, msg):
    rc, _, err = _main(capsys, ["perplexity", "-f", str(TINY / "heldout.txt"), *args])
    assert msg in _one_error(rc, err) and "loaded" not in err


def test_perplexity_file_errors(capsys, tmp_path):
    rc, _, err = _main(capsys, ["perplexity", "-f", str(tmp_path / "none.txt")])
    assert "cannot read" in _one_error(rc, err)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    rc, _, err = _main(capsys, ["perplexity", "-m", str(SEQ), "-f", str(short), "--no-progress"])
    assert rc == 2 and err.strip().splitlines()[-1] == \
        f"error: {short} has 5 tokens, fewer than one window of --ctx 256"


def test_perplexity_chunks_minus_one_scores_every_window(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((TINY / "heldout.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    rc, out, err = _main(capsys, ["perplexity", "-m", str(SEQ), "-f", str(text), "--ctx", "128", "--chunks", "-1",
                                  "--no-progress"])
    n_tok = int(re.search(r"perplexity: (\d+) tokens", err)[1])
    assert rc == 0 and out.splitlines()[0].count("[") == n_tok // 128 >= 2


# ----------------------------------------------------------------------------- convert / export-hf


def test_export_hf_then_convert_reproduces_the_gguf(tmp_path):
    """The README's convert example: export an HF checkpoint from a bundled GGUF, convert it back
    (--type in capitals: case-insensitive); an f32 file comes back byte for byte."""
    p = tensorgpu("export-hf", SEQ, tmp_path / "hf")
    assert p.returncode == 0 and "wrote" in p.stdout, p.stderr
    out = tmp_path / "out.gguf"
    p = tensorgpu("convert", tmp_path / "hf", out, "--type", "F32", "--quiet")
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(rf"wrote {re.escape(str(out))} \([\d,]+ bytes, f32\)\n", p.stdout)
    assert out.read_bytes() == SEQ.read_bytes()
    p = tensorgpu("convert", tmp_path / "hf", tmp_path / "none" / "x.gguf")
    assert one_error_line(p) == f"error: cannot write {tmp_path / 'none' / 'x.gguf'}: the folder " \
                                f"{tmp_path / 'none'} does not exist"


def test_convert_bf16(capsys, tmp_path):
    """bf16: the weight matrices are f32 rounded to bfloat16 (nearest even), the rest stays f32."""
    import gguf

    from models.convert import export_hf
    hf = export_hf(SEQ, tmp_path / "hf")
    rc, out, _ = _main(capsys, ["convert", str(hf), str(tmp_path / "b.gguf"), "--type", "BF16", "--quiet"])
    assert rc == 0
    src = {t.name: t for t in gguf.GGUFReader(SEQ).tensors}
    n_bf16 = 0
    for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors:
        want = np.asarray(src[t.name].data, np.float32)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            n_bf16 += 1
            bits = want.view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            assert np.array_equal(np.asarray(t.data).view(np.uint16).reshape(rounded.shape), rounded), t.name
        else:
            assert len(t.shape) == 1 and np.array_equal(np.asarray(t.data), want), t.name
    assert n_bf16 == 2 + 4 * 2     # token_embd, output and four matrices per layer, two layers
    assert gguf.GGUFReader(tmp_path / "b.gguf").fields["general.file_type"].contents() == 32


def test_convert_errors(capsys, tmp_path):
    """Every failure is one line and exit 2, never a traceback."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((TINY / "hf" / f).read_bytes())
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    out = str(tmp_path / "o.gguf")
    cases = [
        ([str(tmp_path / "nope"), out], f"error: {tmp_path / 'nope'}: no such folder"),
        ([str(TINY / "hf"), out], "no weights in"),
        ([str(llama), out], "config.json: missing required key 'num_attention_heads'"),
        ([str(TINY / "heldout.txt"), out], "is not a folder"),
        ([str(TINY / "hf"), str(tmp_path)], "is a folder; give the GGUF file to write"),
        ([str(TINY / "hf"), out, "--type", "q9"], "--type/--outtype: 'q9' is not one of f32, f16, bf16"),
    ]
    for args, msg in cases:
        rc, _, err = _main(capsys, ["convert", *args])
        assert msg in _one_error(rc, err), (args, err)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    rc, _, err = _main(capsys, ["convert", str(bad), out])
    assert "model.safetensors: corrupt safetensors header" in _one_error(rc, err)
    (bad / "model.safetensors").write_bytes(b"garbage")
    rc, _, err = _main(capsys, ["convert", str(bad), out])
    assert "model.safetensors: " in _one_error(rc, err)
    (bad / "config.json").write_text("{bad")
    rc, _, err = _main(capsys, ["convert", str(bad), out])
    assert "config.json: not valid JSON" in _one_error(rc, err)
    assert not list(tmp_path.glob("*.gguf*")), "a failed convert left a file behind"
    # the bundled hf/ folder has no weights: the message says how to write them
    rc, _, err = _main(capsys, ["convert", str(TINY / "hf"), out])
    assert "tensorgpu export-hf MODEL.gguf DIR" in _one_error(rc, err)


def test_export_hf_errors(capsys, tmp_path):
    rc, _, err = _main(capsys, ["export-hf", str(ROOT / "models" / "tiny-llama" / "tiny-llama-q8_0.gguf"),
                                str(tmp_path / "x")])
    assert "writes GPT-NeoX checkpoints (general.architecture gptneox) only" in _one_error(rc, err)
    rc, _, err = _main(capsys, ["export-hf", str(tmp_path / "none.gguf"), str(tmp_path / "x")])
    assert "none.gguf: no such file" in _one_error(rc, err)


# ----------------------------------------------------------------------------- bench


def test_bench_json_and_table():
    p = tensorgpu("bench", "-m", SEQ, "-p", "16", "-n", "4", "-r", "2", "-o", "json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    for r in rows:
        assert r["model_type"] == "gptneox 1.4M all F32" and r["model_n_params"] == 1_445_376
        assert r["model_size"] == 1_445_376 * 4 and len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        n = r["n_prompt"] or r["n_gen"]
        assert r["avg_ts"] == pytest.approx(np.mean([n / (ns * 1e-9) for ns in r["samples_ns"]]))
        assert r["stddev_ts"] == pytest.approx(np.std(r["samples_ts"], ddof=1))
    from models.tools.bench import Result, table
    res = [Result(**{k: rows[0][k] for k in ("model_filename", "model_type", "model_size", "model_n_params",
                                            "backend", "gpu_info", "test", "n_prompt", "n_gen", "samples_ns")})]
    t = table(res).splitlines()
    assert re.fullmatch(r"\| model +\| +size \| +params \| backend +\| +test \| +t/s \|", t[0])
    assert re.fullmatch(r"\| -+ \| -+: \| -+: \| -+ \| -+: \| -+: \|", t[1])
    assert re.fullmatch(r"\| gptneox 1\.4M all F32 +\| +5\.51 MiB \| +1\.45 M \| \S.* \| +pp16 \| +[\d.]+ ± [\d.]+ \|",
                        t[2])
    assert len({len(x) for x in t}) == 1


@pytest.mark.parametrize("args,msg", [
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-p", "600"], "-p 600 exceeds the model's context length 512"),
    (["-n", "512"], "-n 512 does not fit the model's context length 512"),
    (["-p", "12,x"], "'12,x': 'x' is not an integer"),
    (["-p", "-4"], "must be >= 0"),
    (["-r", "0"], "--repetitions: must be >= 1"),
    (["-o", "csv"], "'csv' is not md or json"),
])
def test_bench_argument_errors(capsys, args, msg):
    rc, _, err = _main(capsys, ["bench", "-m", str(SEQ), *args])
    assert msg in _one_error(rc, err)
    rc, _, err = _main(capsys, ["bench"])
    assert "the following arguments are required: -m/--model" in _one_error(rc, err)
