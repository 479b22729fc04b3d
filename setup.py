"""Only what setup.cfg cannot say: the `models/` folder is installed under the import name
`tensorgpu_models` (a top-level `models` would collide with other projects), with every
sub-package it grows picked up automatically. All other metadata lives in setup.cfg.

In a checkout, `python -m models ...` and `import models` keep working from the repo root;
inside models/ every import is relative, so the same code runs under either name.
"""
from setuptools import find_packages, setup

MODELS_PACKAGE = "tensorgpu_models"   # the import name of models/ once installed


def packages() -> list:
    """tensorgpu and its sub-packages as they are; models/ and its sub-packages renamed."""
    ours = find_packages(include=["tensorgpu", "tensorgpu.*"])
    models = find_packages(include=["models", "models.*"])
    return ours + [MODELS_PACKAGE + name[len("models"):] for name in models]


setup(packages=packages(), package_dir={MODELS_PACKAGE: "models"})
