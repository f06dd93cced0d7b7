"""`nnUNetv2_train ... --c` continues a checkpoint whose refinement differs from the one the trainer builds (a
training of an earlier version, whose DRAMTrainer had the attention): the stored refinement is rebuilt, the optimiser
holds its parameters, and training goes on with it."""
import shutil

import torch


def _checkpoint(folder):
    return torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def test_continuing_a_checkpoint_with_the_attention_keeps_training_the_attention(weak3d):
    ws, dataset = weak3d
    plans = "nnUNetPlans_quick__3d_fullres"
    earlier = ws.results / dataset / f"DRAMTrainerWithAttention_1epochs_2its__{plans}"
    ws.run("nnUNetv2_train", dataset[7:10], "3d_fullres", "all", "-tr", "DRAMTrainerWithAttention_1epochs_2its",
           "-p", "nnUNetPlans_quick", "-device", "cpu", NNUNETV2_DRAM_SEED=3, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)
    # the same training folder under today's trainer name, as after an upgrade
    today = ws.results / dataset / f"DRAMTrainer_2epochs_2its__{plans}"
    shutil.copytree(earlier, today)
    ws.run("nnUNetv2_train", dataset[7:10], "3d_fullres", "all", "-tr", "DRAMTrainer_2epochs_2its", "-p",
           "nnUNetPlans_quick", "-device", "cpu", "--c", NNUNETV2_DRAM_SEED=3, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)
    before, after = _checkpoint(earlier), _checkpoint(today)
    assert before["current_epoch"] == 1 and after["current_epoch"] == 2
    key = "refinement.attention.theta.weight"
    assert key in after["network_weights"]
    assert after["network_weights"]["refinement._extra_state"] == before["network_weights"]["refinement._extra_state"]
    assert not torch.equal(after["network_weights"][key], before["network_weights"][key])  # trained on
