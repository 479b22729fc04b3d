"""`python -m models.gpt_neox {generate,perplexity,convert}`: help everywhere, streaming output,
speed line, progress bar, clean errors. Mostly in-process (models.cli.main) to stay fast; one
real subprocess checks the entry point `make run` uses."""
import os
import subprocess
import sys

import numpy as np
import pytest

from models import cli


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["perplexity", "--help"], ["convert", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if argv[0] == "generate":
        for flag in ("--model", "--prompt", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed"):
            assert flag in out
    if argv[0] == "perplexity":
        assert "--file" in out and "--ctx" in out
    if argv[0] == "convert":
        assert "--type" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_generate_streams_greedy_text(capsys, tiny_neox_dir):
    ref = np.load(tiny_neox_dir / "reference.npz")
    from models.tokenizer import Tokenizer, read_gguf_metadata
    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(tiny_neox_dir / "tiny-neox-q8_0.gguf"))
    prompt = tok.decode(ref["p1_ids"])
    rc, out, err = _run(capsys, ["generate", "--prompt", prompt, "--max-tokens", "16", "--ignore-eos"])
    assert rc == 0
    assert out == prompt + tok.decode(ref["p1_greedy_ids_q8_0"][:16]) + "\n"
    assert "prefill:" in err and "decode: 15 tokens" in err and "tokens/s" in err


def test_generate_sampling_flags(capsys):
    argv = ["generate", "-p", "The", "-n", "8", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9",
            "--seed", "3", "--no-prompt", "--no-warmup", "--ignore-eos"]
    rc, a, _ = _run(capsys, argv)
    rc2, b, _ = _run(capsys, argv)
    assert rc == rc2 == 0 and a == b and a.strip()


def test_generate_errors(capsys, tmp_path):
    rc, out, err = _run(capsys, ["generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x"])
    assert rc == 2 and err.startswith("error:") and "nope.gguf" in err
    rc, out, err = _run(capsys, ["generate", "--prompt", "word " * 40, "--max-context", "16"])
    assert rc == 2 and "do not fit" in err
    rc, out, err = _run(capsys, ["generate", "--prompt", "x", "--top-p", "2"])
    assert rc == 2 and "top_p" in err


def test_perplexity(capsys, tiny_neox_dir):
    rc, out, err = _run(capsys, ["perplexity", "--file", str(tiny_neox_dir / "heldout.txt"), "--ctx", "64",
                                 "--max-windows", "3"])
    assert rc == 0
    line = [ln for ln in out.splitlines() if ln.startswith("perplexity:")][0]
    ppl = float(line.split()[1])
    assert 10 < ppl < 200 and "189 tokens scored in 3 windows of 64" in line
    assert "perplexity: 100%" in err or "3/3" in err  # the tqdm bar


def test_perplexity_errors(capsys, tmp_path):
    rc, _, err = _run(capsys, ["perplexity", "--file", str(tmp_path / "none.txt")])
    assert rc == 2 and "cannot read" in err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    rc, _, err = _run(capsys, ["perplexity", "--file", str(short)])
    assert rc == 2 and "fewer than one window" in err


def test_convert(capsys, tmp_path, tiny_neox_dir):
    from models.convert import export_hf
    hf = export_hf(tiny_neox_dir / "tiny-neox-seq-f32.gguf", tmp_path / "tiny-neox-seq")
    out = tmp_path / "out.gguf"
    rc, stdout, _ = _run(capsys, ["convert", str(hf), str(out), "--type", "f32", "--quiet"])
    assert rc == 0 and out.exists() and "wrote" in stdout
    assert out.read_bytes() == (tiny_neox_dir / "tiny-neox-seq-f32.gguf").read_bytes()


def test_module_entry_point(repo_root):
    """What `make run` does, as a real process."""
    env = dict(os.environ, PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "models.gpt_neox", "generate", "--prompt", "In the beginning God created",
                        "--max-tokens", "8"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("In the beginning God created") and len(p.stdout) > 40
    assert "decode:" in p.stderr and "tokens/s" in p.stderr
