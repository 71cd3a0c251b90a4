# Sourced by tools/slurm_train.sh and tools/slurm_test.sh (needs PARTITION and JOB_NAME):
# turns GPUS, GPUS_PER_NODE, TASKS_PER_NODE, CPUS_PER_TASK and SRUN_ARGS into SRUN_OPTS.
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
PYTHON=${PYTHON:-python}

SRUN_OPTS=(--partition="$PARTITION" --job-name="$JOB_NAME" --ntasks="$GPUS"
           --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1)
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    SRUN_OPTS+=(--gres="gpu:$GPUS_PER_NODE" --ntasks-per-node="$GPUS_PER_NODE")
elif [ -n "${TASKS_PER_NODE:-}" ]; then
    SRUN_OPTS+=(--ntasks-per-node="$TASKS_PER_NODE")
fi
# SRUN_ARGS holds extra srun options separated by spaces, as in OpenMMLab's scripts.
read -r -a EXTRA_SRUN_ARGS <<< "$SRUN_ARGS"
SRUN_OPTS+=("${EXTRA_SRUN_ARGS[@]}")
