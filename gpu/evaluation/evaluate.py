"""Evaluation: perplexity streamed block by block, zero-shot through lm-eval, the eval report.

Perplexity follows the standard protocol (GPTQ/SparseGPT/Wanda): each window's loss is the
mean cross-entropy of its seqlen - 1 next-token predictions; ppl = exp(mean window loss). It
runs block by block over all windows like the pruning does, on a `StreamedModel` (blocks read
from the shards one at a time) or a model in memory, so a model larger than host memory or
the device still works. Zero-shot accuracy goes through stock lm-eval, which loads the whole
model in the usual way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import corpus as data_mod
from ..checkpoint import models as models_mod
from ..checkpoint.adapter import adapter
from ..checkpoint.weights import Weight, prunable_weights
from ..engine.calibration import capture_block_inputs, run_block, visiting
from ..config import DTYPES, EvalConfig, PipelineError
from ..engine.context import this_rank_device
from ..checkpoint.diskspace import writing
from ..engine.distributed import current
from ..checkpoint.lock import prefix_lock
from ..engine.report import missing_parents, write_atomic
from ..checkpoint.sources import as_source, open_model

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device=None, offload_activations: bool = False,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean token NLL) over non-overlapping `windows` [n, seqlen], one block at a time; the
    logits through the model's own forward after the blocks (`adapter.ModelAdapter.logits`).

    `model`: a causal LM in memory or a block source (`sources.BlockSource`).
    """
    source, dist = as_source(model), current()
    device = this_rank_device(device, dist)
    store = torch.device("cpu") if offload_activations else device
    if windows.shape[0] < dist.world:
        raise PipelineError(f"eval_windows: {windows.shape[0]} windows for {dist.world} ranks")
    mine = dist.share(windows)  # several ranks: each its share of the windows, losses gathered
    hid, kwargs = capture_block_inputs(source.model, mine, device, store, progress)
    buf = torch.empty_like(hid)
    for i in tqdm(range(source.num_blocks), desc=desc, disable=not progress, leave=False):
        with source.block(i) as block, visiting([block], device):
            run_block(block, hid, kwargs.at(i), device, buf)
        hid, buf = buf, hid
    shape = adapter(source.model)
    losses = []
    with visiting(shape.outside_blocks(), device):  # the model's own head: norm, lm head, soft cap, ...
        for i in range(hid.shape[0]):
            logits = shape.logits(hid[i:i + 1].to(device), mine[i:i + 1].to(device)).float()
            target = mine[i:i + 1, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    target.reshape(-1))
            losses.append(float(nll))
    losses = [x for rank in dist.gather_objects(losses) for x in rank]
    value = math.exp(sum(losses) / len(losses))
    if not math.isfinite(value):
        raise PipelineError(f"{desc} is not finite ({value}); the model produces NaN/Inf")
    return value


@contextlib.contextmanager
def naming(flag: str, source: str, seqlen: str = "seqlen"):
    """Prefix a data error with the flag and source it concerns (just the flag where it names the
    source already); an unreachable hub's hint names `flag` too. `seqlen`: the setting that gave
    the window length, said in a window-length error (``eval_seqlen`` where that set it)."""
    try:
        yield
    except data_mod.HubUnreachable as e:
        raise data_mod.HubUnreachable(e.source, e.reason, flag) from None
    except data_mod.DataError as e:
        message = re.sub(r"\bseqlen\b", seqlen, str(e)) if e.field == "seqlen" else str(e)
        said = f"{flag} {message}" if str(source) in message else f"{flag} {source}: {message}"
        raise data_mod.DataError(said, field=seqlen if e.field == "seqlen" else None) from None


def load_eval_windows(source: str, split: str, tokenizer, seqlen: int, max_windows: int | None):
    """Perplexity windows of `source` (rows joined with "\\n\\n"), at most `max_windows`."""
    texts = data_mod.load_texts(source, split=split)
    windows = data_mod.tokenize_for_perplexity(data_mod.perplexity_text(texts), tokenizer, seqlen)
    return windows if max_windows is None else windows[:max_windows]


@torch.no_grad()
def linear_sparsity(model, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> float:
    """Fraction of exact zeros over the decoder blocks' prunable weights (model or block
    source), chosen by `targets`/`ignore` as `weights.prunable_weights` chooses them (default:
    every nn.Linear of the blocks but routers, and every expert)."""
    source = as_source(model)
    zeros = total = 0
    for i in range(source.num_blocks):
        with source.block(i) as block:
            for weight in _counted(block, targets, ignore):
                w = weight.matrix(block)
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / max(total, 1)


def _counted(block, targets, ignore) -> list:
    """The weights `linear_sparsity` counts: the prunable ones; where experts are packed in a
    layout that cannot be pruned (named by prune, not here), the block's linears alone."""
    try:
        return prunable_weights(block, targets, ignore)
    except models_mod.ModelError:
        return [Weight(n, n) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)
                and (not targets or any(re.search(t, n) for t in targets)) and not any(re.search(t, n) for t in ignore)]


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """Perplexity and zero-shot accuracy of a model, with the sparsity it actually has.

    With ``cfg.baseline`` the baseline model (typically the dense one) is evaluated on the
    same windows and documents, and ``result["baseline"]`` and ``result["markdown"]`` (the two
    side by side) are added. With ``cfg.out`` the result is written to OUT.json and OUT.md,
    and ``OUT.lock`` is held meanwhile (one run per prefix: `lock.OutputLock`). Everything
    that can be checked (the report's folder, the task names and files, the baseline's
    existence) is checked before the first forward pass.
    """
    cfg.warn_unused()
    out = prepare_report_out(cfg.out)
    with prefix_lock(cfg.out, current().main):
        return _run_eval(cfg, out, model, tokenizer)


