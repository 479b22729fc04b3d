"""`python -m models serve`: help, argument checks (exit 2 with one line naming the argument)."""
import pytest

from models import cli


def test_serve_is_listed_and_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--model", "--host", "--port", "--max-batch", "--ctx", "--max-waiting", "--model-name", "--ray",
                 "--replicas", "--num-gpus", "--shutdown-timeout", "--exact-batching", "--gil-switch-ms",
                 "--engine"):
        assert flag in out, flag


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/nonexistent.gguf"], "--model /nonexistent.gguf: no such file"),
    (["--max-batch", "0"], "--max-batch must be in [1, 1024], got 0"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--ctx", "1"], "--ctx must be >= 2, got 1"),
    (["--max-waiting", "-1"], "--max-waiting must be >= 0, got -1"),
    (["--replicas", "0", "--ray"], "--replicas must be >= 1, got 0"),
    (["--num-gpus", "-1", "--ray"], "--num-gpus must be >= 0, got -1"),
    (["--shutdown-timeout", "-2"], "--shutdown-timeout must be >= 0"),
    (["--gil-switch-ms", "0"], "--gil-switch-ms must be in [0.01, 100], got 0.0"),
    (["--engine", "process", "--ray"], "--engine process and --ray do not combine"),
])
def test_bad_arguments_exit_2_naming_them(capsys, argv, needle):
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ")


def test_model_name_defaults_to_the_file_name():
    from models.serve.cli import model_name_of, parser
    assert model_name_of(parser().parse_args(["--model", "/x/pythia-1.4b-q4_0.gguf"])) == "pythia-1.4b-q4_0"
    assert model_name_of(parser().parse_args(["--model", "a.gguf", "--model-name", "m"])) == "m"


def test_exact_batching_reaches_the_engine():
    from models.gpt_neox import DEFAULT_MODEL
    from models.serve.cli import engine_factory, parser
    assert parser().parse_args(["--model", "m.gguf", "--exact-batching"]).exact_batching
    assert not parser().parse_args(["--model", "m.gguf"]).exact_batching
    assert engine_factory(str(DEFAULT_MODEL), 2, 32, 4, True)().exact_batching
    assert not engine_factory(str(DEFAULT_MODEL), 2, 32, 4)().exact_batching


def test_gil_switch_interval_is_set_before_serving(monkeypatch):
    """--gil-switch-ms sets Python's thread switch interval for the server process (the engine
    thread waits for the GIL after each wgpu call while the HTTP thread runs)."""
    import sys

    from models.serve import app as app_mod, cli as serve_cli
    seen = {}
    monkeypatch.setattr(app_mod, "build_app", lambda factory, name: object())
    monkeypatch.setattr(serve_cli, "serve_uvicorn", lambda *a, **k: seen.setdefault("interval", sys.getswitchinterval()))
    old = sys.getswitchinterval()
    try:
        assert serve_cli.main(["--gil-switch-ms", "0.5"]) == 0
    finally:
        sys.setswitchinterval(old)
    assert abs(seen["interval"] - 0.0005) < 1e-9
