#!/usr/bin/env bash
# Check stimsynth on a GPU machine, in about five minutes (see benchmarks/gpu_check.py):
# the tiny study on CUDA and on the CPU, whose results must agree, and the speed of
# four metamer seeds in one batch against four single-seed runs.
#
#   benchmarks/gpu_check.sh [--cpu-only] [gpu_check.py options]
#
# Python: $PYTHON if set, else .venv/bin/python, else a new .venv made from python3
# with the system's packages visible (so that a CUDA torch installed there is used)
# and stimsynth installed with its test extra. The check needs a CUDA build of
# torch (`python -c "import torch; print(torch.version.cuda)"` prints None for a CPU
# build), installed beforehand where the machine has no network. Without a GPU it
# exits 1 unless --cpu-only is given.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu_check}

if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    echo "gpu_check: creating .venv (system packages visible, for a CUDA torch)"
    python3 -m venv --system-site-packages .venv
    python=.venv/bin/python
fi

# What the check needs: stimsynth and its test extra (pytest, for the tiny study's
# config in tests/test_workflow.py), and torch.
if ! "$python" -c "import stimsynth, snakemake, plenoptic, pytest, torch" 2>/dev/null; then
    echo "gpu_check: installing stimsynth[test] for $python"
    "$python" -m pip install --quiet -e ".[test]" || {
        echo "gpu_check: could not install stimsynth and its dependencies (no network?);" \
            "set PYTHON to an interpreter that has them and a CUDA build of torch" >&2
        exit 1
    }
fi

"$python" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: "
      f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
EOF

exec timeout 600 "$python" benchmarks/gpu_check.py --out "$OUT" "$@"
