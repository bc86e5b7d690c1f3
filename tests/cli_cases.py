"""What the hardening tests of round 4 (#28) share: a tiny saved model, a corpus, the CLI run
in-process, and the one error line it prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from synth import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from admm_prune.gpu.checkpoint import models

    folder = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = models.tiny_model("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_cli(args, capsys):
    """`admm-prune ARGS` in this process: (exit status, stdout, stderr)."""
    from admm_prune.gpu import cli

    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one line the CLI says about an error (log lines before it aside): the last line, and
    the only one that is not a log record."""
    lines = [line for line in err.strip().splitlines() if not is_log_line(line)]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


def is_log_line(line: str) -> bool:
    return " INFO " in line or " WARNING " in line or line.startswith("Cholesky of ")  # the retries' warnings


def prune_argv(ck: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """A prune of the first block of `ck` on two windows of 16 tokens, no evaluation."""
    return ["prune", "--model", str(ck), "--calib", str(corpus / "calib.jsonl"), "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--num-blocks", "1", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]
