#!/usr/bin/env bash
# Training on a Slurm cluster: srun starts one task per process, mmengine's slurm launcher
# reads the rank layout from SLURM_* variables.
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#       bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]
#
# GPUS is the total number of tasks (processes), GPUS_PER_NODE the GPUs and tasks per node.
# GPUS_PER_NODE=0 runs on CPU-only nodes: no --gres is requested, TASKS_PER_NODE (optional)
# spreads the tasks, and the backend is gloo. MASTER_PORT, if unset, is derived per job step
# (see docs/distributed.md). PYTHON selects the interpreter (default: python).
set -euo pipefail

if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
shift 4
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/slurm_args.sh"

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec srun "${SRUN_OPTS[@]}" \
    "$PYTHON" -u "$ROOT/tools/train.py" "$CONFIG" --work-dir "$WORK_DIR" --launcher slurm "$@"
