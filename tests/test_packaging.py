"""Packaging, README and vendored-data checks (no GPU needed)."""
import configparser
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

VENDORED = [
    "tiny-neox-q8_0.gguf",
    "tiny-neox-q4_0.gguf",
    "tiny-neox-seq-f32.gguf",
    "reference.npz",
    "reference-seq.npz",
    "reference.json",
    "heldout.txt",
    "README.md",
    "hf/tokenizer.json",
    "hf/config.json",
    "hf/tokenizer_config.json",
]
NOT_VENDORED = ["tiny-neox-f32.gguf", "tiny-neox-f16.gguf", "hf/model.safetensors"]
MAX_VENDORED_BYTES = 20 * 1000 * 1000


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    assert cfg.read(ROOT / "setup.cfg"), "setup.cfg missing"
    return cfg


def _lines(value: str) -> list[str]:
    return [x.strip() for x in value.strip().splitlines() if x.strip()]


# --- setup.cfg ------------------------------------------------------------------

def test_wgsl_and_the_default_model_are_package_data():
    cfg = _setup_cfg()
    assert "*.wgsl" in cfg.get("options.package_data", "tensorgpu.kernels").split()
    data = cfg.get("options.package_data", "tensorgpu_models").split()
    assert data == ["tiny-neox/tiny-neox-q8_0.gguf"] and (ROOT / "models" / data[0]).is_file()
    from models.tools.common import DEFAULT_MODEL
    assert DEFAULT_MODEL == ROOT / "models" / data[0]   # found beside the package, installed or not


def test_console_script():
    cfg = _setup_cfg()
    scripts = _lines(cfg.get("options.entry_points", "console_scripts"))
    assert scripts == ["tensorgpu = tensorgpu_models.cli:main"]


def test_kernels_dir_is_a_package_if_it_has_wgsl():
    # find: only sees folders with __init__.py; without it the .wgsl files are not shipped.
    kernels = ROOT / "tensorgpu" / "kernels"
    if not list(kernels.glob("*.wgsl")):
        pytest.skip("no .wgsl kernels yet")
    assert (ROOT / "tensorgpu" / "__init__.py").is_file()
    assert (kernels / "__init__.py").is_file(), (
        "tensorgpu/kernels/__init__.py is missing: the .wgsl package data would not be installed"
    )


def test_install_requires_and_extras():
    cfg = _setup_cfg()
    reqs = _lines(cfg.get("options", "install_requires"))
    names = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in reqs}
    assert {"wgpu", "numpy", "gguf", "tokenizers", "tqdm", "safetensors", "jinja2"} <= names
    assert "wgpu==0.32.0" in reqs
    assert cfg.get("options", "python_requires").strip() == ">=3.10"
    test_extra = set(_lines(cfg.get("options.extras_require", "test")))
    assert {"pytest", "hypothesis", "pytest-benchmark"} <= test_extra
    assert "slow" in cfg.get("tool:pytest", "markers")


def _setup_py_arguments() -> dict:
    """What setup.py hands to setuptools.setup() (run with setup() recorded, not executed)."""
    import runpy
    import setuptools
    got = {}
    old_setup, old_cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kw: got.update(kw)
    os.chdir(ROOT)          # find_packages looks in the cwd
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = old_setup
        os.chdir(old_cwd)
    return got


def test_models_installs_as_tensorgpu_models():
    """models/ is the package `tensorgpu_models` once installed (no top-level `models` to collide
    with other projects'), every sub-package of it included; tensorgpu keeps its name."""
    kw = _setup_py_arguments()
    packages, package_dir = set(kw["packages"]), kw["package_dir"]
    assert package_dir == {"tensorgpu_models": "models"}
    assert not any(p == "models" or p.startswith("models.") for p in packages)
    models = ROOT / "models"
    want = {"tensorgpu_models"} | {"tensorgpu_models." + ".".join(d.relative_to(models).parts)
                                   for d in models.rglob("*") if d.is_dir() and (d / "__init__.py").is_file()}
    assert want <= packages and "tensorgpu_models.tools" in packages
    assert {"tensorgpu", "tensorgpu.kernels"} <= packages
    assert not any(p.startswith(("tests", "benchmarks")) for p in packages)
    assert "packages" not in _setup_cfg()["options"]   # one place says what is installed: setup.py


