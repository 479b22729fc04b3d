"""Models written as plain tensorgpu code (GPT-NeoX, LLaMA/Qwen2), their tokenizers, the CLI.

    from models import load
    model = load("models/tiny-llama/tiny-llama-q8_0.gguf")   # the class general.architecture names

Bundled reference data lives in models/tiny-*/ (not Python packages).
"""


def load(path, progress=None):
    """Load any supported GGUF model (models/registry.py)."""
    from .registry import load as _load
    return _load(path, progress)
