"""Exit 0 if wgpu finds a usable (non-OpenGL) GPU adapter, 1 otherwise.

Used by the Makefile to decide whether to install Mesa's lavapipe (software
Vulkan) driver. Software adapters (lavapipe, adapter_type "CPU") count as
usable; OpenGL ones do not (wgpu's GL backend lacks compute features we need).
Prints what it found on stderr. `-q` silences that.
"""
import sys


def main() -> int:
    quiet = "-q" in sys.argv[1:]

    def say(msg: str) -> None:
        if not quiet:
            print(f"has_adapter: {msg}", file=sys.stderr)

    try:
        import wgpu
    except Exception as e:  # wgpu missing or its native library fails to load
        say(f"cannot import wgpu: {e!r}")
        return 1
    try:
        adapters = wgpu.gpu.enumerate_adapters_sync()
    except Exception as e:
        say(f"enumerate_adapters_sync failed: {e!r}")
        return 1
    usable = []
    for a in adapters:
        info = dict(a.info)
        backend = str(info.get("backend_type", ""))
        desc = f"{info.get('device', '?')} [{backend}, {info.get('adapter_type', '?')}]"
        if backend.lower() in ("opengl", "gl", "gles"):
            say(f"ignoring {desc}")
        else:
            say(f"found {desc}")
            usable.append(a)
    if not usable:
        say("no non-OpenGL adapter")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
