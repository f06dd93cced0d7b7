#!/usr/bin/env bash
# The GPU benchmark as ONE device call (the device tool lends an H100/H200 for 15 minutes per session).
#
# Here, once:   bash ../shared/device/prepare-site.sh          (packs nnU-Net & co. into .whl/, git-ignored)
#               /root/.pyenv/versions/3.12.1/bin/python -m pip wheel pydensecrf2==1.1 -w .whl/   (optional, 49 s)
# Device call:  run(command="bash benchmarks/gpu_session.sh speed", carry=[".whl"], timeout_s=580)
#   speed   (~8 min): 0. the refinement's parts alone (refinement_speed.py, seconds, loop vs stacked offsets,
#                        5/3/2 CRF iterations)
#                     1. time per iteration of stock, DRAM, NoRefine, CAM on nnU-Net's full plans (96x192x192 CTs):
#                        the nnUNetv2_train loop and the train step alone (iteration_speed.py --mode both)
#                     2. dense CRF on a 300x512x512 CT: torch CRF on the GPU vs pydensecrf on that machine's CPU
#                     3. pseudo-label throughput (cases/minute) of the DRAMTrainer model from 1, GPU vs CPU (1 case)
#   small   only a short DRAM-vs-CAM-vs-fully-supervised quality run (3-D CTSS, quick plans, 12 x 60 iterations
#            per stage = 1.5x the CPU runs' budget); rows are saved as they finish. It needs ~13 min, more than one
#            call: its workspace lies in the repository (.gpu_workspace/, git-ignored), which a warm machine keeps, so
#            a second `small` call right after the first (the machine is released after 30 s idle) resumes it:
#            finished trainings and pseudo-label sets are skipped. On 2026-11-27 one call reached 9 of 15 rows.
#   compile (a second call): also DRAMTrainer under torch.compile (nnUNet_compile=t; off by default for our
#            trainers since it had not finished 3 short epochs in 170 s on an H200, 2026-11-26)
#   steps   (~4 min): the refinement as trained (coarse grid, 5 CRF iterations), stacked eager vs compiled window
#            sums (offset mode "compiled": torch.compile fuses each multiply with its sum), then train steps only
#            (no nnUNetv2_train loop) for nnUNetTrainer, DRAMTrainer, DRAMTrainer+compiled (NNUNETV2_DRAM_REFINE_OFFSETS
#            =compiled) and DRAMTrainerNoRefine on 5 cases, each profiled for its GPU busy time (torch.profiler)
#   dry     (here, CPU, ~6 min): every step at toy size, to check the script before spending device time
# A step is skipped when fewer seconds than it needs remain of DEADLINE_S (default 520), so the call ends with
# results inside the device tool's limit. Results: $OUT/*.json, $OUT/summary.txt (the tables), $OUT/logs.tar.gz.
# Measured with this script: docs/benchmarks.md (H200, 2026-11-26).
set -uo pipefail
size=${1:-speed}
OUT=${OUT:-/tmp/gpu_out}
DEADLINE_S=${DEADLINE_S:-520}
start=$(date +%s)
mkdir -p "$OUT"
if ! python3 -c "import nnunetv2" 2>/dev/null; then  # the device machine: nnU-Net comes from the packed site
  mkdir -p /tmp/site
  tar -xJf .whl/nnunet-site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
  if ls .whl/pydensecrf2-*cp312*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/pydensecrf2-*cp312*.whl
  fi
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$size" = "dry" ]; then
  device=cpu; shape="32 64 64"; plans=quick; cases=6; its=4; crf_size="24 48 48"; ws=/tmp/dram_bench_dry
  procs=2; qws=$ws/quality
  export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1} nnUNet_def_n_proc=2
else
  device=cuda; shape="96 192 192"; plans=full; cases=8; its=20; crf_size="300 512 512"; ws=/tmp/dram_bench
  procs=8; qws=$PWD/.gpu_workspace  # kept by a warm machine between calls: a second `small` call resumes
  export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-8} nnUNet_def_n_proc=8
