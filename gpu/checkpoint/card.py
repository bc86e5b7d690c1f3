"""The pruned checkpoint's model card (``README.md``), in the model hub's convention: YAML front
matter (base_model, tags, license where known, pipeline_tag), then what was done to the
model, what it measured, and the command that made it.

Made from the run's report alone (its config, model identity, calibration, perplexities,
versions), so it says what the run did, not what it was asked to do.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import shlex
from pathlib import Path

import yaml

from .. import methods
from ..config import PruneConfig
from .models import DEFAULT_MODEL, GGUF_DISTRIBUTION

EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded Q4_1 GGUF quantizes
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")  # a Hugging Face cache folder


def base_model(model: dict) -> str | None:
    """The hub id the run's model came from: the embedded SmolLM2's, a hub id as given, the
    repository of a Hugging Face cache snapshot; None for another local folder or a model in memory."""
    name, path = model.get("name"), model.get("path") or ""
    if name in (None, DEFAULT_MODEL):
        return EMBEDDED_BASE
    if SNAPSHOT.search(path):
        return "/".join(SNAPSHOT.search(path).groups())
    if HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    return None


def base_license(model: dict) -> str | None:
    """The base model's license where it is known: the embedded model's distribution's, or the
    ``license`` of a README.md front matter beside the checkpoint read."""
    if model.get("name") in (None, DEFAULT_MODEL):
        try:
            text = importlib.metadata.metadata(GGUF_DISTRIBUTION).get("License")
            return text.lower() if text else None
        except importlib.metadata.PackageNotFoundError:
            return None
    readme = Path(model.get("path") or "") / "README.md"
    if model.get("path") and readme.is_file():
        front = front_matter(readme.read_text(errors="replace"))
        return front.get("license") if isinstance(front.get("license"), str) else None
    return None


def front_matter(text: str) -> dict:
    """The YAML between a model card's leading ``---`` lines ({} where there is none or it is not YAML)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def command_line(config: dict) -> str:
    """`admm-prune prune` with the flags that give `config` (a `PruneConfig` as a dict): every
    field that differs from its default, written as the command line writes it."""
    words = ["admm-prune", "prune"]
    for f in dataclasses.fields(PruneConfig):
        if "help" not in f.metadata or f.name not in config or config[f.name] == f.default:
            continue
        value, flag = config[f.name], f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if f.type == "bool":
            words.append(flag)
        elif f.type == "bool | None":
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else
                      "none" if value is None else str(value)]
    return " ".join(shlex.quote(w) for w in words)


def model_card(report) -> str:
    """The README.md of the checkpoint that `report` (a `PruneReport`) describes."""
    cfg, model, calib, ppl = report.config, report.model, report.calibration, report.perplexity
    base, method = base_model(model), cfg["method"]
    meta = {**({"base_model": base} if base else {}), "tags": ["pruned", "sparse", "admm-prune", method],
            **({"license": base_license(model)} if base_license(model) else {}),
            "pipeline_tag": "text-generation", "library_name": "transformers"}
    target = f"{cfg['pattern']} (N:M)" if cfg["pattern"] != "unstructured" else f"{100 * cfg['sparsity']:g} %"
    achieved = [r["sparsity"] for r in report.linears]
    rows = [
        ("base model", base or model.get("path") or model.get("name") or "(unknown)"),
        ("method", f"{method}: {methods.get(method).spec.summary}"),
        ("sparsity", f"{target} of each pruned linear's weights ({cfg['sparsity_profile']} across blocks); "
                     f"achieved {100 * sum(achieved) / max(len(achieved), 1):.2f} % on average over "
                     f"{len(achieved)} linears"),
        ("pattern", cfg["pattern"]),
        ("calibration", f"{calib.get('nsamples', 0)} windows x {cfg['seqlen']} tokens of {cfg['calib']} "
                        f"(seed {cfg['seed']}, {calib.get('mode', '-')})" if calib.get("mode") != "none"
                        else calib.get("reason", "none")),
        ("block reconstruction", f"{cfg['reconstruct_steps']} Adam steps of {cfg['reconstruct_batch']} "
                                 f"window{'s' if cfg['reconstruct_batch'] != 1 else ''}, "
                                 f"relative step size {cfg['reconstruct_lr']:g}" if cfg["reconstruct_steps"] else "off"),
        ("dtype", model.get("dtype", "-")),
    ]
    if "pruned" in ppl:
        split = "" if Path(cfg["eval"]).expanduser().exists() else f"{cfg['eval_split']} split, "  # a hub dataset's
        rows.append(("perplexity", f"dense {ppl['dense']:.3f}, pruned **{ppl['pruned']:.3f}** on {cfg['eval']} "
                                   f"({split}{ppl['windows']} windows of {ppl['seqlen']} tokens)"))
    versions = report.versions
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {base or Path(model.get('path') or 'model').name} pruned with admm-prune ({method}, {target})", "",
             "One-shot pruning, no training: the pruned linears' weights were set to zero by the method "
             "below and the kept ones updated on the calibration windows. The zeros are stored as "
             "ordinary dense tensors; the checkpoint loads with `transformers` as the base model does.", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## How it was made", "", "```", command_line(cfg), "```", "",
             f"admm-prune {versions.get('admm_prune', '?')}, torch {versions.get('torch', '?')}, "
             f"transformers {versions.get('transformers', '?')}; {report.world_size} process(es) on "
             f"{model.get('device', '?')}. Every per-linear error and time is in `report.json`.", ""]
    return "\n".join(lines)
