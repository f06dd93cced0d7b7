"""`nnunetv2_dram pseudolabels`: a trained dRAM/CAM model -> a standard nnU-Net raw dataset of pseudo labels.

Per training case: the model runs region by region as it was trained (on nnU-Net's preprocessed data of that
case, or the raw files through nnU-Net's own preprocessor when those are gone), the region maps are pasted into
the case grid, nnU-Net's export puts them back into the original image geometry, a dense CRF on the CT
sharpens them, and a threshold set by the case's weak labels (by default the middle of each region's target
interval) makes the label.

Safety: the source dataset is only read. The new dataset is `DatasetNEW_ID_<Name>Pseudo`; an existing one is
refused without `overwrite`. Every file is written under a temporary name and renamed; a case counts as done
when its label file exists (written last), so a killed run, rerun with the same settings, skips finished cases
and ends with the same bytes. A marker file holds the settings until the dataset is complete, after which
dataset.json (written last) carries them as provenance.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass, asdict, field
from pathlib import Path

import numpy as np

from nnunetv2_dram.io_utils import atomic_path, atomic_write_json
from nnunetv2_dram.pseudo_labels.thresholds import DEFAULT_THRESHOLD
from nnunetv2_dram.weak_labels.format import FILENAME as WEAK_LABELS_FILE, read_weak_labels

MARKER = ".nnunetv2_dram_pseudolabels.json"
#: width of the dense CRF's intensity kernel on CT, in HU: about twice the noise of a clinical CT (20-40 HU), below
#: the contrast of ground glass against aerated lung (150-400 HU)
CRF_INTENSITY_SIGMA_HU = 60.0


class PseudoLabelError(Exception):
    pass


@dataclass
class PseudoLabelSettings:
    dataset: str  # source dataset name
    configuration: str
    fold: str
    trainer: str
    plans: str = "nnUNetPlans"
    checkpoint: str = "checkpoint_final.pth"
    crf: str = "dense"  # or "none"
    crf_backend: str = "auto"  # auto | pydensecrf | torch
    threshold: str = DEFAULT_THRESHOLD  # midpoint | calibrated | otsu | a number
    ignore_band: float = 0.0
    map_kind: str = "final"  # final | dram | refined
    crf_params: dict = field(default_factory=dict)

    def provenance(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- folders
def source_dataset_dir(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_raw
    return Path(nnUNet_raw.require()) / dataset


def pseudo_dataset_name(source: str, new_id: int) -> str:
    return f"Dataset{int(new_id):03d}_{source.split('_', 1)[1]}Pseudo"


def prepare_output_dir(source: str, new_id: int, settings: PseudoLabelSettings, overwrite: bool) -> Path:
    """The output folder, created or resumed; raises PseudoLabelError when that would clobber something."""
    from nnunetv2.paths import nnUNet_raw
    raw = Path(nnUNet_raw.require())
    if not 1 <= int(new_id) <= 999:
        raise PseudoLabelError(f"-o {new_id}: nnU-Net dataset ids have three digits (1..999)")
    if int(source[7:10]) == int(new_id):
        raise PseudoLabelError(f"-o {new_id} is the source dataset's own id; choose a new dataset id")
    out = raw / pseudo_dataset_name(source, new_id)
    others = [p for p in raw.glob(f"Dataset{int(new_id):03d}_*") if p.name != out.name and not p.name.startswith(".")]
    if others:
        raise PseudoLabelError(f"dataset id {new_id} is already used by {others[0]}; nnU-Net needs unique ids — "
                               f"choose another -o")
    marker = out / MARKER
    if out.exists():
        if overwrite:
            shutil.rmtree(out)
        elif marker.is_file():
            previous = json.loads(marker.read_text())
            if previous != settings.provenance():
                raise PseudoLabelError(f"{out} holds an unfinished run with other settings ({previous}); rerun "
                                       f"with the same settings to resume, or pass --overwrite to start over")
            return out  # resume
        else:
            raise PseudoLabelError(f"{out} already exists; pass --overwrite to replace it")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, settings.provenance())
    return out


def pseudo_dataset_json(source_json: dict, n_cases: int, settings: PseudoLabelSettings) -> dict:
    labels = {"background": 0, "lesion": 1}
    if settings.ignore_band > 0:
        labels["ignore"] = 2
    return {"channel_names": source_json["channel_names"], "labels": labels, "numTraining": n_cases,
            "file_ending": source_json["file_ending"],
            **({"overwrite_image_reader_writer": source_json["overwrite_image_reader_writer"]}
               if "overwrite_image_reader_writer" in source_json else {}),
            "description": f"pseudo lesion labels made by nnunetv2_dram from {settings.dataset}",
            "nnunetv2_dram": settings.provenance()}


# ---------------------------------------------------------------------------------------------------- model
class LoadedModel:
    """A trained weak model restored from its nnU-Net results folder."""

    def __init__(self, settings: PseudoLabelSettings, device):
        import torch
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.paths import nnUNet_results
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2_dram.paths import ensure_ext_trainer_path
        from nnunetv2_dram.training.region_chunks import ChunkSpec

        folder = Path(nnUNet_results.require()) / settings.dataset / \
            f"{settings.trainer}__{settings.plans}__{settings.configuration}"
        ckpt = folder / f"fold_{settings.fold}" / settings.checkpoint
        if not ckpt.is_file():
            raise PseudoLabelError(f"no trained model at {ckpt}; train it first: nnUNetv2_train "
                                   f"{settings.dataset[7:10]} {settings.configuration} {settings.fold} "
                                   f"-tr {settings.trainer} -p {settings.plans}")
        self.folder = folder
        self.plans_manager = PlansManager(load_json(folder / "plans.json"))
        self.configuration_manager = self.plans_manager.get_configuration(settings.configuration)
        self.model_dataset_json = load_json(folder / "dataset.json")
        ensure_ext_trainer_path()
        trainer_class = recursive_find_trainer_class_by_name(settings.trainer)
        if not hasattr(trainer_class, "margin_mm"):
            raise PseudoLabelError(f"{settings.trainer} is not a weak (dRAM/CAM) trainer of this plugin")
        n_in = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.model_dataset_json)
        self.network = trainer_class.build_network_architecture(self.plans_manager, self.configuration_manager, n_in,
                                                                2, enable_deep_supervision=False)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        self.network.load_state_dict(state["network_weights"])
        self.network.to(device).eval()
        self.device = device
        self.mirror_axes = ()
        self.spec = ChunkSpec.from_configuration(self.configuration_manager.patch_size,
                                                 self.configuration_manager.spacing, trainer_class.margin_mm,
                                                 trainer_class.mask_outside)
        self.label_manager = self.plans_manager.get_label_manager({"labels": {"background": 0, "lesion": 1}})


def _preprocessed_case(model: LoadedModel, dataset: str, case: str, image_files: list[str], region_file: str,
                       source_json: dict):
    """nnU-Net's preprocessed arrays of the case: the stored ones the model was trained on, if present."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = Path(nnUNet_preprocessed.get() or "/nonexistent") / dataset / \
        model.configuration_manager.data_identifier
    if folder.is_dir() and any(folder.glob(f"{case}.*")):
        try:
            ds = infer_dataset_class(str(folder))(str(folder), [case])
            data, seg, _, props = ds.load_case(case)
            return np.asarray(data[:]), np.asarray(seg[:]), props
        except (FileNotFoundError, AssertionError):
            pass
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)
    data, seg, props = preprocessor.run_case(image_files, region_file, model.plans_manager,
                                             model.configuration_manager, source_json)
    return data, seg, props


