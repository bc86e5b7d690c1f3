"""The bench's tables: ratios to the llm-compressor peer, mean and spread over calibration
seeds with ratios paired per seed, and the markdown report."""

from __future__ import annotations

import math

from ..engine.report import PHASES


def ratios_to_peer(runs: list[dict]) -> list[dict]:
    """Our runs against llm-compressor SparseGPT at the same setting and seed (perplexity, time)."""
    peer = {(r["setting"], r["seed"]): r for r in runs if r["impl"] == "llmcompressor" and r["method"] == "sparsegpt"}
    out = []
    for r in runs:
        p = peer.get((r["setting"], r["seed"]))
        if r["impl"] == "admm-prune" and p is not None:
            out.append({"seed": r["seed"], "setting": r["setting"], "method": r["method"],
                        "perplexity_ratio": r["perplexity"] / p["perplexity"],
                        "time_ratio": r["prune_seconds"] / p["prune_seconds"]})
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def summarize(runs: list[dict], baseline_method: str | None) -> list[dict]:
    """Per (setting, implementation, method): perplexity and prune time over the seeds (mean, std,
    each seed's value) and, with a baseline method, the ratio to it taken per seed on the same
    calibration (paired), then averaged; prune times likewise."""
    base = {(r["setting"], r["seed"]): r for r in runs
            if r["impl"] == "admm-prune" and r["method"] == baseline_method}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["impl"], r["method"]), []).append(r)
    out = []
    for (setting, impl, method), rs in groups.items():
        ppl = [r["perplexity"] for r in rs]
        row = {"setting": setting, "impl": impl, "method": method, "seeds": [r["seed"] for r in rs],
               "perplexities": ppl, "perplexity_mean": mean_std(ppl)[0], "perplexity_std": mean_std(ppl)[1],
               "prune_seconds_mean": mean_std([r["prune_seconds"] for r in rs])[0]}
        paired = [(r, base[(setting, r["seed"])]) for r in rs if (setting, r["seed"]) in base]
        if baseline_method is not None and len(paired) == len(rs):
            ratios = [r["perplexity"] / b["perplexity"] for r, b in paired]
            times = [r["prune_seconds"] / b["prune_seconds"] for r, b in paired]
            row.update(ratio_to=baseline_method, ratios=ratios, ratio_mean=mean_std(ratios)[0],
                       ratio_std=mean_std(ratios)[1], time_ratios=times, time_ratio_mean=mean_std(times)[0],
                       time_ratio_std=mean_std(times)[1])
        out.append(row)
    return out


def format_markdown(result: dict) -> str:
    c = result["config"]
    first = next(iter(result["calibration"].values()))
    seeds = c["seeds"]
    lines = [
        f"Model `{result['model']}` ({result.get('dtype', c['dtype'])}) on {result['device']}; calibration "
        f"{first.get('nsamples')} x {c['seqlen']} tokens from `{c['calib']}` "
        f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, {first.get('mode')}); perplexity on "
        f"{result['eval_windows']} windows of {c['eval_seqlen']} tokens of `{c['eval']}`. "
        f"Dense perplexity **{result['dense_perplexity']:.3f}**.",
        "",
    ]
    summary = result.get("summary") or []
    base = c.get("baseline_method")
    if (len(seeds) > 1 or base) and summary:  # one seed: the table for its ratios to the baseline method
        lines += [(f"Mean ± std over {len(seeds)} calibration seeds" if len(seeds) > 1 else "One calibration seed")
                  + (f"; ratio to {base} taken per seed (same calibration), then averaged:" if base else ":"), "",
                  "| setting | implementation | method | perplexity | " + (f"/ {base} | " if base else "")
                  + "prune time (s) |" + (" time / base |" if base else ""),
                  "|---|---|---|---:|" + ("---:|" if base else "") + "---:|" + ("---:|" if base else "")]
        def pm(row, name, spec):  # mean ± std; one seed has no spread to show
            mean, std = format(row[f"{name}_mean"], spec), format(row[f"{name}_std"], spec)
            return mean if len(seeds) == 1 else f"{mean} ± {std}"

        for r in summary:
            ratio = f"{pm(r, 'ratio', '.3f')} | " if "ratio_mean" in r else ("— | " if base else "")
            time_ratio = f" {pm(r, 'time_ratio', '.2f')} |" if "time_ratio_mean" in r else (" — |" if base else "")
            lines.append(f"| {r['setting']} | {r['impl']} | {r['method']} | {pm(r, 'perplexity', '.3f')} | "
                         f"{ratio}{r['prune_seconds_mean']:.1f} |{time_ratio}")
        lines += ["", "Each run:", ""]
    lines += [
        "| seed | setting | implementation | method | perplexity | ppl / llmc-SparseGPT | prune time (s) "
        "| time / llmc-SparseGPT | peak mem (GiB) | mean layer error | sparsity |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {(r["seed"], r["setting"], r["method"]): r for r in result["ratios"]}

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    for r in result["runs"]:
        q = ratios.get((r["seed"], r["setting"], r["method"]), {}) if r["impl"] == "admm-prune" else {}
        lines.append(
            f"| {r['seed']} | {r['setting']} | {r['impl']} | {r['method']} | {r['perplexity']:.3f} | "
            f"{fmt(q.get('perplexity_ratio'), '.3f')} | {r['prune_seconds']:.1f} | "
            f"{fmt(q.get('time_ratio'), '.2f')} | {fmt(r['peak_memory_gib'], '.2f')} | "
            f"{fmt(r['mean_layer_error'], '.4f')} | {r['linear_sparsity']:.4f} |")
    ours = [r for r in result["runs"] if r.get("phase_seconds")]
    if ours:
        names = sorted({k for r in ours for k in r["phase_seconds"]}, key=PHASES.index)
        lines += ["", "Pruning time by phase (s, summed over blocks):", "",
                  "| seed | setting | method | " + " | ".join(names) + " |", "|---:|---|---|" + "---:|" * len(names)]
        lines += [f"| {r['seed']} | {r['setting']} | {r['method']} | "
                  + " | ".join(f"{r['phase_seconds'].get(k, 0.0):.1f}" for k in names) + " |" for r in ours]
    for what, why in result["skipped"].items():
        lines.append(f"\n{what} skipped: {why}")
    return "\n".join(lines) + "\n"

