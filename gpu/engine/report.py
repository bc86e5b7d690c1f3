"""What a run reports: per-linear records, the run's report, versions, peak memory, atomic writes."""

from __future__ import annotations

from admm_prune.reference.errors import AdmmPruneError

import contextlib
import os
import time
import platform
import resource
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LinearRecord:
    """What happened to one linear layer (one row of the report)."""

    block: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    error_mask_only: float | None  # relative error of W * M (the final mask, no weight update)
    error_pruned: float | None  # relative error of the pruned weights (None: magnitude, no inputs seen)
    seconds: float
    tokens: int | None = None  # an expert's: the calibration tokens routed to it (None: not an expert)
    fallback: str | None = None  # an expert pruned without its Gram: why and how (fewer than moe_min_tokens)


class PhaseTimer:
    """Seconds per named phase of a block (`PHASES`: load, forward, gram, share, solve, errors,
    write, write_wait) or of a run (`RUN_PHASES`).

    ``with timer("solve"): ...`` adds the time of the body; on CUDA each boundary
    synchronizes, so the seconds are the device's work, not its queueing. A timer made with
    ``enabled=False`` only runs the bodies."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.seconds: dict[str, float] = {}
        self.enabled = enabled
        cuda = device is not None and device.type == "cuda"
        self._sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


NO_TIMER = PhaseTimer(enabled=False)
PHASES = ("load", "forward", "gram", "share", "solve", "errors", "reconstruct", "write", "write_wait")
# run_prune's steps: the model's skeleton, tokenizer and NaN scan; the calibration windows; the
# perplexity windows; the staging folder and the tensors outside the blocks; dense perplexity;
# the block loop (with OWL's targets); pruned perplexity; the checkpoint's shards and files.
RUN_PHASES = ("open", "calibration", "eval_windows", "staging", "dense_perplexity", "prune",
              "pruned_perplexity", "assemble")


def phase_totals(blocks: list[dict]) -> dict[str, float]:
    """The phases' seconds summed over blocks."""
    out: dict[str, float] = {}
    for b in blocks:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


@dataclass
class PruneReport:
    config: dict
    versions: dict
    model: dict = field(default_factory=dict)  # what was loaded: name, resolved path, files, device
    world_size: int = 1  # processes that ran it (torch.distributed)
    calibration: dict = field(default_factory=dict)
    linears: list = field(default_factory=list)
    block_sparsity: dict = field(default_factory=dict)  # profile, per-block targets and achieved (OWL: ratios)
    block_seconds: list = field(default_factory=list)
    block_phases: list = field(default_factory=list)  # per block: seconds of each of PHASES
    resumed_blocks: list = field(default_factory=list)  # blocks taken from an interrupted run
    block_reconstruction: list = field(default_factory=list)  # per block: error_before/after, steps, seconds
    matmul_precision: str = ""  # what the solves' float32 products ran with: "high" (TF32) on CUDA only
    run_phases: dict = field(default_factory=dict)  # seconds of each of RUN_PHASES that ran
    total_seconds: float = 0.0  # run_prune, from its call to the checkpoint assembled
    wall_seconds: float = 0.0  # the same end, from the process's start (`process_seconds`)
    prune_seconds: float = 0.0
    peak_memory: dict = field(default_factory=dict)  # taken at the same end, after the assembly
    perplexity: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "linears": len(self.linears),
            "mean_sparsity": sum(r["sparsity"] for r in self.linears) / max(len(self.linears), 1),
            "mean_layer_error": mean_layer_error(r["error_pruned"] for r in self.linears),
            "perplexity": self.perplexity,
            "prune_seconds": self.prune_seconds,
            "total_seconds": self.total_seconds,
            "wall_seconds": self.wall_seconds,
            "run_phases": self.run_phases,
            "phase_seconds": phase_totals(self.block_phases),
            "resumed_blocks": len(self.resumed_blocks),
            **({"reconstruction_error": {
                "before": mean_layer_error(r["error_before"] for r in self.block_reconstruction),
                "after": mean_layer_error(r["error_after"] for r in self.block_reconstruction)}}
               if self.block_reconstruction else {}),
        }


def mean_layer_error(errors) -> float | None:
    """Mean of the measured layer errors; None when none was measured (magnitude)."""
    errs = [e for e in errors if e is not None]
    return sum(errs) / len(errs) if errs else None


def versions() -> dict:
    import numpy
    import scipy
    import transformers

    try:
        from importlib.metadata import version

        ours = version("admm-prune")
    except Exception:  # not installed (e.g. run from a source tree)
        ours = "source"
    return {
        "admm_prune": ours, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": numpy.__version__,
        "scipy": scipy.__version__, "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


_IMPORTED = time.time()


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included).

    Linux: the process's start time (field 22 of /proc/self/stat, clock ticks since boot)
    against /proc/uptime, both 10 ms grained. Elsewhere: seconds since this module was
    imported (which misses the interpreter's start and the imports before it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after "(command name)"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - _IMPORTED


def peak_rss_bytes() -> int:
    """Peak resident set of this process (mapped shard pages count).

    Linux: VmHWM of /proc/self/status, which starts afresh at exec; ru_maxrss does not (a
    child started from a large parent reports the parent's size). Elsewhere: ru_maxrss."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(device: torch.device) -> dict:
    """Peak host RSS of this process and peak device memory."""
    mem = {"host_max_rss_gib": peak_rss_bytes() / 2**30}
    if device.type == "cuda":
        mem["device_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return mem


def usual_mode(is_dir: bool) -> int:
    """The permissions open()/mkdir() would give under the process umask (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, usual_mode(False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def missing_parents(out: str) -> list[Path]:
    """The folders above `out` that do not exist yet (outermost first), after checking that
    the nearest existing one is a folder this process can write in. Raises AdmmPruneError
    naming `out`."""
    path = Path(out).absolute()
    missing = []
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AdmmPruneError(f"out {out}: {parent} is a file, not a folder", field="out")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise AdmmPruneError(f"out {out}: cannot write to {parent}", field="out")
            return missing[::-1]
        missing.append(parent)
    return missing[::-1]


def exclusive_phases(seconds: dict) -> dict:
    """Phase seconds with the Gram hooks' time taken out of the forwards they ran inside."""
    out = dict(seconds)
    if "gram" in out and "forward" in out:
        out["forward"] -= out["gram"]
    return out


def achieved_block_sparsity(records: list[LinearRecord]) -> list[float]:
    """Each pruned block's fraction of zeros over its prunable weights, from the records."""
    zeros: dict[int, float] = {}
    total: dict[int, int] = {}
    for r in records:
        n = r.shape[0] * r.shape[1]
        zeros[r.block] = zeros.get(r.block, 0.0) + r.sparsity * n
        total[r.block] = total.get(r.block, 0) + n
    return [zeros[b] / total[b] for b in sorted(total)]
