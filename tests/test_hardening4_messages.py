"""Hardening round 4 (#28, items 6, 9, 11, 16, 17, 19, 20 and the flag-naming helper): flag-named
messages and warnings, regexes with commas, devices this machine lacks, data errors, help and the
bench's markdown. Each test failed before its fix (a traceback, a field name where a flag belongs,
a silent success); each user error is one line, exit 2, naming the flag. Files, locks and runs:
tests/test_hardening4_files.py."""

from __future__ import annotations

import argparse
import logging

import pytest
from cli_cases import corpus, tiny_dir  # noqa: F401 (fixtures)
from cli_cases import error_line as _error_line
from cli_cases import prune_argv as _prune_argv
from cli_cases import run_cli as _cli

torch = pytest.importorskip("torch")

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


# --- one helper: field names said as flags, in errors and in unused-setting warnings ----------

@pytest.mark.parametrize("command, message, said", [
    # a switch is named by its positive form (before: --no-layer-errors, which turns it off)
    ("prune", "layer_errors needs calibration inputs; magnitude reads only the weights",
     "--layer-errors needs calibration inputs; magnitude reads only the weights"),
    # quoted text is the user's value or another library's words (before: "--device string")
    ("prune", "device 'x' is not valid: \"expected a device string\"",
     "--device 'x' is not valid: \"expected a device string\""),
    ("prune", "out x\nholds y", "--out x holds y"),  # one line
    ("prune", "the model's limit of 8 positions; lower seqlen", "the model's limit of 8 positions; lower --seqlen"),
])
def test_flag_names(command, message, said):
    assert cli.flag_names(message, _subparser(command)) == said


def test_layer_errors_with_magnitude_names_the_flag_that_was_given(capsys, tmp_path):
    code, _, err = _cli(["prune", "--method", "magnitude", "--layer-errors", "--out", str(tmp_path / "o")], capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == ("admm-prune: error: --layer-errors needs calibration inputs; magnitude reads only "
                                "the weights")


UNUSED = [
    (["--reconstruct-steps", "0", "--reconstruct-lr", "0.05", "--reconstruct-batch", "4"],
     "--reconstruct-lr and --reconstruct-batch set but unused: only --reconstruct-steps > 0 reads them"),
    (["--method", "sparsegpt", "--mask-steps", "3"],
     "--mask-steps set but unused: --method sparsegpt keeps its first mask, so nothing reads it"),
    (["--polish-damp", "0.2"], "--polish-damp set but unused: only --polish-iters > 0 reads it"),
    (["--eval-seqlen", "32"],
     "--eval-seqlen set but unused: --eval none reads no perplexity data, so nothing reads it"),
    (["--owl-m", "3"], "--owl-m set but unused: only --sparsity-profile owl reads it"),
    (["--alps-iters", "50", "--alps-rho", "0.2"],
     "--alps-rho and --alps-iters set but unused: only --method alps reads them"),
]


@pytest.mark.parametrize("extra, warning", UNUSED, ids=[u[0][0] for u in UNUSED])
def test_a_flag_set_but_unused_is_a_warning_naming_the_flag(extra, warning, tiny_dir, corpus, tmp_path, capsys,
                                                            caplog):
    with caplog.at_level(logging.WARNING):
        code, out, err = _cli(_prune_argv(tiny_dir, corpus, tmp_path / "out", *extra), capsys)
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]


def test_the_library_warns_in_field_names(tiny_dir, corpus, tmp_path, caplog):
    from admm_prune.gpu.engine import pipeline

    cfg = pipeline.PruneConfig(model=str(tiny_dir), calib=str(corpus / "calib.jsonl"), eval=None, nsamples=2,
                               seqlen=16, num_blocks=1, device="cpu", progress=False, out=str(tmp_path / "o"),
                               polish_damp=0.3)
    with caplog.at_level(logging.WARNING):
        pipeline.run_prune(cfg)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "polish_damp set but unused: only polish_iters > 0 reads it"]


