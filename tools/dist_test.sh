#!/usr/bin/env bash
# Distributed testing with torchrun (DDP through mmengine's pytorch launcher).
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args...]
#
# Same environment as tools/dist_train.sh: NNODES, NODE_RANK, MASTER_ADDR, PORT, PYTHON.
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [test.py args...]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NUM_PROCS=$3
shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/torchrun_args.sh"

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run "${TORCHRUN_OPTS[@]}" \
    "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
