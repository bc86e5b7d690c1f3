"""`admm-prune` command line: parses flags into a frozen config and calls one library function.

    admm-prune prune [--model ID_OR_PATH] --method admm-grad --sparsity 0.5 --out DIR ...
    admm-prune eval  --model DIR [--eval wikitext2] [--tasks rte,arc_easy --task-data DIR] ...
    admm-prune bench --settings 0.5,2:4 --out runs/bench ...

User errors (bad flags, missing files, unknown models, NaN in a block, existing --out)
end with one line on stderr and exit status 2, nothing written. Ctrl-C and SIGTERM end with one
line saying what was kept (finished blocks staged for --resume) and exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import signal
import sys
import threading

from admm_prune.reference.errors import AdmmPruneError

from . import config as config_mod
from . import methods
from .config import EvalConfig, PipelineError, PruneConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C; SIGTERM too
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


def _typed(what: str, convert):
    """An argparse type: `convert(text)`, or one clear line saying what was expected."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    parse.__name__ = what  # what argparse names in its own messages
    return parse


def _none_or(convert, words=("none",)):
    return lambda text: None if text.strip().lower() in words else convert(text)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def regex_list(text: str) -> tuple[str, ...]:
    """'o_proj,mlp\\.(gate|up)_proj' -> ('o_proj', 'mlp\\.(gate|up)_proj'): split at the commas outside
    (), [] and {} (and not escaped), so that a regex's own comma (``pro{1,1}j``, ``[,;]``) stays in it."""
    items, current, depth, in_class, escaped = [], [], 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "({":
            depth += 1
        elif ch in ")}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    return tuple(t.strip() for t in [*items, "".join(current)] if t.strip())


def byte_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, '500MB', '1.5GB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", text, flags=re.IGNORECASE)
    size = int(float(match[1]) * _BYTE_UNITS[(match[2] or "").lower()]) if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive size such as 5GB, 500MB, 2GiB or a number of bytes, got {text!r}")
    return size


# How a field's annotation is typed on the command line.
_TYPES = {
    "int": _typed("an integer", int),
    "int | None": _typed("an integer, or 'none'/'all'", _none_or(int, ("none", "all"))),
    "float": _typed("a number", float),
    "float | None": _typed("a number such as 0.5, or 'none'", _none_or(float)),
    "str": str,
    "str | None": _none_or(str),
    "tuple[str, ...]": _comma_list,
    "tuple[int, ...]": _typed("comma-separated integers", lambda text: tuple(int(t) for t in _comma_list(text))),
}
_PARSERS = {"byte_size": byte_size, "regex_list": regex_list}


