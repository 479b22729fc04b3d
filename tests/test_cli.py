"""The `tensorgpu` command and its generate tool, as a user runs them: real subprocesses for
what a user sees (output, exit status, the timing line), in-process calls of models.cli.main for
the long matrix of argument errors (each must be one `error:` line, exit 2, before any load)."""
import re
import subprocess
import sys

import numpy as np
import pytest

from cli_util import ROOT, one_error_line, tensorgpu
from models import cli
from models.tools.generate import timing_line

TINY = ROOT / "models" / "tiny-neox"
QWEN = ROOT / "models" / "tiny-qwen2" / "tiny-qwen2-q8_0.gguf"
SEQ = TINY / "tiny-neox-seq-f32.gguf"


@pytest.fixture(scope="module")
def tok():
    from models.tokenizer import Tokenizer, read_gguf_metadata
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(TINY / "tiny-neox-q8_0.gguf"))


@pytest.fixture(scope="module")
def ref():
    return np.load(TINY / "reference.npz")


# ----------------------------------------------------------------------------- the command


def test_help_lists_the_tools_and_version():
    p = tensorgpu("--help")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith("usage: tensorgpu TOOL [options]")
    tools = re.findall(r"^  ([a-z-]+) {3,}(\S.*?)(?:\(like (\S+)\))?$", p.stdout, re.M)
    listed = {name: like for name, _, like in tools}
    assert {"generate": "llama-cli", "perplexity": "llama-perplexity", "bench": "llama-bench",
            "convert": "convert_hf_to_gguf.py", "export-hf": ""}.items() <= listed.items()
    # a tool is listed exactly when its module is there (serve and quantize come with their modules)
    assert listed["quantize"] == "llama-quantize"
    # a tool is listed exactly when its module is there (serve comes with models/serve/cli.py)
    assert ("serve" in listed) == (ROOT / "models" / "serve" / "cli.py").is_file()
    v = tensorgpu("--version")
    assert v.returncode == 0 and re.match(r"tensorgpu \d+\.\d+\.\d+\S* \(wgpu \d", v.stdout)


def test_no_tool_and_unknown_tool_are_usage_errors():
    p = tensorgpu()
    assert p.returncode == 2 and "error: name a tool: generate, perplexity, bench" in p.stderr
    p = tensorgpu("gen", "-p", "x")
    assert p.returncode == 2 and "unknown tool 'gen' (did you mean generate?)" in p.stderr


