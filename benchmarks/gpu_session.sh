#!/usr/bin/env bash
# The GPU benchmark as ONE call on a machine with one CUDA GPU, no network and a limit of about 10 minutes per call.
#
# Prepare once: bash ../shared/device/prepare-site.sh          (packs nnU-Net & co. into .whl/, git-ignored)
#               /root/.pyenv/versions/3.12.1/bin/python -m pip wheel pydensecrf2==1.1 -w .whl/   (optional, 49 s)
# GPU call:     bash benchmarks/gpu_session.sh speed     (.whl/ copied along; allow 580 s)
#               bash benchmarks/gpu_session.sh steps     (allow 300 s)
#   speed   (~9 min; the iteration table first, then what the deadline leaves time for):
#                     0. the refinement alone (refinement_speed.py): DRAMTrainer's (the intensity head),
#                        DRAMTrainerWithAttention's (full resolution), the coarse grid's, with the trainable CRF (full
#                        and coarse grid), forward + backward, loop vs stacked offset sums
#                     1. time per iteration of stock nnUNetTrainer, DRAMTrainer, DRAMTrainerNoRefine,
#                        DRAMTrainerCoarseRefinement, DRAMTrainerWithCRF and CAMTrainer on nnU-Net's full plans
#                        (96x192x192 CTs), each trained as <Trainer>_3epochs_20its: the nnUNetv2_train loop and the
#                        train step alone (iteration_speed.py --mode both), ratios to nnUNetTrainer
#                     2. if time is left: dense CRF on a 300x512x512 CT, torch CRF on the GPU vs pydensecrf on
#                        that machine's CPU
#                     3. if time is left: pseudo-label throughput of the DRAMTrainer model from 1, GPU vs CPU
#   small   only a short DRAM-vs-CAM-vs-fully-supervised quality run (3-D CTSS, quick plans, 12 x 60 iterations
#            per stage); rows are saved as they finish. It needs ~13 min, more than one call: its workspace lies in
#            the repository (.gpu_workspace/, git-ignored), which a warm machine keeps, so a second `small` call
#            right after the first (the machine is released after 30 s idle) resumes it: finished trainings and
#            pseudo-label sets are skipped.
#   compile DRAMTrainer under torch.compile alone, through nnUNetv2_train (row DRAMTrainer@nnUNet_compile=t; off by
#            default for our trainers: compilation takes minutes before the first step)
#   steps   (~4 min, DEADLINE_S 240): the train step alone (no nnUNetv2_train loop) on nnU-Net's full plans, 5 CTs
#            of 96x192x192, as a ratio to stock nnUNetTrainer, for DRAMTrainer, DRAMTrainerNoRefine,
#            DRAMTrainerWithAttention, DRAMTrainerDecoderHead, DRAMTrainerCoarseRefinement, DRAMTrainerWithCRF and
#            last DRAMTrainerWithAttention+compiled
#            (NNUNETV2_DRAM_REFINE_OFFSETS=compiled), 12 steps after 3 warm-up ones, then 2 profiled for the GPU's
#            busy time (torch.profiler); a row the deadline stops is reported as stopped. Then, with what time is
#            left, the refinement alone (DRAMTrainerWithAttention's and DRAMTrainerWithCRF's, loop vs stacked).
#            Results: $OUT/train_steps.json (rows[].step_ratio_to_nnUNetTrainer), the table in $OUT/summary.txt
#   dry     (here, CPU, ~35 min on 2 busy cores, DEADLINE_S 2400): every step of speed and steps at toy size
#            (quick plans, 32x64x64 CTs), plus the `small` quality path, to check the script before spending
#            GPU time
#   quality2d  (~7.5 min, from 403 s measured for these four pipelines at once on one GPU, plus data and start-up)
#            the quality table on nnU-Net's default 2d plans (--preset full): 96 + 24 synthetic slices
#            of 128x128, every arm (DRAMTrainer, DRAMTrainerNoRefine, CAMTrainer pipelines and the fully supervised
#            nnU-Net) as its own process on the one GPU (quality.py --parallel-arms), 15 x 80 iterations per stage
#   quality3d  (not measured yet: estimated 8-10 min, so the deadline may stop the last final networks) the same in
#            3-D: 24 + 8 synthetic CTs of 32x96x96 (nnU-Net's default 3d_fullres plans: patch 32x96x96, batch 2),
#            10 x 200 = 2,000 iterations per stage (few epochs: less per-epoch overhead), training seeds 0 and 1, i.e.
#            8 chains and 14 trainings at once
#   quality-dry (here, CPU, ~25 min on 2 busy cores): both quality modes at toy size, to check the path
#     Quality modes take Q_TARGET (percentage | ctss; 2d: ctss, 3d: percentage), Q_SEEDS (training seeds), Q_SHAPE,
#     Q_EPOCHS, Q_ITERATIONS (per epoch) from the environment. Rows are saved as they finish: a chain that the
#     deadline stops leaves its finished rows in $OUT/<mode>.json. The workspace lies in .gpu_workspace/ (kept by a
#     warm machine), so the same call again resumes (finished trainings and pseudo labels are kept).
# A step is skipped when fewer seconds than it needs remain of DEADLINE_S (default 520; steps 240; dry 2400;
# quality-dry 1800), and a long step is stopped at it, so the call ends with results inside its limit.
# Results: $OUT/*.json, $OUT/summary.txt (the tables), $OUT/logs.tar.gz. A quality call:
# bash benchmarks/gpu_session.sh quality3d (allow 580 s). The tables measured with this script: docs/benchmarks.md.
set -uo pipefail
size=${1:-speed}
OUT=${OUT:-/tmp/gpu_out}
default_deadline=520; [ "$size" = quality-dry ] && default_deadline=1800  # 2 CPU cores, 12 chains
[ "$size" = steps ] && default_deadline=240
[ "$size" = dry ] && default_deadline=2400  # 2 CPU cores: every step of speed and steps, unskipped
DEADLINE_S=${DEADLINE_S:-$default_deadline}
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
if [ "$size" = dry ] || [ "$size" = quality-dry ]; then
  device=cpu; shape="32 64 64"; plans=quick; cases=6; its=4; crf_size="24 48 48"; ws=/tmp/dram_bench_dry
  procs=2; qws=$ws/quality
  export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1} nnUNet_def_n_proc=2