def predict_probability(model: LoadedModel, data, seg, props, map_kind: str = "final") -> np.ndarray:
    """Lesion probability of one case in its original geometry (nnU-Net's export does the resampling)."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2_dram.inference.region_inference import fill_outside_regions, predict_case_by_regions
    from nnunetv2_dram.training.region_chunks import build_region_samples, region_bboxes

    index = {"case": region_bboxes(seg)}
    samples, _ = build_region_samples(index, None)
    pred = predict_case_by_regions(model.network, data, seg, samples, model.spec, model.device, kind=map_kind,
                                   mirror_axes=model.mirror_axes)
    regions = np.asarray(seg)[0] > 0
    regions = regions[0] if pred.probability.ndim == 2 else regions
    p = np.clip(fill_outside_regions(pred.probability, regions, model.configuration_manager.spacing), 1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p)).astype(np.float32)
    if logit.ndim == 2:
        logit = logit[None]
    logits = torch.from_numpy(np.stack([np.zeros_like(logit), logit]))
    _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, model.plans_manager, model.configuration_manager, model.label_manager, props,
        return_probabilities=True, num_threads_torch=1)
    return probs[1].astype(np.float32), pred.fractions


# ---------------------------------------------------------------------------------------------------- per case
def _bbox_slices(mask: np.ndarray, margin: int = 4):
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def refine_and_threshold(prob: np.ndarray, image: np.ndarray, regions: np.ndarray, spacing, settings,
                         targets: dict, intensity_norm: tuple[float, float], crf_backend: str | None = None,
                         crf_device: str = "cpu", memory_share: float = 1.0, ct_image: bool = True
                         ) -> tuple[np.ndarray, np.ndarray]:
    """-> (refined probability, uint8 label). Arrays (Z, Y, X) in the original geometry. crf_backend/crf_device: as
    `crf_backend_and_device` gives them (default: resolved for the CPU). intensity_norm: (mean, std) the image is
    z-scored with for the CRF; ct_image: the image is in HU, so the CRF's intensity kernel is CRF_INTENSITY_SIGMA_HU
    wide unless settings.crf_params say otherwise (else DEFAULT_CRF_PARAMS' width in z-score units)."""
    from nnunetv2_dram.pseudo_labels.thresholds import pseudo_label
    prob = np.where(regions > 0, prob, 0).astype(np.float32)
    refined = prob
    if settings.crf == "dense":
        box = _bbox_slices(regions > 0)
        if box is not None:
            from nnunetv2_dram.inference.crf_refine import refine_probability
            mean, std = intensity_norm
            guide = ((image[box].astype(np.float32) - mean) / max(std, 1e-6))
            params = dict(settings.crf_params)
            if "intensity_sigma" not in params and ct_image:
                # a width in HU: about twice a clinical CT's noise, whatever the dataset's intensity spread
                params["intensity_sigma"] = CRF_INTENSITY_SIGMA_HU / max(std, 1e-6)
            p, g, m = prob[box], guide, regions[box] > 0
            sp = list(spacing)
            if p.shape[0] == 1:  # one slice: a 2-D CRF
                p, g, m, sp = p[0], g[0], m[0], sp[1:]
            if crf_backend is None:
                crf_backend, crf_device = crf_backend_and_device(settings.crf_backend, "cpu")
            r = refine_probability(p, g, sp, backend=crf_backend, device=crf_device, mask=m,
                                   memory_share=memory_share, **params)
            refined = prob.copy()
            refined[box] = r.reshape(refined[box].shape)
            refined = np.where(regions > 0, refined, 0).astype(np.float32)
    # ties (the CRF saturates many voxels at the same value) are broken by the map before the CRF
    label = pseudo_label(refined, regions, settings.threshold, targets, settings.ignore_band, tie_break=prob)
    return refined, label


def crf_backend_and_device(requested: str, device) -> tuple[str, str]:
    """(backend, device) of the dense CRF for pseudo labels whose maps are made on `device`. "auto": the torch CRF on
    that GPU when the maps are made on one (47-53x pydensecrf on a full CT), else pydensecrf when it is installed,
    else the torch CRF on the CPU; "torch" follows the maps' device; "pydensecrf" runs on the CPU."""
    import torch
    dev = torch.device(device)
    gpu = str(dev) if dev.type == "cuda" else None
    if requested == "pydensecrf":
        return "pydensecrf", "cpu"
    if requested == "torch" or gpu:
        return "torch", gpu or "cpu"
    try:
        import pydensecrf.densecrf  # noqa: F401
        return "pydensecrf", "cpu"
    except ImportError:
        return "torch", "cpu"


def _init_worker(torch_threads: int) -> None:
    """A pool worker's share of the CPU cores (torch would give every worker all of them)."""
    import torch
    torch.set_num_threads(torch_threads)


def finish_case(case: str, prob: np.ndarray, out_dir: str, source_dir: str, source_json: dict, rw_name: str,
                settings: PseudoLabelSettings, targets: dict, intensity_norm, qc_dir: str | None,
                crf: tuple = (None, "cpu", 1.0)) -> str:
    """CRF, threshold, write: the second half of a case (runs in a worker process). crf: (backend, device, GPU memory
    share) from `crf_backend_and_device`."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    rw = recursive_find_reader_writer_by_name(rw_name)()
    ending = source_json["file_ending"]
    src = Path(source_dir)
    channels = sorted(source_json["channel_names"], key=int)
    image_files = [str(src / "imagesTr" / f"{case}_{int(c):04d}{ending}") for c in channels]
    image, props = rw.read_images(image_files[:1])
    regions, _ = rw.read_seg(str(src / "labelsTr" / f"{case}{ending}"))
    regions = regions[0].astype(np.int32)
    if prob.shape != regions.shape:
        raise PseudoLabelError(f"case '{case}': map shape {prob.shape} differs from its region map {regions.shape}")
    ct_image = str(source_json["channel_names"].get("0", "")).lower() == "ct"  # nnU-Net's CT normalisation rule
    refined, label = refine_and_threshold(prob, image[0], regions, props["spacing"], settings, targets,
                                          intensity_norm, *crf, ct_image=ct_image)
    out = Path(out_dir)
    for f in image_files:
        dst = out / "imagesTr" / Path(f).name
        if not dst.exists():
            with atomic_path(dst) as tmp:
                shutil.copyfile(f, tmp)
    if qc_dir:
        from nnunetv2_dram.pseudo_labels.qc import save_case_qc
        save_case_qc(Path(qc_dir) / f"{case}.png", image[0], regions, prob, refined, label, props["spacing"], case)
    with atomic_path(out / "labelsTr" / f"{case}{ending}") as tmp:  # last: marks the case as done
        rw.write_seg(label, str(tmp), props)
    return case


# ---------------------------------------------------------------------------------------------------- driver
def make_pseudo_labels(dataset: str, new_id: int, settings: PseudoLabelSettings, device: str = "cpu",
                       num_processes: int = 2, num_parts: int = 1, part_id: int = 0, overwrite: bool = False,
                       qc_dir: str | None = None, progress: bool = True) -> Path:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    src = source_dataset_dir(dataset)
    if not (src / "dataset.json").is_file():
        raise PseudoLabelError(f"{src} has no dataset.json")
    source_json = load_json(src / "dataset.json")
    weak, problems = read_weak_labels(src / WEAK_LABELS_FILE)
    if weak is None or any(p.severity == "error" for p in problems):
        raise PseudoLabelError("weak labels unusable:\n" + "\n".join(f"  {p}" for p in problems))
    if not 0 <= part_id < num_parts:
        raise PseudoLabelError(f"-part_id {part_id} must be in 0..{num_parts - 1}")
    ending = source_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (src / "labelsTr").iterdir()
                   if p.name.endswith(ending) and not p.name.startswith("."))
    if not cases:
        raise PseudoLabelError(f"no region maps in {src / 'labelsTr'}")
    device_t = torch.device(device)
    model = LoadedModel(settings, device_t)  # fails early (missing model) before anything is written
    out = prepare_output_dir(dataset, new_id, settings, overwrite)
    my_cases = cases[part_id::num_parts]
    todo = [c for c in my_cases if not (out / "labelsTr" / f"{c}{ending}").exists()]
    rw_class = determine_reader_writer_from_dataset_json(
        source_json, str(src / "imagesTr" / f"{cases[0]}_0000{ending}"))
    fg = model.plans_manager.foreground_intensity_properties_per_channel.get("0", {})
    intensity_norm = (float(fg.get("mean", 0.0)), float(fg.get("std", 1.0)))
    print(f"pseudo labels for {len(my_cases)} cases ({len(my_cases) - len(todo)} already done) -> {out}")
    channels = sorted(source_json["channel_names"], key=int)
    iterator = todo
    if progress:
        from tqdm import tqdm
        iterator = tqdm(todo, desc="pseudo labels", unit="case")
    ctx = multiprocessing.get_context("spawn")
    pool = None
    if num_processes > 1:
        pool = ctx.Pool(num_processes, initializer=_init_worker,
                        initargs=(max(1, (os.cpu_count() or 1) // num_processes),))
    # the CRF runs in the workers: on the GPU when the maps are made there (each worker takes its share of the GPU
    # memory), otherwise on the CPU with each worker's share of the cores
    crf = crf_backend_and_device(settings.crf_backend, device) + (1.0 / (num_processes if pool else 1),)
    if settings.crf == "dense":
        print(f"dense CRF: {crf[0]} on {crf[1]}")
    pending = []
    try:
        for case in iterator:
            image_files = [str(src / "imagesTr" / f"{case}_{int(c):04d}{ending}") for c in channels]
            data, seg, props = _preprocessed_case(model, dataset, case, image_files,
                                                  str(src / "labelsTr" / f"{case}{ending}"), source_json)
            prob, _ = predict_probability(model, data, seg, props, settings.map_kind)
            args = (case, prob, str(out), str(src), source_json, rw_class.__name__, settings,
                    weak.regions_of(case), intensity_norm, qc_dir, crf)
            if pool is None:
                finish_case(*args)
            else:
                pending.append(pool.apply_async(finish_case, args))
                while True:  # keep at most num_processes cases queued: bounded memory, errors surface early
                    for r in pending:
                        if r.ready():
                            r.get()
                    pending = [r for r in pending if not r.ready()]
                    if len(pending) <= num_processes:
                        break
                    pending[0].wait(0.5)
        for r in pending:
            r.get()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if all((out / "labelsTr" / f"{c}{ending}").exists() for c in cases):
        atomic_write_json(out / "dataset.json", pseudo_dataset_json(source_json, len(cases), settings))
        if (out / MARKER).exists():
            (out / MARKER).unlink()
        print(f"pseudo-label dataset complete: {out}")
    else:
        print(f"part {part_id}/{num_parts} done; dataset.json is written when every part has finished")
    return out
