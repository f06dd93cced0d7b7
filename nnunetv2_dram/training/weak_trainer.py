"""The part every weakly supervised trainer shares: weak labels in, region chunks, region-% metrics out.

Subclasses say which network to build (`build_network_architecture`) and how its outputs become a loss
(`compute_loss`). Everything else — nnU-Net's planning, preprocessing, folders, optimiser, schedule,
checkpointing, `--c`, DDP — is nnU-Net's own.
"""
from __future__ import annotations

import math
import os
import shutil
from time import time
from typing import List

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join, isfile, maybe_mkdir_p, save_json
from torch import autocast
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_dram.building_blocks.region_pooling import pooled_log_fractions
from nnunetv2_dram.losses.interval_regression import interval_distance, interval_regression_loss
from nnunetv2_dram.training.budget import apply_environment_settings, skip_final_validation
from nnunetv2_dram.training.chunk_loader import RegionChunkLoader
from nnunetv2_dram.training.gpu_memory import log_peak_gpu_memory
from nnunetv2_dram.training.region_chunks import (ChunkSpec, balanced_probabilities, build_region_samples,
                                                  index_regions)
from nnunetv2_dram.training.region_logger import RegionLogger
from nnunetv2_dram.weak_labels.format import FILENAME as WEAK_LABELS_FILE, WeakLabels, percent_to_ctss, read_weak_labels
from nnunetv2_dram.weak_labels.problems import Problem, WeakDatasetError

LESION_LABELS = {"background": 0, "lesion": 1}


def lesion_dataset_json(dataset_json: dict, weak_target: str | None) -> dict:
    """The dataset.json a trained weak model is used with: same channels, one lesion label. nnU-Net's predictor
    reads it from the model folder, so `nnUNetv2_predict` writes lesion masks (and lesion probabilities)."""
    out = {k: v for k, v in dataset_json.items() if k not in ("labels", "regions_class_order")}
    out["labels"] = dict(LESION_LABELS)
    out["nnunetv2_dram"] = {"regions": dataset_json.get("labels"), "weak_target": weak_target}
    return out


def unwrap(network):
    mod = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


