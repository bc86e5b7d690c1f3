"""The house rules of issue #19, machine-checked: each solver default written once, no private
names imported across modules, engine files that fit a read, method names compared only in
the registry, and one base class for every error a user can fix."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("reference", "gpu") for p in sorted((ROOT / d).rglob("*.py"))]
MAX_ENGINE_LINES = 400


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _solver_fields() -> set[str]:
    from admm_prune.reference.options import SolverOptions

    return {f.name for f in dataclasses.fields(SolverOptions)}


def test_each_solver_default_is_written_once():
    """Outside reference/options.py no signature or dataclass gives a solver setting a literal
    default (``mask_steps: int = 15``); they read ``DEFAULTS.mask_steps`` or inherit the field."""
    fields, found = _solver_fields(), []
    for path in SOURCES:
        if path.name == "options.py" and path.parent.name == "reference":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                pos = args.posonlyargs + args.args
                pairs = list(zip(pos[len(pos) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                found += [f"{path.name}:{node.lineno} {node.name}({a.arg}={ast.unparse(d)})"
                          for a, d in pairs if a.arg in fields and isinstance(d, ast.Constant) and d.value is not None]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id in fields and isinstance(node.value, ast.Constant):
                found.append(f"{path.name}:{node.lineno} {node.target.id} = {ast.unparse(node.value)}")
    assert not found, "defaults written outside reference/options.py:\n" + "\n".join(found)


def test_no_module_imports_a_private_name_from_another():
    found = []
    for path in SOURCES + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "tutorial").glob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                parts = (node.module or "").split(".")
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(p.startswith("_") and p != "__init__" for p in parts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {'.' * node.level}{node.module} "
                                 f"import {', '.join(a.name for a in node.names)}")
    assert not found, "\n".join(found)


def test_no_engine_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "gpu").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_ENGINE_LINES}
    assert not long, long


def test_method_names_are_compared_only_in_the_registry():
    """At most 3 comparisons with a method's name in gpu/ outside gpu/methods/ (the bench's
    llm-compressor peers have their own two)."""
    from admm_prune.reference.methods import REGISTRY

    names, found = set(REGISTRY), []
    for path in sorted((ROOT / "gpu").rglob("*.py")):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] for c in
                          ([c] if isinstance(c, ast.Constant) else getattr(c, "elts", []))
                          if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert len(found) <= 3, "\n".join(found)


def _modules(package: str):
    pkg = importlib.import_module(package)
    yield pkg
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        if info.name.endswith("__main__"):  # runs the CLI on import
            continue
        yield importlib.import_module(info.name)


@pytest.mark.parametrize("package", ["admm_prune.reference", "admm_prune.gpu"])
def test_every_user_error_shares_one_base(package):
    from admm_prune.reference.errors import AdmmPruneError

    errors = {f"{m.__name__}.{name}": cls for m in _modules(package)
              for name, cls in inspect.getmembers(m, inspect.isclass)
              if cls.__module__ == m.__name__ and name.endswith("Error")}
    assert errors, "no error classes found"
    assert all(issubclass(c, AdmmPruneError) for c in errors.values()), \
        [n for n, c in errors.items() if not issubclass(c, AdmmPruneError)]


def test_a_registered_method_needs_one_file_and_one_line(tmp_path, monkeypatch):
    """What the README's "Adding a method" promises: a Method entry and a MethodImpl, one line
    in the registry, and the engine's configs and CLI take it."""
    import torch

    from admm_prune.gpu import cli, methods
    from admm_prune.gpu.config import PruneConfig
    from admm_prune.gpu.methods.base import MethodImpl, Pruned
    from admm_prune.gpu.solvers.prune import prune_shared
    from admm_prune.reference import methods as specs

    class Keep(MethodImpl):  # keeps the largest |W| * ||X_j||^2: a toy, not a good method
        spec = specs.Method("toy", "gram", None, False, False, "toy scores |W| diag(XtX)")

        def prune(self, problem, W, prepared, settings):
            from admm_prune.gpu.solvers.masks import select_unchecked

            M = select_unchecked(W.abs() * problem.XtX.diagonal()[None, :].to(W.dtype), problem.sparsity,
                                 settings.pattern, settings.group)
            return Pruned(W * M, M)

    monkeypatch.setitem(specs.REGISTRY, "toy", Keep.spec)
    monkeypatch.setitem(methods.IMPLEMENTATIONS, "toy", Keep())
    cfg = PruneConfig(method="toy", sparsity=0.5)
    assert cfg.needs_calibration and cfg.measure_errors
    W, X = torch.randn(4, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    (res,) = prune_shared([W], X.T @ X, 0.5, **cfg.solver_kwargs())
    assert int(res.mask.sum()) == 16 and torch.equal(res.W, W * res.mask)
    assert "toy" in cli.build_parser().parse_args(["prune", "--method", "toy"]).method


LAYOUT_SPELLINGS = re.compile(r"model\\?\.layers|model\\?\.norm|lm_head|embed_tokens")


def test_at_most_one_engine_file_spells_the_models_layout():
    """Issue #27: the model adapter (gpu/checkpoint/adapter.py) owns every fact about a model's
    shape; no other engine file spells Llama's paths (``model.layers``, ``model.norm``,
    ``lm_head``, ``embed_tokens``), in code, comments or docstrings."""
    spelled = {str(p.relative_to(ROOT)): sorted(set(LAYOUT_SPELLINGS.findall(p.read_text())))
               for p in sorted((ROOT / "gpu").rglob("*.py")) if LAYOUT_SPELLINGS.search(p.read_text())}
    assert len(spelled) <= 1, spelled
