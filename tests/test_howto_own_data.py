"""docs/howto_own_data.md, walked command by command on tiny generated CTs.

The shell blocks the how-to marks with `<!-- walked by tests/test_howto_own_data.py -->` run as written, each
command a bash subprocess inside a study folder laid out as the how-to describes, against a private nnU-Net
workspace. Only what a tiny CPU run needs differs from the text:

- the `/data/` folders of the exports lie under the test's temporary folder;
- `-tr X` becomes `-tr X_1epochs_2its` (one epoch of two iterations; the stock trainer where no `-tr` is given);
- `-device cpu` for training, pseudo labels and prediction, `--disable_tta` for `nnUNetv2_predict`, and nnU-Net's
  end-of-training validation skipped (NNUNETV2_DRAM_SKIP_FINAL_VALIDATION);
- nnU-Net's worker process counts fitted to two cores (`-npfp 2 -np 2` for planning, `-npp 1 -nps 1` for prediction).

The inputs are what the how-to's layout names: `cts/` and `lobes/` (TotalSegmentator-style `--ml` files, with a
liver label to be dropped) for the case ids of the sample spreadsheets in docs/examples/, which are copied to the
file names the commands read, and `new_cts/`, `new_lobes/`, `lesion_masks/` for two new cases. The block marked
"(CTSS variant)" is run after the exports, in a workspace of its own.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lobe_phantom import TS_V2_LOBES

REPO = Path(__file__).resolve().parent.parent
HOWTO = REPO / "docs" / "howto_own_data.md"
EXAMPLES = REPO / "docs" / "examples"
MARKER = re.compile(r"^<!-- walked by tests/test_howto_own_data\.py(?: \((?P<variant>[^)]+)\))? -->$")
CTSS_VARIANT = "CTSS variant"
#: file name the how-to's commands read -> the sample spreadsheet copied there
TABLES = {"scores.csv": "scores_percentage.csv", "ctss_scores.csv": "scores_ctss.csv"}
NEW_CASES = ("covid_101", "covid_102")
SHAPE = (24, 64, 64)
TS_V2_LIVER = 5
BUDGET = "_1epochs_2its"
#: the how-to must walk these, in this order (other commands may come in between)
REQUIRED_ORDER = ("nnunetv2_dram convert", "nnunetv2_dram check", "nnUNetv2_plan_and_preprocess", "nnUNetv2_train",
                  "nnunetv2_dram pseudolabels", "nnUNetv2_plan_and_preprocess", "nnUNetv2_train",
                  "nnUNetv2_predict", "nnunetv2_dram regions", "nnunetv2_dram restrict", "nnunetv2_dram evaluate")
COMMAND_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------ the how-to
def walked_blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """(variant, commands) of every marked block, in document order; variant "" for the main walk."""
    lines = markdown.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if m is None:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() in ("```bash", "```sh"), \
            f"howto_own_data.md:{i + 1}: the marker must stand right above a ```bash block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip().startswith("```"))
        blocks.append((m.group("variant") or "", logical_lines(lines[i + 2:end])))
    return blocks


def logical_lines(block: list[str]) -> list[str]:
    """Shell commands of a block: backslash continuations joined, blank and comment-only lines left out."""
    commands, current = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current = (current + line).strip()
        if current and not current.startswith("#"):
            commands.append(current)
        current = ""
    return commands


def program_of(command: str) -> str:
    words = command.split()
    return " ".join(words[:2]) if words[0] == "nnunetv2_dram" else words[0]


def adapted(command: str, data_root: Path) -> str:
    """The command as the tiny CPU run executes it (see the module docstring)."""
    command = command.replace("=/data/", f"={data_root}/")
    program = program_of(command)
    if program == "nnUNetv2_plan_and_preprocess":
        return shlex.join(shlex.split(command) + ["-npfp", "2", "-np", "2"])
    if program not in ("nnUNetv2_train", "nnUNetv2_predict", "nnunetv2_dram pseudolabels"):
        return command
    argv = shlex.split(command)
    if "-tr" in argv:
        argv[argv.index("-tr") + 1] += BUDGET
    else:
        argv += ["-tr", "nnUNetTrainer" + BUDGET]
    if "-device" in argv:
        argv[argv.index("-device") + 1] = "cpu"
    else:
        argv += ["-device", "cpu"]
    if program == "nnUNetv2_predict":
        argv += ["--disable_tta", "-npp", "1", "-nps", "1"]
    return shlex.join(argv)


def test_walked_blocks_are_found_and_cover_the_whole_way():
    blocks = walked_blocks(HOWTO.read_text(encoding="utf-8"))
    main = [program_of(c) for variant, commands in blocks if not variant for c in commands]
    position = 0
    for needed in REQUIRED_ORDER:
        assert needed in main[position:], f"docs/howto_own_data.md: no walked {needed!r} at this point of the way"
        position = main.index(needed, position) + 1
    assert any(v == CTSS_VARIANT for v, _ in blocks)


def test_the_adaptation_changes_only_what_a_tiny_cpu_run_needs():
    root = Path("/tmp/x")
    assert adapted("export nnUNet_raw=/data/nnUNet_raw", root) == "export nnUNet_raw=/tmp/x/nnUNet_raw"
    assert adapted("nnUNetv2_train 501 3d_fullres all -tr DRAMTrainer", root) == \
        "nnUNetv2_train 501 3d_fullres all -tr DRAMTrainer_1epochs_2its -device cpu"
    assert adapted("nnUNetv2_train 502 3d_fullres all", root) == \
        "nnUNetv2_train 502 3d_fullres all -tr nnUNetTrainer_1epochs_2its -device cpu"
    assert adapted("nnunetv2_dram pseudolabels -d 501 -tr DRAMTrainer -o 502 -device cuda", root) == \
        "nnunetv2_dram pseudolabels -d 501 -tr DRAMTrainer_1epochs_2its -o 502 -device cpu"
    assert adapted("nnUNetv2_predict -i a/ -o b/ -d 502", root).endswith(
        "-tr nnUNetTrainer_1epochs_2its -device cpu --disable_tta -npp 1 -nps 1")
    assert adapted("nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres", root).endswith("-npfp 2 -np 2")
    assert adapted("nnunetv2_dram check -d 501", root) == "nnunetv2_dram check -d 501"


# ------------------------------------------------------------------------------------------------ the study
def sample_case_ids(table: Path) -> list[str]:
    with table.open(newline="", encoding="utf-8") as f:
        return [row[0] for row in list(csv.reader(f))[1:] if row]


def _write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def totalsegmentator_lobes(region_map: Path, out: Path) -> None:
    """A TotalSegmentator 2.x `--ml` file of the same anatomy: lobes 10..14 and a liver (5) outside the lungs."""
    image = sitk.ReadImage(str(region_map))
    regions = sitk.GetArrayFromImage(image)
    ts = np.zeros_like(regions)
    for ours, theirs in TS_V2_LOBES.items():
        ts[regions == ours] = theirs
    corner = np.zeros(regions.shape, dtype=bool)
    corner[:3, -6:, :6] = True  # inferior, posterior, patient's right
    ts[corner & (regions == 0)] = TS_V2_LIVER
    _write_like(ts, image, out)


def write_study(study: Path) -> list[str]:
    """The how-to's study folder from a generated synthetic dataset; returns the training case ids."""
    from nnunetv2_dram.synthetic.dataset import case_ids, write_weak_dataset
    ids = sample_case_ids(EXAMPLES / TABLES["scores.csv"])
    assert sorted(ids) == sorted(sample_case_ids(EXAMPLES / TABLES["ctss_scores.csv"])), \
        "the two sample spreadsheets must list the same cases"
    generated = write_weak_dataset(study.parent / "generated", 1, n_train=len(ids), n_test=len(NEW_CASES),
                                   shape=SHAPE, seed=0)
    synth_train, synth_test = case_ids(len(ids), len(NEW_CASES))
    for case, synth in zip(ids, synth_train):
        (study / "cts").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated / "imagesTr" / f"{synth}_0000.nii.gz", study / "cts" / f"{case}.nii.gz")
        totalsegmentator_lobes(generated / "labelsTr" / f"{synth}.nii.gz", study / "lobes" / f"{case}.nii.gz")
    for case, synth in zip(NEW_CASES, synth_test):
        for folder in ("new_cts", "lesion_masks"):
            (study / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated / "imagesTs" / f"{synth}_0000.nii.gz", study / "new_cts" / f"{case}.nii.gz")
        shutil.copyfile(generated / "referenceTs" / f"{synth}.nii.gz", study / "lesion_masks" / f"{case}.nii.gz")
        totalsegmentator_lobes(generated / "labelsTs" / f"{synth}.nii.gz", study / "new_lobes" / f"{case}.nii.gz")
    for name, sample in TABLES.items():
        shutil.copyfile(EXAMPLES / sample, study / name)
    return ids