@pytest.mark.parametrize("tool,flags", [
    ("generate", ["--model", "--prompt", "--file", "--max-tokens", "--temperature", "--top-k", "--top-p",
                  "--seed", "--stop", "--keep", "--no-context-shift", "--chat"]),
    ("perplexity", ["--file", "--ctx", "--chunks", "--llamacpp"]),
    ("bench", ["--n-prompt", "--n-gen", "--repetitions", "--output"]),
    ("convert", ["HF_DIR", "OUT.gguf", "--type", "bf16", "default f16"]),
    ("export-hf", ["MODEL.gguf", "OUT_DIR", "--tokenizer"]),
    ("quantize", ["IN.gguf", "OUT.gguf", "TYPE", "Q4_K_M", "Q5_K_M", "--pure"]),
])
def test_tool_help(capsys, tool, flags):
    try:
        code = cli.main([tool, "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m models {tool}")
    for flag in flags:
        assert flag in out, flag


def test_python_m_models_gpt_neox_still_works():
    """The older spelling of the command, as a real process."""
    p = subprocess.run([sys.executable, "-m", "models.gpt_neox", "generate", "--prompt", "In the beginning God created",
                        "--max-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("In the beginning God created") and "decode: 3 tokens" in p.stderr


# ----------------------------------------------------------------------------- generate


def test_generate_streams_greedy_text_and_times_it(tok, ref):
    prompt = tok.decode(ref["p1_ids"])
    p = tensorgpu("generate", "-p", prompt, "-n", "16", "--ignore-eos")
    assert p.returncode == 0, p.stderr
    assert p.stdout == prompt + tok.decode(ref["p1_greedy_ids_q8_0"][:16]) + "\n"
    line = p.stderr.splitlines()[-1]
    m = re.fullmatch(r"prefill: (\d+) tokens in ([\d.]+) s = ([\d.]+) tokens/s; "
                     r"decode: 15 tokens in ([\d.]+) s = ([\d.]+) tokens/s", line)
    assert m, line
    assert int(m[1]) == len(ref["p1_ids"])
    assert abs(15 / float(m[4]) - float(m[5])) <= 0.01 * float(m[5]) + 0.1


def test_generate_prompt_from_stdin_and_file_and_stop(tmp_path, capsys, tok, ref):
    prompt = tok.decode(ref["p0_ids"])
    full = tok.decode(ref["p0_greedy_ids_q8_0"][:32])
    assert full.count("earth") > 1
    p = tensorgpu("generate", "-f", "-", "-n", "32", "--ignore-eos", "--stop", "shall", "--stop", "earth",
                  "--no-prompt", input=prompt)
    assert p.returncode == 0, p.stderr
    # the text up to the first stop string, the token that completes it included
    cut = min(full.index("earth") + len("earth"), full.index("shall") + len("shall") if "shall" in full else 10**9)
    assert p.stdout.rstrip("\n").startswith(full[:cut]) and len(p.stdout.rstrip("\n")) < len(full)
    f = tmp_path / "prompt.txt"
    f.write_text(prompt, encoding="utf-8")
    assert cli.main(["generate", "--file", str(f), "-n", "4", "--ignore-eos", "--no-warmup"]) == 0
    assert capsys.readouterr().out.startswith(prompt + full[:8])


def test_generate_short_runs_have_honest_timing_lines(capsys):
    """-n 1: no decode step, no nan; -n 2: '1 token'; -n 0: nothing generated."""
    for n, want in ((1, "decode: 0 tokens"), (2, "decode: 1 token in"), (0, "no tokens generated")):
        assert cli.main(["generate", "-m", str(SEQ), "-p", "In the beginning", "-n", str(n), "--no-warmup"]) == 0
        err = capsys.readouterr().err
        assert want in err and "nan" not in err and not re.search(r"(?<![\d.])1 tokens", err), err


def test_keep_counts_after_the_bos_and_minus_one_is_the_prompt():
    import argparse
    from types import SimpleNamespace

    from models.tools.common import UsageError
    from models.tools.generate import keep_tokens
    bos = SimpleNamespace(bos_id=1)
    a = argparse.Namespace(keep=0, no_context_shift=False)
    assert keep_tokens(a, bos, [1, 5, 6, 7], 16) == 1          # the BOS always stays
    assert keep_tokens(a, bos, [5, 6, 7], 16) == 0
    a.keep = 2
    assert keep_tokens(a, bos, [1, 5, 6, 7], 16) == 3 and keep_tokens(a, bos, [5], 16) == 1
    a.keep = -1
    assert keep_tokens(a, bos, [1, 5, 6, 7], 16) == 4
    with pytest.raises(UsageError, match="leaves nothing for a context shift"):
        keep_tokens(a, bos, list(range(15)), 16)
    a.no_context_shift = True
    assert keep_tokens(a, bos, list(range(15)), 16) == 15


def test_timing_line():
    st = dict(prefill_tokens=1, prefill_s=0.5, decode_tokens=1, decode_s=0.25, stop="length", context_shifts=0)
    assert timing_line(st, 512) == ("prefill: 1 token in 0.500 s = 2.0 tokens/s; "
                                    "decode: 1 token in 0.250 s = 4.0 tokens/s")
    st.update(decode_tokens=0, decode_s=0.0)
    assert timing_line(st, 512) == "prefill: 1 token in 0.500 s = 2.0 tokens/s; decode: 0 tokens"
    st.update(decode_tokens=7, decode_s=0.7, stop="context", context_shifts=0)
    assert timing_line(st, 16).endswith("decode: 7 tokens in 0.700 s = 10.0 tokens/s "
                                        "(stopped: the context of 16 tokens is full)")
    st.update(stop="length", context_shifts=2)
    assert timing_line(st, 16).endswith("= 10.0 tokens/s; 2 context shifts")


def test_generate_decode_rate_of_a_short_run_is_not_inflated():
    """The timer covers every decode step: -n 3 reports about the rate -n 24 does (before, the
    two steps queued during the prefill were not timed and -n 3 read ~15x too fast)."""
    rates = {}
    for n in (3, 24):
        p = tensorgpu("generate", "-m", SEQ, "-p", "In the beginning", "-n", n, "--ignore-eos")
        assert p.returncode == 0, p.stderr
        rates[n] = float(re.search(r"decode: \d+ tokens? in [\d.]+ s = ([\d.]+) tokens/s", p.stderr)[1])
    assert rates[3] < 4 * rates[24], rates


def test_generate_context_shift_and_its_absence(capsys):
    argv = ["generate", "-m", str(SEQ), "-p", "In the beginning God created", "-c", "16", "-n", "30",
            "--ignore-eos", "--no-warmup", "--no-prompt", "--keep", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "context shift" in err and "decode: 29 tokens" in err and "stopped" not in err
    assert cli.main(argv + ["--no-context-shift"]) == 0
    out2, err2 = capsys.readouterr()
    assert "(stopped: the context of 16 tokens is full)" in err2 and out.startswith(out2.rstrip("\n"))


def test_generate_seed_minus_one_is_random_and_printed(capsys):
    argv = ["generate", "-m", str(SEQ), "-p", "The", "-n", "8", "-t", "1.5", "--no-warmup", "--no-prompt",
            "--ignore-eos"]
    outs = []
    for _ in range(2):
        assert cli.main(argv + ["--seed", "-1"]) == 0
        out, err = capsys.readouterr()
        outs.append((out, int(re.search(r"^seed: (\d+)$", err, re.M)[1])))
    assert outs[0][1] != outs[1][1]
    assert cli.main(argv + ["--seed", str(outs[0][1])]) == 0   # the printed seed repeats the run
    out, err = capsys.readouterr()
    assert out == outs[0][0] and "seed:" not in err


def test_chat_uses_the_template_and_keeps_the_conversation():
    """Two turns through the ChatML template of tiny-qwen2: each reply is what a session fed the
    rendered conversation generates (greedy), and the second turn only runs its new tokens."""
    p = tensorgpu("generate", "-m", QWEN, "--chat", "-n", "6", "--no-warmup", "-p", "Be brief.",
                  input="Hello there\nWhat is the word?\n")
    assert p.returncode == 0, p.stderr
    from models import load
    m = load(QWEN)
    tok = m.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}]
    end = tok.token_to_id("<|im_end|>")
    prompt_lengths, replies = [], []
    for user in ["Hello there", "What is the word?"]:
        msgs.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = list(m.session().generate(ids, max_new_tokens=6, stop=[end]))
        replies.append(tok.decode(want, skip_special=True) + "\n")
        msgs.append({"role": "assistant", "content": tok.decode(want[:-1] if want[-1] in (end, tok.eos_id) else want,
                                                                skip_special=True)})
        prompt_lengths.append(len(ids))
    assert p.stdout == "".join(replies)
    # the second turn ran only what the cache did not hold yet
    prefilled = int(re.search(r"2 turns; prefill: (\d+) tokens", p.stderr)[1])
    assert prompt_lengths[0] < prefilled < sum(prompt_lengths)


# ----------------------------------------------------------------------------- argument errors


def test_generate_argument_errors_come_before_the_load(tmp_path):
    """The real command: a bad value is one line, exit 2, and the model is never loaded."""
    p = tensorgpu("generate", "-t", "-1", "-p", "x")
    assert "temperature" in one_error_line(p) and "loaded" not in p.stderr
    p = tensorgpu("generate", "-m", QWEN, "-p", "x", "--max-context", "100000")
    assert "exceeds the model's context length 512" in one_error_line(p)


@pytest.mark.parametrize("args,msg", [
    (["-p", "x", "-t", "-1"], "temperature/--temp: must be >= 0, got -1"),
    (["-p", "x", "-t", "nan"], "is not a finite number"),
    (["-p", "x", "--top-p", "2"], "--top-p: must be in (0, 1], got 2"),
    (["-p", "x", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["-p", "x", "--top-k", "-3"], "--top-k: must be >= 0 (0: off), got -3"),
    (["-p", "x", "--repetition-penalty", "0"], "must be > 0"),
    (["-p", "x", "-n", "-2"], "--max-tokens/--n-predict: must be >= -1"),
    (["-p", "x", "-n", "ten"], "'ten' is not an integer"),
    (["-p", "x", "--seed", "-2"], "--seed: must be >= -1 (-1: random)"),
    (["-p", "x", "-c", "0"], "--max-context/--ctx-size: must be >= 1"),
    (["-p", "x", "-c", "1000"], "--max-context 1000 exceeds the model's context length 512"),
    (["-p", "x", "-c", "16", "--keep", "15"], "--keep 15 leaves nothing for a context shift to drop"),
    (["-p", "x", "-p", "y", "-f", "z"], "not allowed with argument"),
    ([], "give a prompt: -p TEXT, -f FILE or -f - (standard input), or --chat"),
    (["-p", ""], "the prompt is empty"),
    (["-f", "{tmp}/none.txt"], "cannot read {tmp}/none.txt: No such file or directory"),
    (["-f", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["-m", "{tmp}/none.gguf", "-p", "x"], "{tmp}/none.gguf: no such file"),
    (["-m", "{tmp}", "-p", "x"], "is a directory"),
    (["-m", "{tmp}/latin1.txt", "-p", "x"], "is not a GGUF file"),
    (["--chat"], "has no chat template (tokenizer.chat_template); --chat needs one"),
    (["-m", str(QWEN), "--chat", "-f", "-"], "--chat reads the conversation from standard input"),
])
def test_generate_argument_errors(capsys, tmp_path, args, msg):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        rc = cli.main(["generate", *args])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert msg.replace("{tmp}", str(tmp_path)) in lines[0] and "loaded" not in err


def test_generate_errors_after_the_load(capsys):
    """What only the tokenizer can tell: a prompt longer than the context."""
    assert cli.main(["generate", "-m", str(SEQ), "-p", "word " * 40, "--max-context", "16", "--no-warmup"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and "do not fit" in err[-1]


def test_chat_ctrl_c_ends_the_reply_and_the_conversation_goes_on(monkeypatch, capsys):
    """Ctrl-C while a reply streams ends that reply ([interrupted]) and the next message is
    answered; end of input then exits 0, as llama-cli's interactive mode does."""
    import io
    from models.session import Session
    real = Session.generate
    calls = []

    def generate(self, *args, **kw):
        calls.append(1)
        gen = real(self, *args, **kw)
        if len(calls) > 1:
            return gen

        def interrupted():                 # the first reply: Ctrl-C after two tokens
            for i, t in enumerate(gen):
                if i == 2:
                    raise KeyboardInterrupt
                yield t
        return interrupted()

    monkeypatch.setattr(Session, "generate", generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a story\nAgain\n"))
    assert cli.main(["generate", "-m", str(QWEN), "--chat", "-n", "4", "--no-warmup"]) == 0
    out, err = capsys.readouterr()
    assert len(calls) == 2
    first, second = out.split("\n")[:2]
    assert first.endswith(" [interrupted]") and "2 turns" in err, (out, err)
