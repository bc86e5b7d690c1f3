"""Hypothesis profiles and the backend fixture every invariant test runs on."""

from __future__ import annotations

import os

# What .ci/run exports, for the README's test command typed in a plain shell: offline (no
# test needs the network), no plot windows. Set before anything imports huggingface_hub, which
# reads them once. ADMM_PRUNE_CACHE is left to its default (~/.cache/admm_prune), where
# scripts/quickstart.sh has already converted the embedded model.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
from hypothesis import HealthCheck, settings

from backends import available_backends

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=15, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_common)
settings.register_profile("fuzz", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

try:  # the test problems are tiny: one thread avoids oversubscription on small shared machines
    import torch

    torch.set_num_threads(int(os.environ.get("ADMM_TEST_THREADS", "1")))
except ImportError:
    pass


@pytest.fixture(scope="session", params=available_backends(), ids=lambda b: b.name)
def backend(request):
    """The reference and (when importable) the torch backend, behind one numpy-in/numpy-out face."""
    return request.param


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (tier-2 parity); run on a GPU machine")
        for item in items:
            # the marker, not the keyword: "gpu" is also the torch backend's parameter id
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
