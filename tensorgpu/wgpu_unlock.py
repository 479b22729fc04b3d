"""Lets the wgpu-native library that wgpu-py ships create devices with wgpu's experimental
cooperative-matrix feature (tensor cores), which its C API cannot request.

Why this exists: wgpu-native 29 (wgpu-py 0.32) implements cooperative matrices in naga and its
Vulkan backend, and an NVIDIA adapter reports the `cooperative-matrix` feature, but requesting it
fails with "Some experimental features, EXPERIMENTAL_COOPERATIVE_MATRIX, were requested, but
experimental features are not enabled": wgpu-core wants `ExperimentalFeatures::enabled()` in the
device descriptor, and wgpu-native's `wgpuAdapterRequestDevice` always passes `disabled()`
(WGPUDeviceExtras carries only a trace path). SPIR-V passthrough, the other road to the tensor
cores, is closed too: `wgpuDeviceCreateShaderModuleSpirV` needs PASSTHROUGH_SHADERS, whose native
feature value is commented out of wgpu.h, so no adapter reports it.

What it does: for the exact library builds listed in KNOWN_BUILDS (checked by SHA-256), it writes a
copy with the two conditional jumps of that check in `wgpu_core::instance::Adapter::
create_device_and_queue` made to pass, verifies the copy's SHA-256, and points wgpu-py at it with
WGPU_LIB_PATH before the library is first loaded. Nothing else in the library changes; a device that
requests no experimental feature behaves exactly as before. Any other build (another wgpu-py
version, macOS, Windows), a WGPU_LIB_PATH the user set, a library already loaded, or
TENSORGPU_DISABLE_COOPMAT=1 leaves everything alone, and matmuls keep the portable WGSL kernels.
runtime.Device then self-tests the cooperative-matrix kernel shape it will use before trusting it.

Delete this module once wgpu-native exposes experimental features (an upstream
WGPUDeviceExtras field would do)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from typing import Optional

# library SHA-256 -> (SHA-256 after the patch, [(file offset, bytes before, bytes after)])
KNOWN_BUILDS = {
    # wgpu-py 0.32.0, manylinux_2_28_x86_64: libwgpu_native-release.so (wgpu-native 29).
    # At 0x4140a3 (file 0x4130a3) `jne` to the ExperimentalFeaturesNotEnabled error after
    # `cmpb $0x1, 0x120(%r14)` (desc.experimental_features) becomes two NOPs; at 0x4140cb (file
    # 0x4130cb) the `jne` past the error after `cmpb $0x0, 0x120(%r14)` becomes an unconditional jmp.
    "be0d8270dd9d78e1039eeb413ee21be8a89776a752e56d6b0f57eefbbc2d749c": (
        "308595d5f4cedbb630b94ce0dbb1f68b243975a20370af2dbb371f2fcbf2cba4",
        ((0x4130a3, "7528", "9090"), (0x4130cb, "751d", "eb1d"))),
}

STATE = {"patched": False, "reason": "not attempted", "path": None}


def shipped_library() -> Optional[str]:
    """The path of the library wgpu-py would load, found without loading it."""
    spec = importlib.util.find_spec("wgpu")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "libwgpu_native-release.so")
    return path if os.path.exists(path) else None


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tensorgpu")


def patched_copy(src: str, cache_dir: Optional[str] = None) -> tuple:
    """(path or None, reason): the verified patched copy of library `src`, written once per cache."""
    data = bytearray(open(src, "rb").read())
    digest = hashlib.sha256(data).hexdigest()
    if digest not in KNOWN_BUILDS:
        return None, f"unknown wgpu-native build (sha256 {digest[:12]}...)"
    want, edits = KNOWN_BUILDS[digest]
    for off, old, new in edits:
        if data[off:off + len(old) // 2].hex() != old:
            return None, f"bytes at file offset {off:#x} are {data[off:off + 2].hex()}, expected {old}"
        data[off:off + len(new) // 2] = bytes.fromhex(new)
    if hashlib.sha256(data).hexdigest() != want:
        return None, "the patched copy's sha256 differs from the expected one"
    # the user's cache, else a private temporary directory (never a shared one: a file another
    # user could swap between our check and wgpu's dlopen)
    for d in ([cache_dir] if cache_dir else [_cache_dir(), None]):
        try:
            d = d or tempfile.mkdtemp(prefix="tensorgpu-")
            path = os.path.join(d, f"libwgpu_native-{want[:16]}.so")
            if os.path.exists(path) and open(path, "rb").read() == data:    # the verified bytes, exactly
                return path, "patched"
            os.makedirs(d, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return path, "patched"
        except OSError:
            continue
    return None, "no writable cache directory for the patched copy"


def _is_patched(path: str) -> bool:
    if not os.path.basename(path).startswith("libwgpu_native-") or not os.path.exists(path):
        return False
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return any(digest == want for want, _ in KNOWN_BUILDS.values())


def unlock() -> bool:
    """Point wgpu-py at the patched library if it is safe to (see the module docstring). Call
    before wgpu.gpu is first used; returns whether the patched library will be loaded."""
    if STATE["reason"] != "not attempted":
        return STATE["patched"]
    if os.environ.get("TENSORGPU_DISABLE_COOPMAT", "") not in ("", "0"):
        STATE["reason"] = "TENSORGPU_DISABLE_COOPMAT is set"
    elif os.environ.get("WGPU_LIB_PATH", "").strip():
        path = os.environ["WGPU_LIB_PATH"].strip()
        if _is_patched(path):     # a parent process unlocked it: this process loads the same copy
            STATE["patched"], STATE["path"], STATE["reason"] = True, path, "patched (inherited WGPU_LIB_PATH)"
        else:
            STATE["reason"] = "WGPU_LIB_PATH is set by the user"
    elif "wgpu.backends.wgpu_native._ffi" in sys.modules:
        STATE["reason"] = "the wgpu-native library was loaded before tensorgpu's device"
    else:
        src = shipped_library()
        if src is None:
            STATE["reason"] = "wgpu-py's library was not found"
        else:
            path, STATE["reason"] = patched_copy(src)
            if path:
                os.environ["WGPU_LIB_PATH"] = path
                STATE["patched"], STATE["path"] = True, path
    return STATE["patched"]
