"""Running the `tensorgpu` command as a user does, in a subprocess.

The installed console script is `sys.exit(tensorgpu_models.cli:main())` with argv[0] ending in
`tensorgpu`; here the same call is made on the checkout's models/ package (the test venv's
`tensorgpu` script may belong to another checkout)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = "import sys; from models.cli import main; sys.argv[0] = 'tensorgpu'; sys.exit(main())"


def tensorgpu(*args, input=None, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, args)], input=input, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command: exactly one `error:` line, exit status 2."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]
