"""Hardening (#21): broken data files, a tokenizer larger than the model, SIGTERM, flag messages,
a config with fewer layers than the weights. Each user error is one line naming what is wrong
(exit 2 at the CLI); each case here failed differently before its fix (a traceback, a message
naming the wrong line or flag, a silent success)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gzip
import json
import logging
import os
import re
import shutil
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

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.evaluation import evaluate  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402
from admm_prune.gpu.engine import pipeline  # noqa: E402
from admm_prune.gpu.data.corpus import DataError, load_texts  # noqa: E402

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
    from admm_prune.gpu.checkpoint.adapter import adapter

    assert adapter(models.tiny_model("llama")[0]).unused_block_keys(keys) == ["model.layers.10.a", "model.layers.2.a"]
    assert adapter(models.tiny_model("llama", num_hidden_layers=11)[0]).unused_block_keys(keys) == []


def test_streamed_model_warns_about_blocks_the_config_leaves_out(tmp_path, caplog):
    from admm_prune.gpu.checkpoint.sources import StreamedModel

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


# --- one run per output (#21 item 1) ----------------------------------------------------------

def _prune_argv(ck: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(ck), "--calib", str(corpus / "calib.jsonl"), "--eval", "none",
            "--nsamples", "4", "--seqlen", "32", "--iters", "6", "--mask-steps", "4", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def _start_prune(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "admm_prune.gpu", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_staged_block(proc: subprocess.Popen, staging: Path):
    deadline = time.monotonic() + 240
    while not list(staging.glob("block-*.safetensors")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no block staged in time"
        time.sleep(0.05)


def _folder_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _block_sparsity_on_disk(out: Path) -> dict[str, float]:
    """Each saved linear's fraction of zeros, by its name in the report (block, name)."""
    from safetensors import safe_open

    zeros = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", k)
                if m and "norm" not in m[2]:
                    zeros[(int(m[1]), m[2])] = float((f.get_tensor(k) == 0).float().mean())
    return zeros


def test_a_second_run_into_the_same_out_stops_at_once(tmp_path, corpus):
    """Two real processes: while the first is mid-run (stopped with SIGSTOP once a block is
    staged), a second run into its --out exits 2 with one line naming the first (PID, start
    time) and leaves its staging folder alone; the first then finishes, its report matching
    every saved block. Before the lock the second removed the first's staging folder."""
    ck = _save(tmp_path / "ck", num_hidden_layers=24)
    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    first = _start_prune(_prune_argv(ck, corpus, out, "--sparsity", "0.5"))
    try:
        _wait_for_a_staged_block(first, staging)
        first.send_signal(signal.SIGSTOP)
        before = _folder_state(staging)
        for extra in ([], ["--resume", "--overwrite"]):
            second = subprocess.run([sys.executable, "-m", "admm_prune.gpu",
                                     *_prune_argv(ck, corpus, out, "--sparsity", "0.7", *extra)],
                                    cwd=ROOT, capture_output=True, text=True, timeout=240)
            line = _one_line(second.stderr)
            assert second.returncode == cli.EXIT_USER_ERROR and second.stdout == "", second.stderr[-2000:]
            assert re.fullmatch(rf"admm-prune: error: --out {re.escape(str(out))} is being written by another "
                                rf"run \(pid {first.pid} on .+, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d.*", line), line
            assert "choose another --out" in line, line
            assert _folder_state(staging) == before
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sparsity"] == 0.5 and len(report["linears"]) == 24 * 7
    on_disk = _block_sparsity_on_disk(out)
    assert {(r["block"], r["name"]): r["sparsity"] for r in report["linears"]} == on_disk
    assert all(abs(s - 0.5) < 0.01 for s in on_disk.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]  # no staging, no lock file left


def test_a_lock_left_by_a_killed_run_does_not_block_resume(tmp_path, corpus, capsys):
    ck = _save(tmp_path / "ck", num_hidden_layers=24)
    out, staging, lock = tmp_path / "out", tmp_path / ".out.staging", tmp_path / ".out.lock"
    first = _start_prune(_prune_argv(ck, corpus, out))
    try:
        _wait_for_a_staged_block(first, staging)
        first.kill()
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    assert f"pid {first.pid} " in lock.read_text()  # what the killed run left
    code, stdout, err = _cli(_prune_argv(ck, corpus, out, "--resume"), capsys)
    assert code == 0, err
    assert json.loads(stdout)["resumed_blocks"] >= 1
    assert not lock.exists() and not staging.exists() and (out / "report.json").is_file()


