"""The README cannot rot: its Python blocks run, its commands exist, CI runs its test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

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
                    unknown = [w for w in words if w.startswith("--") and w not in known]
                    assert not unknown, f"`admm-prune {sub}` has no {unknown}"
                    checked += 1
    assert checked >= 4
    assert (ROOT / "scripts" / "quickstart.sh").is_file()
