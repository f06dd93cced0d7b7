#!/usr/bin/env bash
# One entry point for a fresh machine:  bash scripts/run.sh demo | test | setup
#   setup: a virtual environment (.venv, or $NNUNETV2_DRAM_VENV) with torch, nnU-Net and this plugin
#   demo:  setup, then `nnunetv2_dram demo` (synthetic chest CTs through the whole pipeline)
#   test:  setup, then the test suite
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NNUNETV2_DRAM_VENV:-$repo/.venv}
python=${PYTHON:-python3}
what=${1:-demo}
shift || true

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
  fi
  local py="$venv/bin/python"
  "$py" -m pip install -q --upgrade pip
  # torch goes in before nnU-Net so that nnU-Net does not pull a different build. A torch that is already
  # there (the user's own) stays.
  if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
    if grep -qs "torch<=2.14.1" /etc/xdg/pip/constraints.txt; then
      # this workplace's machines: these wheels lie on disk (torch 2.13.0 has no matching torchvision)
      "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
    else
      "$py" -m pip install -q torch torchvision
    fi
  fi
  "$py" -m pip install -q -e "$repo[test]"
  # the CPU dense CRF is optional: pydensecrf 1.0rc3 does not build under Cython 3, pydensecrf2 does
  if ! "$py" -c "import pydensecrf.densecrf" >/dev/null 2>&1; then
    "$py" -m pip install -q "pydensecrf2==1.1" || echo "[setup] pydensecrf2 did not build; the torch CRF will be used"
  fi
}

case "$what" in
  setup) setup ;;
  demo)
    setup
    device=cpu
    "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda
    exec "$venv/bin/nnunetv2_dram" demo -o "${NNUNETV2_DRAM_DEMO_DIR:-$repo/workspace/demo}" -device "$device" "$@"
    ;;
  test)
    setup
    cd "$repo"
    exec "$venv/bin/python" -m pytest -q tests "$@"
    ;;
  *) echo "usage: bash scripts/run.sh demo|test|setup [extra args]" >&2; exit 2 ;;
esac