BENCH_UNUSED = [
    (["--methods", "wanda,admm-grad", "--reconstruct-steps", "4"],
     ["--reconstruct-steps set but unused: only +reconstruct variants (without their own K) read it"]),
    (["--methods", "wanda,admm-grad+reconstruct4", "--reconstruct-steps", "4"],
     ["--reconstruct-steps set but unused: only +reconstruct variants (without their own K) read it"]),
    (["--methods", "wanda,admm-grad+reconstruct", "--reconstruct-steps", "4", "--reconstruct-lr", "0.1"], []),
    (["--methods", "wanda,admm-grad", "--reconstruct-lr", "0.1"],
     ["--reconstruct-lr set but unused: only +reconstruct variants read it"]),
    (["--methods", "sparsegpt,admm-grad+iters10", "--mask-steps", "3"],
     ["--mask-steps set but unused: no variant that re-selects its mask without +itersK reads it"]),
    (["--methods", "sparsegpt", "--polish-damp", "0.3"],
     ["--polish-damp set but unused: only +polishK variants read it"]),
    (["--methods", "wanda,admm-grad", "--alps-pcg-iters", "3"],
     ["--alps-pcg-iters set but unused: only alps variants read it"]),
    (["--methods", "alps", "--alps-pcg-iters", "3"], []),
    (["--methods", "sparsegpt+polish2", "--polish-damp", "0.3"], []),
    (["--methods", "wanda", "--owl-m", "3", "--owl-lambda", "0.1"],
     ["--owl-m and --owl-lambda set but unused: only +owl variants read them"]),
]