def test_the_output_lock_is_exclusive_and_says_who_holds_it(tmp_path):
    from admm_prune.gpu.checkpoint.lock import OutputBusy, OutputLock

    path = tmp_path / ".x.lock"
    held = OutputLock.take(path, "out x")
    with pytest.raises(OutputBusy, match=rf"out x is being written by another run \(pid {os.getpid()} on "):
        OutputLock.take(path, "out x")  # another open file description: refused even in one process
    held.release()
    assert not path.exists()
    OutputLock.take(path, "out x").release()


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_bench_and_eval_refuse_a_prefix_in_use(command, tmp_path, tiny_dir, corpus, capsys, monkeypatch):
    from admm_prune.gpu.checkpoint.lock import OutputLock

    prefix = tmp_path / "runs" / "r"
    prefix.parent.mkdir()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(evaluate, "_evaluate", lambda *a, **k: pytest.fail("work started"))
    held = OutputLock.take(Path(f"{prefix}.lock"), "out r")
    try:
        args = (["bench", "--methods", "wanda", "--settings", "0.5", "--peers", ""] if command == "bench"
                else ["eval"])
        code, out, err = _cli([*args, "--model", str(tiny_dir), "--eval", str(corpus / "eval.txt"),
                               "--device", "cpu", "--no-progress", "--out", str(prefix)], capsys)
    finally:
        held.release()
    line = _one_line(err)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert f"--out {prefix} is being written by another run (pid {os.getpid()} " in line, line
    assert sorted(p.name for p in prefix.parent.iterdir()) == []


# --- a full disk, a file-size limit (#21 item 3) ----------------------------------------------

def _no_room_after(calls: int):
    """A safetensors save_file that writes `calls` files, then finds the disk full."""
    from safetensors.torch import save_file

    seen = []

    def save(tensors, path, metadata=None):
        seen.append(path)
        if len(seen) > calls:
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_file(tensors, path, metadata=metadata)
    return save


def test_a_full_disk_while_staging_is_one_line_and_resume_continues(tmp_path, tiny_dir, corpus, capsys,
                                                                    monkeypatch):
    from admm_prune.gpu.checkpoint import staging as staging_mod

    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    argv = _prune_argv(tiny_dir, corpus, out)
    monkeypatch.setattr(staging_mod, "save_file", _no_room_after(2))  # the rest and block 0, then full
    code, stdout, err = _cli(argv, capsys)
    line = err.strip().splitlines()[-1]
    assert code == cli.EXIT_USER_ERROR and stdout == "", err
    assert line.startswith(f"admm-prune: error: could not write {staging / 'block-00001.safetensors'}: "
                           f"No space left on device; this run needs about "), line
    assert re.search(rf"about 0\.\d\d MB free in {re.escape(str(tmp_path))} \(the staged blocks plus the final "
                     rf"copy; [\d.]+ [MG]B free now\)", line), line
    assert line.endswith(f"free some space; {out} untouched; 1 finished blocks kept in {staging}: rerun the same "
                         f"command with --resume to continue"), line
    assert "Traceback" not in err and sorted(p.name for p in staging.iterdir()) == [
        "block-00000.safetensors", "manifest.json", "rest.safetensors"]  # no half file
    monkeypatch.undo()
    code, stdout, err = _cli([*argv, "--resume"], capsys)
    assert code == 0 and json.loads(stdout)["resumed_blocks"] == 1, err


