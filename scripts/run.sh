#!/usr/bin/env bash
# One entry point for a fresh machine:  bash scripts/run.sh demo | test | setup
#   setup: a virtual environment (.venv, or $NNUNETV2_DRAM_VENV) with torch, nnU-Net and this plugin, at the
#          versions pinned in requirements/constraints.txt
#   demo:  setup, then `nnunetv2_dram demo` (synthetic chest CTs through the whole pipeline)
#   test:  setup, then the test suite
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NNUNETV2_DRAM_VENV:-$repo/.venv}
python=${PYTHON:-python3}
constraints=$repo/requirements/constraints.txt
what=${1:-demo}
shift || true

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
  fi
  local py="$venv/bin/python"
  local pins="$constraints"
  "$py" -m pip install -q --upgrade pip
  # torch goes in before nnU-Net so that nnU-Net does not pull a different build; versions come from the
  # constraints file. A torch that is already there (the user's own build, e.g. for their CUDA) stays: the
  # remaining installs then get the constraints without the torch and torchvision pins.
  if "$py" -c "import torch" >/dev/null 2>&1; then
    filtered_constraints=$(mktemp)
    trap 'rm -f "${filtered_constraints:-}"' EXIT
    pins=$filtered_constraints
    grep -v -E '^[[:space:]]*(torch|torchvision)[[:space:]]*([=<>!~;[:space:]]|$)' "$constraints" >"$pins" || true
  else
    "$py" -m pip install -q -c "$constraints" torch torchvision
  fi
  "$py" -m pip install -q -c "$pins" -e "$repo[test]"
  # the CPU dense CRF is optional: pydensecrf 1.0rc3 does not build under Cython 3, pydensecrf2 does
  if ! "$py" -c "import pydensecrf.densecrf" >/dev/null 2>&1; then
    "$py" -m pip install -q -c "$pins" pydensecrf2 || echo "[setup] pydensecrf2 did not build; the torch CRF will be used"
  fi
  if [ "$pins" != "$constraints" ]; then rm -f "$pins"; fi
}

case "$what" in
  setup) setup ;;
  demo)
    setup
    # -device auto (the default): the GPU when torch sees one, else the CPU
    exec "$venv/bin/nnunetv2_dram" demo -o "${NNUNETV2_DRAM_DEMO_DIR:-$repo/workspace/demo}" "$@"
    ;;
  test)
    setup
    cd "$repo"
    exec "$venv/bin/python" -m pytest -q tests "$@"
    ;;
  *) echo "usage: bash scripts/run.sh demo|test|setup [extra args]" >&2; exit 2 ;;
esac
