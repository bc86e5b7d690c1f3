"""The --overwrite swap cannot lose the old output (#28 item 3). On Linux the new checkpoint
and the old output trade places in one renameat2(RENAME_EXCHANGE); elsewhere (or where the
filesystem lacks it) two renames, the old output moved back when the second fails, and a run
killed between them leaves the old output where the next run names it. Before: an ENOSPC on
the second rename left --out gone, the old output in .NAME.old-PID, a log saying "untouched",
then a traceback; a SIGKILL between the renames left no --out and nothing said where it went."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synth import write_corpus

pytest.importorskip("torch")

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.checkpoint import models, output  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform == "linux"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint and a corpus."""
    folder = tmp_path_factory.mktemp("swap")
    model, tok = models.tiny_model("llama")
    model.save_pretrained(folder / "ck")
    tok.save_pretrained(folder / "ck")
    return folder / "ck", write_corpus(folder, seed=0)


def _argv(setup, out: Path, sparsity: str) -> list[str]:
    ck, corpus = setup
    return ["prune", "--model", str(ck), "--calib", str(corpus / "calib.jsonl"), "--eval", "none", "--nsamples", "4",
            "--seqlen", "32", "--iters", "4", "--mask-steps", "2", "--device", "cpu", "--no-progress",
            "--sparsity", sparsity, "--out", str(out)]


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _first_output(setup, tmp_path, capsys) -> tuple[Path, dict]:
    out = tmp_path / "out"
    assert cli.main(_argv(setup, out, "0.5")) == 0
    capsys.readouterr()
    return out, _contents(out)


def _sparsity(out: Path) -> float:
    return json.loads((out / "report.json").read_text())["config"]["sparsity"]


@pytest.mark.skipif(not LINUX, reason="renameat2 is Linux's")
def test_overwrite_exchanges_the_folders_in_one_step(setup, tmp_path, capsys, monkeypatch):
    out, _ = _first_output(setup, tmp_path, capsys)
    calls, real = [], output._exchange
    monkeypatch.setattr(output, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    assert cli.main([*_argv(setup, out, "0.6"), "--overwrite"]) == 0
    assert len(calls) == 1 and calls[0][1] == out
    assert _sparsity(out) == 0.6 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_failed_swap_leaves_the_old_output_in_place(exchange, setup, tmp_path, capsys, monkeypatch):
    """ENOSPC injected into the exchange, or into the second of the two renames: --out keeps its
    old contents byte for byte, one line, exit 2, and --resume then finishes the run."""
    if exchange and not LINUX:
        pytest.skip("renameat2 is Linux's")
    out, before = _first_output(setup, tmp_path, capsys)
    no_room = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if exchange:
        def fail(a, b):
            raise no_room
        monkeypatch.setattr(output, "_exchange", fail)
    else:
        real_rename = Path.rename

        def rename(self, target):
            if self.name == "final":  # the second rename: the new checkpoint onto --out
                raise no_room
            return real_rename(self, target)
        monkeypatch.setattr(output, "_exchange", lambda a, b: False, raising=False)
        monkeypatch.setattr(Path, "rename", rename)
    assert cli.main([*_argv(setup, out, "0.6"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    assert _contents(out) == before and not list(tmp_path.glob(".out.old-*"))
    monkeypatch.undo()
    assert cli.main([*_argv(setup, out, "0.6"), "--overwrite", "--resume"]) == 0
    assert _sparsity(out) == 0.6 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILL = """
import os, signal, sys
from pathlib import Path
from admm_prune.gpu import cli
from admm_prune.gpu.checkpoint import output

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "two-renames":  # killed between the old output's rename and the new one's
    real = Path.rename
    output._exchange = lambda a, b: False
    Path.rename = lambda self, target: kill() if self.name == "final" else real(self, target)
else:  # killed right after the exchange, before the old output is removed
    real = output._exchange
    output._exchange = lambda a, b: (real(a, b), kill())
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("how", ["exchange", "two-renames"])
def test_a_run_killed_during_the_swap_loses_no_output(how, setup, tmp_path, capsys):
    """SIGKILL in the middle of the swap: after the exchange --out already holds the new
    checkpoint; between two renames the old output is in .out.old-PID, and the next run
    refuses in one line naming it, before any work."""
    if how == "exchange" and not LINUX:
        pytest.skip("renameat2 is Linux's")
    out, before = _first_output(setup, tmp_path, capsys)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL, how, *_argv(setup, out, "0.6"), "--overwrite"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    if how == "exchange":
        assert _sparsity(out) == 0.6  # complete: the new checkpoint was in place in one step
        assert cli.main([*_argv(setup, out, "0.7"), "--overwrite"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        return
    (old,) = tmp_path.glob(".out.old-*")
    assert not out.exists() and _contents(old) == before
    for extra in ([], ["--overwrite"], ["--overwrite", "--resume"]):
        assert cli.main([*_argv(setup, out, "0.6"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(old) in err[0] and "--out" in err[0], err
    assert _contents(old) == before


def test_when_neither_rename_back_works_the_message_says_where_the_old_output_is(setup, tmp_path, capsys,
                                                                                 monkeypatch):
    """Two renames, the second fails and so does moving the old output back: one line naming
    the folder that holds the old output (and the new checkpoint), which the next run names too."""
    out, before = _first_output(setup, tmp_path, capsys)
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "final" or ".out.old-" in self.name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_rename(self, target)

    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    monkeypatch.setattr(Path, "rename", rename)
    assert cli.main([*_argv(setup, out, "0.6"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    (old,) = tmp_path.glob(".out.old-*")
    assert err[-1].startswith("admm-prune: error: ") and f"the earlier output is in {old}" in err[-1], err
    assert all(str(old) in line for line in err), err  # the log line of what is kept says it too
    assert _contents(old) == before
    monkeypatch.undo()
    assert cli.main([*_argv(setup, out, "0.6"), "--overwrite"]) == 2
    assert str(old) in capsys.readouterr().err
