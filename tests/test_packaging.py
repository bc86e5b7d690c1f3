"""Packaging promises: the reference imports without torch; the gpu backend mirrors it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import admm_prune.reference as R


def test_reference_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import admm_prune.reference as R\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(R.prune_layer.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "prune_layer"


def _public_functions(module):
    return {n: getattr(module, n) for n in module.__all__
            if inspect.isfunction(getattr(module, n))}


def test_gpu_mirrors_every_reference_function():
    gpu = pytest.importorskip("admm_prune.gpu")
    missing, mismatched = [], []
    for name, ref_fn in _public_functions(R).items():
        twin = getattr(gpu, name, None)
        if twin is None:
            missing.append(name)
            continue
        ref_params = list(inspect.signature(ref_fn).parameters)
        twin_params = list(inspect.signature(twin).parameters)
        # a twin may add trailing keyword-only options (prune_layer's allow_tf32)
        if twin_params[:len(ref_params)] != ref_params or any(
                inspect.signature(twin).parameters[p].kind is not inspect.Parameter.KEYWORD_ONLY
                for p in twin_params[len(ref_params):]):
            mismatched.append(f"{name}: reference {ref_params} vs gpu {twin_params}")
    assert not missing, f"admm_prune.gpu lacks twins of {missing}"
    assert not mismatched, "\n".join(mismatched)


def test_each_twin_lives_in_the_reference_modules_namesake():
    """gpu/solvers/ is the file-for-file twin of reference/: a twin in gpu/solvers/X.py mirrors a
    function of reference/X.py, and each solvers module (but the torch-only linalg) has a namesake."""
    gpu = pytest.importorskip("admm_prune.gpu")
    import pathlib
    misplaced = []
    for name, ref_fn in _public_functions(R).items():
        twin = getattr(gpu, name)
        if twin is ref_fn:  # scalar math the gpu package re-exports from the reference itself
            continue
        ref_file, twin_module = ref_fn.__module__.rsplit(".", 1)[1], twin.__module__
        if twin_module != f"admm_prune.gpu.solvers.{ref_file}":
            misplaced.append(f"{name}: reference/{ref_file}.py, twin in {twin_module}")
    assert not misplaced, "\n".join(misplaced)
    solvers = pathlib.Path(gpu.__file__).parent / "solvers"
    reference = pathlib.Path(R.__file__).parent
    orphans = [p.name for p in solvers.glob("*.py")
               if p.name not in ("__init__.py", "linalg.py") and not (reference / p.name).exists()]
    assert not orphans, f"gpu/solvers/ modules without a reference namesake: {orphans}"
