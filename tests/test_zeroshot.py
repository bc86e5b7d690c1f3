"""Zero-shot evaluation through stock lm-eval on local task files (offline, seconds).

The configs are checked three ways: field by field against the installed stock lm-eval task
configs; document by document against our own reading of the shared data files (ARC,
OpenBookQA, PIQA, RTE); and, for the tasks without shared data (boolq, hellaswag, winogrande),
against the stock task itself run on the same synthetic documents in the Hugging Face layout.
"""

import csv
import dataclasses
import json
import os
import random
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from admm_prune.gpu.evaluation import zeroshot  # noqa: E402
from admm_prune.gpu.checkpoint.models import tiny_model  # noqa: E402
from admm_prune.gpu.evaluation.zeroshot import TASKS, ZeroShotError, format_table, load_tasks, run_zeroshot  # noqa: E402

SHARED_DATA = Path(os.environ.get("ADMM_PRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHARED_TASKS = ("rte", "openbookqa", "arc_easy", "arc_challenge", "piqa")
LIMIT = 8
# The stock config each admm_<name> task mirrors, under lm_eval/tasks/.
STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
}
# Fields that decide what the model is asked and how it is scored.
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
                 "fewshot_delimiter", "description", "process_results")


@pytest.fixture(scope="module")
def data_dir():
    if not all((SHARED_DATA / sub).is_dir() for sub in ("rte", "openbookqa", "arc", "piqa")):
        pytest.skip(f"shared task data absent in {SHARED_DATA} (set ADMM_PRUNE_DATA to the shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def results(data_dir):
    """One run on the shared tasks with the network refused and the global RNG states watched."""
    model, tokenizer = tiny_model("llama")
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError("network refused by test_zeroshot")

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        out = run_zeroshot(model, tokenizer, list(SHARED_TASKS), data_dir, limit=LIMIT, batch_size=8, device="cpu")
    assert attempts == [], f"lm-eval tried the network: {attempts}"
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[2])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1]))
    return out


# --- what run_zeroshot returns ---------------------------------------------------------------

def test_results_shape_and_mean(results):
    assert list(results["tasks"]) == list(SHARED_TASKS)
    for name, row in results["tasks"].items():
        assert 0.0 <= row["acc"] <= 1.0 and row["n"] == LIMIT, name
        assert ("acc_norm" in row) == (name != "rte")  # the stock rte reports acc only
        if "acc_norm" in row:
            assert 0.0 <= row["acc_norm"] <= 1.0
        # acc is a mean of 0/1 over LIMIT documents
        assert row["acc"] * LIMIT == pytest.approx(round(row["acc"] * LIMIT))
    assert results["mean_acc"] == pytest.approx(np.mean([row["acc"] for row in results["tasks"].values()]))
    assert results["lm_eval_version"] == lm_eval.__version__
    # the shared ARC files are the Dev split; OpenBookQA's is the stock test split
    assert results["tasks"]["arc_easy"]["split"] == "validation"
    assert results["tasks"]["openbookqa"]["split"] == "test"


def test_format_table(results):
    pruned = {**results, "tasks": {k: {**v, "acc": v["acc"] / 2} for k, v in results["tasks"].items()},
              "mean_acc": results["mean_acc"] / 2}
    lines = format_table(results, pruned).splitlines()
    assert lines[0] == "| task | n | dense acc % | pruned acc % | change |"
    assert len(lines) == 2 + len(SHARED_TASKS) + 1
    rte = results["tasks"]["rte"]["acc"]
    assert f"| rte | {LIMIT} | {100 * rte:.2f} | {50 * rte:.2f} | {-50 * rte:+.2f} |" in lines
    assert lines[-1].startswith(f"| mean |  | {100 * results['mean_acc']:.2f} |")
    assert format_table(results).splitlines()[0] == "| task | n | dense acc % |"
    fewer = {**pruned, "tasks": {k: v for k, v in pruned["tasks"].items() if k != "rte"}}
    with pytest.raises(ValueError, match="same tasks"):
        format_table(results, fewer)


# --- the documents lm-eval sees equal the source files ---------------------------------------

def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _obqa_choices(cell):
    """Split '(A) x (B) y (C) z (D) w' at the four markers, by position."""
    starts = [cell.index(f"({label}) ") for label in "ABCD"]
    ends = starts[1:] + [len(cell)]
    return [cell[s + 4:e].strip() for s, e in zip(starts, ends)]


