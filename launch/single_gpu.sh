#!/usr/bin/env bash
# One GPU (an RTX 4090, an L40, one A100): plain `python -m lowmem_nablagfn.cli train`, nothing distributed.
#   launch/single_gpu.sh --preset sd15_rtx4090 [key=value ...]
#   launch/single_gpu.sh --preset sd15_rtx4090 distributed.backend=deepspeed distributed.offload_optimizer=true
#       (ZeRO-Offload: AdamW state and fp32 master weights of LoRA + flow model in CPU memory)
# Environment: GPU (which card, default 0), PYTHON, OMP_NUM_THREADS.
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-${GPU:-0}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "${PYTHON:-python}" -m lowmem_nablagfn.cli train "$@"
