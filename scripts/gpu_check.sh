#!/usr/bin/env bash
# The GPU check (benchmarks/README.md, "The GPU check"): on a lent CUDA machine, install the
# wheels laid in scripts/wheels/ by scripts/gpu_wheels.sh (no registry is reached from there),
# then run python -m benchmarks.gpu_check, under 8 minutes in all. Figures go to
# $OUT/gpu_check.json (else scripts/gpu_check.json), a log beside it. Exits 0 whatever part
# failed: the JSON says which and why.
#
#   bash scripts/gpu_check.sh                      # on the GPU machine
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --cpu-smoke    # here: tiny sizes, no GPU
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
py="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
out="${OUT:-$here}"
mkdir -p "$out"
cuda12_args=()

smoke=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && ls "$here"/wheels/*.whl >/dev/null 2>&1; then
    # pip chooses the wheels that fit this Python from the folder; the CUDA 12 runtime goes to its
    # own folder, off sys.path, so that torch's CUDA 13 libraries never meet it there.
    t0=$(date +%s)
    for spec in "faiss-gpu:$site" "bitsandbytes:$site" "nvidia-cuda-runtime-cu12:$site-cuda12"; do
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${spec#*:}" \
            --find-links "$here/wheels" "${spec%%:*}" || echo "gpu_check.sh: installing ${spec%%:*} failed"
    done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    cuda12_args=(--cuda12 "$site-cuda12/nvidia/cuda_runtime/lib")
    echo "gpu_check.sh: wheels installed in $(( $(date +%s) - t0 )) s"
elif [ "$smoke" = 0 ]; then
    echo "gpu_check.sh: no wheels in $here/wheels (run scripts/gpu_wheels.sh where PyPI is reachable)"
fi

cd "$root"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the Python side keeps to --budget-s (420 s by default); this is the backstop
timeout -k 10 450 "$py" -m benchmarks.gpu_check --out "$out/gpu_check.json" --wheels "$here/wheels" \
    "${cuda12_args[@]}" "$@"
rc=$?
[ "$rc" = 0 ] || echo "gpu_check.sh: the check itself stopped (exit status $rc); $out/gpu_check.json holds what it reached"
exit 0
