"""DRAMTrainer (the method: dRAM, region regression, refinement trained per voxel) and DRAMTrainerNoRefine (the dRAM
alone, its ablation)."""
from __future__ import annotations

import torch

from nnunetv2_dram.architectures.dram_network import (DenseRegressionNetwork, build_backbone,
                                                      features_per_stage)
from nnunetv2_dram.losses.self_training import self_training_loss, self_training_targets
from nnunetv2_dram.training.budget import refine_offset_mode
from nnunetv2_dram.training.weak_trainer import WeakRegressionTrainer, unwrap

#: HU of the trainable CRF's intensity kernel on CT: about twice the noise of a clinical CT (20-40 HU), well below
#: the contrast of ground glass against aerated lung (150-400 HU)
CRF_INTENSITY_SIGMA_HU = 60.0
#: the method's local-affinity attention (building_blocks/local_attention.py): 3^dim neighbours, propagated twice, each
#: time every voxel replaced by its neighbourhood's weighted mean (a fixed mix of 1: with a learnable mix,
#: self-training shrinks the mix towards the identity instead of teaching the affinities where edges are). Used by
#: DRAMTrainerWithAttention and the variants of the refinement that are about the attention.
LOCAL_ATTENTION = {"kernel_size": 3, "iterations": 2, "init_mix": 1.0, "learn_mix": False}


