"""What a pruning run does before its first block, step by step, in a fresh process each time;
old and new code alternately (A B A B).

    python benchmarks/startup.py --base 9c1cd67 --rounds 2 --calib C4.jsonl.gz --nsamples 128 \
        --seqlen 2048 --out paper_notes/startup_cpu

Steps (seconds, each timed in the child): ``import`` (process start to the engine imported:
interpreter, torch, transformers, the CLI's parser), ``open`` (the model's skeleton, its
tensors outside the blocks, the tokenizer), ``scan`` (the NaN/Inf check of every stored
weight), ``texts`` (the calibration file read), ``sample`` (the calibration windows),
``capture`` (block 0's inputs). A is ``git archive <base>`` put first on PYTHONPATH (as in
`speed_ab.py`), B this checkout. The windows' sha256 of A and B must agree. Default model: the
embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_ab import base_package  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
def since_start():
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    import os
    return float(Path("/proc/uptime").read_text().split()[0]) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
import torch
from admm_prune.gpu import cli
from admm_prune.gpu.data import corpus as data
from admm_prune.gpu.engine import pipeline
from admm_prune.gpu.engine.calibration import capture_block_inputs
from admm_prune.gpu.checkpoint.sources import open_model
cli.build_parser()
times = {"import": since_start()}
model, calib, nsamples, seqlen = sys.argv[1] or None, sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def timed(name, fn):
    t = time.perf_counter(); out = fn(); times[name] = time.perf_counter() - t; return out
source, tok = timed("open", lambda: open_model(model, torch.float32))
timed("scan", source.check_finite)
texts = timed("texts", lambda: data.load_texts(calib))
ids, info = timed("sample", lambda: data.sample_calibration(texts, tok, nsamples, seqlen, 0))
timed("capture", lambda: capture_block_inputs(source.model, ids, torch.device("cpu"), torch.device("cpu"), False))
print(json.dumps({"times": times, "sha256": info["sha256"]}))
"""

STEPS = ("import", "open", "scan", "texts", "sample", "capture")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="")
    p.add_argument("--calib", required=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="path prefix: OUT.json, OUT.md")
    a = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-ab-") as tmp:
        base = str(base_package(a.base, Path(tmp)))
        for _ in range(a.rounds):
            for label, path in (("A", base), ("B", None)):
                child_env = {**env, "PYTHONPATH": path} if path else env
                proc = subprocess.run([sys.executable, "-c", CHILD, a.model, a.calib, str(a.nsamples), str(a.seqlen)],
                                      env=child_env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                rows.append({"label": label, **json.loads(proc.stdout.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"Start-up steps (s): model {a.model or 'smollm2'}, calibration {a.nsamples} x {a.seqlen} from "
             f"{a.calib}, {a.threads} thread(s); A = {a.base}, B = this checkout.", "",
             "| run | code | " + " | ".join(STEPS) + " | sum |", "|" + "---|" * (len(STEPS) + 3)]
    for k, r in enumerate(rows):
        t = r["times"]
        lines.append(f"| {k + 1} | {r['label']} | " + " | ".join(f"{t[s]:.2f}" for s in STEPS) +
                     f" | {sum(t.values()):.2f} |")
    lines += ["", f"Calibration windows identical across runs: {len({r['sha256'] for r in rows}) == 1}."]
    Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
