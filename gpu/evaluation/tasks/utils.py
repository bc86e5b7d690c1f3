"""Document helpers for the ``admm_*`` lm-eval tasks (referenced as ``!function utils.<name>``).

Each ``*_docs`` function turns the rows of a public release file into the documents of the
Hugging Face dataset that lm-eval's stock task reads, field for field, so that the stock
prompt templates apply unchanged. The hellaswag and winogrande functions restate the stock
task's own helpers (lm_eval/tasks/hellaswag/utils.py, lm_eval/tasks/winogrande/
preprocess_winogrande.py); tests/test_zeroshot.py checks them against the installed ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets

# One class for `zeroshot` to catch: lm-eval loads this file as a module of its own.
from admm_prune.gpu.evaluation.zeroshot import DocumentError

# GLUE/SuperGLUE RTE label ids (nyu-mll/glue "rte", aps/super_glue "rte"): 0 = entailment.
RTE_LABELS = ("entailment", "not_entailment")
# BoolQ answers as the releases write them: booleans (the BoolQ release), 1/0 (SuperGLUE), or
# their spellings as text (some SuperGLUE exports write "true"/"false").
BOOLQ_LABELS = {"true": 1, "false": 0, "yes": 1, "no": 0, "1": 1, "0": 0}
# An OpenBookQA TSV "Choices" cell: "(A) text (B) text (C) text (D) text".
_OBQA_CHOICE = re.compile(r"\(([A-Z])\) (.*?)(?= \([A-Z]\) |$)")


def rte_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """SuperGLUE RTE jsonl (premise, hypothesis, label name, idx) -> GLUE RTE docs
    (sentence1, sentence2, label id, idx)."""

    def convert(doc, index):
        label = doc["label"]
        if isinstance(label, str):
            if label not in RTE_LABELS:
                raise DocumentError(f"label {label!r} is not one of {RTE_LABELS}", dataset.split, index)
            label = RTE_LABELS.index(label)
        return {"sentence1": doc["premise"], "sentence2": doc["hypothesis"], "label": int(label), "idx": doc["idx"]}

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)


def boolq_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """BoolQ release jsonl (question, title, answer: bool, passage) -> SuperGLUE BoolQ docs
    (question, passage, idx, label: 1 = yes). A SuperGLUE ``label`` field is read as well."""
    key = "answer" if "answer" in dataset.column_names else "label"

    def convert(doc, idx):
        return {"question": doc["question"], "passage": doc["passage"], "idx": idx,
                "label": boolq_label(doc[key], dataset.split, idx)}

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)


def boolq_label(value, split=None, index=None) -> int:
    """A BoolQ answer as 1 (yes) or 0 (no): a boolean, 1/0, or true/false, yes/no, 1/0 as text in
    any case. Anything else raises `DocumentError` for document `index` of `split`."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in BOOLQ_LABELS:
        return BOOLQ_LABELS[value.strip().lower()]
    raise DocumentError(f"answer {value!r} is not a boolean (true/false, yes/no or 1/0)", split, index)


def arc_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """ARC-V1-Feb2018 jsonl (id, question{stem, choices[{text, label}]}, answerKey) -> allenai/ai2_arc
    docs (id, question, choices{text, label}, answerKey)."""

    def convert(doc):
        choices = doc["question"]["choices"]
        return {
            "id": doc["id"],
            "question": doc["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": doc["answerKey"],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def openbookqa_choices(cell: str) -> dict:
    """``"(A) x (B) y ..."`` -> ``{"text": ["x", "y", ...], "label": ["A", "B", ...]}``."""
    pairs = _OBQA_CHOICE.findall(cell.strip())
    if not pairs:
        raise ValueError(f"OpenBookQA choices cell not in '(A) ... (B) ...' form: {cell!r}")
    return {"text": [text for _, text in pairs], "label": [label for label, _ in pairs]}


def openbookqa_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """OpenBookQA Main TSV (ID, Question Stem, Choices, Complete Question, Answer Key) ->
    allenai/openbookqa "main" docs (id, question_stem, choices{text, label}, answerKey)."""

    def convert(doc):
        return {
            "id": str(doc["ID"]),
            "question_stem": doc["Question Stem"],
            "choices": openbookqa_choices(doc["Choices"]),
            "answerKey": doc["Answer Key"],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def piqa_dataset(data_files: dict, label_files: dict, **_metadata) -> datasets.DatasetDict:
    """PIQA release (``<split>.jsonl`` with goal, sol1, sol2 and ``<split>-labels.lst``, one 0/1
    per line) -> the docs of baber/piqa (goal, sol1, sol2, label), one split per ``data_files`` key.

    lm-eval calls this as the task's ``custom_dataset`` with the task metadata and
    ``dataset_kwargs`` as keyword arguments; the metadata is not used.
    """
    splits = {}
    for split, path in data_files.items():
        docs = datasets.load_dataset("json", data_files=str(path), split="train")
        labels = [int(line) for line in Path(label_files[split]).read_text().split()]
        if len(labels) != len(docs):
            raise ValueError(f"{label_files[split]}: {len(labels)} labels for {len(docs)} questions in {path}")
        splits[split] = docs.add_column("label", labels)
    return datasets.DatasetDict(splits)


def hellaswag_preprocess(text: str) -> str:
    """Stock hellaswag text clean-up: strip, "[title]" -> ". ", drop other [bracket] tags, "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Stock hellaswag ``process_docs``: adds query (activity label: context), cleaned choices, gold."""

    def convert(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + context),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(convert)


def winogrande_doc_to_text(doc: dict) -> int:
    """Index of the correct context (stock winogrande scores the shared continuation after each)."""
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_doc_to_target(doc: dict) -> str:
    """The sentence after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_doc_to_choice(doc: dict) -> list:
    """The sentence up to the blank, completed by each option."""
    prefix = doc["sentence"][: doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]
