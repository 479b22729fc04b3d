"""The README's shell commands, checked without running them (.ci/readme_quickstart runs them
on a fresh clone): each is run by that check or skipped for a stated reason, every `tensorgpu`
line parses with the real tool's argument parser, and the files they name are in the repo."""
import importlib.util
import shlex

import pytest

from cli_util import ROOT

_spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
readme_commands = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_commands)

COMMANDS = readme_commands.commands(ROOT / "README.md")


def test_the_check_runs_every_command_but_the_stated_skips():
    script = readme_commands.script(ROOT / "README.md").splitlines()
    for c in COMMANDS:
        runs = c in script or f"{c} &" in script          # a server runs in the background
        assert runs != bool(readme_commands.skip_reason(c)), c
    skipped = [c for c in COMMANDS if readme_commands.skip_reason(c)]
    assert "make test" in skipped
    assert all(c == "make test" or "ray" in c for c in skipped), skipped   # nothing else is left out
    # a server command runs in the background until /health answers, and is stopped at the end
    for c in COMMANDS:
        if readme_commands.SERVER.search(c):
            i = script.index(f"{c} &")
            assert "curl -sf http://127.0.0.1:8000/health" in script[i + 3]
            assert script[-1].startswith('if [ -n "$server_pid" ]; then kill -TERM')
    # set-up first, then the command is put on PATH before it is used
    assert COMMANDS[0] == "make run"
    first_tool = next(i for i, c in enumerate(COMMANDS) if c.startswith("tensorgpu "))
    assert "source .venv/bin/activate" in COMMANDS[:first_tool]


def test_continued_lines_are_one_command():
    assert readme_commands.joined(["curl a \\", "  -d '{}'   # c", "next"]) == ["curl a -d '{}'", "next"]


def test_comments_are_cut_outside_quotes_only():
    cut = readme_commands.command_of
    assert cut('tensorgpu generate -p "a # b" -n 2   # note') == 'tensorgpu generate -p "a # b" -n 2'
    assert cut("echo 'x#y' #z") == "echo 'x#y'"
    assert cut('echo "q\\" #" # c') == 'echo "q\\" #"'
    assert cut("# only a comment") == ""


def _tool_lines():
    for c in COMMANDS:
        for part in c.split("|"):
            words = shlex.split(part)
            if words[:1] == ["tensorgpu"]:
                yield words[1:]
            elif words[:3] == ["python", "-m", "models"]:
                yield words[3:]


@pytest.mark.parametrize("argv", list(_tool_lines()), ids=lambda a: " ".join(a[:3]))
def test_tensorgpu_lines_parse_and_name_files_that_exist(argv):
    from models import cli
    if argv[0] in ("--help", "--version"):
        return
    tool = next(t for t in cli.available_tools() if t.name == argv[0])
    module = __import__(f"models{tool.module}", fromlist=["x"])
    if hasattr(module, "add_arguments"):
        parser = cli._parser_for(tool, module)
    else:                     # a module that owns its command line (models/quantize.py, serve/cli.py)
        parser = module._parser() if hasattr(module, "_parser") else module.parser()
    args = parser.parse_args(argv[1:])
    for key in ("model", "file", "hf_dir", "gguf", "tokenizer", "input"):
        path = getattr(args, key, None)
        if path and path != "-" and not str(path).startswith("build/"):
            assert (ROOT / path).exists(), path   # (an absolute path, the default model's, stays as it is)


def test_make_run_uses_the_installed_command():
    make = (ROOT / "Makefile").read_text()
    run = make.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "$(VENV)/bin/tensorgpu generate" in run
    assert "setup.py" in make.split("$(STAMP):", 1)[1].split("\n", 1)[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/readme_quickstart" in ci and (ROOT / ".ci" / "readme_quickstart").stat().st_mode & 0o111
