"""`pipeline` flags -p/-pl/--restrict-to-regions/-tr: what they resolve to, and combinations that cannot work
refused before any stage runs."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_dram.pipeline.pipeline import PipelineError, PipelineOptions, predict_command, validate_options


def _opts(**kw):
    return PipelineOptions(dataset="Dataset731_SynthChest", new_id=732, **kw)


def test_plans_identifier_of_each_preset_and_planner():
    assert _opts().plans == "nnUNetPlans"
    assert _opts(preset="quick").plans == "nnUNetPlans_quick"
    assert _opts(planner="nnUNetPlannerResEncM").plans == "nnUNetResEncUNetMPlans"
    assert _opts(planner="nnUNetPlannerResEncL", preset="quick").plans == "nnUNetResEncUNetLPlans_quick"
    assert _opts(plans_identifier="MyPlans", planner="nnUNetPlannerResEncM").plans == "MyPlans"


def test_predict_command_names_the_final_model():
    cmd = predict_command(_opts(preset="quick", epochs=3, iterations=9, fold="0", configuration="2d"),
                          "Dataset732_SynthChestPseudo")
    assert cmd == ("nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d 732 -c 2d -f 0 "
                   "-tr nnUNetTrainer_3epochs_9its -p nnUNetPlans_quick --disable_tta")
    assert predict_command(_opts(), "Dataset732_SynthChestPseudo").endswith("-tr nnUNetTrainer -p nnUNetPlans")


@pytest.fixture
def generated(nnunet_env):
    exe = Path(sys.executable).parent / "nnunetv2_dram"
    subprocess.run([str(exe), "generate", "-d", "731", "--train", "2", "--test", "1", "--shape", "16", "32", "32"],
                   check=True, capture_output=True)
    return nnunet_env


@pytest.mark.parametrize("flags,message", [
    (["--preset", "quick", "-p", "nnUNetPlans"], "would overwrite those"),
    (["--preset", "quick", "-pl", "nnUNetPlannerResEncM", "-p", "nnUNetResEncUNetMPlans"], "would overwrite those"),
    (["-pl", "NoSuchPlanner"], "-pl NoSuchPlanner: no such nnU-Net experiment planner"),
    (["-p", "plans/nnUNetPlans.json"], "a plans identifier is a name"),
    (["-tr", "DRAMTrainer_5epochs", "--epochs", "2"], "already names a training length"),
    (["--epochs", "0"], "--epochs 0"),
    (["--restrict-to-regions"], "labelsTs"),
])
def test_combinations_that_cannot_work_stop_before_any_stage(generated, flags, message):
    raw = generated["nnUNet_raw"] / "Dataset731_SynthChest"
    if "--restrict-to-regions" in flags:
        shutil.rmtree(raw / "labelsTs")
    proc = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), "pipeline", "-d", "731", "-o", "732",
                           "-device", "cpu", *flags], capture_output=True, text=True)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "=== check ===" not in proc.stdout
    assert not any(generated["nnUNet_preprocessed"].iterdir()) and not any(generated["nnUNet_results"].iterdir())


def test_valid_combinations_pass(generated):
    validate_options(_opts(preset="quick", planner="nnUNetPlannerResEncM"))
    validate_options(_opts(preset="quick", plans_identifier="nnUNetPlans_small"))
    validate_options(_opts(plans_identifier="nnUNetPlans", planner="ExperimentPlanner", restrict_to_regions=True))
    validate_options(_opts(trainer="DRAMTrainer_5epochs"))
    with pytest.raises(PipelineError, match="no region map"):
        (generated["nnUNet_raw"] / "Dataset731_SynthChest" / "labelsTs" / "synth_002.nii.gz").unlink()
        validate_options(_opts(restrict_to_regions=True))
