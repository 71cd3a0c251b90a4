#!/usr/bin/env bash
# Distributed training with torchrun (DDP through mmengine's pytorch launcher).
#
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
#
# NUM_PROCS is the number of processes on this node: one per GPU, or any number on a CPU-only
# machine (the backend is then gloo; see docs/distributed.md). Multi-node: run the same command
# on every node with NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's address) and PORT.
# On a single node without PORT, torchrun picks a free port, so parallel jobs never collide.
# PYTHON selects the interpreter (default: python).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCS [train.py args...]" >&2
    exit 2
fi
CONFIG=$1
NUM_PROCS=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/torchrun_args.sh"

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run "${TORCHRUN_OPTS[@]}" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