# ------------------------------------------------------------------------------------------------ running
def base_environment() -> dict:
    """This interpreter's environment without nnU-Net's folder variables (the how-to's exports set them) and without
    any plugin trainer variable of the caller's shell."""
    from nnunetv2_dram.training.budget import TRAINER_VARIABLES
    cleared = {"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", *TRAINER_VARIABLES}
    env = {k: v for k, v in os.environ.items() if k not in cleared}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(nnUNet_def_n_proc="2", nnUNet_compile="f", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NNUNETV2_DRAM_SKIP_FINAL_VALIDATION="1")
    return env


class Walk:
    """Runs commands one by one in `study`; `export` lines are run too and kept as every later command's preamble."""

    def __init__(self, study: Path, data_root: Path):
        self.study, self.data_root = study, data_root
        self.preamble: list[str] = ["set -euo pipefail"]
        self.log: list[tuple[str, float]] = []

    def run(self, command: str) -> None:
        command = adapted(command, self.data_root)
        env = base_environment()
        # nnU-Net's planner cannot run with nnUNet_n_proc_DA=0; training on tiny chunks is fastest with it
        env["nnUNet_n_proc_DA"] = "0" if program_of(command) == "nnUNetv2_train" else "1"
        script = "\n".join(self.preamble + [command])
        start = time.time()
        proc = subprocess.run(["bash", "-c", script], cwd=self.study, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        self.log.append((command, round(time.time() - start, 1)))
        print(f"[{self.log[-1][1]:6.1f} s] {command}", flush=True)
        assert proc.returncode == 0, (f"docs/howto_own_data.md: `{command}` failed with exit status "
                                      f"{proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                                      f"{proc.stderr[-4000:]}")
        if command.startswith("export "):
            self.preamble.append(command)

    def env_value(self, name: str) -> Path:
        proc = subprocess.run(["bash", "-c", "\n".join(self.preamble + [f'printf %s "${name}"'])], cwd=self.study,
                              env=base_environment(), capture_output=True, text=True, check=True)
        return Path(proc.stdout)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_own_data_howto_runs_as_written(tmp_path):
    blocks = walked_blocks(HOWTO.read_text(encoding="utf-8"))
    main = [c for variant, commands in blocks if not variant for c in commands]
    ctss = [c for variant, commands in blocks if variant == CTSS_VARIANT for c in commands]
    exports = [c for c in main if c.startswith("export ")]
    study = tmp_path / "study"
    ids = write_study(study)

    # the CTSS variant builds the same dataset id from the scores table: a workspace of its own
    variant = Walk(study, tmp_path / "ctss_data")
    for command in [*exports, *(c for c in main if c.startswith("mkdir -p \"$nnUNet")), *ctss]:
        variant.run(command)
    weak = json.loads((variant.env_value("nnUNet_raw") / "Dataset501_Covid" / "weak_labels.json").read_text())
    assert weak["target"] == "ctss" and sorted(weak["cases"]) == sorted(ids)

    walk = Walk(study, tmp_path / "data")
    for command in main:
        walk.run(command)
    raw = walk.env_value("nnUNet_raw")

    weak = json.loads((raw / "Dataset501_Covid" / "weak_labels.json").read_text())
    assert weak["target"] == "percentage" and sorted(weak["cases"]) == sorted(ids)
    pseudo = raw / "Dataset502_CovidPseudo"
    assert json.loads((pseudo / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1}
    for case in ids:
        assert set(np.unique(_array(pseudo / "labelsTr" / f"{case}.nii.gz")).tolist()) <= {0, 1}
    for case in NEW_CASES:
        restricted = _array(study / "predictions_in_lungs" / f"{case}.nii.gz")
        regions = _array(study / "new_regions" / f"{case}.nii.gz")
        assert set(np.unique(regions).tolist()) <= {0, 1, 2, 3, 4, 5}, "the liver label must be dropped"
        assert not restricted[regions == 0].any()
    assert (study / "predictions_in_lungs" / "restriction.json").is_file()
    evaluation = json.loads((study / "evaluation.json").read_text())
    assert sorted(row["case"] for row in evaluation["cases"]) == sorted(NEW_CASES)
    print("total", round(sum(s for _, s in variant.log + walk.log), 1), "s")
