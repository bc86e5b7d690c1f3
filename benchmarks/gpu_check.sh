#!/usr/bin/env bash
# The whole GPU check as one command, under 4 minutes (timeouts 130 s + 100 s; on an H200
# the benchmark itself took 10 s; it saves its table after every shape):
# tier-2 parity tests (pytest -m gpu tests/test_parity.py), then the layer benchmark.
#
#   bash benchmarks/gpu_check.sh                  # outputs under ${OUT:-/tmp/out}
#   DEVICE=cpu BENCH_SHAPES=small BENCH_TIMEOUT=900 bash benchmarks/gpu_check.sh  # no GPU
#
# Needs python with torch, numpy, scipy, pytest, hypothesis; no network, no pip install:
# admm_prune.reference and admm_prune.gpu are made importable from this checkout through
# symlinks in a temporary directory put first on PYTHONPATH.
# Outputs (7 files): env.txt, tier2.log, tier2.xml (junit; the measured float32
# deviations are recorded there as properties), bench.log, layer_benchmark.md/.json,
# summary.txt. Exit status: the tests' if they failed, else the benchmark's.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
DEVICE="${DEVICE:-cuda}"
BENCH_SHAPES="${BENCH_SHAPES:-all}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-100}"
mkdir -p "$OUT"

PKG="$(mktemp -d)"
trap 'rm -rf "$PKG"' EXIT
mkdir -p "$PKG/admm_prune"
ln -s "$REPO/reference" "$PKG/admm_prune/reference"
ln -s "$REPO/gpu" "$PKG/admm_prune/gpu"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=ci PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
cd "$REPO"

python - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch, admm_prune.gpu as G, admm_prune.reference as R
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("admm_prune.gpu from", G.__file__, "| reference from", R.__file__)
EOF

timeout 130 python -m pytest -m gpu tests/test_parity.py -p no:cacheprovider -q -rs \
    -W ignore::DeprecationWarning --junitxml="$OUT/tier2.xml" 2>&1 | tee "$OUT/tier2.log"
rc_tests=${PIPESTATUS[0]}

timeout "$BENCH_TIMEOUT" python benchmarks/bench_layers.py --device "$DEVICE" --shapes "$BENCH_SHAPES" \
    --repeats 3 --out "$OUT/layer_benchmark.md" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

echo "tier-2 tests rc=$rc_tests, benchmark rc=$rc_bench" | tee "$OUT/summary.txt"
[ "$rc_tests" -ne 0 ] && exit "$rc_tests"
exit "$rc_bench"
