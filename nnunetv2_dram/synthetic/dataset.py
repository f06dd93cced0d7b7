"""Write a synthetic chest-CT weak dataset in the weak-dataset layout (an nnU-Net v2 raw dataset + weak_labels.json; docs/reference.md, "Weak dataset").

    raw_root/DatasetXXX_Name/
        dataset.json, weak_labels.json
        imagesTr/CASE_0000<ending>   labelsTr/CASE<ending> (region maps)   referenceTr/CASE<ending> (lesion masks)
        imagesTs/...                 labelsTs/...                          referenceTs/...

The whole folder is built under a temporary name and renamed into place at the end.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from nnunetv2_dram.synthetic.chest_ct import LOBE_LABELS, LUNG_LABELS_2D, MODES, generate_case

# Endings nnU-Net's SimpleITK reader handles (nnunetv2.imageio.simpleitk_reader_writer.SimpleITKIO).
SUPPORTED_FILE_ENDINGS = (".nii.gz", ".nrrd", ".mha", ".gipl")
TARGETS = ("percentage", "ctss")
GENERATOR_KEY = "nnunetv2_dram_synthetic"  # marks dataset.json files this module wrote
CASE_PREFIX = "synth"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def region_labels_for(mode: str) -> dict[str, int]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return dict(LOBE_LABELS if mode == "3d" else LUNG_LABELS_2D)


def dataset_json_for(mode: str, num_training: int, file_ending: str = ".nii.gz", name: str = "SynthChest",
                     generator: dict | None = None) -> dict:
    """dataset.json of a synthetic weak dataset (nnU-Net v2: CT channel, region labels)."""
    labels = region_labels_for(mode)
    regions = "left/right lung of one axial slice" if mode == "2d" else "the five lung lobes"
    out = {
        "name": name,
        "description": f"Synthetic chest CT ({mode}) with COVID-19-like lesions made by nnunetv2_dram; labelsTr hold "
                       f"region maps of {regions}, weak_labels.json the per-region lesion targets, referenceTr/Ts the "
                       f"voxel lesion masks (for evaluation only).",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    if generator is not None:
        out[GENERATOR_KEY] = generator
    return out


def case_ids(n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Training ids synth_000.. and test ids numbered after them."""
    width = max(3, len(str(n_train + n_test - 1)))
    ids = [f"{CASE_PREFIX}_{i:0{width}d}" for i in range(n_train + n_test)]
    return ids[:n_train], ids[n_train:]


def case_seed(seed: int, split: str, index: int) -> int:
    """Seed of one case: independent streams for train and test, so test cases never repeat a training case and
    adding training cases does not change the test cases."""
    stream = {"train": 0, "test": 1}[split]
    return int(np.random.SeedSequence([int(seed), stream, int(index)]).generate_state(1, dtype=np.uint32)[0])


def weak_value(percent: float, target: str):
    """What weak_labels.json stores for a region: the percentage rounded to 0.1, or the CT severity score."""
    from nnunetv2_dram.weak_labels.format import percent_to_ctss
    if target == "ctss":
        return percent_to_ctss(percent)
    return round(float(percent), 1)


def _write_case(job: dict) -> dict:
    """Generate one case and write its image, region map and lesion mask. Runs in worker processes too."""
    from nnunetv2_dram.io_utils import write_sitk_image

    case = generate_case(job["seed"], shape=job["shape"], mode=job["mode"])
    root, ending, suffix, cid = Path(job["root"]), job["file_ending"], job["suffix"], job["case_id"]
    write_sitk_image(case.to_sitk(case.image), root / f"images{suffix}" / f"{cid}_0000{ending}")
    write_sitk_image(case.to_sitk(case.regions), root / f"labels{suffix}" / f"{cid}{ending}")
    write_sitk_image(case.to_sitk(case.lesion), root / f"reference{suffix}" / f"{cid}{ending}")
    return {"case_id": cid, "percent": case.region_percent, "info": case.info}


