"""The `admm-prune` command line: help text, flag parsing, console output, interrupts, a core install.

No model runs here: the library call behind a subcommand is replaced where output is checked
(tests/test_pipeline.py runs the commands end to end on tiny models).
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
from admm_prune.gpu import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option_help(sub: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as --help prints it (defaults expanded), by its longest flag."""
    formatter = sub._get_formatter()
    return {max(a.option_strings, key=len): formatter._expand_help(a) for a in sub._actions
            if a.option_strings and a.help is not argparse.SUPPRESS}


# --- help text -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_every_option_has_help_with_at_most_one_default(command):
    for flag, text in _option_help(_subparsers()[command]).items():
        assert text.strip(), f"{command} {flag} has no help"
        assert text.lower().count("default") <= 1, f"{command} {flag}: {text!r}"
        assert not re.search(r"default: [(\[]", text), f"{command} {flag} prints a Python tuple/list: {text!r}"


@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_on_off_flags_show_no_default(command):
    sub = _subparsers()[command]
    helps = _option_help(sub)
    for action in sub._actions:
        if action.option_strings and action.nargs == 0 and action.dest != "help":
            assert "default" not in helps[max(action.option_strings, key=len)].lower(), action.option_strings


def test_method_help_names_its_default_and_eval_mentions_zero_shot():
    prune_help = _subparsers()["prune"].format_help()
    assert "--no-progress         no progress bars" in prune_help
    assert "(default: True)" not in prune_help and "(default: False)" not in prune_help
    assert "(default: admm-grad)" in re.sub(r"\s+", " ", _option_help(_subparsers()["prune"])["--method"])
    top = re.sub(r"\s+", " ", cli.build_parser().format_help())
    assert "zero-shot" in top and "zero-shot" in _subparsers()["eval"].format_help()
    bench = re.sub(r"\s+", " ", _subparsers()["bench"].format_help())
    assert "(default: wanda,sparsegpt,admm,admm-grad)" in bench and "(default: 0.5,0.6,0.7,0.8,2:4)" in bench


# --- flags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("5GB", 5_000_000_000), ("500MB", 500_000_000), ("2GiB", 2 * 2**30), ("5000000000", 5_000_000_000),
    ("1.5gb", 1_500_000_000), ("64kib", 65536), ("100", 100), (" 3 GB ", 3_000_000_000),
])
def test_max_shard_size_accepts_units(text, size):
    args = cli.build_parser().parse_args(["prune", "--max-shard-size", text])
    assert args.max_shard_size == size


@pytest.mark.parametrize("text", ["5XB", "0", "-1", "", "GB", "five", "5 G B", "0.1B"])
def test_bad_max_shard_size_exits_2_with_one_line_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["prune", "--max-shard-size", text])
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--max-shard-size" in err, err


def test_resume_and_shard_size_defaults():
    args = cli.build_parser().parse_args(["prune"])
    assert args.resume is False and args.max_shard_size == 5_000_000_000
    assert cli.build_parser().parse_args(["prune", "--resume"]).resume is True


def test_matmul_precision_is_tf32_unless_highest_and_decides_the_weights():
    from admm_prune.gpu.config import PruneConfig

    default = PruneConfig(**_prune_options([]))
    highest = PruneConfig(**_prune_options(["--matmul-precision", "highest"]))
    assert default.matmul_precision == "high" and default.engine_solver_kwargs()["allow_tf32"] is True
    assert highest.engine_solver_kwargs()["allow_tf32"] is False
    assert default.fingerprint()["matmul_precision"] != highest.fingerprint()["matmul_precision"]  # resume refuses
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "--matmul-precision", "medium"])


def _prune_options(argv: list[str]) -> dict:
    options = vars(cli.build_parser().parse_args(["prune", *argv]))
    options.pop("command"), options.pop("verbose")
    return options


