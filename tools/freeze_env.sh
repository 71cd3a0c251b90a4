#!/usr/bin/env bash
# Print the constraints file of the environment VENV (default .venv): every installed package
# at its installed version, for requirements/constraints.txt. Used by `make lock`.
set -euo pipefail
VENV="${1:-.venv}"
PY="$VENV/bin/python"
cat <<'HEADER'
# The exact stack CI tests: every package tools/setup_env.sh installs, at the version it installs.
# Regenerate deliberately with 'make lock' (see README, Installation). mmcv is built from source
# at this version; torch/torchvision are PyPI's CUDA builds (they run on the CPU).
HEADER
"$PY" - <<'PYEOF'
from importlib.metadata import distributions

# This checkout itself is installed editable and is no dependency.
pins = {dist.metadata['Name'].lower(): dist.version for dist in distributions()
        if dist.metadata['Name'].lower() != 'mmsparsevit'}
for name in sorted(pins):
    print(f'{name}=={pins[name]}')
PYEOF
