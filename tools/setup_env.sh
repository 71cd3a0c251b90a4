#!/usr/bin/env bash
# Creates (or brings up to date) the project's environment in .venv/ at the repository root.
#
# Why torch 2.12.1 + torchvision 0.27.1: timm needs torchvision, and the only torchvision
# builds on PyPI that match an available torch are the standard CUDA pairs; they run on the
# CPU as well. The local torch 2.13.0 CPU wheel has no matching torchvision.
#
# mmcv 2.1.0 (the newest version mmdet 3.3 / mmseg 1.2 accept) ships no wheel for this
# Python, so it is compiled from source with its ops. The wheel is cached outside the
# repository, keyed by Python, torch and CPU/CUDA flavour, so only the first set-up pays for it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
# Every package is installed at the version CI tested (requirements/constraints.txt);
# CONSTRAINTS=none resolves the newest allowed versions instead (what `make lock` does).
CONSTRAINTS="${CONSTRAINTS:-$ROOT/requirements/constraints.txt}"
pinned() { sed -n "s/^$1==//p" "$ROOT/requirements/constraints.txt"; }
TORCH_VERSION="${TORCH_VERSION:-$(pinned torch)}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-$(pinned torchvision)}"
MMCV_VERSION="$(pinned mmcv)"
CACHE_ROOT="${MMSPARSEVIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmsparsevit}"

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; set PYTHON=/path/to/python3.x" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
if [ "$CONSTRAINTS" != none ]; then
    export PIP_CONSTRAINT="$CONSTRAINTS"  # pip's --constraint, for every install and wheel
fi

step "build tools"
"${PIP[@]}" install -q --upgrade pip 'setuptools<70' wheel ninja

have_version() { "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    installed = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if installed.split('+')[0] == sys.argv[2] else 1)
PYEOF
}

if have_version torch "$TORCH_VERSION" && have_version torchvision "$TORCHVISION_VERSION"; then
    step "torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION already installed"
else
    step "installing torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION (large download the first time)"
    "${PIP[@]}" install --progress-bar on "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

step "mmengine and runtime dependencies"
"${PIP[@]}" install -q 'mmengine==0.10.7' 'numpy' 'opencv-python-headless' 'pycocotools' \
    'matplotlib' 'ftfy' 'regex' 'timm' 'pytest' 'scipy' 'shapely' 'terminaltables' 'prettytable' \
    'onnx' 'onnxruntime'

if have_version mmcv "$MMCV_VERSION" && "$PY" -c 'import mmcv.ops' 2>/dev/null; then
    step "mmcv $MMCV_VERSION with ops already installed"
else
    flavour=$("$PY" -c 'import torch; print("cu" + torch.version.cuda.replace(".", "") if torch.cuda.is_available() else "cpu")')
    py_tag=$("$PY" -c 'import sys; print(f"py{sys.version_info.major}{sys.version_info.minor}")')
    wheel_dir="$CACHE_ROOT/wheels/mmcv-$MMCV_VERSION-$py_tag-torch$TORCH_VERSION-$flavour"
    wheel=$(ls "$wheel_dir"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        step "compiling mmcv $MMCV_VERSION with ops for $flavour (15 to 40 minutes on 2 cores; cached in $wheel_dir)"
        mkdir -p "$wheel_dir"
        build_dir=$(mktemp -d)
        MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" wheel --no-build-isolation --no-deps \
            -v -w "$build_dir" "mmcv==$MMCV_VERSION" 2>&1 | tee "$build_dir/build.log" \
            | sed -unE 's#^\s*\[([0-9]+/[0-9]+)\] .* -c [^ ]*/([^ /]+\.(cpp|cu)) .*#    [\1] \2#p; t; s#.* -c [^ ]*/([^ /]+\.(cpp|cu)) .*#    compiling \1#p; /Created wheel|[Ee]rror:/p' || true
        built=$(ls "$build_dir"/mmcv-*.whl 2>/dev/null | head -n 1 || true)
        [ -n "$built" ] || { echo "error: the mmcv build produced no wheel; see $build_dir/build.log" >&2; exit 1; }
        mv "$built" "$wheel_dir/"
        rm -rf "$build_dir"
        wheel=$(ls "$wheel_dir"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    else
        step "reusing cached mmcv wheel $wheel"
    fi
    "${PIP[@]}" install -q --no-deps --force-reinstall "$wheel"
    "${PIP[@]}" install -q addict yapf packaging pillow pyyaml
fi

step "mmdet 3.3.0 and mmsegmentation 1.2.2"
"${PIP[@]}" install -q 'mmdet==3.3.0' 'mmsegmentation==1.2.2'

step "mmsparsevit (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"

step "checking the stack"
"$PY" - <<'PYEOF'
import torch, torchvision, timm, mmengine, mmcv, mmcv.ops, mmdet.models, mmseg.models, mmsparsevit
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, '
      f'mmengine {mmengine.__version__}, mmcv {mmcv.__version__} (ops), mmdet, mmseg, '
      f'mmsparsevit {mmsparsevit.__version__}: OK')
PYEOF