def _expected(name, data_dir):
    """(prompt, choices, gold index) per document, read from the raw file without lm-eval or utils."""
    if name in ("arc_easy", "arc_challenge"):
        part = "Easy" if name == "arc_easy" else "Challenge"
        out = []
        for doc in _jsonl(data_dir / "arc" / f"ARC-{part}-Dev.jsonl"):
            labels = [c["label"] for c in doc["question"]["choices"]]
            out.append((f"Question: {doc['question']['stem']}\nAnswer:",
                        [c["text"] for c in doc["question"]["choices"]], labels.index(doc["answerKey"])))
        return out
    if name == "openbookqa":
        with open(data_dir / "openbookqa" / "test.tsv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [(r["Question Stem"], _obqa_choices(r["Choices"]), "ABCD".index(r["Answer Key"])) for r in rows]
    if name == "piqa":
        labels = (data_dir / "piqa" / "valid-labels.lst").read_text().split()
        return [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(y))
                for d, y in zip(_jsonl(data_dir / "piqa" / "valid.jsonl"), labels, strict=True)]
    if name == "rte":
        return [(f"{d['premise']}\nQuestion: {d['hypothesis']} True or False?\nAnswer:", ["True", "False"],
                 {"entailment": 0, "not_entailment": 1}[d["label"]]) for d in _jsonl(data_dir / "rte" / "val.jsonl")]
    raise KeyError(name)


@pytest.mark.parametrize("name", SHARED_TASKS)
def test_docs_match_source_files(name, data_dir):
    task = load_tasks(name, data_dir)[name]
    docs = list(task.eval_docs)
    seen = [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in docs]
    expected = _expected(name, data_dir)
    assert len(seen) == len(expected)
    assert seen[0] == expected[0]
    assert seen == expected


# --- the configs mirror the stock lm-eval tasks ----------------------------------------------

def _stock_config(name):
    loader = pytest.importorskip("lm_eval.tasks._yaml_loader", reason="lm-eval's YAML loader moved")
    path = Path(lm_eval.__file__).parent / "tasks" / STOCK_YAML[name]
    if not path.is_file():
        pytest.skip(f"stock config {path} not in this lm-eval; update STOCK_YAML")
    return loader.load_yaml(path, resolve_func=True)


def _ours(name, data_dir):
    return load_tasks(name, data_dir)[name].config


def _synthetic_data_dir(root):
    """Release-layout files for boolq, hellaswag and winogrande (none are in the shared data)."""
    boolq = [
        {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue on a clear day."},
        {"question": "do fish fly", "title": "Fish", "answer": False, "passage": "Most fish swim; a few glide."},
    ]
    hellaswag = [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "ctx": "Then, the man writes over the snow. then", "split": "val",
         "split_type": "indomain", "source_id": "activitynet~v_-1IBHYS3L-Y", "label": 3,
         "endings": [", the man adds wax to the windshield.", " [title] a woman  walks.", " waves [step] hi.",
                     " stops."]},
        {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to dig [title] Pick a spot.",
         "ctx_b": "look", "ctx": "x", "split": "val", "split_type": "zeroshot", "source_id": "wikihow~1",
         "label": 0, "endings": ["for sun  [substeps] here.", "b", "c", "d"]},
    ]
    winogrande = [
        {"qID": "a-1", "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"qID": "b-2", "sentence": "The trophy did not fit in the case because the _ was too small.",
         "option1": "trophy", "option2": "case", "answer": "2"},
    ]
    for sub, file, docs in (("boolq", "dev.jsonl", boolq), ("hellaswag", "hellaswag_val.jsonl", hellaswag),
                            ("winogrande", "dev.jsonl", winogrande)):
        (root / sub).mkdir()
        (root / sub / file).write_text("".join(json.dumps(d) + "\n" for d in docs))
    # the same documents as the stock tasks' Hugging Face datasets hold them
    hub = {
        "boolq": [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
                  for i, d in enumerate(boolq)],
        "hellaswag": [{**d, "label": str(d["label"])} for d in hellaswag],  # Rowan/hellaswag: label is text
        "winogrande": [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in winogrande],
    }
    return root, hub


@pytest.mark.parametrize("name", TASKS)
def test_config_mirrors_stock(name, data_dir, tmp_path):
    stock = _stock_config(name)
    root = data_dir if name in SHARED_TASKS else _synthetic_data_dir(tmp_path)[0]
    ours = _ours(name, root)
    defaults = {f.name: f.default for f in dataclasses.fields(ours)}
    assert stock["task"] == name and ours.task == zeroshot.TASK_PREFIX + name
    for field in PROMPT_FIELDS:
        mine, theirs = getattr(ours, field), stock.get(field, defaults[field])
        if callable(theirs):  # the helpers' behaviour is compared in test_helpers_behave_as_stock
            assert callable(mine), field
        else:
            assert mine == theirs, field
    assert [m["metric"] for m in ours.metric_list] == [m["metric"] for m in stock["metric_list"]]
    assert ours.metadata["version"] == stock["metadata"]["version"]


@pytest.mark.parametrize("name", ("boolq", "hellaswag", "winogrande"))
def test_helpers_behave_as_stock(name, tmp_path):
    """Our task on release-layout files asks and scores exactly what the stock task does on the hub layout."""
    from lm_eval.api.task import ConfigurableTask

    root, hub = _synthetic_data_dir(tmp_path)
    config = {k: v for k, v in _stock_config(name).items() if k not in ("tag", "group")}
    stock_docs = datasets.DatasetDict({"validation": datasets.Dataset.from_list(hub[name])})
    stock = ConfigurableTask(config={**config, "training_split": None,
                                     "custom_dataset": lambda **_: stock_docs})
    ours = load_tasks(name, root)[name]

    def asked(task):
        return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in task.eval_docs]

    assert asked(ours) == asked(stock)
    assert len(asked(ours)) == 2


