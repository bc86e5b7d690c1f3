"""Zero-shot accuracy of an in-memory model through the stock EleutherAI lm-eval harness.

The tasks are the pruning papers' (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge,
openbookqa) plus piqa, read from local files so that evaluation runs offline. Each is an lm-eval
YAML config in ``tasks/`` (``admm_<name>``) whose prompt, choices, target and metrics are those
of the stock lm-eval task of the same name; only where the documents come from differs. The
YAMLs name their files relative to a data dir; `load_tasks` writes, per run, a small YAML that
includes the packaged one with the paths made absolute, and hands that folder to
``lm_eval.tasks.TaskManager``. Scoring is lm-eval's own (``lm_eval.simple_evaluate`` on an
``HFLM`` wrapping the model); this module only chooses files and collects the numbers.

lm-eval is the optional extra ``eval``: ``pip install 'admm-prune[eval]'``.
"""

from __future__ import annotations

from admm_prune.reference.errors import AdmmPruneError

import contextlib
import json
import logging
import math
import numbers
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

logger = logging.getLogger(__name__)

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
TASK_DIR = Path(__file__).parent / "tasks"
TASK_PREFIX = "admm_"
INSTALL_HINT = "pip install 'admm-prune[eval]'"
# lm-eval's own defaults (those of its CLI), so that a run here matches a CLI run.
SEEDS = dict(random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
# dataset_kwargs entries that map split -> file (relative to the data dir in the packaged YAMLs).
FILE_KEYS = ("data_files", "label_files")
# data_files split name -> the task-config field that names that split.
SPLIT_FIELDS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


class ZeroShotError(AdmmPruneError):
    """A zero-shot request that cannot run: unknown task, missing or malformed data file, lm-eval
    not installed."""


class DocumentError(ZeroShotError):
    """A document that ``tasks/utils.py`` cannot convert: document `index` of data split `split`.

    `_load` says which file and line that is.
    """

    def __init__(self, message, split=None, index=None):
        super().__init__(message)
        self.split, self.index = split, index


class _TemplateLoader(yaml.SafeLoader):
    """Reads the packaged YAMLs without resolving lm-eval's ``!function`` tags (kept as text)."""


_TemplateLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as error:
        raise ZeroShotError(f"zero-shot evaluation needs lm-eval ({error}): {INSTALL_HINT}") from None
    return lm_eval


def _task_names(tasks):
    """`tasks` (a name or names) as a tuple without repeats, each checked against `TASKS`."""
    names = tuple(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ZeroShotError(f"unknown task(s) {unknown or names}; valid tasks: {', '.join(TASKS)}")
    return names


def _task_config(name, data_dir):
    """The override config for task `name` on `data_dir`: packaged YAML + absolute file paths.

    Splits whose file is missing are dropped (their split field set to None), so lm-eval scores
    the test split when its file is there and the validation split otherwise, as it does for its
    stock tasks. Raises `ZeroShotError`, naming the paths looked for, when neither is there.
    """
    template = TASK_DIR / f"{TASK_PREFIX}{name}.yaml"
    kwargs = yaml.load(template.read_text(), Loader=_TemplateLoader)["dataset_kwargs"]
    data_dir = Path(data_dir).expanduser().resolve()
    files = {key: {split: data_dir / rel for split, rel in kwargs[key].items()} for key in FILE_KEYS if key in kwargs}
    splits = list(files["data_files"])
    present = [split for split in splits if all(paths[split].is_file() for paths in files.values())]
    if "test" not in present and "validation" not in present:
        missing = [str(paths[s]) for s in ("test", "validation") if s in splits for paths in files.values()
                   if not paths[s].is_file()]
        raise ZeroShotError(f"{name}: data file not found: looked for {' or '.join(missing)} "
                            f"(expected files: see the comments in {template})")
    config = {
        "include": str(template),
        "dataset_kwargs": {**kwargs, **{key: {s: str(paths[s]) for s in present} for key, paths in files.items()}},
    }
    for split in splits:
        if split not in present:
            config[SPLIT_FIELDS[split]] = None
    return config


def _load(names, data_dir, progress=True):
    """(task manager, {name: lm-eval Task}) for the checked `names`, documents loaded."""
    lm_eval = _lm_eval()
    configs = {name: _task_config(name, data_dir) for name in names}  # every file checked before loading
    loaded = {}
    # _global_rng_kept: lm-eval draws from Python's global RNG on each Task.task_name read.
    with tempfile.TemporaryDirectory(prefix="admm_zeroshot_") as folder, _global_rng_kept(), \
            _progress_bars(progress):
        for name, config in configs.items():
            (Path(folder) / f"{TASK_PREFIX}{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        manager = lm_eval.tasks.TaskManager(include_path=folder, include_defaults=False)
        for name in names:  # one at a time, so that a bad file is named with its task
            with _file_errors(name, configs[name]["dataset_kwargs"]["data_files"]):
                loaded[name] = manager.load([TASK_PREFIX + name])["tasks"][TASK_PREFIX + name]
    return manager, loaded


@contextlib.contextmanager
def _file_errors(name, files):
    """A task file that `datasets` cannot read, or whose document ``tasks/utils.py`` refuses,
    becomes a one-line ZeroShotError naming the file (and the line, where known)."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except DocumentError as error:
        path = files.get(str(error.split)) if error.split is not None else None
        if path is None or error.index is None:
            raise ZeroShotError(f"{name}: {' or '.join(files.values())}: {error}") from None
        raise ZeroShotError(f"{name}: {path}: {_where(path, error.index)}: {error}") from None
    except (DatasetGenerationError, ValueError) as error:  # ValueError: pyarrow's, datasets' own
        cause = error.__cause__ or error
        for path in files.values():
            bad_line = _first_bad_json_line(path)
            if bad_line is not None:
                raise ZeroShotError(f"{name}: {path}: line {bad_line} is not a JSON object") from None
        raise ZeroShotError(f"{name}: cannot read {' or '.join(files.values())} "
                            f"({type(cause).__name__}: {cause})") from None


def _where(path, index):
    """'line N' of document `index` (0-based) in a JSON-lines file, else 'row N'."""
    if str(path).endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            records = (number for number, line in enumerate(f, 1) if line.strip())
            line = next((n for i, n in enumerate(records) if i == index), None)
        if line is not None:
            return f"line {line}"
    return f"row {index + 1}"


def _first_bad_json_line(path):
    """Number of the first non-blank line of a ``.jsonl`` file that is not a JSON object, else None."""
    if not str(path).endswith(".jsonl"):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    if not isinstance(json.loads(line), dict):
                        return number
                except json.JSONDecodeError:
                    return number
    return None


@contextlib.contextmanager
def _progress_bars(enabled):
    """lm-eval's and datasets' progress bars shown or not for the duration; nothing changed after.

    lm-eval 0.4 draws its bars with the ``tqdm`` each of its modules imports (requests being
    built, HFLM's log-likelihoods) and has no switch for them, so while disabled those module
    attributes are a ``tqdm`` that is always disabled; datasets' own bars (files read, maps)
    have a switch, whose previous state is restored.
    """
    if enabled:
        yield
        return
    import tqdm.auto
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = {cls: type(cls.__name__, (cls,), {"__init__": _disabled_init(cls)})
             for cls in {tqdm.tqdm, tqdm.auto.tqdm}}
    patched = [(module, cls) for name, module in list(sys.modules.items())
               if name.split(".")[0] == "lm_eval" and (cls := getattr(module, "tqdm", None)) in quiet]
    datasets_bars_were_on = not are_progress_bars_disabled()
    try:
        for module, cls in patched:
            module.tqdm = quiet[cls]
        disable_progress_bars()
        yield
    finally:
        for module, cls in patched:
            module.tqdm = cls
        if datasets_bars_were_on:
            enable_progress_bars()


def _disabled_init(cls):
    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **{**kwargs, "disable": True})

    return __init__


def load_tasks(tasks, data_dir):
    """The lm-eval ``Task`` objects that `run_zeroshot` scores, as ``{name: Task}``.

    ``task.eval_docs`` are the documents lm-eval sees; ``task.doc_to_text(doc)``,
    ``task.doc_to_choice(doc)`` and ``task.doc_to_target(doc)`` give its prompt, choices and gold.
    """
    return _load(_task_names(tasks), data_dir)[1]


def _split_scored(task):
    return task.config.test_split or task.config.validation_split


@contextlib.contextmanager
def _global_rng_kept():
    """Restores Python's, NumPy's and torch's global RNG states (lm-eval seeds them) on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _on_device(model, device):
    """Runs with `model` on `device` (unchanged when None), then moves it back."""
    if device is None:
        yield
        return
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def run_zeroshot(model, tokenizer, tasks, data_dir, *, limit=None, batch_size=1, device=None, num_fewshot=0,
                 progress=True):
    """Accuracy of `model` on `tasks`, scored by lm-eval on the files under `data_dir`.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM (in memory, e.g. pruned) and its tokenizer.
    tasks : a name or names from `TASKS`.
    data_dir : folder with the task files (layouts: the comments in ``tasks/admm_<name>.yaml``).
    limit : score only the first `limit` documents of each task (None: all).
    batch_size : lm-eval's batch size (an int, or "auto").
    device : where to run; the model is moved there and back afterwards (None: where it is).
    num_fewshot : examples in each prompt (0, as in the papers).
    progress : show lm-eval's and datasets' progress bars (False: none, only for this call).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "n",
    "split"}}, "mean_acc": mean of the tasks' acc, "lm_eval_version", "num_fewshot", "limit"}``.
    lm-eval seeds the global RNGs with its CLI defaults (`SEEDS`); their states are restored.
    """
    names = _task_names(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ZeroShotError(f"limit must be a positive int or None, got {limit!r}")
    limit = None if limit is None else int(limit)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager, loaded = _load(names, data_dir, progress)
    with _on_device(model, device), _global_rng_kept(), _progress_bars(progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=[loaded[name] for name in names], num_fewshot=num_fewshot, limit=limit,
            task_manager=manager, log_samples=False, **SEEDS,
        )
    results = {}
    for name in names:
        key = TASK_PREFIX + name
        metrics = output["results"][key]
        row = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                row[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else math.nan
        row["n"] = int(output["n-samples"][key]["effective"])
        row["split"] = _split_scored(loaded[name])
        results[name] = row
        logger.info("%s (%s, n=%d): acc %.4f", name, row["split"], row["n"], row["acc"])
    return {
        "tasks": results,
        "mean_acc": float(np.mean([row["acc"] for row in results.values()])),
        "lm_eval_version": lm_eval.__version__,
        "num_fewshot": num_fewshot,
        "limit": limit,
    }


def format_table(results_dense, results_pruned=None, labels=("dense", "pruned")):
    """Markdown table of per-task accuracy (acc, in %) and the mean, dense and pruned side by side.

    The two results must cover the same tasks on the same number of documents. `labels`
    name the two accuracy columns ("<label> acc %").
    """
    runs = [results_dense] if results_pruned is None else [results_dense, results_pruned]
    dense = results_dense["tasks"]
    if results_pruned is not None:
        pruned = results_pruned["tasks"]
        if set(pruned) != set(dense) or any(pruned[name]["n"] != dense[name]["n"] for name in dense):
            raise ValueError("dense and pruned results must cover the same tasks with the same n")
    names = [name for name in TASKS if name in dense] + [name for name in dense if name not in TASKS]
    entries = [(name, str(dense[name]["n"]), [run["tasks"][name]["acc"] for run in runs]) for name in names]
    entries.append(("mean", "", [run["mean_acc"] for run in runs]))
    header = ["task", "n"] + [f"{label} acc %" for label in labels[:len(runs)]]
    header += ["change"] if results_pruned is not None else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, n, accs in entries:
        cells = [name, n] + [f"{100 * acc:.2f}" for acc in accs]
        if len(accs) == 2:
            cells.append(f"{100 * (accs[1] - accs[0]):+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