def test_too_little_free_space_is_a_warning_before_the_first_block(tmp_path, tiny_dir, corpus, caplog,
                                                                   monkeypatch):
    from admm_prune.gpu.checkpoint import diskspace

    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: usage)
    cfg = pipeline.PruneConfig(model=str(tiny_dir), calib=str(corpus / "calib.jsonl"), eval=None, nsamples=2,
                               seqlen=16, device="cpu", progress=False, out=str(tmp_path / "out"))
    with caplog.at_level(logging.INFO):
        pipeline.run_prune(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("only 0.00 MB free in ") and "writes about 0.86 MB there" in m for m in warnings), warnings
    first_block = next(i for i, r in enumerate(caplog.records) if r.getMessage().startswith("block 0:"))
    assert any(r.getMessage().startswith("only ") for r in caplog.records[:first_block])


@pytest.mark.parametrize("limit, where", [(140_000, "block-00000.safetensors"), (400_000, "the checkpoint in ")])
def test_a_file_size_limit_is_one_line_and_resume_continues(limit, where, tmp_path, tiny_dir, corpus, capsys):
    """RLIMIT_FSIZE in a real process (EFBIG): a block file (140 kB: safetensors' own error) or
    the final checkpoint (400 kB: the assembly's copy) larger than the limit."""
    import resource

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "admm_prune.gpu", *_prune_argv(tiny_dir, corpus, out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = run.stderr.strip().splitlines()[-1]
    assert run.returncode == cli.EXIT_USER_ERROR, run.stderr[-2000:]
    assert line.startswith(f"admm-prune: error: could not write ") and where in line, line
    assert "File too large; this run needs about " in line and "raise the file-size limit (ulimit -f" in line, line
    assert line.endswith("--resume to continue"), line
    assert "Traceback" not in run.stderr
    code, stdout, err = _cli([*argv[3:], "--resume"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["resumed_blocks"] == (2 if limit > 200_000 else 0)


# --- a symlink as --out (#21 item 4) ----------------------------------------------------------

def _quick_cfg(tiny_dir, corpus, out, **kw):
    return pipeline.PruneConfig(model=str(tiny_dir), calib=str(corpus / "calib.jsonl"), eval=None, nsamples=2,
                                seqlen=16, device="cpu", progress=False, out=str(out), **kw)


def _everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.parent == folder or p.is_dir())


def test_a_dangling_symlink_as_out_is_written_through(tmp_path, tiny_dir, corpus, caplog):
    """Before: the checkpoint was staged beside the link and renamed onto it at the end (ENOTDIR)."""
    target, link = tmp_path / "disk" / "pruned", tmp_path / "link"
    link.symlink_to(target)
    with caplog.at_level(logging.INFO):
        pipeline.run_prune(_quick_cfg(tiny_dir, corpus, link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "report.json").is_file() and (target / "model.safetensors").is_file()
    assert _everything_under(tmp_path) == ["disk", "disk/pruned", "link"]
    assert f"out {link} is a symlink to {target}: writing through to it" in caplog.text


def test_overwrite_of_a_symlinked_out_replaces_its_target_and_leaves_nothing_behind(tmp_path, tiny_dir, corpus,
                                                                                    caplog):
    """Before: the link itself was moved to .link.old-PID (and left there), a folder put in its place."""
    target, link = tmp_path / "disk" / "pruned", tmp_path / "link"
    pipeline.run_prune(_quick_cfg(tiny_dir, corpus, target))
    link.symlink_to(target)
    with caplog.at_level(logging.INFO):
        pipeline.run_prune(_quick_cfg(tiny_dir, corpus, link, sparsity=0.6, overwrite=True))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads((target / "report.json").read_text())["config"]["sparsity"] == 0.6
    assert _everything_under(tmp_path) == ["disk", "disk/pruned", "link"]  # no .NAME.old-PID, no staging
    assert f"out {link} is a symlink to {target}: writing through to it (replacing what is there)" in caplog.text
    assert f"replaced the earlier contents of {target}" in caplog.text


def test_a_symlink_loop_as_out_is_one_line_before_any_work(tmp_path, tiny_dir, corpus, capsys, monkeypatch):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: pytest.fail("work started"))
    code, out, err = _cli(_prune_argv(tiny_dir, corpus, tmp_path / "a"), capsys)
    line = _one_line(err)
    assert code == cli.EXIT_USER_ERROR and f"--out {tmp_path / 'a'} is a symlink that does not resolve" in line, line


# --- smaller items (#21 item 8) ---------------------------------------------------------------

def test_num_blocks_above_the_depth_is_one_line_naming_both(tmp_path, tiny_dir, corpus, capsys):
    code, out, err = _cli([*_prune_argv(tiny_dir, corpus, tmp_path / "out"), "--num-blocks", "5"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert line == "admm-prune: error: --num-blocks 5 exceeds the 2 decoder blocks of the model", line
    assert list(tmp_path.iterdir()) == []


def test_owl_settings_with_the_uniform_profile_are_a_warning(tmp_path, tiny_dir, corpus, caplog, monkeypatch):
    from admm_prune.gpu.bench import bench

    cfg = _quick_cfg(tiny_dir, corpus, tmp_path / "out", owl_lambda=0.1)
    with caplog.at_level(logging.WARNING):
        pipeline.run_prune(cfg)
        pipeline.run_prune(dataclasses.replace(cfg, owl_lambda=0.1, sparsity_profile="owl", overwrite=True))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "owl_lambda set but unused: only sparsity_profile owl reads it"]
    caplog.clear()

    class Stop(Exception):
        pass

    monkeypatch.setattr(bench.models_mod, "load_model", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    for methods, warned in [(("wanda", "admm"), True), (("wanda", "admm+owl"), False)]:
        with caplog.at_level(logging.WARNING), pytest.raises(Stop):
            bench.run_bench(bench.BenchConfig(methods=methods, owl_m=3.0, owl_lambda=0.1, settings=("0.5",)))
        messages = [r.getMessage() for r in caplog.records]
        assert messages == (["owl_m and owl_lambda set but unused: only +owl variants read them"] if warned else [])
        caplog.clear()


def test_an_error_resume_cannot_cure_does_not_suggest_resume(tmp_path, tiny_dir, corpus, caplog, monkeypatch):
    """A ModelError at block 1 (a tensor that cannot be read): the staged block stays, and the
    message says resuming will not get past it; an interruption at the same place says --resume."""
    from admm_prune.gpu.checkpoint import sources

    block = sources.StreamedModel.block
    out, staging = tmp_path / "out", tmp_path / ".out.staging"

    def failing(error):
        def patched(self, i, tensors=None):
            if i == 1:
                raise error
            return block(self, i, tensors)
        return patched

    monkeypatch.setattr(sources.StreamedModel, "block", failing(models.ModelError("x: tensor y cannot be read")))
    with caplog.at_level(logging.INFO), pytest.raises(models.ModelError):
        pipeline.run_prune(_quick_cfg(tiny_dir, corpus, out))
    assert "--resume" not in caplog.text and "to continue" not in caplog.text, caplog.text
    assert f"1 finished blocks kept in {staging}; resuming cannot get past this error" in caplog.text
    monkeypatch.setattr(sources.StreamedModel, "block", failing(KeyboardInterrupt()))
    with pytest.raises(pipeline.RunInterrupted, match="rerun the same command with --resume to continue"):
        pipeline.run_prune(_quick_cfg(tiny_dir, corpus, out))


def test_a_tensor_missing_from_the_checkpoint_is_found_before_any_work(tmp_path, tiny_dir, corpus, capsys):
    from safetensors.torch import load_file, save_file

    ck = shutil.copytree(tiny_dir, tmp_path / "ck")
    tensors = load_file(ck / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    code, out, err = _cli(_prune_argv(ck, corpus, tmp_path / "out"), capsys)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert _one_line(err) == (f"admm-prune: error: {ck}: 1 tensors missing from the checkpoint: "
                              f"model.layers.1.mlp.up_proj.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_bf16_checkpoint_is_pruned_and_saved_in_bf16_by_default(tmp_path, corpus):
    from safetensors import safe_open

    model, tok = models.tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ck")
    tok.save_pretrained(tmp_path / "ck")
    assert models.checkpoint_dtype(tmp_path / "ck") == torch.bfloat16
    for dtype, expected in [(None, "BF16"), ("float32", "F32")]:
        out = tmp_path / f"out-{dtype}"
        report = pipeline.run_prune(_quick_cfg(tmp_path / "ck", corpus, out, dtype=dtype))
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert set(stored.values()) == {expected}
        assert report.model["dtype"] == {"BF16": "bfloat16", "F32": "float32"}[expected]
        assert json.loads((out / "config.json").read_text())["dtype"] == report.model["dtype"]
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert abs((tmp_path / "out-None" / "model.safetensors").stat().st_size - size) < 0.01 * size


# --- methods without mask steps take any --iters (#21 item 2) ----------------------------------

def _quick_argv(tiny_dir, corpus, *extra):
    return ["prune", "--model", str(tiny_dir), "--calib", str(corpus / "calib.jsonl"), "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_prune_with_few_iters_prunes_methods_without_mask_steps(method, tiny_dir, corpus, capsys):
    code, out, err = _cli(_quick_argv(tiny_dir, corpus, "--method", method, "--iters", "3"), capsys)
    assert code == 0, err
    assert abs(json.loads(out)["mean_sparsity"] - 0.5) < 0.01


def test_bench_with_few_iters_runs_methods_without_mask_steps(tiny_dir, corpus, capsys):
    """Before: the bench checked --mask-steps 15 against --iters 3 for admm-grad, a method it was not asked to run."""
    code, out, err = _cli(["bench", "--model", str(tiny_dir), "--methods", "wanda,sparsegpt,admm", "--iters", "3",
                           "--settings", "0.5", "--peers", "", "--calib", str(corpus / "calib.jsonl"),
                           "--nsamples", "2", "--seqlen", "16", "--eval", str(corpus / "eval.txt"),
                           "--eval-seqlen", "16", "--eval-windows", "2", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| 0 | 0.5 | admm-prune |")]
    assert [row.split(" | ")[3] for row in rows] == ["wanda", "sparsegpt", "admm"], out


@pytest.mark.parametrize("command", ["prune", "bench"])
def test_admm_grad_with_iters_below_the_mask_steps_is_one_line(command, tiny_dir, corpus, capsys):
    args = _quick_argv(tiny_dir, corpus) if command == "prune" else ["bench", "--methods", "wanda,admm-grad+polish2"]
    code, out, err = _cli([*args, "--iters", "3"], capsys)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert _one_line(err) == ("admm-prune: error: --mask-steps must be an integer in [0, --iters=3], got 15 "
                              "(--mask-steps defaults to 15: lower it with --iters)")


# --- bench checks like prune (#21 item 7) -----------------------------------------------------

@pytest.mark.parametrize("flags, said", [
    (["--nsamples", "0"], "--nsamples must be a positive integer, got 0"),
    (["--seqlen", "0"], "--seqlen must be an integer >= 2, got 0"),
    (["--iters", "0"], "--iters must be an integer >= 1, got 0"),
    (["--owl-lambda", "nan"], "--owl-lambda must be a finite number >= 0, got nan"),
    (["--methods", ""], "--methods is empty; name at least one, e.g. admm-grad"),
    (["--settings", ""], "--settings is empty; name at least one, e.g. 0.5 or 2:4"),
    (["--methods", "magnitude+polish3"], "--polish-iters needs a method that sees inputs; magnitude reads only "
                                         "the weights"),
])
def test_bench_refuses_bad_settings_in_one_line_before_any_work(flags, said, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("work started"))
    code, out, err = _cli(["bench", *flags, "--device", "cpu", "--no-progress"], capsys)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert _one_line(err) == f"admm-prune: error: {said}"


@pytest.mark.parametrize("how", ["chmod", "simulated"])
def test_bench_out_in_a_read_only_folder_is_one_line_before_any_work(how, tmp_path, capsys, monkeypatch):
    """chmod: a real read-only folder (root writes into it anyway: skipped as root); simulated:
    the folder as a non-root user sees it, through os.access."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root can write into a read-only folder")
        folder.chmod(0o555)
    else:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != folder and real(p, mode, **k))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("work started"))
    try:
        code, out, err = _cli(["bench", "--device", "cpu", "--no-progress", "--out", str(folder / "bench")], capsys)
    finally:
        folder.chmod(0o755)
    assert code == cli.EXIT_USER_ERROR and out == "", err
    assert _one_line(err) == f"admm-prune: error: --out {folder / 'bench'}: cannot write to {folder}"
    assert list(folder.iterdir()) == []
