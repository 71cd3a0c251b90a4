# Sourced by tools/dist_train.sh and tools/dist_test.sh (needs NUM_PROCS): turns NNODES,
# NODE_RANK, MASTER_ADDR and PORT into TORCHRUN_OPTS. A single node without PORT uses
# torchrun's standalone rendezvous on a free port, so concurrent jobs never collide.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}

if [ "$NNODES" -eq 1 ] && [ -z "${PORT:-}" ]; then
    TORCHRUN_OPTS=(--standalone)
else
    TORCHRUN_OPTS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
                   --master_port="${PORT:-29500}")
fi
TORCHRUN_OPTS+=(--nproc_per_node="$NUM_PROCS")
