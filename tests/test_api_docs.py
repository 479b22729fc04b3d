"""Every public function and Tensor method has a docstring, and tg.__version__ is the release
number setup.cfg declares."""
import configparser
import inspect
import subprocess
import sys

import tensorgpu as tg
import tensorgpu.debug
import tensorgpu.gguf
import tensorgpu.nn

PUBLIC_MODULES = (tg, tg.nn, tg.debug, tg.gguf)
# attributes every Python class has, or data rather than methods
NOT_METHODS = {"__init__", "__slots__", "__module__", "__doc__", "__weakref__", "__array_priority__", "__hash__",
               "__dict__", "__annotations__", "node", "view", "__str__"}


def _public_callables():
    for mod in PUBLIC_MODULES:
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for n in names:
            obj = getattr(mod, n)
            if inspect.ismodule(obj) or isinstance(obj, tg.DType):
                continue
            if callable(obj) and getattr(obj, "__module__", "").startswith("tensorgpu"):
                yield f"{mod.__name__}.{n}", obj


def _tensor_members():
    for n, obj in vars(tg.Tensor).items():
        if n in NOT_METHODS or (n.startswith("_") and not (n.startswith("__") and n.endswith("__"))):
            continue
        if isinstance(obj, property):
            yield f"Tensor.{n}", obj
        elif isinstance(obj, staticmethod):
            yield f"Tensor.{n}", obj.__func__
        elif callable(obj):
            yield f"Tensor.{n}", obj


def test_every_public_function_has_a_docstring():
    found = list(_public_callables())
    assert len(found) > 60          # the walk sees the API (tg.tensor, tg.einsum, tg.nn.linear, ...)
    missing = [name for name, obj in found if not (obj.__doc__ or "").strip()]
    assert not missing, f"public functions without a docstring: {missing}"


def test_every_tensor_method_has_a_docstring():
    found = list(_tensor_members())
    names = {n for n, _ in found}
    assert {"Tensor.transpose", "Tensor.__add__", "Tensor.shape", "Tensor.cumsum", "Tensor.__format__"} <= names
    missing = [name for name, obj in found if not (obj.__doc__ or "").strip()]
    assert not missing, f"Tensor methods without a docstring: {missing}"


def _setup_cfg_version(repo_root):
    cfg = configparser.ConfigParser()
    cfg.read(repo_root / "setup.cfg")
    return cfg["metadata"]["version"]


def test_version_matches_setup_cfg(repo_root):
    want = _setup_cfg_version(repo_root)
    assert tg._SOURCE_VERSION == want            # the fallback of a never-installed checkout
    assert tg.__version__ == want                # whichever source this interpreter reads it from


def test_version_without_package_metadata(repo_root, tmp_path):
    """A source tree on sys.path with no installed distribution still knows its version."""
    code = ("import importlib.metadata as m\n"
            "def nope(name):\n    raise m.PackageNotFoundError(name)\n"
            "m.version = nope\n"
            f"import sys; sys.path.insert(0, {str(repo_root)!r})\n"
            "import tensorgpu; print(tensorgpu.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _setup_cfg_version(repo_root)
