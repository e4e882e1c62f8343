#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher (pdsh over passwordless ssh), one process per GPU.
#   HOSTFILE=launch/hostfile launch/deepspeed_multinode.sh --preset sd15_a100x8 distributed.backend=deepspeed
# The hostfile lists "hostname slots=GPUS" per node (see launch/hostfile.example); the first host is the
# master. The run directory (logging.output_dir) must be on a file system every node sees: each rank
# writes its ZeRO partitions and sample buffer into the checkpoint.
# Environment: HOSTFILE, MASTER_ADDR (default: first host), MASTER_PORT (29500), OMP_NUM_THREADS.
set -euo pipefail
HOSTFILE="${HOSTFILE:-launch/hostfile}"
[[ -f "$HOSTFILE" ]] || { echo "no hostfile at $HOSTFILE (copy launch/hostfile.example)" >&2; exit 2; }
MASTER_ADDR="${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# --no_local_rank: the CLI reads LOCAL_RANK from the environment, not a --local_rank flag
exec "${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --no_local_rank --module lowmem_nablagfn.cli train "$@"
