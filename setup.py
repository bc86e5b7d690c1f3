"""Package discovery for the two source folders (the metadata lives in pyproject.toml).

``reference/`` installs as ``admm_prune.reference`` and ``gpu/`` as ``admm_prune.gpu``, each with
every subpackage found on disk (``find_namespace_packages``: ``gpu/evaluation/tasks`` holds
no ``__init__.py``), so a new folder ships without editing a list. pyproject.toml alone cannot
say this: its ``packages.find`` names what it finds after the folder (``methods``), with no
way to put it under ``admm_prune.gpu``.
"""

from setuptools import find_namespace_packages, setup

PACKAGE_DIR = {"admm_prune.reference": "reference", "admm_prune.gpu": "gpu"}


def discover(package: str, folder: str) -> list[str]:
    """`package` and every folder below `folder` as its subpackage."""
    return [package] + [f"{package}.{name}" for name in find_namespace_packages(folder, exclude=["*__pycache__*"])]


setup(packages=[p for package, folder in PACKAGE_DIR.items() for p in discover(package, folder)],
      package_dir=PACKAGE_DIR)
