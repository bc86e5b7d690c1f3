"""Hardening round 4 (#28, items 8, 12, 14, 15, 18, 19): lock files that cannot be made, a cache
folder that is a file, a Cholesky that fails, an --out through a missing folder, a reverted
reconstruction, a refused resume. Each test failed before its fix (a traceback, a late failure,
a message that hid what happened); each user error is one line, exit 2, naming the flag."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from cli_cases import corpus, tiny_dir  # noqa: F401 (fixtures)
from cli_cases import error_line as _error_line
from cli_cases import prune_argv as _prune_argv
from cli_cases import run_cli as _cli

torch = pytest.importorskip("torch")

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402


# --- item 8: a lock file that cannot be made ----------------------------------------------------

def _lock_argv(command: str, tiny_dir: Path, corpus: Path, out: str) -> list[str]:
    if command == "prune":
        return _prune_argv(tiny_dir, corpus, Path(out))
    extra = ["--methods", "wanda", "--settings", "0.5", "--nsamples", "2", "--seqlen", "16"] if command == "bench" else []
    return [command, "--model", str(tiny_dir), "--eval", str(corpus / "eval.txt"), "--device", "cpu",
            "--no-progress", "--out", out, *extra]


def _lock_path(command: str, out: Path) -> Path:
    return out.parent / (f".{out.name}.lock" if command == "prune" else f"{out.name}.lock")


def _folder_there(lock: Path):
    lock.mkdir()


def _dangling_symlink(lock: Path):
    lock.symlink_to(lock.parent / "nowhere" / "x")


@pytest.mark.parametrize("make, said", [(_folder_there, "is a folder; remove it or choose another --out"),
                                        (_dangling_symlink, "is a symlink; remove it or choose another --out")])
@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_a_lock_path_taken_by_something_else_is_one_line(command, make, said, tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    make(_lock_path(command, out))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _cli(_lock_argv(command, tiny_dir, corpus, str(out)), capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == f"admm-prune: error: --out {out}: its lock file {_lock_path(command, out)} {said}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command, length", [("prune", 250), ("prune", 247), ("eval", 252), ("bench", 252)])
def test_an_out_whose_lock_name_is_too_long_is_one_line(command, length, tiny_dir, corpus, tmp_path, capsys):
    """A legal name whose lock file's (or staging folder's) name is not: before, a traceback (at
    the lock, or for 247 characters at the staging folder, after the calibration)."""
    out = tmp_path / "sub" / ("a" * length)
    code, _, err = _cli(_lock_argv(command, tiny_dir, corpus, str(out)), capsys)
    assert code == cli.EXIT_USER_ERROR
    line = _error_line(err)
    assert line.startswith(f"admm-prune: error: --out {out}: "), line
    assert line.endswith("; choose a shorter --out"), line
    assert list(tmp_path.iterdir()) == []  # the folder made for it is gone again


@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_an_out_in_proc_is_one_line(command, tiny_dir, corpus, capsys):
    code, _, err = _cli(_lock_argv(command, tiny_dir, corpus, "/proc/admm-prune-test"), capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err).startswith("admm-prune: error: --out /proc/admm-prune-test"), err


@pytest.mark.parametrize("where", ["open", "write"])  # out of inodes; out of blocks
@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock_file(command, where, tiny_dir, corpus, tmp_path,
                                                                     capsys, monkeypatch):
    import errno
    import os

    from admm_prune.gpu.checkpoint import lock

    real = {"open": os.open, "write": os.write}

    def full(target, *args):
        name = str(target) if where == "open" else os.readlink(f"/proc/self/fd/{target}")
        if name.endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real[where](target, *args)

    monkeypatch.setattr(lock.os, where, full)
    out = tmp_path / "out"
    code, _, err = _cli(_lock_argv(command, tiny_dir, corpus, str(out)), capsys)
    monkeypatch.undo()
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == (f"admm-prune: error: --out {out}: no room for its lock file {_lock_path(command, out)} "
                                f"(disk, quota or inodes full); free some space")
    assert list(tmp_path.iterdir()) == []


# --- item 12: --cache-dir naming a file ---------------------------------------------------------

@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_a_cache_dir_that_is_a_file_is_refused_before_converting(command, below, tmp_path, capsys, monkeypatch):
    def convert(*args):
        raise AssertionError("converted the embedded model first")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    file = tmp_path / "cache"
    file.write_text("not a folder")
    cache = file / "sub" if below else file
    code, out, err = _cli([command, "--cache-dir", str(cache), "--device", "cpu", "--no-progress"], capsys)
    assert code == cli.EXIT_USER_ERROR and out == ""
    assert _error_line(err) == f"admm-prune: error: --cache-dir {cache}: {file} is a file, not a folder"


def test_the_library_refuses_a_cache_folder_it_cannot_make_before_converting(tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("converted the embedded model first")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", load)
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(models.ModelError, match="cache_dir .*cache: cannot make this folder") as error:
        models.resolve_model(None, cache_dir=tmp_path / "cache")
    assert error.value.field == "cache_dir"


# --- item 14: a Cholesky that fails even with jitter --------------------------------------------

def _never_positive(monkeypatch):
    real = torch.linalg.cholesky_ex

    def failing(A, *args, **kwargs):
        L, info = real(A, *args, **kwargs)
        return L, torch.ones_like(info)  # "minor 1 not positive", whatever is added

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)


def test_a_cholesky_that_fails_with_jitter_is_a_user_error_naming_damp(monkeypatch):
    from admm_prune.gpu.solvers.linalg import cholesky
    from admm_prune.reference.errors import AdmmPruneError

    _never_positive(monkeypatch)
    with pytest.raises(AdmmPruneError, match=r"Cholesky of 'G~ \+ rho I' failed even with .* added") as error:
        cholesky(torch.eye(3, dtype=torch.float64), "G~ + rho I")
    assert error.value.field == "damp"


def test_the_reference_sparsegpt_on_a_singular_gram_without_damping_is_a_user_error_naming_damp():
    """Fewer samples than features and damp 0: the reference says so in one line (it raised numpy's
    bare LinAlgError); the same Gram with the default damping prunes."""
    from admm_prune.reference import prune_layer
    from admm_prune.reference.errors import FactorizationError

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 16))
    W = rng.normal(size=(4, 16))
    with pytest.raises(FactorizationError, match=r"damp=0: the Gram matrix is singular") as error:
        prune_layer(W, X.T @ X, 0.5, method="sparsegpt", damp=0.0)
    assert error.value.field == "damp" and "\n" not in str(error.value)
    assert np.isfinite(prune_layer(W, X.T @ X, 0.5, method="sparsegpt").W).all()


def test_a_cholesky_that_fails_in_a_run_is_one_line_naming_the_layer(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    _never_positive(monkeypatch)
    code, out, err = _cli(_prune_argv(tiny_dir, corpus, tmp_path / "out", "--method", "admm"), capsys)
    assert code == cli.EXIT_USER_ERROR and out == ""
    line = _error_line(err)
    assert line.startswith("admm-prune: error: block 0 self_attn.q_proj, self_attn.k_proj, self_attn.v_proj: Cholesky "
                           "of 'G~ + rho I' failed even with "), line
    assert line.endswith("try a larger --damp or --dtype float32"), line
    assert not (tmp_path / "out").exists()


# --- item 15: --out through a folder that does not exist yet ------------------------------------

def test_an_existing_out_reached_through_a_missing_folder_is_refused_first(tiny_dir, corpus, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep").write_text("an earlier output")
    code, out, err = _cli(_prune_argv(tiny_dir, corpus, Path("nosuch/../existing")), capsys)
    assert code == cli.EXIT_USER_ERROR and out == ""
    assert _error_line(err) == (f"admm-prune: error: --out nosuch/../existing already exists; pass --overwrite to "
                                f"replace it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no nosuch/, no staging folder
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep"]


def test_a_new_out_reached_through_a_missing_folder_is_written_there(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(_prune_argv(tiny_dir, corpus, Path("nosuch/../new")), capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"] and (tmp_path / "new" / "report.json").is_file()


# --- item 18: a reverted reconstruction says so in the log ---------------------------------------

@pytest.mark.parametrize("lr, said", [(10.0, "reverted: 3 steps did not lower the output error"),
                                      (1e-4, "reconstruction: output error")])
def test_the_log_says_a_reconstruction_was_reverted(lr, said, tiny_dir, corpus, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="admm_prune.gpu.engine.pipeline"):
        code, _, err = _cli(_prune_argv(tiny_dir, corpus, tmp_path / "out", "--reconstruct-steps", "3",
                                        "--reconstruct-lr", str(lr)), capsys)
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if "reconstruction" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("block 0 ") and said in lines[0], lines
    assert ("reverted" in lines[0]) == (lr == 10.0) and ("->" in lines[0]) == (lr != 10.0)


# --- item 19: a refused resume says the settings as flags, and "unset" for None -----------------

def _stage_one_block(tiny_dir, corpus, out, **settings):
    """A run of the library interrupted after block 0 is staged; the CLI's resume argv for it."""
    from admm_prune.gpu.engine import pipeline

    def interrupt(block, name, *args):  # block 0 staged
        if block == 1 and name == "mlp.down_proj":
            raise KeyboardInterrupt

    cfg = pipeline.PruneConfig(model=str(tiny_dir), calib=str(corpus / "calib.jsonl"), eval=None, nsamples=2,
                               seqlen=16, device="cpu", progress=False, out=str(out), **settings)
    with pytest.raises(pipeline.RunInterrupted):
        pipeline.run_prune(cfg, callback=interrupt)
    return [a for a in _prune_argv(tiny_dir, corpus, out, "--resume") if a not in ("--num-blocks", "1")]


