"""With the same seed, DRAMTrainer's dRAM is DRAMTrainerNoRefine's to the last bit: the refinement draws its
initialisation from its own generator, reads the dRAM detached and has its gradients clipped apart. So the two
trainers differ only by the refined map, and a paired comparison measures the refinement alone."""
import pytest
import torch

TRAINERS = ("DRAMTrainer", "DRAMTrainerNoRefine", "DRAMTrainerFullDRAMWeight")


@pytest.fixture(scope="module")
def trained_weights(weak3d):
    """Each trainer of TRAINERS trained 2 epochs x 3 iterations with seed 5 on the same data: its final weights."""
    ws, dataset = weak3d
    weights = {}
    for name in TRAINERS:
        trainer = f"{name}_2epochs_3its"
        ws.run("nnUNetv2_train", dataset[7:10], "3d_fullres", "all", "-tr", trainer, "-p", "nnUNetPlans_quick",
               "-device", "cpu", NNUNETV2_DRAM_SEED=5, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)
        checkpoint = ws.results / dataset / f"{trainer}__nnUNetPlans_quick__3d_fullres" / "fold_all" / \
            "checkpoint_final.pth"
        weights[name] = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    return weights


def test_same_seed_gives_the_same_dram_with_and_without_refinement(trained_weights):
    refined, plain = trained_weights["DRAMTrainer"], trained_weights["DRAMTrainerNoRefine"]
    assert set(plain) < set(refined)
    assert {k for k in refined if k not in plain} >= {"refinement._extra_state", "refinement.head.out.weight"}
    for key, value in plain.items():
        assert torch.equal(value, refined[key]), key


def test_the_dram_weight_changes_the_stored_setting_and_nothing_that_trains(trained_weights):
    """DRAMTrainer (the head added to half the dRAM's logits) and DRAMTrainerFullDRAMWeight (to all of them) train
    the same weights, head included: the weight enters only the refined map, which trains nothing. Each checkpoint
    stores its own weight, so its pseudo labels are made with it."""
    half, full = trained_weights["DRAMTrainer"], trained_weights["DRAMTrainerFullDRAMWeight"]
    assert set(half) == set(full)
    for key, value in half.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(value, full[key]), key
    assert half["refinement._extra_state"]["settings"]["head"]["dram_weight"] == 0.5
    assert full["refinement._extra_state"]["settings"]["head"]["dram_weight"] == 1.0
