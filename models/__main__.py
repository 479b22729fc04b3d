"""`python -m models TOOL ...` (installed: the `tensorgpu` command): see models/cli.py."""
import sys

from .cli import main

sys.exit(main())
