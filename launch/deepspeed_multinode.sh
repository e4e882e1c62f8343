#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher (pdsh over passwordless ssh), one process per GPU.
#   launch/deepspeed_multinode.sh --preset sd15_a100x8 distributed.backend=deepspeed
#   launch/deepspeed_multinode.sh --no_ssh_check --preset sd15_a100x8 ...   (one node: skip the ssh test)
# The hostfile lists "hostname slots=GPUS" per node (see launch/hostfile.example); the first host is the
# master. The run directory (logging.output_dir) must be on a file system every node sees: each rank
# writes its ZeRO partitions and sample buffer into the checkpoint.
# Environment: HOSTFILE (default: hostfile beside this script), MASTER_ADDR (default: first host),
# MASTER_PORT (29500), OMP_NUM_THREADS (8), DEEPSPEED, DEEPSPEED_ARGS (more launcher flags),
# EXPORT_VARS (more variable names to send to every worker).
# pdsh workers get only NCCL*/PYTHON*/UCX*/... and what a DeepSpeed env file lists: this script writes
# one (DS_ENV_FILE) with OMP_NUM_THREADS, the HF_* / TRANSFORMERS_* / WANDB_* variables, the CUDA
# allocator setting, GLOO_* (the gloo half of the process group, e.g. GLOO_SOCKET_IFNAME) and EXPORT_VARS, plus the lines of ~/.deepspeed_env and ./.deepspeed_env if present.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOSTFILE="${HOSTFILE:-$HERE/hostfile}"
[[ -f "$HOSTFILE" ]] || { echo "no hostfile at $HOSTFILE (copy $HERE/hostfile.example)" >&2; exit 2; }
LAUNCHER_ARGS=(${DEEPSPEED_ARGS:-})
while [[ $# -gt 0 && "$1" == "--no_ssh_check" ]]; do LAUNCHER_ARGS+=("$1"); shift; done
MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^[[:space:]]*#/ && NF {print $1; exit}' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/lowmem-nablagfn-ds-env.XXXXXX")"
trap 'rm -f "$ENV_FILE"' EXIT
for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do [[ -f "$f" ]] && cat "$f" >> "$ENV_FILE"; done
for name in OMP_NUM_THREADS PYTORCH_CUDA_ALLOC_CONF TOKENIZERS_PARALLELISM TORCH_EXTENSIONS_DIR \
    $(compgen -e | grep -E '^(HF_|HUGGINGFACE_|TRANSFORMERS_|WANDB_|TORCH_NCCL_|GLOO_)' || true) ${EXPORT_VARS:-}; do
  [[ -n "${!name+x}" ]] && printf '%s=%s\n' "$name" "${!name}" >> "$ENV_FILE"
done
export DS_ENV_FILE="$ENV_FILE"
# --no_local_rank: the CLI reads LOCAL_RANK from the environment, not a --local_rank flag
"${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${LAUNCHER_ARGS[@]+"${LAUNCHER_ARGS[@]}"} --no_local_rank --module lowmem_nablagfn.cli train "$@"
