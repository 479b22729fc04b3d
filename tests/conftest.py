"""Shared pytest set-up for tensorgpu.

Sections:
  1. environment   (runs at import, before any test module imports wgpu)
  2. paths         repo_root, tiny_neox_dir, full_reference_dir
  (GPU/runtime fixtures belong to the runtime owner; add them in their own section.)
"""
import os
import tempfile
from pathlib import Path

import pytest

# --- 1. environment ---------------------------------------------------------
# wgpu/Mesa print "XDG_RUNTIME_DIR is invalid or not set" without it.
if not os.environ.get("XDG_RUNTIME_DIR"):
    _xdg = Path(tempfile.gettempdir()) / f"tensorgpu-xdg-{os.getuid() if hasattr(os, 'getuid') else 0}"
    _xdg.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(_xdg)

# --- 2. paths ---------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_NEOX_DIR = REPO_ROOT / "models" / "tiny-neox"
FULL_REFERENCE_ENV = "TENSORGPU_TINY_NEOX_FULL"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding setup.cfg)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_neox_dir() -> Path:
    """models/tiny-neox: vendored q8_0/q4_0/seq-f32 GGUFs, reference*.npz, hf/ tokenizer."""
    return TINY_NEOX_DIR


@pytest.fixture(scope="session")
def full_reference_dir() -> Path:
    """Folder with the non-vendored tiny-neox files (tiny-neox-f32.gguf, -f16.gguf, ...).

    Taken from $TENSORGPU_TINY_NEOX_FULL; the test is skipped when it is unset or missing.
    """
    value = os.environ.get(FULL_REFERENCE_ENV)
    if not value:
        pytest.skip(f"{FULL_REFERENCE_ENV} not set (folder with tiny-neox f32/f16 GGUFs)")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"{FULL_REFERENCE_ENV}={value} is not a directory")
    return path


# --- 3. GPU code paths --------------------------------------------------------
# lavapipe has shader-f16 and subgroups, so the fallbacks an older adapter takes (packed-u32
# f16 loads, shared-memory reductions) only run when a test forces them.
@pytest.fixture(params=[(True, True), (True, False), (False, True), (False, False)],
                ids=["f16+sg", "f16+nosg", "packed+sg", "packed+nosg"])
def all_paths(request):
    """Every combination of shader-f16 / packed-u32 f16 and subgroup / shared-memory reductions."""
    from tensorgpu import runtime
    old = (runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups)
    runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups = request.param
    yield request.param
    runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups = old


@pytest.fixture(autouse=True)
def _wgsl_matmuls_unless_coop_test(request):
    """The suite checks the WGSL kernels and the models at f32 tolerances, so on an adapter with
    tensor cores (an NVIDIA GPU) every test but test_kernel_matmul_coop.py's keeps matmuls on the
    WGSL tiles; that file checks the tensor-core path at f16 tolerance. On lavapipe this is a no-op."""
    if "test_kernel_matmul_coop" in request.node.nodeid:
        yield
        return
    from tensorgpu.kernels import matmul_coop
    old = matmul_coop.TUNING["enabled"]
    matmul_coop.TUNING["enabled"] = False
    try:
        yield
    finally:
        matmul_coop.TUNING["enabled"] = old