fi
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
finish() {  # the device tool returns at most 8 files: the JSONs, plus every log and table in one archive
  (cd "$OUT" && cat ./*.txt > summary.txt.tmp 2>/dev/null; tar -czf logs.tar.gz ./*.log ./*.txt ./*.table \
    2>/dev/null; rm -f ./*.log ./*.txt ./*.table; mv summary.txt.tmp summary.txt)
}
trap finish EXIT
step() {  # step NAME SECONDS_NEEDED: true when there is time for it
  local l; l=$(left)
  if [ "$l" -lt "$2" ]; then echo "SKIPPED $1: ${l} s left, needs ~$2 s" | tee -a "$OUT/skipped.txt"; return 1; fi
  echo "== $1 ($(( $(date +%s) - start )) s in, ${l} s left)"
}
python3 -c "import torch, nnunetv2, platform; print('torch', torch.__version__, '| python', platform.python_version(),
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda', '|', __import__('os').cpu_count(), 'cpus')" \
  | tee "$OUT/device.txt"

quality() {  # quality TRAIN TEST "SHAPE" EPOCHS ITERATIONS: DRAM vs CAM vs fully supervised, held-out synthetic CTs
  step "quality" 60 && timeout $(( $(left) - 10 )) python3 benchmarks/quality.py --device $device --preset quick \
    --train $1 --test $2 --shape $3 --epochs $4 --iterations $5 --targets ctss --processes $procs \
    --workspace "$qws" --json "$OUT/quality.json" > "$OUT/quality.log" 2>&1
  echo "exit $?" >> "$OUT/quality.log"
  tail -18 "$OUT/quality.log" | tee "$OUT/quality.txt"
}
if [ "$size" = small ]; then  # alone: with the speed steps it does not fit one call
  quality 16 6 "48 128 128" 12 60
  echo "total $(( $(date +%s) - start )) s"
  exit 0
fi

# 0. the refinement's parts alone (attention, CRF; full and coarse grid) at the full plans' patch: seconds
crop="96 160 160"; [ "$size" = dry ] && crop="24 48 48"
parts="--downsample 1 2 --offset-modes loop stacked"
[ "$size" = dry ] && parts="--downsample 1 2 --offset-modes loop stacked compiled"
crf_its="5 3 2"
# the path DRAMTrainer trains on a GPU, eager and compiled
[ "$size" = steps ] && parts="--downsample 2 --offset-modes stacked compiled" && crf_its=5
step "refinement parts" 30 && timeout 200 python3 benchmarks/refinement_speed.py --device $device --shape $crop \
  --features 32 $parts --crf-iterations $crf_its --json "$OUT/refinement_speed.json" \
  > "$OUT/refinement_speed.log" 2>&1
tail -20 "$OUT/refinement_speed.log" | tee "$OUT/refinement_speed.txt"

if [ "$size" = steps ]; then  # the train step alone, 4 rows, then stop
  step "train steps" 0 && nnUNet_compile=f python3 benchmarks/iteration_speed.py --device $device --plans $plans \
    --shape $shape --cases 5 --mode steps --steps 20 --profile-steps 5 --workspace "$ws" \
    --json "$OUT/train_steps.json" --trainers nnUNetTrainerBudget DRAMTrainer DRAMTrainer+compiled \
    DRAMTrainerNoRefine \
    > "$OUT/train_steps.log" 2>&1
  tail -7 "$OUT/train_steps.log" | tee "$OUT/train_steps.txt"
  echo "total $(( $(date +%s) - start )) s"
  exit 0
fi

# 1. time per training iteration, side by side (epoch 0 = start-up/cudnn autotuning is dropped; no compile here)
step "iteration speed" 0 && nnUNet_compile=f python3 benchmarks/iteration_speed.py --device $device --plans $plans \
  --shape $shape --cases $cases --epochs 3 --iterations $its --mode both --steps 20 --workspace "$ws" \
  --trainers nnUNetTrainerBudget DRAMTrainer DRAMTrainerNoRefine CAMTrainer \
  --json "$OUT/iteration_speed.json" > "$OUT/iteration_speed.log" 2>&1
tail -9 "$OUT/iteration_speed.log" | tee "$OUT/iteration_speed.txt"

# 2. dense CRF seconds for one volume: pydensecrf on the CPU vs the torch CRF (GPU), same volume and iterations
skip="torch-cpu"
[ "$device" = cpu ] && skip="torch-cuda"
python3 -c "import pydensecrf" 2>/dev/null || skip="$skip pydensecrf-cpu"
step "dense CRF" 90 && python3 benchmarks/crf_speed.py --size $crf_size --repeats 1 --skip $skip \
  --json "$OUT/crf_speed.json" > "$OUT/crf_speed.log" 2>&1
tail -6 "$OUT/crf_speed.log" | tee "$OUT/crf_speed.txt"

# 3. pseudo-label throughput with the DRAMTrainer model of step 1: all cases on the GPU, 1 case on the CPU
export nnUNet_raw=$ws/nnUNet_raw nnUNet_preprocessed=$ws/nnUNet_preprocessed nnUNet_results=$ws/nnUNet_results
export nnUNet_extTrainer=$PWD/trainers
plans_name=nnUNetPlans; [ "$plans" = quick ] && plans_name=nnUNetPlans_quick
pseudo() {  # pseudo DEVICE NEW_ID EXTRA...: prints "<device> <cases> <seconds>"
  local dev=$1 id=$2; shift 2
  local t0; t0=$(date +%s.%N)
  python3 -m nnunetv2_dram pseudolabels -d 960 -c 3d_fullres -f 0 -tr DRAMTrainer -p $plans_name -o $id \
    --crf dense -device $dev -np 4 --overwrite "$@" >> "$OUT/pseudo_labels.log" 2>&1 || { echo "$dev failed"; return; }
  local n; n=$(ls "$nnUNet_raw"/Dataset${id}_*/labelsTr | wc -l)
  echo "$dev $n $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
}
if step "pseudo labels $device" 60; then
  r=$(pseudo $device 961); echo "$r" | tee -a "$OUT/pseudo_labels.txt"
fi
if [ "$device" = cuda ] && step "pseudo labels cpu (1 case)" 90; then  # 2 cases did not fit in two calls
  r=$(pseudo cpu 962 -num_parts $cases -part_id 0); echo "$r" | tee -a "$OUT/pseudo_labels.txt"
fi

# 4. DRAMTrainer under torch.compile (opt-in for our trainers: nnUNet_compile=t)
if [ "$size" = compile ] && step "DRAMTrainer with torch.compile" 150; then
  nnUNet_compile=t timeout $(( $(left) - 10 )) python3 benchmarks/iteration_speed.py --device cuda --plans $plans \
    --shape $shape --cases $cases --epochs 3 --iterations $its --workspace "$ws" --trainers DRAMTrainer --mode loop \
    --json "$OUT/iteration_speed_compiled.json" > "$OUT/iteration_speed_compiled.log" 2>&1
  echo "exit $?" >> "$OUT/iteration_speed_compiled.log"
  tail -4 "$OUT/iteration_speed_compiled.log" | tee "$OUT/iteration_speed_compiled.txt"
fi

if [ "$size" = dry ]; then quality 4 2 "32 64 64" 1 3; fi
echo "total $(( $(date +%s) - start )) s"
