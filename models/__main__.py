"""`python -m models {generate,perplexity,convert} --model FILE.gguf`: any supported architecture."""
import sys

from models.cli import main

sys.exit(main())
