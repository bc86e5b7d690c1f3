"""Hardening (#21): broken data files, a tokenizer larger than the model, SIGTERM, flag messages,
a config with fewer layers than the weights. Each user error is one line naming what is wrong
(exit 2 at the CLI); each case here failed differently before its fix (a traceback, a message
naming the wrong line or flag, a silent success)."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synth import write_corpus

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from admm_prune.gpu import cli, evaluate, models, pipeline  # noqa: E402
from admm_prune.gpu.data import DataError, load_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


def _save(folder: Path, **overrides) -> Path:
    model, tok = models.tiny_model("llama", **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny") / "model")


def _cli(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- data files ------------------------------------------------------------------------------

def _gzip_cut(path: Path):
    path.write_bytes(gzip.compress(b'{"text": "some words"}\n' * 200)[:60])


def _gzip_flipped(path: Path):
    data = bytearray(gzip.compress(json.dumps({"text": "abc " * 300}).encode() + b"\n"))
    data[len(data) // 2] ^= 0xFF  # a CRC or an inflate error, not a clean end
    path.write_bytes(bytes(data))


def _parquet_cut(path: Path):
    pq.write_table(pa.table({"text": ["a" * 500, "b"]}), path)
    path.write_bytes(path.read_bytes()[:200])


BROKEN_FILES = [
    ("null.parquet", lambda p: pq.write_table(pa.table({"text": ["a", None, "b"]}), p), r"row 1\b.*null"),
    ("ints.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p), r"row 0\b.*of type int"),
    ("garbage.parquet", lambda p: p.write_bytes(b"PAR1 not really a parquet file"), "not a readable parquet"),
    ("cut.parquet", _parquet_cut, "not a readable parquet"),
    ("cut.jsonl.gz", _gzip_cut, "not a readable gzip"),
    ("flipped.jsonl.gz", _gzip_flipped, "not a readable gzip"),
    ("plain.jsonl.gz", lambda p: p.write_text('{"text": "not compressed"}\n'), "not a readable gzip"),
    ("broken.jsonl", lambda p: p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n'),
     r"line 4: .*column 10"),
    ("notext.jsonl", lambda p: p.write_text('{"text": "a"}\n\n{"body": "b"}\n'), r"line 3 has no string 'text'"),
]


@pytest.mark.parametrize("name, write, message", BROKEN_FILES, ids=[b[0] for b in BROKEN_FILES])
def test_broken_data_file_is_one_line_naming_file_and_place(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError, match=message) as error:
        load_texts(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value), error.value


def test_broken_json_line_in_a_gzip_file_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n'))
    with pytest.raises(DataError, match=r"line 3: "):
        load_texts(path)


def test_json_lines_are_split_on_newlines_only(tmp_path):
    """U+2028 and friends are legal inside a JSON string; str.splitlines() cut records there."""
    texts = ["one\u2028two", "three\x85four\x0cfive"]
    path = tmp_path / "d.jsonl"
    path.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts), encoding="utf-8")
    assert load_texts(path) == texts


def test_json_list_error_keeps_the_file_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},\n {"text": "b"},\n {oops}]')
    with pytest.raises(DataError, match=r"line 3 column 3"):
        load_texts(path)


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_cli_broken_parquet_exits_2_with_one_line(command, tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), bad)
    args = (["prune", "--calib", str(bad), "--eval", "none", "--nsamples", "2", "--seqlen", "16"]
            if command == "prune" else ["eval", "--eval", str(bad), "--seqlen", "16"])
    code, out, err = _cli([*args, "--model", str(tiny_dir), "--device", "cpu", "--no-progress"], capsys)
    line = _one_line(err)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert str(bad) in line and "row 1" in line, line


# --- offline hints name the flag the command has ----------------------------------------------

def _flags_of(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("args, flag", [
    (["eval", "--eval", "wikitext2"], "--eval"),
    (["prune", "--calib", "CALIB", "--nsamples", "2"], "--eval"),  # --eval wikitext2 is the default
    (["prune", "--calib", "c4", "--eval", "none", "--nsamples", "2"], "--calib"),
])
def test_offline_hub_hint_names_the_flag_that_asked(args, flag, tiny_dir, corpus, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = [str(corpus / "calib.jsonl") if a == "CALIB" else a for a in args]
    code, _, err = _cli([*args, "--model", str(tiny_dir), "--seqlen", "16", "--device", "cpu", "--no-progress"],
                        capsys)
    line = _one_line(err)
    assert code == cli.EXIT_USER_ERROR and "unreachable" in line, line
    suggested = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    assert flag in suggested and suggested <= _flags_of(args[0]), line
    assert f"e.g. {flag} " in line, line


def test_hub_hint_of_the_library_names_no_flag(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="wikitext2: the dataset hub is unreachable") as error:
        load_texts("wikitext2")
    assert "--" not in str(error.value)


def test_naming_keeps_a_message_that_names_the_file(tmp_path):
    path = tmp_path / "x.jsonl"
    with pytest.raises(DataError) as error, evaluate.naming("--eval", str(path)):
        load_texts(path)
    assert str(error.value).count(str(path)) == 1


# --- tokenizer larger than the embedding ------------------------------------------------------

@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    """The tiny tokenizer has 259 tokens; this model's embedding has 200 rows."""
    return _save(tmp_path_factory.mktemp("small-vocab") / "model", vocab_size=200)


