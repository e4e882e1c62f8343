#!/usr/bin/env bash
# One node, N GPUs, one process per GPU (torchrun). Gradients of LoRA + flow model are averaged
# (DDP semantics) unless distributed.backend=deepspeed (ZeRO-2).
#   launch/torchrun_single_node.sh --preset sd15_a100x8 [key=value ...]
#   NPROC=4 launch/torchrun_single_node.sh --preset sd15_a100x8 distributed.backend=deepspeed
# Environment: NPROC (processes, default: the visible GPUs), OMP_NUM_THREADS, TORCHRUN.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NPROC" -gt 0 ]] || NPROC=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node="$NPROC" -m lowmem_nablagfn.cli train "$@"
