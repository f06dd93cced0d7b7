"""With the same seed, DRAMTrainer's dRAM is DRAMTrainerNoRefine's to the last bit: the refinement draws its
initialisation from its own generator, reads the dRAM detached and has its gradients clipped apart. So the two
trainers differ only by the refined map, and a paired comparison measures the refinement alone."""
import torch


def test_same_seed_gives_the_same_dram_with_and_without_refinement(weak3d):
    ws, dataset = weak3d
    weights = {}
    for trainer in ("DRAMTrainer_2epochs_3its", "DRAMTrainerNoRefine_2epochs_3its"):
        ws.run("nnUNetv2_train", dataset[7:10], "3d_fullres", "all", "-tr", trainer, "-p", "nnUNetPlans_quick",
               "-device", "cpu", NNUNETV2_DRAM_SEED=5, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)
        checkpoint = ws.results / dataset / f"{trainer}__nnUNetPlans_quick__3d_fullres" / "fold_all" / \
            "checkpoint_final.pth"
        weights[trainer] = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    refined, plain = weights["DRAMTrainer_2epochs_3its"], weights["DRAMTrainerNoRefine_2epochs_3its"]
    assert set(plain) < set(refined)
    assert {k for k in refined if k not in plain} >= {"refinement._extra_state", "refinement.head.out.weight"}
    for key, value in plain.items():
        assert torch.equal(value, refined[key]), key