def add_flags(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `config` (``--field-name``), with the field's default,
    help and CLI hints (`reference.options.option`): the CLI writes no setting twice."""
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kw = dict(dest=f.name, default=f.default, help=meta["help"])
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        if f.type == "bool":
            kw["action"] = "store_false" if f.default else "store_true"
        elif f.type == "bool | None":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _PARSERS[meta["parse"]] if "parse" in meta else _TYPES[f.type]
            choices = meta.get("choices")
            if choices is not None:
                kw["choices"] = methods.names() if choices == "methods" else choices
        parser.add_argument(flag, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _method_list() -> str:
    return "; ".join(f"{m.spec.name}: {m.spec.summary}" for m in methods.IMPLEMENTATIONS.values())


def build_parser() -> argparse.ArgumentParser:
    from .bench.bench import BenchConfig

    parser = _Parser(
        prog="admm-prune", formatter_class=_HelpFormatter,
        description="One-shot pruning of LLaMA-family models with the ADMM weight update (Boža 2024).")
    sub = parser.add_subparsers(dest="command", required=True)

    summary = "calibrate, prune every decoder block, evaluate, save"
    p = sub.add_parser("prune", help=summary, description=f"{summary}. Methods: {_method_list()}.",
                       formatter_class=_HelpFormatter)
    add_flags(p, PruneConfig)
    _common(p)

    summary = "perplexity and zero-shot task accuracy (lm-eval) of a saved or hub model"
    e = sub.add_parser("eval", help=summary, description=summary, formatter_class=_HelpFormatter)
    add_flags(e, EvalConfig)
    _common(e)

    summary = "every method x setting on one model on the same windows, peers side by side"
    b = sub.add_parser("bench", help=summary, description=f"{summary}. Methods: {_method_list()}.",
                       formatter_class=_HelpFormatter)
    add_flags(b, BenchConfig, skip=BenchConfig.VARIED)
    _common(b)
    return parser


# Config fields that are also everyday words in error messages ("the model's limit of ...").
_NOT_FLAGS = {"model", "limit"}
# Quoted text is a value or another library's words, never a field name: 'x', "x" (not model's).
_QUOTED = re.compile(r"""((?<!\w)'[^']*'(?!\w)|(?<!\w)"[^"]*"(?!\w))""")


def flag_of(action: argparse.Action) -> str:
    """The flag that names a setting: its positive form (``--layer-errors``, not
    ``--no-layer-errors``), else its longest (``--no-progress``)."""
    positive = [o for o in action.option_strings if not o.startswith("--no-")]
    return max(positive or action.option_strings, key=len)


def flag_names(message: str, parser: argparse.ArgumentParser, field: str | tuple[str, ...] | None = None) -> str:
    """A library message as the command line says it, in one line: field names become the flags
    that set them ("out x exists; pass overwrite" -> "--out x exists; pass --overwrite"); paths
    and quoted text are left alone. `field`: the setting(s) the message is about, named as
    flags even where the word is an everyday one ("model").

    The one place where a user error (`main`) or an unused-setting warning (`config.warn_unused`,
    through `FlagNamesFilter`) turns field names into flags."""
    named = {field} if isinstance(field, str) else set(field or ())
    flags = {a.dest: flag_of(a) for a in parser._actions
             if a.option_strings and (a.dest not in _NOT_FLAGS or a.dest in named)}
    pattern = re.compile(r"(?<![\w/.\\-])(" + "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
                         + r")(?![\w/.\\-])")
    parts = _QUOTED.split(" ".join(message.split("\n")))
    return "".join(part if k % 2 else pattern.sub(lambda m: flags[m[1]], part) for k, part in enumerate(parts))


class FlagNamesFilter(logging.Filter):
    """Says the settings of a warning record that names them (``record.fields``, set by
    `config.warn_unused`) as `parser`'s flags (`flag_names`)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if fields:
            record.msg, record.args = flag_names(record.getMessage(), self.parser, fields), ()
        return True


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _run(command: str, options: dict):
    """The library call behind `command`; returns what main prints (a JSON-able dict or text)."""
    from .evaluation import evaluate
    from .engine import pipeline

    if command == "prune":
        return pipeline.run_prune(PruneConfig(**options)).summary()
    if command == "bench":
        from .bench import bench

        return bench.run_bench(bench.BenchConfig(**options))["markdown"]
    return evaluate.run_eval(EvalConfig(**options))


@contextlib.contextmanager
def sigterm_as_sigint():
    """SIGTERM (kill, a batch scheduler's preemption, torchrun stopping its ranks) handled as Ctrl-C
    for the duration: the run stops the same way, says what it kept, exits 130. Outside the main
    thread, where no handler can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _as_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _as_sigint(signum, frame):
    """Whatever SIGINT does now: KeyboardInterrupt, or the checkpoint's "held until the swap is done"."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (nohup, a background job) or default: still stop
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .engine.distributed import finish, init_from_env, launched_by_torchrun

    options = vars(args)
    command = options.pop("command")
    options.pop("verbose")
    subparser = _subparser(parser, command)
    unused_names = FlagNamesFilter(subparser)
    config_mod.log.addFilter(unused_names)
    dist = None
    try:
        if launched_by_torchrun():  # torchrun --nproc-per-node N -m admm_prune.gpu ...: one rank of N
            dist = init_from_env(options.get("device"))
            if not dist.main:  # rank 0 speaks for the run
                options["progress"] = False
                logging.getLogger().setLevel(logging.WARNING)
        with logging_redirect_tqdm(), sigterm_as_sigint():  # log lines above the live progress bars
            result = _run(command, options)
    except AdmmPruneError as e:  # every user error: one line, the fields it names said as flags
        said = flag_names(str(e), subparser, e.field) if e.field or isinstance(e, PipelineError) else str(e)
        print(f"admm-prune: error: {' '.join(said.splitlines())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # the pipeline's own interrupts say what is on disk
        print(f"admm-prune: interrupted; {e}" if str(e) else "admm-prune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        config_mod.log.removeFilter(unused_names)
        if dist is not None:
            finish(dist)
    if dist is None or dist.main:
        print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