else
  device=cuda; shape="96 192 192"; plans=full; cases=8; its=20; crf_size="300 512 512"; ws=/tmp/dram_bench
  procs=8; qws=$PWD/.gpu_workspace  # kept by a warm machine between calls: a second `small` call resumes
  [ "$size" = steps ] && cases=5  # less data to write and preprocess: the step times fixed batches
  export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-8} nnUNet_def_n_proc=8
fi
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
finish() {  # a GPU call returns at most 8 files: the JSONs, plus every log and table in one archive
  (cd "$OUT" && cat ./*.txt > summary.txt.tmp 2>/dev/null; tar -czf logs.tar.gz ./*.log ./*.txt ./*.table \
    ./chain_logs 2>/dev/null; rm -rf ./*.log ./*.txt ./*.table ./chain_logs; mv summary.txt.tmp summary.txt)
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
quality_all_arms() {  # quality_all_arms NAME SECONDS_NEEDED FLAGS...: every arm at once, nnU-Net's default plans
  local name=$1 need=$2; shift 2
  step "$name" "$need" || return 0
  local flags=(--device $device --preset full --parallel-arms --workspace "$qws/$name" --json "$OUT/$name.json" "$@")
  echo "python3 benchmarks/quality.py ${flags[*]}" | tee "$OUT/$name.log"
  # SIGTERM at the deadline: quality.py stops its chains and writes the JSON of the rows they finished
  timeout -k 15 $(( $(left) - 20 )) python3 benchmarks/quality.py "${flags[@]}" >> "$OUT/$name.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/$name.log"
  # the JSON and tables again from the rows on disk, which also holds what a chain wrote just before it was stopped
  python3 benchmarks/quality.py "${flags[@]}" --collect > "$OUT/$name.txt" 2>&1
  cat "$OUT/$name.txt"
  mkdir -p "$OUT/chain_logs/$name"
  (cd "$qws/$name" && find . \( -path '*/logs/*.log' -o -name 'training_log_*.txt' \) -print0 \
    | xargs -0 -r cp --parents -t "$OUT/chain_logs/$name")
}
if [ "$size" = quality2d ] || [ "$size" = quality3d ] || [ "$size" = quality-dry ]; then
  export nnUNet_compile=f  # torch.compile would take minutes per network before its first step
  # 4 chains (2-D) or 8 (3-D) share the machine's cores: augmentation workers and worker processes per chain
  if [ "$size" = quality2d ]; then
    export nnUNet_n_proc_DA=3
    quality_all_arms quality2d 240 --modes 2d --targets ${Q_TARGET:-ctss} --seeds ${Q_SEEDS:-0} \
      --train-2d 96 --test-2d 24 --shape ${Q_SHAPE:-48 128 128} --epochs ${Q_EPOCHS:-15} \
      --iterations-2d ${Q_ITERATIONS:-80} --processes 4
  elif [ "$size" = quality3d ]; then
    export nnUNet_n_proc_DA=2
    quality_all_arms quality3d 300 --modes 3d --targets ${Q_TARGET:-percentage} --seeds ${Q_SEEDS:-0 1} \
      --train 24 --test 8 --shape ${Q_SHAPE:-32 96 96} --epochs ${Q_EPOCHS:-10} --iterations ${Q_ITERATIONS:-200} \
      --processes 2
  else  # toy sizes on the CPU, the same path (quality.py keeps augmentation in the training process there)
    quality_all_arms quality2d 60 --modes 2d --targets ${Q_TARGET:-ctss} --seeds ${Q_SEEDS:-0} --train-2d 6 \
      --test-2d 2 --shape 16 64 64 --epochs 1 --iterations-2d 2 --processes 1
    quality_all_arms quality3d 60 --modes 3d --targets ${Q_TARGET:-percentage} --seeds ${Q_SEEDS:-0 1} --train 4 \
      --test 2 --shape 16 48 48 --epochs 1 --iterations 2 --processes 1
  fi
  echo "total $(( $(date +%s) - start )) s"
  exit 0
fi
if [ "$size" = small ]; then  # alone: with the speed steps it does not fit one call
  quality 16 6 "48 128 128" 12 60
  echo "total $(( $(date +%s) - start )) s"
  exit 0
fi

# the patch of nnU-Net's full plans for these CTs, for the refinement timed alone
crop="96 160 160"; [ "$size" = dry ] && crop="16 32 32"
refinement_parts() {  # refinement_parts SECONDS_NEEDED FLAGS...: refinement_speed.py, stopped at the deadline
  local need=$1; shift
  step "refinement parts" "$need" || return 0
  timeout -k 10 $(( $(left) - 15 )) python3 benchmarks/refinement_speed.py --device $device --shape $crop \
    --features 32 "$@" --json "$OUT/refinement_speed.json" > "$OUT/refinement_speed.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/refinement_speed.log"
  tail -n 34 "$OUT/refinement_speed.log" | tee "$OUT/refinement_speed.txt"
}
# the train step alone (no nnUNetv2_train loop, no data-loading wait) of every refinement against stock nnU-Net;
# DRAMTrainerWithAttention+compiled (NNUNETV2_DRAM_REFINE_OFFSETS=compiled: torch.compile fuses each window multiply with its sum)
# comes last, since its compilation is the longest; a row the deadline stops is reported as such
train_steps() {  # train_steps STEPS WARMUP PROFILE_STEPS
  step "train steps" 60 || return 0
  # two batches per trainer: two augmentation workers start faster than eight
  local da=$nnUNet_n_proc_DA; [ "$da" -gt 2 ] && da=2
  nnUNet_n_proc_DA=$da nnUNet_compile=f timeout -k 20 $(( $(left) - 25 )) python3 benchmarks/iteration_speed.py \
    --device $device --plans $plans --shape $shape --cases $cases --mode steps --steps $1 --warmup $2 \
    --profile-steps $3 --workspace "$ws" --json "$OUT/train_steps.json" --trainers nnUNetTrainer DRAMTrainer \
    DRAMTrainerNoRefine DRAMTrainerWithAttention DRAMTrainerDecoderHead DRAMTrainerCoarseRefinement \
    DRAMTrainerWithCRF DRAMTrainerWithAttention+compiled \
    > "$OUT/train_steps.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/train_steps.log"
  tail -n 12 "$OUT/train_steps.log" | tee "$OUT/train_steps.txt"
}

if [ "$size" = steps ]; then  # the train steps, then the refinement alone with what time is left
  train_steps 12 3 2
  refinement_parts 45 --variants DRAMTrainerWithAttention DRAMTrainerWithCRF --offset-modes loop stacked --repeats 3
  echo "total $(( $(date +%s) - start )) s"
  exit 0
fi

if [ "$size" = compile ]; then  # DRAMTrainer under torch.compile (opt-in for our trainers: nnUNet_compile=t)
  if step "DRAMTrainer with torch.compile" 150; then
    timeout -k 20 $(( $(left) - 25 )) python3 benchmarks/iteration_speed.py --device cuda --plans $plans \
      --shape $shape --cases $cases --epochs 3 --iterations $its --workspace "$ws" \
      --trainers DRAMTrainer@nnUNet_compile=t --mode loop \
      --json "$OUT/iteration_speed_compiled.json" > "$OUT/iteration_speed_compiled.log" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/iteration_speed_compiled.log"
    tail -n 5 "$OUT/iteration_speed_compiled.log" | tee "$OUT/iteration_speed_compiled.txt"
  fi
  echo "total $(( $(date +%s) - start )) s"
  exit 0
fi

# 0. the refinement alone, as each trainer builds it, per implementation of the offset sums: seconds
if [ "$size" = dry ]; then
  refinement_parts 30 --offset-modes loop stacked compiled --repeats 1
else
  refinement_parts 30 --offset-modes loop stacked
fi

# 1. time per training iteration, side by side (epoch 0 = start-up/cudnn autotuning is dropped; no compile here);
# each row trains <Trainer>_3epochs_<its>its; the table has priority over the steps after it
its_trainers="nnUNetTrainer DRAMTrainer DRAMTrainerNoRefine DRAMTrainerCoarseRefinement DRAMTrainerWithCRF CAMTrainer"
if step "iteration speed" 120; then
  nnUNet_compile=f timeout -k 20 $(( $(left) - 25 )) python3 benchmarks/iteration_speed.py --device $device \
    --plans $plans --shape $shape --cases $cases --epochs 3 --iterations $its --mode both --steps 20 \
    --workspace "$ws" --trainers $its_trainers --json "$OUT/iteration_speed.json" > "$OUT/iteration_speed.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/iteration_speed.log"
  tail -n 12 "$OUT/iteration_speed.log" | tee "$OUT/iteration_speed.txt"
fi
if [ "$size" = dry ]; then train_steps 2 1 1; fi  # the `steps` mode's path, at toy size

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
  python3 -m nnunetv2_dram pseudolabels -d 960 -c 3d_fullres -f 0 -tr DRAMTrainer_3epochs_${its}its -p $plans_name \
    -o $id --crf dense -device $dev -np 4 --overwrite "$@" >> "$OUT/pseudo_labels.log" 2>&1 \
    || { echo "$dev failed"; return; }
  local n; n=$(ls "$nnUNet_raw"/Dataset${id}_*/labelsTr | wc -l)
  echo "$dev $n $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
}
if step "pseudo labels $device" 60; then
  r=$(pseudo $device 961); echo "$r" | tee -a "$OUT/pseudo_labels.txt"
fi
if [ "$device" = cuda ] && step "pseudo labels cpu (1 case)" 90; then
  r=$(pseudo cpu 962 -num_parts $cases -part_id 0); echo "$r" | tee -a "$OUT/pseudo_labels.txt"
fi

if [ "$size" = dry ]; then quality 4 2 "32 64 64" 1 3; fi
echo "total $(( $(date +%s) - start )) s"