@pytest.mark.parametrize("extra, warnings", BENCH_UNUSED)
def test_bench_warns_of_flags_no_variant_reads(extra, warnings, monkeypatch, caplog):
    from admm_prune.gpu.bench import bench

    class Stop(Exception):
        pass

    monkeypatch.setattr(bench.models_mod, "load_model", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        cli.main(["bench", "--settings", "0.5", "--device", "cpu", "--no-progress", *extra])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == warnings


def test_bench_help_names_every_variant_and_what_reconstruct_steps_tunes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "+reconstruct[K]" in text
    assert "--reconstruct-steps N Adam steps of the block reconstruction of the +reconstruct variants" in text


# --- item 9: a device this machine cannot run -------------------------------------------------

def _available(device_type: str) -> bool:
    backend = torch.backends.mps if device_type == "mps" else getattr(torch, device_type, None)
    return backend is not None and backend.is_available()


@pytest.mark.parametrize("device, said", [
    ("meta", "--device 'meta' cannot run a model here; choose one of cpu, cuda, mps, xpu"),
    ("foo", "--device 'foo' is not one torch knows; e.g. cpu, cuda or cuda:1"),
    *[(d, f"--device '{d}' requested, but {d.upper()} is not available on this machine (or in this torch build)")
      for d in ("mps", "xpu", "cuda") if not _available(d)],
])
@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_a_device_this_machine_lacks_is_one_line(command, device, said, tiny_dir, tmp_path, capsys):
    code, out, err = _cli([command, "--model", str(tiny_dir), "--device", device, "--out", str(tmp_path / "o")],
                          capsys)
    assert code == cli.EXIT_USER_ERROR and out == ""
    assert _error_line(err).startswith(f"admm-prune: error: {said}"), err
    assert list(tmp_path.iterdir()) == []


# --- item 6: a comma inside a --targets/--ignore regex --------------------------------------

@pytest.mark.parametrize("text, regexes", [
    ("o_proj|down_pro{1,1}j", ("o_proj|down_pro{1,1}j",)),
    ("o_proj, down_proj", ("o_proj", "down_proj")),
    (r"mlp\.(gate|up)_proj,q_pro[j,x]", (r"mlp\.(gate|up)_proj", "q_pro[j,x]")),
    (r"o_proj\,x,v_proj", (r"o_proj\,x", "v_proj")),
    ("[(],o_proj", ("[(]", "o_proj")),
])
@pytest.mark.parametrize("flag", ["--targets", "--ignore"])
def test_a_comma_inside_a_regex_does_not_split_it(flag, text, regexes):
    args = cli.build_parser().parse_args(["prune", flag, text])
    assert getattr(args, flag[2:]) == regexes


def test_ignore_with_a_counted_repeat_leaves_down_proj_dense(tiny_dir, corpus, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    code, _, err = _cli(_prune_argv(tiny_dir, corpus, out, "--ignore", "o_proj|down_pro{1,1}j"), capsys)
    assert code == 0, err
    weights = load_file(out / "model.safetensors")
    fraction = {name: float((w == 0).float().mean()) for name, w in weights.items() if name.startswith("model.layers.0.")
                and name.endswith("proj.weight")}
    assert fraction["model.layers.0.mlp.down_proj.weight"] == 0 == fraction["model.layers.0.self_attn.o_proj.weight"]
    assert fraction["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.5, abs=0.01)


# --- items 11, 19: data errors name the flags that gave the data and the window length ------------

@pytest.fixture(scope="module")
def no_eos_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-eos") / "model"
    model, tok = models.tiny_model("llama")
    tok.eos_token = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def short_texts(tmp_path_factory):
    import json

    folder = tmp_path_factory.mktemp("short")
    (folder / "short.jsonl").write_text("\n".join(json.dumps({"text": f"a few short words {i}"}) for i in range(50)))
    (folder / "short.txt").write_text("just a few words of evaluation text\n")
    return folder


_BENCH = ["--methods", "wanda", "--settings", "0.5", "--eval-seqlen", "16"]


@pytest.mark.parametrize("command", ["prune", "bench"])
def test_a_tokenizer_without_eos_that_must_join_documents_is_one_line(command, no_eos_dir, short_texts, corpus,
                                                                      tmp_path, capsys):
    calib = short_texts / "short.jsonl"
    args = [command, "--model", str(no_eos_dir), "--calib", str(calib), "--eval", str(corpus / "eval.txt"),
            "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--no-progress",
            *(_BENCH if command == "bench" else ["--out", str(tmp_path / "o")])]
    code, _, err = _cli(args, capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == (
        f"admm-prune: error: --calib {calib}: fewer documents than windows are longer than --seqlen 64, and the "
        f"tokenizer has no eos token to join shorter ones with; give longer documents, a smaller --seqlen, or a "
        f"tokenizer with an eos token")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, lengths, flag", [
    ("prune", ["--seqlen", "16", "--eval-seqlen", "128"], "--eval-seqlen"),
    ("prune", ["--seqlen", "128"], "--seqlen"),
    ("bench", ["--seqlen", "16", *_BENCH, "--eval-seqlen", "128"], "--eval-seqlen"),
    ("eval", ["--seqlen", "128"], "--seqlen"),
])
def test_an_evaluation_text_shorter_than_a_window_names_the_length_flag(command, lengths, flag, tiny_dir, corpus,
                                                                        short_texts, capsys):
    text = short_texts / "short.txt"
    calib = ["--calib", str(corpus / "calib.jsonl"), "--nsamples", "2"] if command != "eval" else []
    if command == "prune" and flag == "--seqlen":
        calib = ["--method", "magnitude"]  # no calibration: the window length is the evaluation's alone
    code, _, err = _cli([command, "--model", str(tiny_dir), "--eval", str(text), *calib, *lengths, "--device", "cpu",
                         "--no-progress"], capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == f"admm-prune: error: --eval {text}: text has 37 tokens, fewer than one window of {flag} 128"


@pytest.mark.parametrize("command, flag", [("prune", "--calib"), ("prune", "--eval"), ("bench", "--calib"),
                                           ("bench", "--eval"), ("eval", "--eval")])
def test_a_data_source_that_is_not_there_names_its_flag(command, flag, tiny_dir, corpus, capsys):
    args = {"--calib": str(corpus / "calib.jsonl"), "--eval": str(corpus / "eval.txt"), flag: "nosuch"}
    if command == "eval":
        args.pop("--calib")
    extra = ["--nsamples", "2"] + (_BENCH if command == "bench" else []) if command != "eval" else []
    code, _, err = _cli([command, "--model", str(tiny_dir), *[x for kv in args.items() for x in kv], "--seqlen", "16",
                         *extra, "--device", "cpu", "--no-progress"], capsys)
    assert code == cli.EXIT_USER_ERROR
    assert _error_line(err) == (f"admm-prune: error: {flag} 'nosuch' is neither one of ('c4', 'wikitext2') nor an "
                                f"existing file or directory")


@pytest.mark.parametrize("progress", [True, False])
def test_bench_no_progress_silences_the_loading_bar(progress, tiny_dir, corpus, capsys):
    from transformers.utils import logging as hf_logging

    args = ["bench", "--model", str(tiny_dir), "--calib", "nosuch", "--eval", str(corpus / "eval.txt"),
            "--seqlen", "16", *_BENCH, "--device", "cpu", *([] if progress else ["--no-progress"])]
    code, _, err = _cli(args, capsys)
    assert code == cli.EXIT_USER_ERROR
    assert ("Loading weights" in err) == progress, err
    assert hf_logging.is_progress_bar_enabled()  # as it was before


# --- item 20: one seed, a baseline method: the markdown gives the ratio ---------------------------

def _bench_result(seeds, baseline_method):
    from admm_prune.gpu.bench.bench_report import ratios_to_peer, summarize

    runs = [{"seed": seed, "setting": "0.5", "impl": "admm-prune", "method": m, "perplexity": ppl + seed,
             "prune_seconds": t, "phase_seconds": None, "peak_memory_gib": None, "mean_layer_error": None,
             "linear_sparsity": 0.5} for seed in seeds for m, ppl, t in (("wanda", 30.0, 1.0), ("admm-grad", 24.0, 4.0))]
    return {"config": {"seeds": list(seeds), "dtype": "float32", "seqlen": 16, "calib": "c", "eval_seqlen": 16,
                       "eval": "e", "baseline_method": baseline_method},
            "calibration": {str(s): {"nsamples": 2, "mode": "random-window"} for s in seeds}, "model": "m",
            "device": "cpu", "eval_windows": 3, "dense_perplexity": 20.0, "runs": runs, "skipped": {},
            "ratios": ratios_to_peer(runs), "summary": summarize(runs, baseline_method)}


def test_one_seed_markdown_gives_the_ratio_to_the_baseline_method():
    from admm_prune.gpu.bench.bench_report import format_markdown

    text = format_markdown(_bench_result((0,), "wanda"))
    assert "| setting | implementation | method | perplexity | / wanda | prune time (s) | time / base |" in text
    assert "| 0.5 | admm-prune | admm-grad | 24.000 | 0.800 | 4.0 | 4.00 |" in text
    assert "±" not in text  # one seed: no spread to show
    assert "/ wanda" not in format_markdown(_bench_result((0,), None))


def test_several_seeds_markdown_keeps_mean_and_std():
    from admm_prune.gpu.bench.bench_report import format_markdown

    text = format_markdown(_bench_result((0, 1), "wanda"))
    assert "Mean ± std over 2 calibration seeds" in text
    assert "| 0.5 | admm-prune | admm-grad | 24.500 ± 0.707 | " in text


@pytest.mark.parametrize("extra, warnings", [
    (["--eval", "none", "--eval-windows", "3"],
     ["--eval-windows set but unused: --eval none reads no perplexity data, so nothing reads it"]),
    (["--limit", "5", "--batch-size", "2"], ["--limit and --batch-size set but unused: only --tasks read them"]),
])
def test_eval_warns_of_flags_nothing_reads(extra, warnings, tiny_dir, tmp_path, monkeypatch, caplog):
    from admm_prune.gpu.evaluation import evaluate

    class Stop(Exception):
        pass

    monkeypatch.setattr(evaluate, "prepare_report_out", lambda out: (_ for _ in ()).throw(Stop()))
    tasks = ["--tasks", "rte", "--task-data", str(tmp_path)] if "none" in extra else []
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        cli.main(["eval", "--model", str(tiny_dir), *tasks, *extra, "--device", "cpu", "--no-progress"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == warnings
