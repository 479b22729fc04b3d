"""Models written as plain tensorgpu code (GPT-NeoX, LLaMA/Qwen2), their tokenizers, the
`tensorgpu` command (cli.py, tools/).

    from models import load              # installed (pip install .): from tensorgpu_models import load
    model = load("models/tiny-llama/tiny-llama-q8_0.gguf")   # the class general.architecture names

Bundled reference data lives in models/tiny-*/ (not Python packages); an installed package
carries only tiny-neox/tiny-neox-q8_0.gguf, the command's default model.
"""


def load(path, progress=None):
    """Load any supported GGUF model (models/registry.py)."""
    from .registry import load as _load
    return _load(path, progress)
