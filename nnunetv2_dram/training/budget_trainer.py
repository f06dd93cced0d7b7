"""nnUNetTrainerBudget: stock nnUNetTrainer whose length comes from the environment (see training/budget.py).

The pipeline trains the final network with it when --epochs/--iterations are given; without them it uses plain
nnUNetTrainer. NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1 skips nnU-Net's end-of-training validation (a CPU run
needs its minutes elsewhere).
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dram.training.budget import apply_training_budget, skip_final_validation
from nnunetv2_dram.training.gpu_memory import log_peak_gpu_memory


class nnUNetTrainerBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_training_budget(self)

    def on_epoch_end(self):
        log_peak_gpu_memory(self)
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if skip_final_validation():
            self.print_to_log_file("final validation skipped (NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)")
            return
        super().perform_actual_validation(save_probabilities)