def test_check_tokenizer_fits():
    model, tok = models.tiny_model("llama")
    models.check_tokenizer_fits(model, tok)
    models.check_tokenizer_fits(model, None)
    small, _ = models.tiny_model("llama", vocab_size=200)
    with pytest.raises(models.ModelError, match=r"259 tokens.*200 rows"):
        models.check_tokenizer_fits(small, tok)


def test_prune_refuses_a_tokenizer_larger_than_the_embedding(small_vocab_dir, corpus, tmp_path):
    cfg = pipeline.PruneConfig(model=str(small_vocab_dir), calib=str(corpus / "calib.jsonl"), eval=None,
                               nsamples=2, seqlen=16, device="cpu", progress=False, out=str(tmp_path / "out"))
    with pytest.raises(models.ModelError, match=r"259 tokens.*200 rows"):
        pipeline.run_prune(cfg)
    assert list(tmp_path.iterdir()) == []
    model, tok = models.tiny_model("llama", vocab_size=200)  # in memory: the same check
    with pytest.raises(models.ModelError, match=r"259 tokens.*200 rows"):
        pipeline.run_prune(dataclasses.replace(cfg, model=None, out=None), model=model, tokenizer=tok)


def test_cli_eval_refuses_a_tokenizer_larger_than_the_embedding(small_vocab_dir, corpus, capsys):
    code, out, err = _cli(["eval", "--model", str(small_vocab_dir), "--eval", str(corpus / "eval.txt"),
                           "--seqlen", "16", "--device", "cpu", "--no-progress"], capsys)
    line = _one_line(err)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert "259" in line and "200" in line, line


# --- a config with fewer layers than the weights ----------------------------------------------

def test_unused_block_keys():
    keys = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.1.a", "model.layers.1.b",
            "model.layers.10.a", "model.layers.2.a", "lm_head.weight"]
    assert models.unused_block_keys(keys, 2) == ["model.layers.10.a", "model.layers.2.a"]
    assert models.unused_block_keys(keys, 11) == []


def test_streamed_model_warns_about_blocks_the_config_leaves_out(tmp_path, caplog):
    from admm_prune.gpu.sources import StreamedModel

    path = _save(tmp_path / "model", num_hidden_layers=3)
    StreamedModel(path, torch.float32)
    assert "unused" not in caplog.text
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        source = StreamedModel(path, torch.float32)
    assert source.num_blocks == 2
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("9 tensors" in m and "1 block" in m and "num_hidden_layers=2" in m for m in warning), warning


# --- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["prune", "--sparsity", "50%"], "--sparsity"),
    (["prune", "--damp", "a lot"], "--damp"),
    (["prune", "--eval-windows", "x"], "--eval-windows"),
    (["eval", "--limit", "1.5"], "--limit"),
])
def test_bad_optional_number_names_the_flag_not_a_function(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    line = _one_line(capsys.readouterr().err)
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    assert flag in line and "_optional" not in line and repr(argv[-1]) in line, line


def test_sparsity_message_says_what_is_expected(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "--sparsity", "50%"])
    assert "such as 0.5" in capsys.readouterr().err


# --- SIGTERM is an interrupt ------------------------------------------------------------------

def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, corpus):
    """A real process: SIGTERM once a block is staged; exit 130, the interrupt line, staging kept."""
    ck = _save(tmp_path / "ck", num_hidden_layers=40)
    out = tmp_path / "out"
    staging = tmp_path / ".out.staging"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "admm_prune.gpu", "prune", "--model", str(ck), "--calib", str(corpus / "calib.jsonl"),
         "--eval", "none", "--nsamples", "4", "--seqlen", "32", "--iters", "6", "--mask-steps", "4",
         "--device", "cpu", "--no-progress", "--out", str(out)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(staging.glob("block-*.safetensors")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no block staged in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr[-2000:]
    assert stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("admm-prune: interrupted; ") and str(staging) in last and "--resume" in last, stderr[-2000:]
    assert "Traceback" not in stderr
    assert list(staging.glob("block-*.safetensors")) and not out.exists()


@pytest.fixture
def sigterm_fails_the_test():
    """Without cli.main's own handler a SIGTERM sent here would end pytest itself."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the handler installed before cli.main")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_handler_is_restored_after_main(monkeypatch, capsys, sigterm_fails_the_test):
    seen = []
    monkeypatch.setattr(cli, "_run", lambda command, options: seen.append(signal.getsignal(signal.SIGTERM)) or {})
    assert cli.main(["eval", "--eval", "none", "--tasks", "rte", "--task-data", "x"]) == 0
    assert seen[0] is not sigterm_fails_the_test, "a handler of its own while the command runs"
    assert signal.getsignal(signal.SIGTERM) is sigterm_fails_the_test


def test_sigterm_during_a_command_is_a_keyboard_interrupt(monkeypatch, capsys, sigterm_fails_the_test):
    def run(command, options):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return {"ok": True}

    monkeypatch.setattr(cli, "_run", run)
    start = time.monotonic()
    code = cli.main(["eval", "--eval", "none", "--tasks", "rte", "--task-data", "x"])
    assert code == cli.EXIT_INTERRUPTED and time.monotonic() - start < 4
    assert capsys.readouterr().err == "admm-prune: interrupted\n"