class WeakRegressionTrainer(nnUNetTrainer):
    """Base class; not meant to be trained directly (use DRAMTrainer, DRAMTrainerNoRefine or CAMTrainer)."""

    margin_mm = 10.0  # context around the region's bounding box
    sampling_balance = 1.0  # 1: every severity bin equally often; 0: as the data come
    interval_band = 0.0  # tolerance (fraction) added to every target interval
    # False: the chunk shows the region's surroundings; only the pooling uses the region mask. On the synthetic data
    # this gave clearly better pseudo labels than the authors' masking (outside voxels set to the lowest intensity)
    # at the same budget, and unmasked chunks match what whole-image inference (nnUNetv2_predict) shows the network.
    mask_outside = False
    # True: the interval hinge is continued in the log domain far from the target (losses/interval_regression.py), so
    # a map that went dead (all logits far below 0) still gets a gradient. False: the plain linear hinge.
    saturation_safe_loss = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_val_iterations_per_epoch = 50
        apply_environment_settings(self)
        self.logger.local_logger = RegionLogger()
        self.weak_labels: WeakLabels | None = None
        self.chunk_spec: ChunkSpec | None = None
        self.val_samples = []
        self.region_index = None

    # ---------------------------------------------------------------- network
    def _do_i_compile(self):
        # nnU-Net compiles by default on a GPU. Compiling DRAMTrainer's network took longer than several short epochs
        # run eagerly (3 epochs of 31 iterations unfinished after 170 s; eagerly 41 s with start-up), so the weak
        # trainers run eagerly unless the user asks for compile with nnUNet_compile=t.
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            return super()._do_i_compile()
        return False

    def set_deep_supervision_enabled(self, enabled: bool):
        decoder = unwrap(self.network).decoder
        if decoder is not None and hasattr(decoder, "deep_supervision"):
            decoder.deep_supervision = enabled

    def _build_loss(self):
        return None  # compute_loss() below

    def _deep_supervision_weights(self, n: int) -> np.ndarray:
        """nnU-Net's weighting: halve per scale, drop the coarsest, normalise."""
        w = np.array([1 / (2 ** i) for i in range(n)])
        if n > 1:
            w[-1] = 1e-6 if self.is_ddp else 0  # DDP refuses parameters without a gradient
        return w / w.sum()

    def compute_loss(self, outputs: dict, mask: torch.Tensor, interval: torch.Tensor):
        """-> (loss, pooled predicted fraction (B,) of the map the model is judged by)."""
        raise NotImplementedError

    def _pooled_loss(self, logits: torch.Tensor, mask: torch.Tensor, interval: torch.Tensor):
        """(interval loss, pooled fraction (B,)) of one dense logit map."""
        log_f, log_not_f = pooled_log_fractions(logits, mask)
        f = log_f.exp()
        log_pred = (log_f, log_not_f) if self.saturation_safe_loss else None
        return interval_regression_loss(f, interval, band=self.interval_band, log_pred=log_pred), f

    # ---------------------------------------------------------------- weak labels and data
    def locate_weak_labels(self) -> str:
        from nnunetv2.paths import nnUNet_raw
        candidates = []
        if nnUNet_raw.is_set():
            candidates.append(join(nnUNet_raw.get(), self.plans_manager.dataset_name, WEAK_LABELS_FILE))
        candidates.append(join(self.preprocessed_dataset_folder_base, WEAK_LABELS_FILE))
        for c in candidates:
            if isfile(c):
                return c
        raise SystemExit(f"{self.__class__.__name__}: no {WEAK_LABELS_FILE} found for "
                         f"{self.plans_manager.dataset_name} (looked at: {', '.join(candidates)}). A weak dataset "
                         f"needs one next to its dataset.json (format: docs/reference.md, 'Weak dataset'); "
                         f"`nnunetv2_dram check -d ID` lists what is missing.")

    def load_weak_labels(self) -> WeakLabels:
        path = self.locate_weak_labels()
        weak, problems = read_weak_labels(path)
        errors = [p for p in problems if p.severity == "error"]
        labels = {int(v) for k, v in self.dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
        if weak is not None:
            for case, regions in weak.cases.items():
                for region in regions:
                    if region not in labels or region == 0:
                        errors.append(Problem(f"region {region} is not a label of dataset.json", file=path,
                                              case=case, region=region))
        if errors:
            self._fail(WeakDatasetError(errors, title=f"invalid {path}"))
        # keep a copy with the preprocessed data and with the model: the targets a model was trained on
        if self.local_rank == 0:
            for folder in (self.preprocessed_dataset_folder_base, self.output_folder_base):
                dst = join(folder, WEAK_LABELS_FILE)
                if os.path.abspath(dst) != os.path.abspath(path):
                    from nnunetv2_dram.io_utils import atomic_path
                    with atomic_path(dst) as tmp:
                        shutil.copyfile(path, tmp)
        return weak

    def _fail(self, error: Exception):
        self.print_to_log_file(str(error))
        raise SystemExit(str(error))

    def region_index_file(self) -> str:
        # next to (not inside) the preprocessed case folder: nnU-Net infers the dataset class from the file
        # endings found in there
        return join(self.preprocessed_dataset_folder_base,
                    f"dram_region_index_{self.configuration_manager.data_identifier}.json")

    def prepare_region_samples(self, tr_keys, val_keys):
        weak = self.weak_labels
        all_ids = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        unknown = sorted(set(weak.cases) - set(all_ids))
        problems = [Problem("case in weak_labels.json has no (preprocessed) training image", file=WEAK_LABELS_FILE,
                            case=c, hint="remove the entry or add the case to imagesTr/labelsTr") for c in unknown]
        dataset = self.dataset_class(self.preprocessed_dataset_folder, sorted(set(tr_keys) | set(val_keys)))
        self.region_index = index_regions(dataset, sorted(set(tr_keys) | set(val_keys)),
                                          cache_file=self.region_index_file()
                                          if self.local_rank == 0 else None)
        tr, p_tr = build_region_samples({k: self.region_index[k] for k in tr_keys}, weak)
        val, p_val = build_region_samples({k: self.region_index[k] for k in val_keys}, weak)
        problems += p_tr + [p for p in p_val if p not in p_tr]
        if problems:
            self._fail(WeakDatasetError(problems, title="weak labels do not fit the preprocessed dataset"))
        if not tr:
            self._fail(SystemExit("no training region has a weak target"))
        return tr, val

    def get_dataloaders(self):
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.weak_labels = self.load_weak_labels()
        _, _, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.chunk_spec = ChunkSpec.from_configuration(self.configuration_manager.patch_size,
                                                       self.configuration_manager.spacing, self.margin_mm,
                                                       self.mask_outside)
        tr_keys, val_keys = self.do_split()
        tr_samples, val_samples = self.prepare_region_samples(tr_keys, val_keys)
        if not val_samples:
            val_samples = tr_samples
        self.val_samples = val_samples
        bins, counts = np.unique([s.bin for s in tr_samples], return_counts=True)
        self.print_to_log_file(f"{len(tr_samples)} training regions, {len(val_samples)} validation regions; "
                               f"severity bins (train) {dict(zip(bins.tolist(), counts.tolist()))}; "
                               f"chunk {self.chunk_spec.chunk_size}, margin {self.margin_mm} mm")
        dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys if val_keys else tr_keys)
        dl_tr = RegionChunkLoader(dataset_tr, tr_samples, self.batch_size, self.chunk_spec,
                                  probabilities=balanced_probabilities(tr_samples, self.sampling_balance),
                                  augment=True, mirror_axes=mirror_axes)
        dl_val = RegionChunkLoader(dataset_val, val_samples, self.batch_size, self.chunk_spec, augment=False,
                                   sequential=True)
        # one pass over the validation regions per epoch (at most the configured number of iterations)
        self.num_val_iterations_per_epoch = max(1, min(self.num_val_iterations_per_epoch,
                                                       math.ceil(len(val_samples) / self.batch_size)))
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_train = SingleThreadedAugmenter(dl_tr, None)
        else:
            mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, num_cached=max(6, n_proc // 2), seeds=None,
                                                    pin_memory=self.device.type == "cuda", wait_time=0.002)
        mt_val = SingleThreadedAugmenter(dl_val, None)  # deterministic cycle over the validation regions
        _ = next(mt_train)
        return mt_train, mt_val

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:  # the model folder's dataset.json is what nnUNetv2_predict will use
            save_json(lesion_dataset_json(self.dataset_json, self.weak_labels.target),
                      join(self.output_folder_base, "dataset.json"), sort_keys=False)

    # ---------------------------------------------------------------- steps
    def _forward_loss(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        mask = batch["target"].to(self.device, non_blocking=True)
        interval = batch["interval"].to(self.device, non_blocking=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            # the chunk's own spacing (zoomed) and its region go to the refinement; the dRAM needs neither
            outputs = self.network(data, return_all=True, spacing=batch.get("spacing"), region=mask)
            loss, pred = self.compute_loss(outputs, mask, interval)
        err = interval_distance(pred.detach().float(), interval[:, 0], interval[:, 1]) * 100
        return loss, pred.detach().float(), err

    def _gradient_groups(self) -> list[list[torch.nn.Parameter]]:
        """Parameters whose gradient norm is clipped together: the refinement (whose loss never reaches the rest)
        apart from the rest, so that its gradients cannot change how the dRAM's are clipped."""
        network = unwrap(self.network)
        refinement = getattr(network, "refinement", None)
        if refinement is None:
            return [list(self.network.parameters())]
        own = {id(p) for p in refinement.parameters()}
        return [[p for p in network.parameters() if id(p) not in own], list(refinement.parameters())]

    def _clip_gradients(self) -> None:
        groups = getattr(self, "_clip_groups", None)
        if groups is None:  # the network's parameters never change after initialisation: sort them once
            groups = self._clip_groups = self._gradient_groups()
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, 12)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, err = self._forward_loss(batch)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._clip_gradients()
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), "abs_err": err.cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        loss = np.mean([o["loss"] for o in train_outputs])
        err = np.concatenate([o["abs_err"] for o in train_outputs])
        loss, mae = self._all_reduce_mean([loss], err)
        self.logger.log("train_losses", loss, self.current_epoch)
        self.logger.log("train_region_mae", mae, self.current_epoch)

    def validation_step(self, batch: dict) -> dict:
        loss, pred, err = self._forward_loss(batch)
        bins = batch["bin"].numpy()
        pred_pct = pred.cpu().numpy() * 100
        hit = np.array([float(percent_to_ctss(p) == b) for p, b in zip(pred_pct, bins)])
        return {"loss": loss.detach().cpu().numpy(), "abs_err": err.cpu().numpy(), "bin_hit": hit}

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        loss = np.mean([o["loss"] for o in val_outputs])
        err = np.concatenate([o["abs_err"] for o in val_outputs])
        hits = np.concatenate([o["bin_hit"] for o in val_outputs])
        loss, mae = self._all_reduce_mean([loss], err)
        _, acc = self._all_reduce_mean([0.0], hits)
        self.logger.log("val_losses", loss, self.current_epoch)
        self.logger.log("val_region_mae", mae, self.current_epoch)
        self.logger.log("val_ctss_accuracy", acc if self.weak_labels.target == "ctss" else float("nan"),
                        self.current_epoch)

    def _all_reduce_mean(self, scalars, values):
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (list(scalars), np.asarray(values)))
            scalars = np.mean([g[0] for g in gathered], axis=0)
            values = np.concatenate([g[1] for g in gathered])
        return float(np.mean(scalars)), float(np.mean(values)) if len(values) else float("nan")

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        get = lambda k: self.logger.get_value(k, step=-1)  # noqa: E731
        self.print_to_log_file("train_loss", np.round(get("train_losses"), 4))
        self.print_to_log_file("val_loss", np.round(get("val_losses"), 4))
        acc = get("val_ctss_accuracy")
        self.print_to_log_file(f"Region-% MAE train {get('train_region_mae'):.2f}, val {get('val_region_mae'):.2f} "
                               f"(percentage points)" + (f", val CTSS accuracy {acc:.3f}" if np.isfinite(acc) else ""))
        self.print_to_log_file(f"Epoch time: {np.round(get('epoch_end_timestamps') - get('epoch_start_timestamps'), 2)} s")
        log_peak_gpu_memory(self)
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != (self.num_epochs - 1):
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        ema = get("ema_val_region_mae")
        if self._best_ema is None or ema < self._best_ema:
            self._best_ema = ema
            self.print_to_log_file(f"Yayy! New best EMA validation region-% MAE: {np.round(ema, 3)}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    # ---------------------------------------------------------------- final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """Region-% error of the trained model on the validation cases, run region by region as trained.
        Writes validation/region_fractions.json; with --npz also the lesion probability maps via nnU-Net's export."""
        if skip_final_validation():
            self.print_to_log_file("final validation skipped (NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)")
            return
        from nnunetv2_dram.evaluation.region_report import region_report
        from nnunetv2_dram.inference.region_inference import predict_case_by_regions
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        if self.weak_labels is None:
            self.weak_labels = self.load_weak_labels()
        if self.chunk_spec is None:
            self.chunk_spec = ChunkSpec.from_configuration(self.configuration_manager.patch_size,
                                                           self.configuration_manager.spacing, self.margin_mm,
                                                           self.mask_outside)
        self.set_deep_supervision_enabled(False)
        network = unwrap(self.network)
        network.eval()
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::dist.get_world_size()]
        index = index_regions(self.dataset_class(self.preprocessed_dataset_folder, list(val_keys)), list(val_keys))
        samples, _ = build_region_samples(index, None)
        out_dir = join(self.output_folder, "validation")
        maybe_mkdir_p(out_dir)
        rows = {}
        dataset = self.dataset_class(self.preprocessed_dataset_folder, list(val_keys))
        for case in val_keys:
            data, seg, _, properties = dataset.load_case(case)
            pred = predict_case_by_regions(network, data, seg, [s for s in samples if s.case == case],
                                           self.chunk_spec, self.device)
            rows[case] = {str(r): f * 100 for r, f in pred.fractions.items()}
            if save_probabilities:
                self._export_probability(pred.probability, properties, join(out_dir, case))
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = {k: v for g in gathered for k, v in g.items()}
        if self.local_rank == 0:
            report = region_report(rows, self.weak_labels)
            from nnunetv2_dram.io_utils import atomic_write_json
            atomic_write_json(join(out_dir, "region_fractions.json"), report)
            self.print_to_log_file(f"Validation region-% MAE: {report['mean_abs_error']:.3f} percentage points "
                                   f"over {report['n_regions']} regions", also_print_to_console=True)
            self.logger.log_summary("final_val/region_mae", report["mean_abs_error"])
        self.set_deep_supervision_enabled(True)

    def _export_probability(self, prob: np.ndarray, properties: dict, output_truncated: str):
        from nnunetv2.inference.export_prediction import export_prediction_from_logits
        two_d = len(self.configuration_manager.patch_size) == 2
        p = np.clip(prob, 1e-6, 1 - 1e-6)
        logit = np.log(p / (1 - p)).astype(np.float32)
        if two_d:
            logit = logit[None]
        logits = torch.from_numpy(np.stack([np.zeros_like(logit), logit]))
        export_prediction_from_logits(logits, properties, self.configuration_manager, self.plans_manager,
                                      lesion_dataset_json(self.dataset_json, self.weak_labels.target),
                                      output_truncated, True)
