"""Peak GPU memory per epoch in the training log (the benchmarks compare trainers by it)."""
from __future__ import annotations

import torch


def log_peak_gpu_memory(trainer) -> None:
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30
        trainer.print_to_log_file(f"Peak GPU memory: {peak:.2f} GiB")
        torch.cuda.reset_peak_memory_stats(trainer.device)