def test_a_refused_resume_names_the_changed_flag_and_says_unset(tiny_dir, corpus, tmp_path, capsys):
    argv = _stage_one_block(tiny_dir, corpus, tmp_path / "out", reconstruct_steps=2) + ["--reconstruct-steps", "0"]
    code, _, err = _cli(argv, capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == (f"admm-prune: error: cannot --resume {tmp_path / '.out.staging'}: --reconstruct-steps "
                                f"was 2, now unset")


def test_a_run_staged_before_reconstruction_was_the_default_is_refused_saying_how_to_resume_it(
        tiny_dir, corpus, tmp_path, capsys):
    """A folder staged without reconstruction (the paper's method, the default before the recipe),
    resumed with the defaults: refused, naming the flag that resumes it as it was."""
    argv = _stage_one_block(tiny_dir, corpus, tmp_path / "out", reconstruct_steps=0, sparsity=0.7)
    argv += ["--sparsity", "0.7"]  # where the recipe reconstructs by default
    code, _, err = _cli(argv, capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err).endswith("now on by default (the default recipe); pass --reconstruct-steps=0 to continue "
                                     "them as they were")
    code, _, err = _cli(argv + ["--reconstruct-steps", "0"], capsys)
    assert code == 0, err


def test_a_staging_folder_tuned_with_the_old_absolute_step_is_refused_naming_the_flag(tiny_dir, corpus, tmp_path,
                                                                                        capsys):
    """A run staged before --reconstruct-lr became relative (its fingerprint has no
    reconstruct_lr_mode) is refused in one line that names the flag, not the internal key."""
    import json

    argv = _stage_one_block(tiny_dir, corpus, tmp_path / "out", reconstruct_steps=2) + ["--reconstruct-steps", "2"]
    manifest = tmp_path / ".out.staging" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["fingerprint"]["reconstruct_lr_mode"]  # as an absolute-step run recorded it
    manifest.write_text(json.dumps(data))
    code, _, err = _cli(argv, capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == (f"admm-prune: error: cannot --resume {tmp_path / '.out.staging'}: the staged blocks "
                                "were tuned with the old absolute --reconstruct-lr (now relative to each weight's "
                                "scale); rerun without --resume")
