"""The refactor of issue #19 changed no weight: SmolLM2 pruned through the CLI gives the
checkpoint it gave before, bit for bit.

The hashes were taken at 8177bf5 (before the refactor) by running this file as a script on
this project's CPU machine (`python tests/test_same_weights.py`), one thread, the small
configuration below. They hash every tensor of the saved checkpoint (names and bytes), so a
change of any pruned weight, mask or saved dtype fails the test. A different BLAS or CPU
kernel can change float32 rounding: where that is the cause, retake them on the old commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from pathlib import Path

import pytest
from synth import skip_without_smollm2

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (CLI arguments, sha256 of the checkpoint's tensors) taken before the refactor
CASES = {
    "admm-grad": (["--method", "admm-grad", "--reconstruct-steps", "0"],  # the paper
                  "0541d28a1886f7eb2e283b9af37751e08a7867009f1a62ce17072b5931a1bb86"),
    "admm": (["--method", "admm"],
                  "5e9857e643de04aa7132e2ee1e063a364402de8a6ffa69ee3d3f2392398af58d"),
    "sparsegpt-2:4": (["--method", "sparsegpt", "--pattern", "2:4", "--sparsity", "none"],
                  "e829326ee892980a626ff6a8e65ed9ec84748607abc34a4174da2532e41e1d90"),
    "wanda": (["--method", "wanda"],
                  "cd69c7bceb52e079d7ebc3f8a347f9af74df5705eebef13ddeacca7356583cff"),
    "magnitude": (["--method", "magnitude"],
                  "d7c6b2e57881f46819a38a701f19b7754b191fca2264ddd6aa30875a74589bd8"),
    "admm-grad-owl": (["--method", "admm-grad", "--sparsity", "0.6", "--sparsity-profile", "owl",
                       "--polish-iters", "2", "--iters", "8", "--mask-steps", "4"],
                  "49336c3fa22338f294fd40af87320f72ee0899f28e40b9a06d58c177e66677bf"),
}


def _args(extra: list[str], out: Path) -> list[str]:
    return ["prune", *extra, "--calib", str(SHARED / "c4" / "c4_train_first1000_reserialized.jsonl"),
            "--nsamples", "4", "--seqlen", "64", "--eval", "none", "--num-blocks", "3",
            "--device", "cpu", "--no-progress", "--out", str(out)]


def checkpoint_sha256(folder: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key).contiguous()
                h.update(key.encode())
                h.update(str(t.dtype).encode())
                h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def prune_and_hash(name: str, out: Path) -> str:
    from admm_prune.gpu import cli

    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(_args(CASES[name][0], out))
    assert code == 0
    return checkpoint_sha256(out)


@pytest.mark.model
@pytest.mark.parametrize("name", sorted(CASES))
def test_smollm2_weights_are_those_before_the_refactor(name, tmp_path):
    skip_without_smollm2(SHARED)
    assert prune_and_hash(name, tmp_path / name) == CASES[name][1]


if __name__ == "__main__":  # retake the hashes (on the commit before a refactor)
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(CASES) if len(sys.argv) < 2 else sys.argv[1:]:
            print(f'"{name}": {prune_and_hash(name, Path(tmp) / name)!r}', flush=True)