class DRAMTrainer(WeakRegressionTrainer):
    """Dense regression activation maps: nnU-Net's network with one sigmoid output, averaged inside each region to
    regress the region's lesion fraction (on every deep-supervision scale). A refinement computes a map of its own
    from the detached dRAM: a per-voxel classifier head on the image adds an appearance score to half the dRAM's
    logits. The head is trained per voxel by class-balanced, bootstrapped self-training against the dRAM thresholded
    inside the region (losses/self_training.py); nothing of it reaches the dRAM. Pseudo labels come from the refined
    map.
    The method's local-affinity attention and a trainable dense CRF are settings (DRAMTrainerWithAttention,
    DRAMTrainerWithCRF): measured, neither made better pseudo labels, and the attention costs most of a refinement's
    training time."""

    refine = True
    #: None: no attention, the refined map is half the dRAM plus the head; a dict (LocalAffinityAttention's
    #: arguments, e.g. LOCAL_ATTENTION) propagates the dRAM's logits between feature-similar neighbours before the head
    #: is added
    attention_settings: dict | None = None
    #: None: no CRF inside the network while training (the pseudo labels get a dense CRF on the CT either way);
    #: a dict (TrainableDenseCRF's arguments, may be empty) switches the trainable CRF on
    crf_settings: dict | None = None
    #: the per-voxel classifier head (building_blocks/voxel_head.py; VoxelClassifierHead's arguments plus "combine",
    #: "inputs" and "own_loss", see architectures/dram_refinement.py); None: no head.
    #: Here: a perceptron on each voxel's intensity, trained by its own self-training loss (through the refined map,
    #: whose target is the dRAM's own threshold, it would learn only what the dRAM does not already say), added to the
    #: dRAM's logits (after the attention, where there is one), and evaluated on the case's own grid when pseudo labels
    #: are made. `dram_weight` 0.5: the head's score is added to half the dRAM's logits; the region regression leaves
    #: those logits large, and at full weight (DRAMTrainerFullDRAMWeight) they decide most of the ranking inside a
    #: region. The weight enters only the refined map, which trains nothing here: it changes the pseudo labels, not
    #: what is trained
    head_settings: dict | None = {"combine": "add_after", "inputs": "image", "kernel_size": 1, "norm": False,
                                  "own_loss": True, "dram_weight": 0.5}
    #: 1: the refinement at the dRAM's full resolution, so that it can move an edge by a voxel
    refine_downsample = 1
    self_training_weight = 1.0
    self_training_bootstrap = 0.8

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def refinement_settings(cls, plans_manager, configuration_manager) -> dict | None:
        """The refinement the network is built with (None: no refinement). Stored with the checkpoint."""
        if not cls.refine:
            return None
        attention = None if cls.attention_settings is None else dict(cls.attention_settings)
        crf = None if cls.crf_settings is None else dict(cls.crf_settings)
        if crf is not None and "intensity_sigma" not in crf:
            crf["intensity_sigma"] = crf_intensity_sigma(plans_manager, configuration_manager)
        offset_mode = refine_offset_mode()
        if offset_mode is not None:
            if attention is not None:
                attention["offset_mode"] = offset_mode
            if crf is not None:
                crf["offset_mode"] = offset_mode
        head = None if cls.head_settings is None else dict(cls.head_settings)
        return {"attention": attention, "crf": crf, "downsample": cls.refine_downsample, "head": head}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # num_output_channels is what the label set asks for (lobes while training, lesion/background when
        # predicting); the dRAM has a single channel either way, exposed as two for nnU-Net's predictor
        backbone = build_backbone(configuration_manager, num_input_channels, enable_deep_supervision)
        fps = features_per_stage(configuration_manager)
        # the refinement's initialisation draws from its own generator, so that with the same seed the backbone,
        # and everything drawn later (sampling, augmentation), is what DRAMTrainerNoRefine gets
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + 1)
            return DenseRegressionNetwork(backbone, len(configuration_manager.patch_size),
                                          configuration_manager.spacing, num_input_channels, fps[0] if fps else None,
                                          refinement=cls.refinement_settings(plans_manager, configuration_manager))

    def compute_loss(self, outputs: dict, mask: torch.Tensor, interval: torch.Tensor):
        drams = outputs["dram"]
        weights = self._deep_supervision_weights(len(drams))
        loss, pred = self._pooled_loss(drams[0], mask, interval)
        loss = float(weights[0]) * loss
        for w, o in zip(weights[1:], drams[1:]):
            if w > 0:
                loss = loss + float(w) * self._pooled_loss(o, mask, interval)[0]
        if self.self_training_weight > 0:
            # the refined map and (where it has a loss of its own) the head, each against the thresholded dRAM; the
            # network's own head decides (a continued checkpoint of another version may have another head)
            own = getattr(getattr(unwrap(self.network), "refinement", None), "head_own_loss", False)
            trained = [m for m in (outputs.get("refined"), outputs.get("head") if own else None) if m is not None]
            targets = self_training_targets(drams[0], mask, interval) if trained else None  # once for both
            for logits in trained:
                loss = loss + self.self_training_weight * self_training_loss(
                    logits, None, None, None, bootstrap=self.self_training_bootstrap, targets=targets)
        return loss, pred

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, after rebuilding the refinement the checkpoint stores where it differs from the one this
        trainer built (a training of an earlier version continued with `--c`): the optimiser must hold the
        checkpoint's parameters before its state is loaded."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        weights = checkpoint["network_weights"]
        stored = weights.get("refinement._extra_state", weights.get("module.refinement._extra_state"))
        refinement = getattr(unwrap(self.network), "refinement", None)
        if stored is not None and refinement is not None and stored["settings"] != refinement.settings():
            refinement.set_extra_state(stored)
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            self._clip_groups = None
        # nnU-Net's load_checkpoint reads a file name only
        super().load_checkpoint(filename_or_checkpoint)


class DRAMTrainerNoRefine(DRAMTrainer):
    """Ablation: the dRAM and its region-pooled regression only, no refinement; pseudo labels from the dRAM."""

    refine = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


def crf_intensity_sigma(plans_manager, configuration_manager) -> float:
    """The trainable CRF's intensity sigma in the units of the network's input: CRF_INTENSITY_SIGMA_HU over the
    intensity scale of nnU-Net's CT normalisation (its foreground standard deviation); 0.5 for any other
    normalisation (z-scored images)."""
    schemes = list(getattr(configuration_manager, "normalization_schemes", []) or [])
    properties = plans_manager.foreground_intensity_properties_per_channel.get("0", {})
    std = float(properties.get("std", 0.0) or 0.0)
    if schemes and schemes[0] == "CTNormalization" and std > 0:
        return CRF_INTENSITY_SIGMA_HU / std
    return 0.5
