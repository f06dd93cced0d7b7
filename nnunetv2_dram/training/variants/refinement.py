"""DRAMTrainer's refinement, one setting changed at a time (experiments; the benchmarks compare them)."""
from __future__ import annotations

import torch

from nnunetv2_dram.training.dram_trainers import DRAMTrainer


class DRAMTrainerWithCRF(DRAMTrainer):
    """The trainable dense CRF inside the refinement while training (after the attention, inside the region, at the
    chunk's zoomed spacing, Potts, bounded weights)."""

    crf_settings = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerCoarseRefinement(DRAMTrainer):
    """The refinement on a 2x coarser grid (1/4 of the voxels in 2-D, 1/8 in 3-D), its map upsampled: cheaper, but
    it cannot move an edge by less than two voxels."""

    refine_downsample = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