def _check_arguments(dataset_id, name, n_train, n_test, shape, target, mode, file_ending, num_processes):
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be an integer 1..999 (nnU-Net's DatasetXXX), got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(name)):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '_' or '-' "
                         f"(it becomes part of a folder name)")
    if int(n_train) < 1 or int(n_test) < 0:
        raise ValueError(f"need at least 1 training case and >= 0 test cases, got train={n_train}, test={n_test}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if file_ending not in SUPPORTED_FILE_ENDINGS:
        raise ValueError(f"file ending {file_ending!r} is not one nnU-Net's SimpleITK reader handles; "
                         f"use one of {list(SUPPORTED_FILE_ENDINGS)}")
    if len(tuple(shape)) not in ((2, 3) if mode == "2d" else (3,)):
        raise ValueError(f"shape must be (z, y, x){' or (y, x)' if mode == '2d' else ''}, got {tuple(shape)}")
    if int(num_processes) < 1:
        raise ValueError(f"number of processes must be >= 1, got {num_processes}")


def _existing_with_id(raw_root: Path, dataset_id: int) -> list[Path]:
    prefix = f"Dataset{int(dataset_id):03d}_"
    return sorted(p for p in raw_root.iterdir() if p.name.startswith(prefix)) if raw_root.is_dir() else []


def _listing(folders: list[Path]) -> str:
    return ", ".join(str(p) for p in folders)


def _written_by_us(folder: Path) -> bool:
    try:
        return GENERATOR_KEY in json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def write_weak_dataset(raw_root, dataset_id: int, name: str = "SynthChest", n_train: int = 20, n_test: int = 6,
                       seed: int = 0, shape=(64, 160, 160), target: str = "percentage", mode: str = "3d",
                       file_ending: str = ".nii.gz", overwrite: bool = False, montage_dir=None,
                       num_processes: int = 1) -> Path:
    """Generate a synthetic weak dataset into raw_root/DatasetXXX_<name> and return that folder.

    Refuses when a folder with the same DatasetXXX id already exists; with overwrite=True such folders are
    replaced, but only if this generator wrote them (a user's own data is never deleted). Same arguments give
    the same arrays. montage_dir: also write <montage_dir>/<DatasetXXX_name>.png, a contact sheet to look at.
    """
    _check_arguments(dataset_id, name, n_train, n_test, shape, target, mode, file_ending, num_processes)
    raw_root = Path(raw_root)
    final = raw_root / dataset_folder_name(dataset_id, name)
    existing = _existing_with_id(raw_root, dataset_id)
    if existing and not overwrite:
        raise FileExistsError(
            f"{_listing(existing)} already {'exists' if len(existing) == 1 else 'exist'} with dataset id "
            f"{int(dataset_id):03d}; choose another id, or overwrite=True (--overwrite) to replace it")
    foreign = [p for p in existing if not _written_by_us(p)]
    if foreign:
        raise FileExistsError(
            f"{_listing(foreign)} {'uses' if len(foreign) == 1 else 'use'} dataset id {int(dataset_id):03d} and was "
            f"not written by the synthetic generator, so it is not overwritten; choose another id or remove it "
            f"yourself")

    train_ids, test_ids = case_ids(int(n_train), int(n_test))
    generator = {"seed": int(seed), "mode": mode, "shape": [int(s) for s in shape], "target": target,
                 "n_train": int(n_train), "n_test": int(n_test)}
    from nnunetv2_dram.io_utils import atomic_dir, atomic_write_json
    from nnunetv2_dram.weak_labels.format import FILENAME, FORMAT

    with atomic_dir(final) as tmp:
        jobs = [{"seed": case_seed(seed, split, i), "shape": tuple(int(s) for s in shape), "mode": mode,
                 "root": str(tmp), "file_ending": file_ending, "suffix": suffix, "case_id": cid}
                for split, suffix, ids in (("train", "Tr", train_ids), ("test", "Ts", test_ids))
                for i, cid in enumerate(ids)]
        folders = ("imagesTr", "labelsTr", "referenceTr") + (("imagesTs", "labelsTs", "referenceTs") if test_ids else ())
        for sub in folders:
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        if int(num_processes) > 1 and len(jobs) > 1:
            # spawn, not fork: callers (the pipeline, the demo) may already run torch threads
            with ProcessPoolExecutor(max_workers=min(int(num_processes), len(jobs)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_write_case, jobs))
        else:
            results = [_write_case(job) for job in jobs]
        by_id = {r["case_id"]: r for r in results}
        weak = {"format": FORMAT, "target": target,
                "cases": {cid: {str(label): weak_value(p, target) for label, p in sorted(by_id[cid]["percent"].items())}
                          for cid in train_ids}}
        atomic_write_json(tmp / FILENAME, weak)
        generator["cases"] = {cid: _jsonable(r["info"]) for cid, r in sorted(by_id.items())}
        atomic_write_json(tmp / "dataset.json", dataset_json_for(mode, len(train_ids), file_ending, name, generator))
        _move_aside(existing)
    _remove(existing)

    if montage_dir is not None:
        from nnunetv2_dram.synthetic.montage import save_dataset_montage
        save_dataset_montage(final, Path(montage_dir) / f"{final.name}.png")
    return final


def _jsonable(info: dict) -> dict:
    """The drawn parameters of a case (severity, fused lobe, noise...) with JSON-friendly keys and values."""
    return json.loads(json.dumps(info, default=float))


def _move_aside(folders: list[Path]) -> None:
    """Rename old datasets out of the way just before the new one takes their place (so a failed run keeps them)."""
    for i, folder in enumerate(folders):
        aside = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(folder, aside)
        folders[i] = aside


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        if folder.name.endswith(".old"):
            shutil.rmtree(folder, ignore_errors=True)
