"""nnU-Net's local logger with the quantities a weakly supervised run is judged by.

There is no voxel ground truth during training, so nnU-Net's pseudo Dice has nothing to measure; instead every
epoch logs the validation regions' lesion-% mean absolute error (distance to the weak target interval, in
percentage points), its moving average (which picks checkpoint_best), and for CTSS targets the share of regions
whose predicted percentage falls into the right severity band.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger


class RegionLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.my_fantastic_logging = {
            "train_losses": [], "val_losses": [], "lrs": [], "epoch_start_timestamps": [],
            "epoch_end_timestamps": [], "train_region_mae": [], "val_region_mae": [], "ema_val_region_mae": [],
            "val_ctss_accuracy": [],
        }

    def log(self, key, value, epoch: int):
        super().log(key, value, epoch)
        if key == "val_region_mae":
            previous = self.my_fantastic_logging["ema_val_region_mae"][epoch - 1] if epoch > 0 and \
                len(self.my_fantastic_logging["ema_val_region_mae"]) >= epoch else None
            ema = value if previous is None or not np.isfinite(previous) else 0.9 * previous + 0.1 * value
            super().log("ema_val_region_mae", ema, epoch)

    def plot_progress_png(self, output_folder):
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(3, 1, figsize=(12, 16))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr", linewidth=2)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(x, log["train_region_mae"][:epoch + 1], color="c", ls="dotted", label="region-% MAE (train)",
                 linewidth=2)
        ax2.plot(x, log["val_region_mae"][:epoch + 1], color="g", ls="dotted", label="region-% MAE (val)",
                 linewidth=2)
        ax2.plot(x, log["ema_val_region_mae"][:epoch + 1], color="g", label="region-% MAE (val, mov. avg.)",
                 linewidth=3)
        ax2.set_ylabel("lesion % mean absolute error (percentage points)")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1],
                                           log["epoch_start_timestamps"][:epoch + 1])]
        ax.plot(x, durations, color="b", label="epoch duration", linewidth=2)
        ax.set_ylim(0, max(durations + [1e-3]) * 1.1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend()
        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend()
        plt.tight_layout()
        from nnunetv2_dram.io_utils import atomic_path
        import os
        with atomic_path(os.path.join(output_folder, "progress.png")) as tmp:
            fig.savefig(tmp)
        plt.close(fig)
