"""The bench's picture: perplexity against sparsity, one line per method, the seeds' spread as
error bars (PREFIX.png beside PREFIX.json).

matplotlib is optional (the ``tutorial`` extra): without it the bench writes its tables and
logs one warning instead of the picture. The figure is drawn on matplotlib's object API with
the Agg canvas, imported here and only when a picture is drawn: no pyplot, no global backend
or style is set.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from admm_prune.reference import parse_pattern

from ..engine.report import write_atomic

log = logging.getLogger(__name__)

SIZE_INCHES, DPI = (7.0, 4.5), 100  # a 700 x 450 pixel picture
LOG_RANGE = 10.0  # a logarithmic perplexity axis once the largest point is this many times the smallest


def bench_points(summary: list[dict]) -> dict[str, list[tuple[float, float, float, str]]]:
    """The summary's rows as points per line: {label: [(sparsity, mean ppl, std ppl, setting)]},
    sorted by sparsity. An N:M setting sits at its sparsity 1 - N/M, on a line of its own
    (``method (N:M)``), so it is never joined to the unstructured points."""
    lines: dict[str, list[tuple[float, float, float, str]]] = {}
    for row in summary:
        label = row["method"] if row["impl"] == "admm-prune" else f"{row['impl']} {row['method']}"
        if ":" in row["setting"]:
            n, m = parse_pattern(row["setting"])
            x, label = 1 - n / m, f"{label} ({row['setting']})"
        else:
            x = float(row["setting"])
        lines.setdefault(label, []).append((x, row["perplexity_mean"], row["perplexity_std"], row["setting"]))
    return {k: sorted(v) for k, v in lines.items()}


def log_scale(values: list[float]) -> bool:
    """Whether the perplexity axis is logarithmic: the largest value is `LOG_RANGE` times the smallest or more."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= LOG_RANGE


_warned: list = []  # whether the missing-matplotlib warning was given


def plot_bench(result: dict, path: Path) -> Path | None:
    """Write the picture of `result` (a bench result with its ``summary``) to `path`; None, with a
    warning logged, where matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if _warned:  # once per process: the bench saves (and would plot) after every run
            return None
        _warned.append(True)
        log.warning("no %s: matplotlib is not installed (pip install 'admm-prune[tutorial]' or matplotlib); "
                    "the tables are written", path.name)
        return None
    try:  # the picture is a convenience: a plotting failure never costs a bench its runs
        png = _draw(result, Figure, FigureCanvasAgg)
    except Exception as e:  # noqa: BLE001 (matplotlib raises many types)
        log.warning("no %s: plotting failed (%s); the tables are written", path.name, e)
        return None
    write_atomic(path, png.getvalue())
    return path


def _draw(result: dict, Figure, FigureCanvasAgg) -> io.BytesIO:
    """The bench picture of `result` as PNG bytes."""
    lines = bench_points(result.get("summary") or [])
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {}  # a method's N:M points in its curve's colour
    for label, points in sorted(lines.items(), key=lambda item: ":" in item[1][0][3]):
        xs, ys, errs, _ = zip(*points)
        pattern = ":" in points[0][3]
        color = colors.setdefault(label.rsplit(" (", 1)[0] if pattern else label, f"C{len(colors) % 10}")
        ax.errorbar([100 * x for x in xs], ys, yerr=errs if any(errs) else None, label=label, capsize=3, color=color,
                    marker="X" if pattern else "o", markersize=8 if pattern else 5, linestyle="none" if pattern else "-")
    dense = result.get("dense_perplexity")
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    if log_scale([y for points in lines.values() for _, y, _, _ in points] + ([dense] if dense is not None else [])):
        ax.set_yscale("log")
    seeds = result.get("config", {}).get("seeds") or []
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"perplexity ({result.get('eval_windows', '?')} windows)")
    ax.set_title(f"{Path(str(result.get('model', 'model'))).name}: perplexity against sparsity"
                 + (f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if lines or dense is not None:
        ax.legend(fontsize=7, loc="best", ncols=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png
