#!/usr/bin/env python3
"""The shell commands README.md shows, as a bash script: every command of every ```sh block (a
line, or lines joined by a trailing backslash), in order, each echoed before it runs.
`.ci/readme_quickstart` runs that script in a fresh clone; tests/test_cli_readme.py checks the
same list without running it.

A command that starts the HTTP server (`tensorgpu serve`, `python -m models serve`) runs in the
background until its /health answers, so the README's curl commands after it run against it; it
is stopped with SIGTERM at the end and must exit 0. Skipped, with the reason (SKIP): what a CI run
does anyway as its own step, and the Ray cluster how-to, which needs other machines.

    python3 .ci/readme_commands.py [README.md]   # prints the script
"""
import re
import shlex
import sys
from pathlib import Path

# (pattern, why the quick-start check does not run a command it matches)
SKIP = [
    (r"^make test$", "the test suite: .ci/run's own first step"),
    (r"HEAD_IP|^ray start --head", "the Ray cluster how-to: it needs other machines (HEAD_IP stands for one)"),
]
# a command that starts the HTTP server (and serves until stopped)
SERVER = re.compile(r"^(tensorgpu|python -m models) serve\b(?!.*--ray)")


def skip_reason(command: str):
    return next((why for pattern, why in SKIP if re.search(pattern, command)), None)


def shell_blocks(text: str) -> list:
    """The lines of each ```sh / ```bash block (a block's lines as one list)."""
    blocks, cur = [], None
    for line in text.splitlines():
        s = line.strip()
        if cur is None and s.startswith("```") and s[3:].strip() in ("sh", "bash", "shell", "console"):
            cur = []
        elif cur is not None and s.startswith("```"):
            blocks.append(cur)
            cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def command_of(line: str) -> str:
    """A line without its trailing `# comment` (a '#' inside quotes, or inside a word, stays)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def joined(lines: list) -> list:
    """Lines with a trailing backslash joined to the next (one command over several lines)."""
    out, cur = [], ""
    for line in lines:
        line = command_of(line)
        if line.endswith("\\"):
            cur += line[:-1].rstrip() + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


def commands(readme: Path) -> list:
    return [c for block in shell_blocks(readme.read_text(encoding="utf-8")) for c in joined(block) if c]


def _server_start(c: str) -> list:
    port = re.search(r"--port[= ](\d+)", c)
    url = f"http://127.0.0.1:{port[1] if port else 8000}/health"
    return [
        f"{c} &",
        "server_pid=$!",
        "trap 'kill $server_pid 2>/dev/null || true' EXIT",
        f"for _ in $(seq 300); do curl -sf {url} >/dev/null && break; "
        "kill -0 $server_pid || { echo 'the server exited' >&2; exit 1; }; sleep 1; done",
        f"curl -sf {url} >/dev/null",
    ]


def script(readme: Path) -> str:
    out = ["set -euo pipefail", "server_pid="]
    for c in commands(readme):
        why = skip_reason(c)
        if why:
            out.append(f"echo {shlex.quote(f'# skipped: {c} ({why})')}")
            continue
        out.append(f"echo \"[$SECONDS s] \"{shlex.quote('$ ' + c)}")
        out.extend(_server_start(c) if SERVER.search(c) else [c])
    # a server started above: SIGTERM, and it must shut down cleanly (exit 0)
    out.append('if [ -n "$server_pid" ]; then kill -TERM "$server_pid"; wait "$server_pid"; trap - EXIT; '
               'echo "server stopped"; fi')
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(script(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")))
