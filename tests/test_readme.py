"""The README cannot rot: its Python blocks run, its commands exist, CI runs its test command."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_blocks_run():
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command():
    test_cmd = [b.strip() for b in _blocks("bash") if "pytest" in b]
    assert len(test_cmd) == 1
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd[0] in ci_lines, "CI must run exactly the README's test command"


def test_cli_flags_in_readme_exist():
    from admm_prune.gpu.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    checked = 0
    quickstart = (ROOT / "scripts" / "quickstart.sh").read_text()
    for block in _blocks("bash") + [quickstart]:
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith(("#", "echo")):
                continue
            words = shlex.split(line.split(" # ")[0])
            for entry in ("admm-prune", "admm_prune.gpu"):
                if entry in words and len(words) > words.index(entry) + 1:
                    sub = words[words.index(entry) + 1]
                    assert sub in subparsers, f"README uses unknown subcommand {sub!r}"
                    known = {o for a in subparsers[sub]._actions for o in a.option_strings}
                    unknown = [w for w in words[words.index(entry):] if w.startswith("--") and w not in known]
                    assert not unknown, f"`admm-prune {sub}` has no {unknown}"
                    checked += 1
    assert checked >= 4
    assert (ROOT / "scripts" / "quickstart.sh").is_file()


# --- the README's commands, typed into a new shell ------------------------------------------

QUICKSTART = (ROOT / "scripts" / "quickstart.sh").read_text()
# Programs that exist only inside the environment scripts/quickstart.sh makes (.venv).
ENV_PROGRAMS = {"python", "python3", "pytest", "pip", "pip3", "jupytext", "admm-prune"}


def _shell_commands(text: str) -> list[list[list[str]]]:
    """The shell code blocks of a markdown text, each as its commands (word lists), comments dropped."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [[words for line in block.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]
            for block in blocks]


def _program(words: list[str]) -> str:
    """The program a command runs, past its leading VAR=value assignments."""
    return next(w for w in words if not re.fullmatch(r"[A-Za-z_]\w*=.*", w))


@pytest.mark.parametrize("doc", ["README.md", "tutorial/README.md"])
def test_commands_work_in_a_new_shell(doc):
    """Each code block may be typed into a fresh shell, where no environment is active: a program
    installed in .venv is called by its path, or the block activates .venv before using it."""
    assert "python3 -m venv .venv" in QUICKSTART and "source .venv/bin/activate" in QUICKSTART
    checked = 0
    for block in _shell_commands((ROOT / doc).read_text()):
        active = False
        for words in block:
            if words[:2] == ["source", ".venv/bin/activate"]:
                active = True
                continue
            program = _program(words)
            if program in ENV_PROGRAMS and words[1:3] != ["-m", "venv"]:
                assert active, (f"{doc}: `{' '.join(words)}` fails in a new shell (no environment active); "
                                f"write .venv/bin/{program}, or `source .venv/bin/activate` first in the block")
            checked += program.startswith(".venv/bin/")
    assert checked >= 1


def _ci_exports() -> dict[str, str]:
    """The constant environment variables .ci/run exports before the test command."""
    exports = {}
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if line.startswith("export "):
            exports.update(w.split("=", 1) for w in shlex.split(line)[1:])
    return {name: value for name, value in exports.items() if "$" not in value}


def test_tests_run_in_the_ci_environment():
    """What .ci/run exports (offline flags, no plot windows) holds in a run from a plain shell too."""
    exports = _ci_exports()
    assert {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MPLBACKEND"} <= set(exports)
    assert {name: os.environ.get(name) for name in exports} == exports


def test_readme_test_command_runs_in_a_new_shell():
    """The README's test command, run by bash with no environment active and none of CI's variables."""
    if not (ROOT / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv here (scripts/quickstart.sh or .ci/run makes it)")
    test_cmd = next(words for block in _shell_commands(README) for words in block if "pytest" in words)
    venv_bin = str(ROOT / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in _ci_exports() and k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("PYTEST")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != venv_bin)
    args = ["-q", "-p", "no:cacheprovider", "tests/test_readme.py::test_tests_run_in_the_ci_environment"]
    res = subprocess.run(["bash", "-c", shlex.join(test_cmd + args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "1 passed" in res.stdout


def test_tutorial_notebook_command_executes(tmp_path):
    """tutorial/README.md's `jupytext --execute` works with what the `tutorial` extra installs."""
    jupytext = Path(sys.executable).parent / "jupytext"
    if not jupytext.is_file():
        pytest.skip("jupytext not installed next to this interpreter (extra `tutorial`)")
    command = next(words for block in _shell_commands((ROOT / "tutorial" / "README.md").read_text())
                   for words in block if "--execute" in words)
    assert Path(command[0]).name == "jupytext"
    for chapter in ("common.py", "01_layerwise_problem.py"):
        shutil.copy(ROOT / "tutorial" / chapter, tmp_path)
    args = [str(tmp_path / Path(w).name) if w.startswith("tutorial/") else w for w in command[1:]]
    env = dict(os.environ, ADMM_TUTORIAL_FAST="1", ADMM_TUTORIAL_OUT=str(tmp_path / "out"))
    res = subprocess.run([str(jupytext), *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "01_layerwise_problem.ipynb").is_file()
