"""DRAMTrainer (the full method), DRAMTrainerNoRefine (its ablation without refinement), DRAMTrainerSelfTraining
(DRAMTrainer until 2026-11-27: the refinement also self-trained on the raw dRAM), DRAMTrainerBalancedLoss (the dRAM's
and the refined map's losses half each) and DRAMTrainerFullRefine (the refinement at full instead of half
resolution)."""
from __future__ import annotations

import torch

from nnunetv2_dram.architectures.dram_network import (DenseRegressionNetwork, build_backbone,
                                                      features_per_stage)
from nnunetv2_dram.losses.self_training import self_training_loss
from nnunetv2_dram.training.budget import refine_offset_mode
from nnunetv2_dram.training.weak_trainer import WeakRegressionTrainer


class DRAMTrainer(WeakRegressionTrainer):
    """Dense regression activation maps: nnU-Net's network with one sigmoid output, averaged inside each region
    to regress the region's lesion fraction (on every deep-supervision scale), refined by local-affinity
    attention and a trainable dense CRF that get the same regression loss (self-training on confident voxels of
    the raw map: DRAMTrainerSelfTraining)."""

    refine = True
    attention_kwargs: dict = {}
    crf_kwargs: dict = {}
    # Attention and CRF on a 2x coarser grid, their correction upsampled onto the full-resolution dRAM (the authors'
    # PCM also ran on a coarse 64^3 grid). Against full resolution (DRAMTrainerFullRefine), 3 CPU quality runs
    # (docs/benchmarks.md): pseudo labels +0.01 to +0.03 IoU in all three, epochs 0.7x the time, refinement ~1/8 the cost.
    refine_downsample = 2
    # The refined map is the dRAM plus a correction, so the refined map's loss reaches the dRAM too: with both weights
    # at 1 the dRAM learns with about twice NoRefine's gradient (DRAMTrainerBalancedLoss: half each).
    dram_loss_weight = 1.0
    refined_loss_weight = 1.0
    # 0 since 2026-11-27: the refined map is the dRAM plus a correction, so the self-training loss reached the dRAM
    # itself and pulled it towards its own thresholded values while it was still learning. Without it, pseudo labels
    # were better in all 5 CPU comparisons (+0.01 to +0.14 IoU; a 2-D run went from failed to working;
    # docs/benchmarks.md, results.md). DRAMTrainerSelfTraining keeps the term.
    self_training_weight = 0.0
    self_training_warmup = 0.1  # share of the epochs over which the self-training weight ramps up from 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # num_output_channels is what the label set asks for (lobes while training, lesion/background when
        # predicting); the dRAM has a single channel either way, exposed as two for nnU-Net's predictor
        backbone = build_backbone(configuration_manager, num_input_channels, enable_deep_supervision)
        fps = features_per_stage(configuration_manager)
        attention_kwargs, crf_kwargs = dict(cls.attention_kwargs), dict(cls.crf_kwargs)
        offset_mode = refine_offset_mode()
        if offset_mode is not None:
            attention_kwargs["offset_mode"] = crf_kwargs["offset_mode"] = offset_mode
        return DenseRegressionNetwork(backbone, len(configuration_manager.patch_size), configuration_manager.spacing,
                                      num_input_channels, fps[0] if fps else None, refine=cls.refine,
                                      attention_kwargs=attention_kwargs, crf_kwargs=crf_kwargs,
                                      refine_downsample=cls.refine_downsample)

    def compute_loss(self, outputs: dict, mask: torch.Tensor, interval: torch.Tensor):
        drams = outputs["dram"]
        weights = self.dram_loss_weight * self._deep_supervision_weights(len(drams))
        loss, pred = self._pooled_loss(drams[0], mask, interval)
        loss = float(weights[0]) * loss
        for w, o in zip(weights[1:], drams[1:]):
            if w > 0:
                loss = loss + float(w) * self._pooled_loss(o, mask, interval)[0]
        refined = outputs.get("refined")
        if refined is not None:
            loss_ref, f_ref = self._pooled_loss(refined, mask, interval)
            loss = loss + self.refined_loss_weight * loss_ref
            if self.self_training_weight > 0:
                ramp = min(1.0, (self.current_epoch + 1) / max(1.0, self.self_training_warmup * self.num_epochs))
                loss = loss + ramp * self.self_training_weight * self_training_loss(refined, drams[0].detach(), mask,
                                                                                    interval)
            pred = f_ref
        return loss, pred


class DRAMTrainerNoRefine(DRAMTrainer):
    """Ablation: the dRAM and its region-pooled regression only, no attention, no CRF."""

    refine = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerSelfTraining(DRAMTrainer):
    """DRAMTrainer as it was until 2026-11-27: attention and CRF also self-trained on the confident voxels of the
    detached raw dRAM (threshold 0.5, classes weighted equally, soft bootstrapping), weight 0.5 after a warm-up over
    the first 10 % of the epochs. Its pseudo labels were worse in all 5 CPU comparisons (docs/benchmarks.md)."""

    self_training_weight = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerBalancedLoss(DRAMTrainer):
    """DRAMTrainer with the dRAM's and the refined map's regression losses weighted half each, so that the dRAM,
    which both losses reach, learns with the gradient scale of DRAMTrainerNoRefine instead of about twice it. An
    experiment (2026-11-27, single CPU runs): pseudo labels better in 2 of 3 (2-D 0.325 vs 0.270 IoU, where the dRAM
    no longer stalled in the first epochs; 3-D 0.556 vs 0.503), worse in one (3-D 0.365 vs 0.385;
    docs/benchmarks.md)."""

    dram_loss_weight = 0.5
    refined_loss_weight = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerFullRefine(DRAMTrainer):
    """DRAMTrainer with attention and CRF at the full resolution of the dRAM (the default until 2026-11-26): 8x the
    refinement's cost in 3-D, and its pseudo labels were not better in three CPU quality runs."""

    refine_downsample = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerCoarseRefine(DRAMTrainer):
    """The same as DRAMTrainer since coarse refinement became its default (2026-11-26); kept so that models trained
    under this name still load."""

    refine_downsample = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
