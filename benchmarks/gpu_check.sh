#!/usr/bin/env bash
# The GPU check: run from the repository root on a machine with a CUDA GPU,
#
#     bash benchmarks/gpu_check.sh
#
# (about 3-5 minutes; keep the caller's timeout at ~8 minutes). It
#   1. prints the GPU (nvidia-smi) and the torch build;
#   2. runs the CUDA-parametrised tests: tests/conftest.py's DEVICES gives
#      test ids ending in [cuda], plus the cuda-marked tests, the device-mismatch
#      tests and the README quick start (which runs on CUDA when it is there);
#   3. runs benchmarks/bench_scale.py --device cuda and prints its tables;
#   4. runs benchmarks/bench_sven_step.py --device cuda: the Sven/Adam step ratios of the step-cost cases.
# Logs and the JSON go to $OUT (set by the device tool) or results/gpu_check/.
# The exit status is non-zero if the tests or the benchmark failed (the
# benchmark still runs after a test failure).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
# the device machine has torch but not this project installed: import it from the checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# a Python whose torch sees the GPU: $PYTHON, then the venv, then python3 / python
PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        PY="$cand"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check.sh: no Python with a CUDA-enabled torch that sees a GPU (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
    exit 2
fi

OUT_DIR="${OUT:-results/gpu_check}"
mkdir -p "$OUT_DIR"

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "(no nvidia-smi on PATH)"
fi
"$PY" -c 'import torch; print(f"python torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")'

status=0

echo
echo "== CUDA tests (tests -k 'cuda or device or readme')"
if timeout 240 "$PY" -m pytest tests -q -x -k "cuda or device or readme" 2>&1 \
    | tee "$OUT_DIR/gpu_tests.log"; then
    echo "CUDA tests: passed"
else
    echo "CUDA tests: FAILED (see $OUT_DIR/gpu_tests.log)"
    status=1
fi

echo
echo "== benchmarks/bench_scale.py --device cuda"
if timeout 300 "$PY" benchmarks/bench_scale.py --device cuda --child-timeout 200 \
    --json "$OUT_DIR/bench_scale_cuda.json" 2>&1 | tee "$OUT_DIR/bench_scale_cuda.txt"; then
    echo "bench_scale: done"
else
    echo "bench_scale: FAILED (see $OUT_DIR/bench_scale_cuda.txt)"
    status=1
fi

echo
echo "== benchmarks/bench_sven_step.py --device cuda (Sven step / Adam step, by stage)"
if timeout 240 "$PY" benchmarks/bench_sven_step.py --device cuda --rounds 7 2>&1 | tee "$OUT_DIR/bench_sven_step_cuda.txt"; then
    echo "bench_sven_step: done"
else
    echo "bench_sven_step: FAILED (see $OUT_DIR/bench_sven_step_cuda.txt)"
    status=1
fi

echo
echo "== summary (targets)"
if [ -f "$OUT_DIR/bench_scale_cuda.json" ]; then
    "$PY" - "$OUT_DIR/bench_scale_cuda.json" <<'EOF'
import json, sys

res = json.load(open(sys.argv[1]))
print(f"{'target':58s} {'measured':>10s} {'goal':>8s}  met   basis")
for t in res["targets"]:
    v = "n/a" if t["value"] is None else f"{t['value']:.3g}"
    met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
    print(f"{t['target']:58s} {v:>10s} {t['op']}{t['threshold']:<6g}  {met:4s}  {t['basis']}")
EOF
fi
exit "$status"
