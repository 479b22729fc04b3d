#!/usr/bin/env python3
"""The shell commands README.md shows, as a bash script: every line of every ```sh block, in
order, each echoed before it runs. `.ci/readme_quickstart` runs that script in a fresh clone;
tests/test_cli_readme.py checks the same list without running it.

Skipped, with the reason: only what a CI run does anyway as its own step.

    python3 .ci/readme_commands.py [README.md]   # prints the script
"""
import shlex
import sys
from pathlib import Path

# command -> why the quick-start check does not run it
SKIP = {"make test": "the test suite: .ci/run's own first step"}


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


def commands(readme: Path) -> list:
    return [c for block in shell_blocks(readme.read_text(encoding="utf-8")) for c in map(command_of, block) if c]


def script(readme: Path) -> str:
    out = ["set -euo pipefail"]
    for c in commands(readme):
        if c in SKIP:
            out.append(f"echo {shlex.quote(f'# skipped: {c} ({SKIP[c]})')}")
            continue
        out.append(f"echo \"[$SECONDS s] \"{shlex.quote('$ ' + c)}")
        out.append(c)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(script(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")))
