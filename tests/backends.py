"""One face for both backends: numpy arrays in, numpy arrays out.

The torch backend receives float64 CPU tensors (tier-1 parity) and its results are
converted back, so the invariant tests are written once and run on every backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import types

import numpy as np


class Backend:
    def __init__(self, name: str, module, to_backend, to_numpy):
        self.name, self.module = name, module
        self._to, self._back = to_backend, to_numpy

    def __getattr__(self, fn_name):
        fn = getattr(self.module, fn_name)
        if not callable(fn) or isinstance(fn, type):
            return fn

        def call(*args, **kwargs):
            args = [self._to(a) for a in args]
            kwargs = {k: self._to(v) for k, v in kwargs.items()}
            return self._back(fn(*args, **kwargs))

        return call

    def __repr__(self):
        return f"Backend({self.name})"


def _identity(x):
    return x


def _torch_converters():
    import torch

    def to(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], np.ndarray):
            return type(x)(torch.from_numpy(np.ascontiguousarray(a)) for a in x)
        return x

    def back(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: back(getattr(x, f.name)) for f in dataclasses.fields(x)})
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(back(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(back(v) for v in x)
        if isinstance(x, types.GeneratorType):  # admm_iterates, polish_iterates: state by state
            return (back(v) for v in x)
        return x

    return to, back


def reference_backend() -> Backend:
    return Backend("reference", importlib.import_module("admm_prune.reference"), _identity, _identity)


def gpu_backend() -> Backend | None:
    try:
        module = importlib.import_module("admm_prune.gpu")
    except ImportError:
        return None
    if not hasattr(module, "prune_layer"):
        return None
    return Backend("gpu", module, *_torch_converters())


def available_backends() -> list[Backend]:
    return [b for b in (reference_backend(), gpu_backend()) if b is not None]