def _run_eval(cfg: EvalConfig, out: Path | None, model, tokenizer) -> dict:
    if cfg.tasks:
        from .zeroshot import load_tasks

        load_tasks(list(cfg.tasks), cfg.task_data)  # names, files and their contents
    if cfg.baseline is not None:
        models_mod.resolve_model(cfg.baseline, cfg.cache_dir)
    result = _evaluate(cfg, cfg.model, model, tokenizer)
    if cfg.baseline is not None:
        result["baseline"] = _evaluate(cfg, cfg.baseline)
    result["markdown"] = format_eval_markdown(result)
    if out is not None:
        json_path, md_path = _with_ext(out, ".json"), _with_ext(out, ".md")
        with writing(json_path):
            write_atomic(json_path, json.dumps(result, indent=2, default=str))
        with writing(md_path):
            write_atomic(md_path, result["markdown"])
        log.info("wrote %s and %s", json_path, md_path)
    return result


def _with_ext(prefix: Path, ext: str) -> Path:
    """PREFIX + ext: appended, never replacing a 'suffix' (runs/x-0.5 -> runs/x-0.5.json)."""
    return prefix.with_name(prefix.name + ext)


def _evaluate(cfg: EvalConfig, name, model=None, tokenizer=None) -> dict:
    if model is None:
        source, tokenizer = open_model(name, DTYPES.get(cfg.dtype), cfg.cache_dir)
    else:
        source = as_source(model.eval())
    models_mod.check_tokenizer_fits(source.model, tokenizer)
    result = {"model": name or models_mod.DEFAULT_MODEL, "dtype": str(source.model.dtype).removeprefix("torch."),
              "linear_sparsity": linear_sparsity(source)}
    if cfg.eval is not None:
        models_mod.check_seqlen_fits(source.model, seqlen=cfg.seqlen)
        with naming("--eval", cfg.eval):
            windows = load_eval_windows(cfg.eval, cfg.eval_split, tokenizer, cfg.seqlen, cfg.eval_windows)
        result.update(eval=cfg.eval, windows=int(windows.shape[0]), seqlen=cfg.seqlen,
                      perplexity=perplexity(source, windows, cfg.device, cfg.offload_activations, cfg.progress))
    if cfg.tasks:
        from .zeroshot import run_zeroshot

        full = model
        if full is None:  # lm-eval needs the whole model in memory
            full, tokenizer, _ = models_mod.load_model(name, dtype=DTYPES.get(cfg.dtype), cache_dir=cfg.cache_dir)
        result["zeroshot"] = run_zeroshot(full, tokenizer, list(cfg.tasks), cfg.task_data, limit=cfg.limit,
                                          batch_size=cfg.batch_size, device=cfg.device, progress=cfg.progress)
    return result


def format_eval_markdown(result: dict) -> str:
    """One model's evaluation, or (with a baseline) the baseline and the model side by side."""
    base = result.get("baseline")
    runs = [result] if base is None else [base, result]
    lines = [" vs ".join(f"`{r['model']}` (linear sparsity {r['linear_sparsity']:.4f})" for r in runs)
             + f", {result['dtype']}.", ""]
    if "perplexity" in result:
        ppl = ", ".join(f"{r['perplexity']:.3f}" for r in runs)
        lines += [f"Perplexity on {result['windows']} windows of {result['seqlen']} tokens of "
                  f"`{result['eval']}`: {ppl}" + (" (baseline, model)." if base else "."), ""]
    if "zeroshot" in result:
        from .zeroshot import format_table

        zs = result["zeroshot"]
        if base is None:
            table = format_table(zs, labels=("model",))
        else:
            table = format_table(base["zeroshot"], zs, labels=("baseline", "model"))
        lines += [f"Zero-shot accuracy (lm-eval {zs['lm_eval_version']}, {zs['num_fewshot']}-shot, "
                  f"limit {zs['limit']}):", "", table, ""]
    return "\n".join(lines)


def prepare_report_out(out: str | None, exts: tuple[str, ...] = (".json", ".md")) -> Path | None:
    """Check that the report (OUT.json, OUT.md: OUT plus each of `exts`) can be written before
    hours of evaluation."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and path.is_dir():
        raise PipelineError(f"out {out} is a directory; give a path prefix such as runs/eval_dense")
    for ext in exts:
        if (target := _with_ext(path, ext)).is_dir():
            raise PipelineError(f"out {out}: {target} is a directory, where the report file goes; remove it or "
                                f"choose another prefix", field="out")
    try:
        missing_parents(out)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    return path
