"""Models written as plain tensorgpu code (GPT-NeoX, tokenizer, generate CLI).

Bundled reference data lives in models/tiny-neox/ (not a Python package).
"""