def test_any_bad_flag_is_one_line(capsys):
    for argv in (["prune", "--iters", "x"], ["prune", "--no-such-flag"], [], ["eval", "--dtype", "int8"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.build_parser().parse_args(argv)
        assert exit_info.value.code == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error:" in err, err


@pytest.mark.parametrize("command, config", [("prune", "PruneConfig"), ("eval", "EvalConfig"),
                                             ("bench", "BenchConfig")])
def test_every_flag_sets_a_config_field(command, config):
    """The CLI only parses flags into the frozen config: each flag's dest is one of its fields."""
    import dataclasses

    from admm_prune.gpu.bench import bench
    from admm_prune.gpu import config as config_mod

    fields = {f.name for f in dataclasses.fields(getattr(bench if command == "bench" else config_mod, config))}
    dests = {a.dest for a in _subparsers()[command]._actions if a.dest not in ("help", "verbose")}
    if command == "bench":
        dests.discard("offload_activations")  # shared flag; bench keeps activations where they are
    assert dests <= fields, dests - fields


@pytest.mark.parametrize("command, message, said", [
    ("prune", "out runs/out/x already exists; pass overwrite to replace it",
     "--out runs/out/x already exists; pass --overwrite to replace it"),
    ("prune", "NaN/Inf in q_proj; try dtype float32 or a larger damp",
     "NaN/Inf in q_proj; try --dtype float32 or a larger --damp"),
    ("prune", "eval_seqlen must be a positive integer, got 0", "--eval-seqlen must be a positive integer, got 0"),
    ("eval", "nothing to evaluate: give eval or tasks", "nothing to evaluate: give --eval or --tasks"),
    ("eval", "seqlen 9000 exceeds the model's limit of 8192 positions",
     "--seqlen 9000 exceeds the model's limit of 8192 positions"),
    ("eval", "out runs/eval.x is a directory; try runs/eval_dense", "--out runs/eval.x is a directory; try runs/eval_dense"),
])
def test_config_errors_name_flags(command, message, said):
    assert cli.flag_names(message, _subparsers()[command]) == said


def test_config_error_is_one_line_naming_the_flag(tmp_path, capsys, bare_root_logger):
    bare_root_logger()
    code = cli.main(["prune", "--nsamples", "0", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR and err == "admm-prune: error: --nsamples must be a positive integer, got 0\n"
    assert not (tmp_path / "x").exists()


# --- console output --------------------------------------------------------------------------

@pytest.fixture
def bare_root_logger(monkeypatch):
    """Call to give the root logger no handlers, as in a fresh process (pytest adds its own only
    after fixtures are set up); handlers and level are restored after the test."""
    root = logging.getLogger()
    level = root.level
    yield lambda: monkeypatch.setattr(root, "handlers", [])
    root.setLevel(level)


def test_log_lines_are_not_glued_onto_progress_bars(monkeypatch, capsys, bare_root_logger):
    from tqdm import tqdm

    def run(command, options):
        bar = tqdm(total=2, desc="prune admm-grad", mininterval=0)
        bar.update()
        logging.getLogger("admm_prune.gpu.engine.pipeline").info("block 0 done")
        bar.update()
        bar.close()
        return {"ok": True}

    monkeypatch.setattr(cli, "_run", run)
    bare_root_logger()
    assert cli.main(["eval", "--model", "x"]) == 0
    err = capsys.readouterr().err
    line = next(seg for seg in re.split(r"[\r\n]", err) if "block 0 done" in seg)
    assert re.match(r"\d\d:\d\d:\d\d INFO admm_prune.gpu.engine.pipeline: block 0 done$", line), repr(err)


@pytest.mark.parametrize("error, expected", [
    (KeyboardInterrupt(), "admm-prune: interrupted\n"),
    (KeyboardInterrupt("blocks 0-3 are kept in runs/x.partial; rerun with --resume"),
     "admm-prune: interrupted; blocks 0-3 are kept in runs/x.partial; rerun with --resume\n"),
])
def test_interrupt_says_what_the_pipeline_says(error, expected, monkeypatch, capsys, bare_root_logger):
    def run(command, options):
        raise error

    monkeypatch.setattr(cli, "_run", run)
    bare_root_logger()
    assert cli.main(["prune", "--out", "runs/x"]) == 130
    captured = capsys.readouterr()
    assert captured.err.endswith(expected) and captured.out == ""


# --- a core install (numpy + scipy, no torch) ------------------------------------------------

@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """A PYTHONPATH entry under which `import torch` fails as it does where torch is not installed."""
    folder = tmp_path_factory.mktemp("no_torch")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    return folder


def _without_torch(args, no_torch):
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(no_torch), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=no_torch)


HINT = "pip install 'admm-prune[gpu]'"


def test_core_install_import_says_what_to_install(no_torch):
    res = _without_torch([sys.executable, "-c", "import admm_prune.reference\n"
                          "try:\n    import admm_prune.gpu\n"
                          "except ImportError as e:\n    print('ImportError:', e)"], no_torch)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ImportError: ") and HINT in res.stdout


@pytest.mark.parametrize("entry", ["module", "script"])
def test_core_install_command_is_one_line(entry, no_torch):
    script = Path(sys.executable).parent / "admm-prune"
    if entry == "script" and not script.is_file():
        pytest.skip(f"no console script at {script} (pip install -e .)")
    command = [sys.executable, "-m", "admm_prune.gpu"] if entry == "module" else [str(script)]
    res = _without_torch(command + ["prune", "--help"], no_torch)
    assert res.returncode != 0 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and HINT in res.stderr, res.stderr
