"""The `tensorgpu` command: one entry point, one tool per subcommand (`tensorgpu TOOL --help`).

Installed, it is the `tensorgpu` console script; in a checkout, `python -m models TOOL ...` and
`python -m models.gpt_neox TOOL ...` are the same command. Each tool lives in its own module with
`add_arguments(parser)` and `run(args) -> int` (models/tools/); a module with only
`main(argv[, prog]) -> int` (models/quantize.py, models/serve/cli.py) is handed its arguments as
they are. A tool whose module is not there is simply not listed.

Errors in what the user gave (an argument, a missing or broken file, a prompt too long) print one
`error:` line and exit with status 2, as llama.cpp's tools do; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["TOOLS", "Tool", "main", "version"]


@dataclass(frozen=True)
class Tool:
    name: str
    module: str       # relative to this package (models/ in a checkout, tensorgpu_models installed)
    summary: str      # one line for `tensorgpu --help`
    like: str = ""    # the llama.cpp tool it stands in for


# The tool list, in the order `tensorgpu --help` shows it. A new tool adds one line here.
TOOLS = (
    Tool("generate", ".tools.generate", "text from a prompt, streamed as it is made; -i: chat with the model's "
                                        "template", "llama-cli"),
    Tool("perplexity", ".tools.perplexity", "perplexity of a text file over windows: PPL = X +/- Y",
         "llama-perplexity"),
    Tool("bench", ".tools.bench", "prompt processing and generation speed, as a table", "llama-bench"),
    Tool("serve", ".serve.cli", "OpenAI-compatible HTTP server with continuous batching", "llama-server"),
    Tool("convert", ".tools.convert", "Hugging Face checkpoint (GPT-NeoX, Llama, Mistral, Qwen2) -> GGUF",
         "convert_hf_to_gguf.py"),
    Tool("quantize", ".quantize", "GGUF -> GGUF of another type (q8_0 ... Q4_K_M), blocks as llama.cpp writes "
                                  "them", "llama-quantize"),
    Tool("export-hf", ".tools.export_hf", "GGUF (GPT-NeoX) -> Hugging Face checkpoint, the inverse of convert"),
)


def _module_exists(name: str) -> bool:
    """Whether `name` (relative to this package) can be imported, without importing it."""
    from importlib.util import find_spec
    try:
        return find_spec(name, __package__) is not None
    except ImportError:      # its parent package is not there either
        return False


def available_tools() -> list:
    return [t for t in TOOLS if _module_exists(t.module)]


def prog() -> str:
    """How the user called us, for usage lines: `tensorgpu`, or `python -m models` in a checkout."""
    exe = os.path.basename(sys.argv[0] or "")
    if exe in ("__main__.py", "gpt_neox.py", "-c", "") or exe.endswith(".py"):
        return f"python -m {__package__}"
    return "tensorgpu"


def version() -> str:
    """tensorgpu's version: the package's own __version__ where it has one, else the installed
    distribution's, else setup.cfg's (a checkout that was never installed)."""
    import tensorgpu
    v = getattr(tensorgpu, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            return dist_version("tensorgpu")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - Python >= 3.8 has importlib.metadata
        pass
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
    return cfg.get("metadata", "version", fallback="unknown")


def _version_text() -> str:
    import platform
    parts = []
    for dist in ("wgpu", "numpy", "gguf"):
        try:
            from importlib.metadata import version as dist_version
            parts.append(f"{dist} {dist_version(dist)}")
        except Exception:
            pass
    return f"tensorgpu {version()} ({', '.join(parts + ['Python ' + platform.python_version()])})"


def _tool_list(tools: list) -> str:
    """The tool list of `tensorgpu --help`, one line per tool, as llama.cpp's list of tools reads."""
    w = max(len(t.name) for t in tools) + 3
    sw = max(len(t.summary) for t in tools) + 3
    lines = []
    for t in tools:
        like = f"(like {t.like})" if t.like else ""
        lines.append(f"  {t.name:<{w}}{t.summary:<{sw}}{like}".rstrip())
    return "\n".join(lines)


def _usage(tools: list) -> str:
    p = prog()
    return (f"usage: {p} TOOL [options]        ({p} TOOL --help: the tool's options)\n"
            f"       {p} --version\n")


def _help(tools: list) -> str:
    p = prog()
    return (_usage(tools) + "\n"
            "LLM inference on tensorgpu: GGUF models (GPT-NeoX, LLaMA-family, Qwen2; f32 to 4-bit k-quants) on any\n"
            "GPU that WebGPU reaches (Vulkan, Metal, DX12) through wgpu-py.\n\n"
            "tools:\n" + _tool_list(tools) + "\n\n"
            "options:\n"
            "  -h, --help     this list\n"
            "  --version      the versions of tensorgpu, wgpu, numpy, gguf and Python\n\n"
            "examples:\n"
            f"  {p} generate -p \"In the beginning\" -n 32       (the bundled tiny-neox model)\n"
            f"  {p} generate -m MODEL.gguf -f prompt.txt -n 128 --temp 0.8 --seed 1\n"
            f"  {p} perplexity -m MODEL.gguf -f text.txt --ctx 256 --chunks 8\n"
            f"  {p} bench -m MODEL.gguf -p 512 -n 128\n")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line, as every other error is."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser_for(tool: Tool, module) -> argparse.ArgumentParser:
    desc = getattr(module, "DESCRIPTION", None) or tool.summary
    p = _Parser(prog=f"{prog()} {tool.name}", description=desc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p


def _run_tool(tool: Tool, argv: list) -> int:
    module = importlib.import_module(tool.module, __package__)
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        # a module that owns its whole command line (models/quantize.py, models/serve/cli.py):
        # main(argv[, prog])
        import inspect
        if "prog" in inspect.signature(module.main).parameters:
            return module.main(argv, prog=f"{prog()} {tool.name}")
        return module.main(argv)
    args = _parser_for(tool, module).parse_args(argv)
    return module.run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `tensorgpu ARGV...`; returns the exit status (SystemExit for --help and usage errors,
    as argparse does)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tools = available_tools()
    if not argv:
        sys.stderr.write(_usage(tools) + f"error: name a tool: {', '.join(t.name for t in tools)}\n")
        raise SystemExit(2)
    first = argv[0]
    if first in ("-h", "--help", "help"):
        sys.stdout.write(_help(tools))
        raise SystemExit(0)
    if first in ("--version", "-V", "version"):
        print(_version_text())
        raise SystemExit(0)
    tool = next((t for t in tools if t.name == first), None)
    if tool is None:
        import difflib
        near = [t.name for t in tools if t.name.startswith(first)] or \
            difflib.get_close_matches(first, [t.name for t in tools], n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        sys.stderr.write(_usage(tools) + f"error: unknown tool {first!r}{hint}; tools: "
                         f"{', '.join(t.name for t in tools)}\n")
        raise SystemExit(2)

    from .tools.common import UsageError, fail
    try:
        return _run_tool(tool, argv[1:])
    except UsageError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:            # `tensorgpu generate ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:
        if _is_input_error(e):
            return fail(str(e) or type(e).__name__)
        raise


def _is_input_error(e: Exception) -> bool:
    """Errors that describe the user's input (a file, a model, a value), not a bug: these print
    as one line. Anything else keeps its traceback."""
    from tensorgpu.gguf import GGUFError

    from .base import ModelError
    return isinstance(e, (GGUFError, ModelError, ValueError, IndexError, FileNotFoundError, PermissionError,
                          IsADirectoryError, NotADirectoryError, UnicodeDecodeError))


if __name__ == "__main__":
    sys.exit(main())
