#!/usr/bin/env bash
# bench/gpu_check.sh OUT_DIR [tests|bench|all]
#
# Set MTLFAST_COMMIT=<sha> when the tree was copied without .git, so that the results
# record the commit; WORKLOADS="..." picks benchmark workloads.
#
# On a GPU host with no network: prints the machine and versions, installs mtlfast
# (building csrc/), runs the whole test suite on the GPU and the full benchmark (one
# process per workload) plus a profile of one bert-base-4task step, and leaves logs and
# results in OUT_DIR. Carried wheels in
# .whl/ (liger-kernel, cut-cross-entropy) are installed to /tmp/site first; fetch them on a
# host with network with `pip download --no-deps -d .whl liger-kernel cut-cross-entropy`.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR [tests|bench|all]}
PART=${2:-all}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

{
    nvidia-smi
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
    nvcc --version | tail -2
    git rev-parse HEAD 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$OUT/install.log" 2>&1 &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "== install" | tee -a "$OUT/install.log"
if ! (time "$PY" -m pip install --no-build-isolation --no-deps -e .) >>"$OUT/install.log" 2>&1; then
    tail -40 "$OUT/install.log"
    echo "install failed"
    exit 1
fi
tail -3 "$OUT/install.log"

status=0
if [[ $PART == tests || $PART == all ]]; then
    echo "== tests"
    # one tuning config: the tests check results, not tuning; the benchmark tunes
    MTLFAST_AUTOTUNE=${MTLFAST_AUTOTUNE:-0} timeout 540 "$PY" -m pytest -q -ra tests --junitxml="$OUT/junit.xml" \
        >"$OUT/tests.log" 2>&1 || status=1
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi
if [[ $PART == bench || $PART == all ]]; then
    for workload in ${WORKLOADS:-bert-base-4task many-tasks-64 big-head-128k}; do
        echo "== bench $workload"
        timeout 400 "$PY" -m mtlfast.bench --device cuda --workloads "$workload" --out "$OUT/bench-$workload" \
            >"$OUT/bench-$workload.log" 2>&1 || status=1
        grep -E "^\[" "$OUT/bench-$workload.log"
    done
    # where a small step's time goes (host vs kernels), for the issue notes
    timeout 120 "$PY" -m mtlfast.bench.profile_step bert-base-4task mtlfast-triton 25 >"$OUT/profile-bert-triton.txt" 2>&1
    head -1 "$OUT/profile-bert-triton.txt"
    "$PY" -m mtlfast.bench.merge "$OUT"/bench-* --out "$OUT" >/dev/null && cat "$OUT/results.md"
fi
exit $status
