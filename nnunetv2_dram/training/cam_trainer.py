"""CAMTrainer: the class-activation-map baseline the paper compares against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunetv2_dram.architectures.dram_network import ClassActivationNetwork, build_backbone, features_per_stage
from nnunetv2_dram.building_blocks.region_pooling import region_mean, resize_mask
from nnunetv2_dram.losses.interval_regression import interval_regression_loss
from nnunetv2_dram.training.weak_trainer import WeakRegressionTrainer


class CAMTrainer(WeakRegressionTrainer):
    """nnU-Net's encoder; its deepest features are averaged inside the region and a linear layer (1×1 conv)
    regresses the region's fraction through a sigmoid. The layer applied at every position, upsampled, is the
    activation map. Coarse by construction: that is what the dRAM improves on."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        backbone = build_backbone(configuration_manager, num_input_channels, False)
        fps = features_per_stage(configuration_manager)
        if fps is None:
            raise ValueError("CAMTrainer needs `features_per_stage` in the plans' network_arch_init_kwargs")
        return ClassActivationNetwork(backbone, fps[-1], len(configuration_manager.patch_size))

    def compute_loss(self, outputs: dict, mask: torch.Tensor, interval: torch.Tensor):
        cam = outputs["cam"].float()
        # global (region) average of the per-position regression, then the sigmoid: CAM's classic head
        pooled_logit = region_mean(cam, resize_mask(mask, cam.shape[2:]))[:, 0]
        pred = torch.sigmoid(pooled_logit)
        log_pred = (F.logsigmoid(pooled_logit), F.logsigmoid(-pooled_logit)) if self.saturation_safe_loss else None
        return interval_regression_loss(pred, interval, band=self.interval_band, log_pred=log_pred), pred