def test_models_imports_itself_relatively():
    """`from models.x import` inside models/ would break the installed tensorgpu_models."""
    import ast
    offenders = []
    for path in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "models" or n.startswith("models.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"absolute imports of `models` in {offenders}: use relative imports"
    from models.registry import MODELS
    assert all(spec.startswith(".") for spec in MODELS.values())


# --- README / make / CI --------------------------------------------------------

def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    before, fence, rest = text.partition("```")
    assert fence, "README.md has no code block"
    head = [line for line in before.splitlines() if line.strip()]
    assert head and head[0].startswith("# "), "README should start with a '# title' line"
    assert len(head) <= 2, f"only a title and one sentence may precede the commands: {head}"
    block = rest.split("```", 1)[0].splitlines()[1:]  # drop the info string (sh)
    commands = [line.split("#", 1)[0].strip() for line in block]
    assert [c for c in commands if c] == ["make run", "make test"]


def test_make_targets_and_ci_script():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "bench", "setup"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks '{target}:'"
    assert ".venv/.installed" in makefile or "$(VENV)/.installed" in makefile
    ci = ROOT / ".ci" / "run"
    assert ci.is_file() and os.access(ci, os.X_OK), ".ci/run must be executable"
    assert "make test" in ci.read_text()


# --- vendored reference data ---------------------------------------------------

def test_vendored_files_exist_and_are_small(tiny_neox_dir):
    missing = [f for f in VENDORED if not (tiny_neox_dir / f).is_file()]
    assert not missing, f"missing from {tiny_neox_dir}: {missing}"
    total = sum(p.stat().st_size for p in tiny_neox_dir.rglob("*") if p.is_file())
    assert total < MAX_VENDORED_BYTES, f"models/tiny-neox holds {total} bytes (limit {MAX_VENDORED_BYTES})"
    present = [f for f in NOT_VENDORED if (tiny_neox_dir / f).exists()]
    assert not present, f"too large to vendor: {present}"


@pytest.mark.parametrize("name,files", [("tiny-llama", ["tiny-llama-q8_0.gguf", "tiny-llama-q4_k_m.gguf"]),
                                        ("tiny-qwen2", ["tiny-qwen2-q8_0.gguf", "tiny-qwen2-q4_0.gguf"])])
def test_vendored_llama_family(name, files):
    """q8_0 and one 4-bit file per model, trimmed references; no f32/f16 (size)."""
    d = ROOT / "models" / name
    for f in files + ["reference.npz", "reference.json", "README.md"]:
        assert (d / f).is_file(), f"models/{name}/{f} is missing"
    for f in files:
        assert (d / f).read_bytes()[:4] == b"GGUF", f"{f} is not a GGUF file (git-lfs pointer?)"
    assert not list(d.glob("*-f32.gguf")) + list(d.glob("*-f16.gguf")), "f32/f16 files are not vendored"
    total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert total < 6_600_000, f"models/{name} holds {total} bytes"


def test_vendored_gguf_headers(tiny_neox_dir):
    for name in VENDORED:
        if name.endswith(".gguf"):
            with open(tiny_neox_dir / name, "rb") as f:
                assert f.read(4) == b"GGUF", f"{name} is not a GGUF file (git-lfs pointer?)"


def test_nothing_reads_shared_folder():
    # Code and tests use the vendored copy in models/tiny-neox, never ../shared.
    pattern = re.compile(r"(/work/shared|\.\./shared|\bshared/models)")
    offenders = []
    for top in ("tensorgpu", "models", "tests", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            if path.resolve() == Path(__file__).resolve():
                continue
            if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these files refer to the shared folder: {offenders}"


def test_tiny_neox_readme_lists_exactly_the_files_here(tiny_neox_dir):
    """models/tiny-neox/README.md's file table names every file of the folder, with its size."""
    text = (tiny_neox_dir / "README.md").read_text(encoding="utf-8")
    table = text.split("What this folder holds in the repository:", 1)[1].split("\n\n", 2)[1]
    listed = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        sizes = [int(x.replace(",", "")) for x in re.findall(r"[\d,]+", cells[1])] or [None] * len(names)
        listed.update(zip(names, sizes))
    present = {str(p.relative_to(tiny_neox_dir)): p.stat().st_size for p in tiny_neox_dir.rglob("*") if p.is_file()}
    assert set(listed) == set(present)
    assert {k: v for k, v in listed.items() if v is not None} == {k: present[k] for k, v in listed.items() if v}
