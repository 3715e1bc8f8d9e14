#!/usr/bin/env bash
# The CUDA path of fine-tuning, end to end (issue 11), ready to rerun on a machine with a GPU.
#
# The same 100-step run as the CPU figures, on the project's own format-teaching data
# (tests/finetune/format_data.py): dataset build, then `appliance finetune` with CUDA in NF4 with
# bf16 compute (QUANTIZATION=auto measures the GPU candidates instead), then merge, GGUF f16,
# quantize, load and ask in llama.cpp (the CPU build the appliance installs), gate, register;
# then format adherence of the base and the fine-tuned GGUF on 16 unseen questions. It prints
# the time per step and the end-to-end time (benchmarks/finetune_end_to_end.py), then runs the
# `gpu` tests (tests/finetune/test_gpu.py).
#
#   benchmarks/finetune_gpu.sh                 # from the repository root or anywhere
#   STEPS=100 QUANTIZATION=nf4 PY=.venv/bin/python benchmarks/finetune_gpu.sh [--json]
#
# Needs: an NVIDIA GPU and driver, and a CUDA build of torch in the venv. ./install.sh pins the
# CPU wheel of torch; on a GPU machine install the CUDA wheel of the same version first (for
# example: .venv/bin/python -m pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128). bitsandbytes' wheel carries its CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-100}
QUANTIZATION=${QUANTIZATION:-nf4}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== the machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
else
    echo "nvidia-smi not found: is this a CUDA machine?" >&2
fi
"$PY" - <<'PYEOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(
        "torch sees no CUDA device: this venv has the CPU build of torch (install.sh pins it) "
        "or there is no GPU; install torch's CUDA wheel of the same version and rerun"
    )
print(f"GPU {torch.cuda.get_device_name(0)}, bf16 supported {torch.cuda.is_bf16_supported()}")
free, total = torch.cuda.mem_get_info()
print(f"memory free {free / 2**30:.1f} of {total / 2**30:.1f} GiB")
import bitsandbytes

print(f"bitsandbytes {bitsandbytes.__version__}")
PYEOF

echo "== ${STEPS} steps in ${QUANTIZATION}, then export, gate, register, adherence"
start=$(date +%s)
"$PY" benchmarks/finetune_end_to_end.py --steps "$STEPS" --quantization "$QUANTIZATION" \
    --require-cuda "$@"
echo "script wall time: $(( $(date +%s) - start )) s"

echo "== the gpu tests"
"$PY" -m pytest tests/finetune/test_gpu.py -q -rs
