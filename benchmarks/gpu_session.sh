#!/usr/bin/env bash
# The GPU benchmark as ONE device call (the device tool lends an H100/H200 for 15 minutes per session).
#
# Here, once:   bash ../shared/device/prepare-site.sh          (packs nnU-Net & co. into .whl/, git-ignored)
# Device call:  run(command="bash benchmarks/gpu_session.sh small", carry=[".whl"], timeout_s=540)
#   small  (~7 min): iteration speed of all trainers on nnU-Net's full plans (96x192x192 synthetic CTs),
#                    torch CRF on the GPU for a 300x512x512 CT, a short DRAM-vs-CAM quality run
#   speed  (~4 min): only the two speed tables
# Results: $OUT/*.json and $OUT/*.txt (copied back by the device tool).
set -euo pipefail
size=${1:-small}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
tar -xJf .whl/nnunet-site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-8} nnUNet_def_n_proc=8
ws=/tmp/dram_bench
python3 -c "import torch, nnunetv2; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

# 1. time per training iteration, nnU-Net's own plans, side by side (epoch 0 = compile/warm-up is dropped)
nnUNet_compile=${nnUNet_compile:-f} python3 benchmarks/iteration_speed.py --device cuda --plans full \
  --shape 96 192 192 --cases 8 --epochs 3 --iterations 40 --workspace "$ws" --json "$OUT/iteration_speed.json" \
  2>&1 | tail -12 | tee "$OUT/iteration_speed.txt"

# 2. CRF seconds for a full-size CT: torch CRF on the GPU vs pydensecrf on this machine's CPU, side by side.
#    pydensecrf is not in nnU-Net's site archive; build its Python-3.12 wheel here once (49 s):
#      /root/.pyenv/versions/3.12.1/bin/python -m pip wheel pydensecrf2==1.1 -w .whl/
skip="torch-cpu"
if ls .whl/pydensecrf2-*cp312*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/pydensecrf2-*cp312*.whl
else
  skip="$skip pydensecrf-cpu"
fi
python3 benchmarks/crf_speed.py --size 300 512 512 --skip $skip --json "$OUT/crf_speed.json" \
  2>&1 | tail -8 | tee "$OUT/crf_speed.txt"

if [ "$size" = "small" ]; then
  # 3. a short quality run: DRAM vs CAM vs fully supervised on held-out synthetic CTs
  python3 benchmarks/quality.py --device cuda --preset quick --train 16 --test 6 --shape 48 128 128 \
    --epochs 10 --iterations 50 --workspace "$ws" --json "$OUT/quality.json" 2>&1 | tail -25 \
    | tee "$OUT/quality.txt"
fi