# --- data-dir resolution and errors ----------------------------------------------------------

def test_missing_file_names_task_and_path(tmp_path):
    with pytest.raises(ZeroShotError, match="boolq") as error:
        load_tasks(["boolq"], tmp_path)
    assert str(tmp_path / "boolq" / "dev.jsonl") in str(error.value)
    with pytest.raises(ZeroShotError, match="arc_challenge") as error:
        load_tasks(["arc_challenge"], tmp_path)
    for split in ("Test", "Dev"):
        assert str(tmp_path / "arc" / f"ARC-Challenge-{split}.jsonl") in str(error.value)


def test_piqa_without_labels_names_the_labels_file(data_dir, tmp_path):
    (tmp_path / "piqa").mkdir()
    shutil.copy(data_dir / "piqa" / "valid.jsonl", tmp_path / "piqa")
    with pytest.raises(ZeroShotError, match="piqa") as error:
        load_tasks("piqa", tmp_path)
    assert str(tmp_path / "piqa" / "valid-labels.lst") in str(error.value)


def test_test_split_scored_when_present(data_dir, tmp_path):
    """Like the stock arc tasks: the Test file is scored when there, the Dev file otherwise."""
    (tmp_path / "arc").mkdir()
    dev = (data_dir / "arc" / "ARC-Easy-Dev.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "arc" / "ARC-Easy-Dev.jsonl").write_text("".join(dev[:7]))
    assert len(load_tasks("arc_easy", tmp_path)["arc_easy"].eval_docs) == 7
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text("".join(dev[7:10]))
    task = load_tasks("arc_easy", tmp_path)["arc_easy"]
    assert task.config.test_split == "test" and len(task.eval_docs) == 3


def test_unknown_task_lists_valid_names(tmp_path):
    with pytest.raises(ZeroShotError, match="mmlu") as error:
        load_tasks(["rte", "mmlu"], tmp_path)
    assert all(name in str(error.value) for name in TASKS)
    with pytest.raises(ZeroShotError, match="limit"):
        run_zeroshot(None, None, ["rte"], tmp_path, limit=0)


def test_missing_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ZeroShotError, match=r"pip install 'admm-prune\[eval\]'"):
        run_zeroshot(None, None, ["rte"], tmp_path)


# --- bad task files and quiet runs -------------------------------------------------------------

def _boolq_file(root, answers):
    (root / "boolq").mkdir(exist_ok=True)
    rows = [{"question": f"q{i}", "title": "t", "passage": "p", "answer": a} for i, a in enumerate(answers)]
    (root / "boolq" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "boolq" / "dev.jsonl"


def test_boolq_labels_in_their_common_spellings(tmp_path):
    """SuperGLUE exports write the answer as text; the BoolQ release as booleans."""
    _boolq_file(tmp_path, ["true", "False", "yes", "NO", 1, 0, True, False, " 1 "])
    docs = load_tasks("boolq", tmp_path)["boolq"].eval_docs
    assert [d["label"] for d in docs] == [1, 0, 1, 0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("bad", ["maybe", 2, None, 1.5])
def test_boolq_bad_label_names_file_and_line(tmp_path, bad):
    path = _boolq_file(tmp_path, [True, "false", bad])
    with pytest.raises(ZeroShotError) as error:
        load_tasks("boolq", tmp_path)
    assert str(error.value).startswith(f"boolq: {path}: line 3: answer {bad!r} is not a boolean")


def test_malformed_task_file_names_file_and_line(tmp_path):
    (tmp_path / "rte").mkdir()
    good = {"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0}
    (tmp_path / "rte" / "val.jsonl").write_text(json.dumps(good) + "\n\n" + '{"premise": broken\n')
    with pytest.raises(ZeroShotError) as error:
        load_tasks("rte", tmp_path)
    assert str(error.value) == f"rte: {tmp_path / 'rte' / 'val.jsonl'}: line 3 is not a JSON object"


def test_no_progress_silences_lm_eval_and_datasets_bars(data_dir, capfd):
    """progress=False: no bar from lm-eval (requests, log-likelihoods) or datasets, and both as before after."""
    from datasets.utils import are_progress_bars_disabled
    from lm_eval.api import task as lm_eval_task
    from tqdm import tqdm

    model, tokenizer = tiny_model("llama")
    bars_before = are_progress_bars_disabled()
    for progress in (True, False):
        capfd.readouterr()
        run_zeroshot(model, tokenizer, ["rte"], data_dir, limit=2, device="cpu", progress=progress)
        err = capfd.readouterr().err
        assert ("%|" in err) == progress, err
    assert lm_eval_task.tqdm is tqdm and are_progress_bars_disabled() == bars_before
