"""Checks a weak dataset (docs/reference.md, "Weak dataset") and the set-up before any GPU time is spent.

Every mistake is collected as a `Problem` (file, case, region, what, what to do) instead of stopping at the
first one, so a user fixes everything in one go. Nothing here writes: the dataset is only read.

Images and region maps are read with the reader nnU-Net itself would pick for the dataset, so whatever file
ending nnU-Net supports is checked the way nnU-Net will later see it. Heavy imports (numpy, nnU-Net, tqdm)
happen inside the functions, keeping `import nnunetv2_dram.weak_labels` light.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from nnunetv2_dram.weak_labels.format import FILENAME as WEAK_LABELS_FILENAME
from nnunetv2_dram.weak_labels.format import FORMAT as WEAK_LABELS_FORMAT
from nnunetv2_dram.weak_labels.format import WeakLabels, read_weak_labels
from nnunetv2_dram.weak_labels.problems import Problem

TRAINER_NAMES = ("DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer")
NNUNET_FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CRF_INSTALL_HINT = "pip install pydensecrf2==1.1   (or: pip install 'nnunetv2_dram[crf]')"

# Geometry tolerances. Spacing is compared relatively (files store it as float32 or as text with few digits);
# origin in millimetres; direction cosines are unit-less.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4
AFFINE_ATOL = 1e-3

# How many case names an aggregated problem spells out before it says "and N more".
_NAMES_SHOWN = 5

# Voxels per step when counting label values (bounds the temporary int64 copy to 64 MiB).
_LABEL_CHUNK = 1 << 23

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class CaseFiles:
    """The files nnU-Net would use for one case: channel files in channel order, and its map (if any)."""
    case: str
    images: list[Path]
    label: Path | None = None
    channel_files_missing: bool = False


@dataclass
class CheckReport:
    dataset_dir: Path
    problems: list[Problem] = field(default_factory=list)
    training_cases: list[str] = field(default_factory=list)
    test_cases: list[str] = field(default_factory=list)
    reference_files: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass
class _DatasetJson:
    """The parts of dataset.json the checks need; None where dataset.json does not say it usably."""
    content: dict | None = None
    labels: dict[str, int] | None = None  # name -> value, integer labels only
    labels_complete: bool = False  # every label has a usable value: cross-checks against labels make sense
    ignore_value: int | None = None
    file_ending: str | None = None
    n_channels: int | None = None
    num_training: int | None = None

    @property
    def region_values(self) -> set[int]:
        if self.labels is None:
            return set()
        return {v for v in self.labels.values() if v != 0 and v != self.ignore_value}

    def region_name(self, value: int) -> str:
        for name, v in (self.labels or {}).items():
            if v == value:
                return name
        return "?"


@dataclass
class _Geometry:
    shape: tuple
    spacing: tuple | None
    origin: tuple | None = None
    direction: tuple | None = None
    affine: object = None  # 4x4 array from nibabel readers


# ---------------------------------------------------------------------------------------------------- helpers

def _names(items: Iterable, shown: int = _NAMES_SHOWN) -> str:
    items = [str(i) for i in items]
    text = ", ".join(items[:shown])
    if len(items) > shown:
        text += f" and {len(items) - shown} more"
    return text


@contextlib.contextmanager
def _silenced():
    """nnU-Net's readers and resolvers print progress and tracebacks themselves; the checker reports instead."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield sink


def _describe_exception(e: BaseException) -> str:
    """One line: SimpleITK puts the useful part after 'sitk::ERROR:' below a source-location line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for line in lines:
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _relative(problem: Problem, root: Path) -> Problem:
    if not problem.file:
        return problem
    try:
        rel = Path(problem.file).resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return problem
    return dataclasses.replace(problem, file=rel.as_posix())


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------------------------------------ dataset resolution

def resolve_raw_dataset_dir(dataset: str | int | os.PathLike) -> Path:
    """The raw dataset folder for an nnU-Net dataset ID (901 or "901"), a name ("Dataset901_X") or a path."""
    from nnunetv2_dram.cli import UserError

    if isinstance(dataset, os.PathLike):
        path = Path(dataset).expanduser()
        if not path.is_dir():
            raise UserError(f"dataset folder {path} does not exist")
        return path
    text = str(dataset).strip()
    is_id = isinstance(dataset, int) and not isinstance(dataset, bool) or text.isdigit()
    is_name = text.startswith("Dataset") and os.sep not in text and "/" not in text
    if not is_id and not is_name:
        path = Path(text).expanduser()
        if path.is_dir():
            return path
        raise UserError(f"'{text}' is neither a dataset ID (e.g. 901), a dataset name (e.g. Dataset901_Name) "
                        f"nor an existing folder")
    if is_name and not os.environ.get("nnUNet_raw") and Path(text).is_dir():
        return Path(text)

    from nnunetv2.paths import nnUNet_raw
    if not nnUNet_raw.is_set():
        raise UserError(f"cannot look up dataset {text}: nnUNet_raw is not set. Export nnUNet_raw (see nnU-Net's "
                        f"documentation/setting_up_paths.md) or pass the dataset folder itself to -d")
    raw = Path(nnUNet_raw.get()).expanduser()
    if not raw.is_dir():
        raise UserError(f"nnUNet_raw={raw} does not exist; create it or fix the variable")
    if is_name:
        name = text
    else:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        try:
            with _silenced():
                name = maybe_convert_to_dataset_name(int(text))
        except RuntimeError as e:
            if "More than one" in str(e):
                raise UserError(f"more than one dataset has the ID {int(text)} in nnUNet_raw, nnUNet_preprocessed "
                                f"or nnUNet_results; rename one of them or pass the folder itself to -d") from None
            raise UserError(f"no dataset with the ID {int(text)} (looked for Dataset{int(text):03d}_* in "
                            f"nnUNet_raw={raw})") from None
    path = raw / str(name)
    if not path.is_dir():
        raise UserError(f"dataset {name} has no raw folder {path} (it may exist only in nnUNet_preprocessed or "
                        f"nnUNet_results); the weak dataset must be in nnUNet_raw")
    return path


# ---------------------------------------------------------------------------------------------- dataset.json

def _check_dataset_json(dataset_dir: Path, problems: list[Problem]) -> _DatasetJson:
    path = dataset_dir / "dataset.json"
    info = _DatasetJson()
    if not path.is_file():
        problems.append(Problem("file not found", file=str(path),
                                hint="every nnU-Net raw dataset needs a dataset.json (channel_names, labels, "
                                     "numTraining, file_ending)"))
        return info
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(Problem(f"not valid JSON ({e})", file=str(path), hint="fix the syntax of the file"))
        return info
    except OSError as e:
        problems.append(Problem(f"cannot be read ({_describe_exception(e)})", file=str(path)))
        return info
    if not isinstance(content, dict):
        problems.append(Problem("must hold a JSON object", file=str(path)))
        return info
    info.content = content
    file = str(path)

    channels = content.get("channel_names")
    if channels is None:
        hint = "rename 'modality' to 'channel_names' (nnU-Net v2)" if "modality" in content else \
            'add e.g. "channel_names": {"0": "CT"}'
        problems.append(Problem("'channel_names' is missing", file=file, hint=hint))
    elif not isinstance(channels, dict) or not channels:
        problems.append(Problem("'channel_names' must be a non-empty object {\"0\": \"CT\", ...}", file=file))
    else:
        keys = list(channels)
        if sorted(keys, key=lambda k: (len(k), k)) != [str(i) for i in range(len(keys))]:
            problems.append(Problem(f"'channel_names' keys {keys} must be \"0\", \"1\", ... in order", file=file))
        else:
            info.n_channels = len(keys)

    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(Problem("'labels' is missing or not an object", file=file,
                                hint='e.g. "labels": {"background": 0, "left_lung": 1, "right_lung": 2}'))
    else:
        _check_labels(labels, file, problems, info)

    ending = content.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        problems.append(Problem(f"'file_ending' is {json.dumps(ending)}; it must be a string such as \".nii.gz\"",
                                file=file))
    else:
        info.file_ending = ending
        overridden = content.get("overwrite_image_reader_writer") not in (None, "None")
        if not overridden and not _ending_supported(ending):
            problems.append(Problem(f"no nnU-Net reader supports the file ending {ending!r}", file=file,
                                    hint="convert the images to .nii.gz (or another ending nnU-Net reads) or set "
                                         "'overwrite_image_reader_writer'"))

    num_training = content.get("numTraining")
    if not _is_int(num_training) or num_training < 0:
        problems.append(Problem(f"'numTraining' is {json.dumps(num_training)}; it must be the number of training "
                                f"cases", file=file))
    else:
        info.num_training = num_training
    return info


def _check_labels(labels: dict, file: str, problems: list[Problem], info: _DatasetJson) -> None:
    good: dict[str, int] = {}
    for name, value in labels.items():
        if not _is_int(value):
            what = "a region-based label (list)" if isinstance(value, (list, tuple)) else json.dumps(value)
            problems.append(Problem(f"label '{name}' has value {what}; a weak dataset needs one integer value per "
                                    f"region", file=file, region=name))
        elif value < 0:
            problems.append(Problem(f"label '{name}' has the negative value {value}", file=file, region=name))
        else:
            good[name] = value
    if labels.get("background") != 0:
        problems.append(Problem(f"'labels' must contain \"background\": 0 (found "
                                f"{json.dumps(labels.get('background'))})", file=file,
                                hint='add "background": 0 and number the regions 1, 2, ...'))
    by_value: dict[int, list[str]] = {}
    for name, value in good.items():
        by_value.setdefault(value, []).append(name)
    for value, names in sorted(by_value.items()):
        if len(names) > 1:
            problems.append(Problem(f"labels {names} share the value {value}", file=file,
                                    hint="give every region its own value"))
    ignore = good.get("ignore")
    values = sorted(v for n, v in good.items() if n != "ignore")
    if values and values != list(range(values[0], values[0] + len(values))) and len(by_value) == len(good):
        problems.append(Problem(f"label values {values} are not consecutive; nnU-Net requires 0, 1, 2, ...",
                                file=file))
    if ignore is not None and values and ignore <= max(values):
        problems.append(Problem(f"the 'ignore' label ({ignore}) must have the highest value", file=file))
    if not [v for n, v in good.items() if v != 0 and n != "ignore"]:
        problems.append(Problem("'labels' declares no region besides background", file=file,
                                hint="list the regions of the region maps, e.g. the five lung lobes"))
    info.labels = good
    info.ignore_value = ignore
    info.labels_complete = len(good) == len(labels)


def _ending_supported(ending: str) -> bool:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    return any(ending.lower() in rw.supported_file_endings for rw in LIST_OF_IO_CLASSES)


# ---------------------------------------------------------------------------------------------- file layout

def _scan_image_folder(folder: Path, ending: str, n_channels: int | None, problems: list[Problem],
                       required: bool) -> dict[str, CaseFiles] | None:
    """Cases of an images folder, every channel file in order. Missing channels are reported."""
    if not folder.is_dir():
        if required:
            problems.append(Problem("folder not found", file=str(folder),
                                    hint=f"put the training images there as CASE_0000{ending}"))
        return None
    found: dict[str, dict[int, Path]] = {}
    ignored = []
    for path in _visible_files(folder):
        if path.is_dir():
            ignored.append(path.name + "/")
            continue
        if not path.name.endswith(ending):
            ignored.append(path.name)
            continue
        match = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if not match:
            problems.append(Problem(f"is not named CASE_XXXX{ending} (case identifier, underscore, 4-digit channel "
                                    f"index)", file=str(path),
                                    hint=f"if it is channel 0 of case '{path.name[: -len(ending)]}', rename it to "
                                         f"{path.name[: -len(ending)]}_0000{ending}"))
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    if ignored:
        problems.append(Problem(f"{len(ignored)} entr(y/ies) without the file ending {ending!r} will be ignored by "
                                f"nnU-Net: {_names(ignored)}", file=str(folder), severity="warning"))

    # An RGB(A) natural image holds several channels in one file (nnU-Net counts channels after reading), so if
    # every case has the same smaller set 0..k-1 of files, the file count is not an error by itself.
    expected = n_channels
    index_sets = {tuple(sorted(ch)) for ch in found.values()}
    if n_channels is not None and len(index_sets) == 1:
        only = next(iter(index_sets))
        if only == tuple(range(len(only))) and len(only) < n_channels:
            expected = len(only)

    cases: dict[str, CaseFiles] = {}
    for case, channels in sorted(found.items()):
        top = expected if expected is not None else max(channels) + 1
        for c in range(top):
            if c not in channels:
                problems.append(Problem(f"channel {c} is missing: {case}_{c:04d}{ending} not found", file=str(folder),
                                        case=case, hint=f"dataset.json declares {n_channels} channel(s); every case "
                                                        f"needs one file per channel"))
        for c in sorted(channels):
            if c >= top:
                problems.append(Problem(f"unexpected channel {c}: dataset.json declares {n_channels} channel(s)",
                                        file=str(channels[c]), case=case,
                                        hint="add the channel to 'channel_names' or remove the file"))
        cases[case] = CaseFiles(case, [channels[c] for c in sorted(channels) if c < top],
                                channel_files_missing=any(c not in channels for c in range(top)))
    return cases


def _scan_map_folder(folder: Path, ending: str, problems: list[Problem]) -> dict[str, Path] | None:
    if not folder.is_dir():
        return None
    maps: dict[str, Path] = {}
    ignored = []
    for path in _visible_files(folder):
        if path.is_file() and path.name.endswith(ending):
            maps[path.name[: -len(ending)]] = path
        else:
            ignored.append(path.name)
    if ignored:
        problems.append(Problem(f"{len(ignored)} entr(y/ies) without the file ending {ending!r} will be ignored: "
                                f"{_names(ignored)}", file=str(folder), severity="warning"))
    return maps


def _cases_from_explicit_list(dataset_dir: Path, content: dict, problems: list[Problem]) -> dict[str, CaseFiles]:
    """nnU-Net also accepts dataset.json's 'dataset' key: {case: {"images": [...], "label": ...}}."""
    cases: dict[str, CaseFiles] = {}
    entries = content.get("dataset")
    file = str(dataset_dir / "dataset.json")
    if not isinstance(entries, dict):
        problems.append(Problem("'dataset' must be an object {case: {\"images\": [...], \"label\": ...}}", file=file))
        return cases

    def resolve(p: str) -> Path:
        p = os.path.expandvars(p)
        return Path(p) if os.path.isabs(p) else dataset_dir / p

    for case, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or \
                not isinstance(entry.get("label"), str):
            problems.append(Problem("'dataset' entry must be {\"images\": [files], \"label\": file}", file=file,
                                    case=case))
            continue
        images = [resolve(i) for i in entry["images"]]
        label = resolve(entry["label"])
        for image in images:
            if not image.is_file():
                problems.append(Problem("image file not found", file=str(image), case=case))
        if not label.is_file():
            problems.append(Problem("region map not found", file=str(label), case=case))
            label = None
        cases[case] = CaseFiles(case, [i for i in images if i.is_file()], label,
                                channel_files_missing=not all(i.is_file() for i in images))
    return cases


# ---------------------------------------------------------------------------------------------- file contents

class _Reader:
    """Reads files with one nnU-Net reader class; any failure becomes a Problem naming the file."""

    def __init__(self, reader_class, problems: list[Problem]):
        self.reader_class = reader_class
        self.problems = problems

    def read(self, path: Path, case: str | None, what: str, segmentation: bool = False):
        try:
            with _silenced():
                rw = self.reader_class()
                array, props = rw.read_seg(str(path)) if segmentation else rw.read_images([str(path)])
        except Exception as e:  # a corrupt/unsupported file must never end the check
            self.problems.append(Problem(f"{what} cannot be read by nnU-Net's {self.reader_class.__name__} "
                                         f"({_describe_exception(e)})", file=str(path), case=case,
                                         hint="check that the file is complete and a valid image of the dataset's "
                                              "file ending (re-export it if needed)"))
            return None, None
        return array, _geometry_of(array, props)


def _geometry_of(array, props: dict) -> _Geometry:
    sitk_stuff = props.get("sitk_stuff") or {}
    nib_stuff = props.get("nibabel_stuff") or {}
    spacing = props.get("spacing")
    return _Geometry(shape=tuple(int(s) for s in array.shape[1:]),
                     spacing=tuple(float(s) for s in spacing) if spacing is not None else None,
                     origin=tuple(sitk_stuff["origin"]) if "origin" in sitk_stuff else None,
                     direction=tuple(sitk_stuff["direction"]) if "direction" in sitk_stuff else None,
                     affine=nib_stuff.get("original_affine"))


def _geometry_mismatches(a: _Geometry, b: _Geometry) -> list[str]:
    import numpy as np

    def fmt(values) -> str:
        return "(" + ", ".join(f"{v:g}" for v in values) + ")"

    out = []
    if a.shape != b.shape:
        out.append(f"shape {a.shape} vs {b.shape}")
        return out  # spacing etc. of differently shaped grids add nothing
    if a.spacing is not None and b.spacing is not None and (
            len(a.spacing) != len(b.spacing) or not np.allclose(a.spacing, b.spacing, rtol=SPACING_RTOL, atol=0)):
        out.append(f"spacing {fmt(a.spacing)} vs {fmt(b.spacing)}")
    if a.origin is not None and b.origin is not None and (
            len(a.origin) != len(b.origin) or not np.allclose(a.origin, b.origin, rtol=0, atol=ORIGIN_ATOL_MM)):
        out.append(f"origin {fmt(a.origin)} vs {fmt(b.origin)}")
    if a.direction is not None and b.direction is not None and (
            len(a.direction) != len(b.direction) or
            not np.allclose(a.direction, b.direction, rtol=0, atol=DIRECTION_ATOL)):
        out.append(f"direction {fmt(a.direction)} vs {fmt(b.direction)}")
    if a.affine is not None and b.affine is not None and (
            np.shape(a.affine) != np.shape(b.affine) or not np.allclose(a.affine, b.affine, rtol=0, atol=AFFINE_ATOL)):
        out.append("affine differs")
    return out


def _label_counts(array, path: Path, case: str | None, what: str, problems: list[Problem]) -> dict[int, int] | None:
    """Voxel count per label value of a map/mask, or None (with a problem) if the values are not labels.

    Works through the voxels in chunks: a whole CT converted to int64 at once would cost gigabytes."""
    import numpy as np

    flat = array.reshape(-1)
    if flat.size == 0:
        problems.append(Problem(f"{what} is empty (no voxels)", file=str(path), case=case))
        return None
    counts: dict[int, int] = {}
    for start in range(0, flat.size, _LABEL_CHUNK):
        part = flat[start:start + _LABEL_CHUNK]
        if part.dtype.kind == "f":
            if np.isnan(part).any():
                problems.append(Problem(f"{what} contains NaN values", file=str(path), case=case,
                                        hint="a label file holds integer label values only"))
                return None
            values = part.astype(np.int64)
            fractional = values != part
            if fractional.any():
                problems.append(Problem(f"{what} contains non-integer values (e.g. {part[fractional][0]:g})",
                                        file=str(path), case=case,
                                        hint="save it as an integer image without interpolation (nearest "
                                             "neighbour when resampling)"))
                return None
        else:
            values = part.astype(np.int64, copy=False)
        low, high = int(values.min()), int(values.max())
        if low < 0:
            problems.append(Problem(f"{what} contains negative values (minimum {low})", file=str(path), case=case))
            return None
        if high <= 1_000_000:
            per_value = np.bincount(values)
            found = np.flatnonzero(per_value)
            found_counts = per_value[found]
        else:
            found, found_counts = np.unique(values, return_counts=True)
        for v, n in zip(found.tolist(), found_counts.tolist()):
            counts[v] = counts.get(v, 0) + n
    return counts


def _count_channels_and_nan(arrays: list, files: list[Path], case: str, problems: list[Problem]) -> int:
    import numpy as np
    total = 0
    for array, path in zip(arrays, files):
        total += int(array.shape[0])
        if array.dtype.kind == "f" and np.isnan(array).any():
            problems.append(Problem("image contains NaN voxel values", file=str(path), case=case,
                                    hint="replace NaN with a meaningful value (e.g. the minimum intensity)"))
    return total


def _read_case_images(reader: _Reader, files: CaseFiles, n_channels: int | None,
                      problems: list[Problem]) -> _Geometry | None:
    """Reads every channel once; checks channels against each other. Returns the case's image geometry."""
    arrays, geometries, readable = [], [], []
    for path in files.images:
        array, geometry = reader.read(path, files.case, "image")
        if array is not None:
            arrays.append(array)
            geometries.append(geometry)
            readable.append(path)
    if not arrays:
        return None
    for path, geometry in zip(readable[1:], geometries[1:]):
        diffs = _geometry_mismatches(geometries[0], geometry)
        if diffs:
            problems.append(Problem(f"channel does not match {readable[0].name}: {'; '.join(diffs)}", file=str(path),
                                    case=files.case, hint="all channels of a case must share one voxel grid"))
    total = _count_channels_and_nan(arrays, readable, files.case, problems)
    if n_channels is not None and not files.channel_files_missing and len(readable) == len(files.images) \
            and total != n_channels:
        problems.append(Problem(f"the image file(s) hold {total} channel(s) but dataset.json declares {n_channels}",
                                file=str(files.images[0]), case=files.case,
                                hint="make 'channel_names' match the images"))
    return geometries[0]


# ------------------------------------------------------------------------------------------- the main checks

def check_weak_dataset(dataset_dir: str | os.PathLike, *, verify_images: bool = True,
                       progress: bool = False) -> list[Problem]:
    """Every problem of the weak dataset in `dataset_dir` (errors and warnings). Reads only, never writes.

    With verify_images=False the image files are only looked for, not read (region maps are still read: the
    weak targets are checked against them)."""
    return inspect_weak_dataset(dataset_dir, verify_images=verify_images, progress=progress).problems


def inspect_weak_dataset(dataset_dir: str | os.PathLike, *, verify_images: bool = True,
                         progress: bool = False) -> CheckReport:
    """`check_weak_dataset` plus what was found (case counts), for a summary line."""
    root = Path(dataset_dir).expanduser()
    report = CheckReport(dataset_dir=root)
    problems = report.problems
    if not root.is_dir():
        problems.append(Problem("dataset folder not found", file=str(root)))
        return report

    info = _check_dataset_json(root, problems)
    weak, weak_problems = read_weak_labels(root / WEAK_LABELS_FILENAME)
    problems.extend(weak_problems)
    if weak is None and not (root / WEAK_LABELS_FILENAME).is_file():
        problems[-1] = dataclasses.replace(
            problems[-1], hint=f"write the weak targets as {{\"format\": \"{WEAK_LABELS_FORMAT}\", \"target\": "
                               f"\"percentage\", \"cases\": {{CASE: {{\"1\": 12.5, ...}}}}}} (docs/reference.md, "
                               f"\"weak_labels.json\")")

    ending = info.file_ending
    train: dict[str, CaseFiles] | None = None
    test: dict[str, CaseFiles] | None = None
    if ending is not None:
        if info.content is not None and "dataset" in info.content:
            train = _cases_from_explicit_list(root, info.content, problems)
        else:
            train = _scan_image_folder(root / "imagesTr", ending, info.n_channels, problems, required=True)
            if train is not None:
                _attach_maps(train, root / "labelsTr", ending, problems, training=True)
        test = _scan_image_folder(root / "imagesTs", ending, info.n_channels, problems, required=False)
        test_maps_exist = (root / "labelsTs").is_dir()
        if test is not None:
            _attach_maps(test, root / "labelsTs", ending, problems, training=False)
        elif test_maps_exist:
            maps = _scan_map_folder(root / "labelsTs", ending, problems) or {}
            for case, path in sorted(maps.items()):
                problems.append(Problem("region map of a test case that has no image (imagesTs is missing)",
                                        file=str(path), case=case, hint="add imagesTs or remove the map"))

    if train is not None:
        report.training_cases = sorted(train)
        if info.num_training is not None and info.num_training != len(train):
            problems.append(Problem(f"'numTraining' is {info.num_training} but {len(train)} training case(s) were "
                                    f"found", file=str(root / "dataset.json"),
                                    hint=f"set \"numTraining\": {len(train)}"))
        if not train and not any(p.file == str(root / "imagesTr") for p in problems):
            problems.append(Problem("no training images found", file=str(root / "imagesTr"),
                                    hint=f"images are named CASE_0000{ending}"))
    if test is not None:
        report.test_cases = sorted(test)

    if weak is not None and train is not None:
        _cross_check_entries(weak, train, test or {}, info, root, problems)

    references = {}
    if ending is not None:
        for folder_name, cases in (("referenceTr", train), ("referenceTs", test)):
            refs = _scan_map_folder(root / folder_name, ending, problems)
            if refs is None:
                continue
            image_folder = "imagesTr" if folder_name == "referenceTr" else "imagesTs"
            for case, path in sorted(refs.items()):
                if cases is None or case not in cases:
                    problems.append(Problem(f"reference mask of a case that has no image in {image_folder}",
                                            file=str(path), case=case,
                                            hint=f"name it after an {image_folder} case or remove it"))
                else:
                    references[path] = cases[case]
        report.reference_files = len(references)

    # regions whose value was rejected already have an error; they must not count as "no target" as well
    rejected = {(p.case, p.region) for p in weak_problems if p.severity == "error" and p.region is not None}
    _check_file_contents(root, info, weak, rejected, train or {}, test or {}, references, verify_images, progress,
                         problems)
    report.problems[:] = [_relative(p, root) for p in problems]
    return report


def _attach_maps(cases: dict[str, CaseFiles], folder: Path, ending: str, problems: list[Problem],
                 training: bool) -> None:
    maps = _scan_map_folder(folder, ending, problems)
    if maps is None:
        if training:
            problems.append(Problem("folder not found", file=str(folder),
                                    hint=f"put one region map per training case there, named CASE{ending}"))
        return
    image_folder = "imagesTr" if training else "imagesTs"
    for case, files in cases.items():
        if case in maps:
            files.label = maps[case]
        elif training:
            problems.append(Problem("training case has no region map", file=str(folder / f"{case}{ending}"),
                                    case=case, hint="every training case needs its region map (e.g. lung lobes)"))
        else:
            problems.append(Problem("test case has no region map although labelsTs exists",
                                    file=str(folder / f"{case}{ending}"), case=case, severity="warning",
                                    hint="region-wise evaluation will skip this case"))
    for case in sorted(set(maps) - set(cases)):
        problems.append(Problem(f"region map of a case that has no image in {image_folder}", file=str(maps[case]),
                                case=case, hint=f"add the image as {image_folder}/{case}_0000{ending} or remove "
                                                f"the map"))


def _cross_check_entries(weak: WeakLabels, train: dict[str, CaseFiles], test: dict[str, CaseFiles],
                         info: _DatasetJson, root: Path, problems: list[Problem]) -> None:
    file = str(root / WEAK_LABELS_FILENAME)
    for case in sorted(set(weak.cases) - set(train)):
        where = " (it is a test case in imagesTs; weak targets belong to training cases)" if case in test else ""
        problems.append(Problem(f"unknown case: no training image in imagesTr{where}", file=file, case=case,
                                hint="fix the case identifier or remove the entry"))
    for case in sorted(set(train) - set(weak.cases)):
        problems.append(Problem("training case has no entry in weak_labels.json", file=file, case=case,
                                hint=f"add \"{case}\": {{region: value, ...}} (regions without a value carry no "
                                     f"supervision), or remove the case from imagesTr/labelsTr"))
    if not info.labels_complete:
        return  # a broken 'labels' is reported already; comparing against it would only repeat that
    declared = info.region_values
    unknown: dict[int, list[str]] = {}
    for case, regions in weak.cases.items():
        for region in regions:
            if region not in declared:
                unknown.setdefault(region, []).append(case)
    for region, cases in sorted(unknown.items()):
        what = "is the 'ignore' label" if region == info.ignore_value else "is not a label in dataset.json"
        where = f" (case(s) {_names(sorted(cases))})" if len(cases) > 1 else ""
        problems.append(Problem(f"region key \"{region}\" {what}{where}", file=file,
                                case=cases[0] if len(cases) == 1 else None, region=region,
                                hint=f"region keys are dataset.json label values: "
                                     f"{sorted(declared) if declared else 'none declared'}"))


def _check_file_contents(root: Path, info: _DatasetJson, weak: WeakLabels | None, rejected: set,
                         train: dict[str, CaseFiles],
                         test: dict[str, CaseFiles], references: dict[Path, CaseFiles], verify_images: bool,
                         progress: bool, problems: list[Problem]) -> None:
    jobs = [(c, True) for c in sorted(train.values(), key=lambda c: c.case)]
    jobs += [(c, False) for c in sorted(test.values(), key=lambda c: c.case)]
    refs_by_case: dict[int, list[Path]] = {}
    for path, files in references.items():
        refs_by_case.setdefault(id(files), []).append(path)
    jobs = [(c, tr) for c, tr in jobs if verify_images or c.label is not None or id(c) in refs_by_case]
    if not jobs or info.content is None:
        return

    reader_class = _reader_class(info, jobs, problems)
    if reader_class is None:
        return
    reader = _Reader(reader_class, problems)
    declared = set(info.labels.values()) | {0} if info.labels_complete else None
    no_target_regions = 0
    no_target_cases = set()

    from tqdm import tqdm
    for files, training in tqdm(jobs, desc="checking cases", unit="case", disable=not progress, leave=False):
        image_geometry = _read_case_images(reader, files, info.n_channels, problems) if verify_images else None

        if files.label is not None:
            array, geometry = reader.read(files.label, files.case, "region map", segmentation=True)
            if array is not None:
                if image_geometry is not None:
                    diffs = _geometry_mismatches(image_geometry, geometry)
                    if diffs:
                        problems.append(Problem(f"region map does not match the image "
                                                f"{files.images[0].name}: {'; '.join(diffs)} (image vs map)",
                                                file=str(files.label), case=files.case,
                                                hint="the map must be on the image's voxel grid (resample it with "
                                                     "nearest neighbour onto the image)"))
                if array.shape[0] != 1:
                    problems.append(Problem(f"region map has {array.shape[0]} channels; it must be a single-channel "
                                            f"label image", file=str(files.label), case=files.case))
                counts = _label_counts(array, files.label, files.case, "region map", problems)
                if counts is not None:
                    _check_map_values(files, counts, declared, info, problems)
                    if training and weak is not None and files.case in weak.cases:
                        missing = _check_targets_against_map(files, counts, weak, info, rejected, root,
                                                             problems)
                        no_target_regions += len(missing)
                        if missing:
                            no_target_cases.add(files.case)

        for ref in refs_by_case.get(id(files), []):
            array, geometry = reader.read(ref, files.case, "reference mask", segmentation=True)
            if array is None:
                continue
            if image_geometry is not None:
                diffs = _geometry_mismatches(image_geometry, geometry)
                if diffs:
                    problems.append(Problem(f"reference mask does not match the image {files.images[0].name}: "
                                            f"{'; '.join(diffs)} (image vs mask)", file=str(ref), case=files.case,
                                            hint="the mask must be on the image's voxel grid"))
            counts = _label_counts(array, ref, files.case, "reference mask", problems)
            if counts is not None and set(counts) - {0, 1}:
                problems.append(Problem(f"reference mask must be binary (0/1) but contains the value(s) "
                                        f"{sorted(set(counts) - {0, 1})}", file=str(ref), case=files.case,
                                        hint="store lesion = 1, everything else = 0"))

    if no_target_regions:
        problems.append(Problem(f"{no_target_regions} region(s) in {len(no_target_cases)} case(s) have no weak target "
                                f"and carry no supervision (e.g. {_names(sorted(no_target_cases), 3)})",
                                file=str(root / WEAK_LABELS_FILENAME), severity="info"))


def _reader_class(info: _DatasetJson, jobs, problems: list[Problem]):
    """The reader nnU-Net would choose: it tries the first training image, as its preprocessing does."""
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         recursive_find_reader_writer_by_name)
    content = info.content
    override = content.get("overwrite_image_reader_writer")
    if override not in (None, "None"):
        try:
            with _silenced():
                recursive_find_reader_writer_by_name(override)
        except Exception:
            problems.append(Problem(f"'overwrite_image_reader_writer' names {override!r}, which nnU-Net cannot find; "
                                    f"it will choose a reader from the file ending", severity="warning",
                                    file="dataset.json"))
    example = next((str(c.images[0]) for c, _ in jobs if c.images), None)
    for candidate in (example, None):
        try:
            with _silenced():
                return determine_reader_writer_from_dataset_json(content, candidate, verbose=False)
        except Exception:
            continue
    problems.append(Problem(f"nnU-Net has no reader for the file ending {info.file_ending!r}", file="dataset.json"))
    return None


def _check_map_values(files: CaseFiles, counts: dict[int, int], declared: set[int] | None, info: _DatasetJson,
                      problems: list[Problem]) -> None:
    if declared is None:
        return
    undeclared = sorted(set(counts) - declared)
    if undeclared:
        shown = ", ".join(f"{v} ({counts[v]} voxels)" for v in undeclared[:_NAMES_SHOWN])
        problems.append(Problem(f"region map contains label value(s) that dataset.json does not declare: {shown}",
                                file=str(files.label), case=files.case,
                                hint=f"declared values are {sorted(declared)}; add the regions to 'labels' or fix "
                                     f"the map"))
    if not set(counts) & info.region_values:
        problems.append(Problem("region map contains no region (background only)", file=str(files.label),
                                case=files.case, severity="warning"))


def _check_targets_against_map(files: CaseFiles, counts: dict[int, int], weak: WeakLabels, info: _DatasetJson,
                               rejected: set, root: Path, problems: list[Problem]) -> list[int]:
    """Errors for targets of regions absent from the map; returns the map's regions that have no target."""
    file = str(root / WEAK_LABELS_FILENAME)
    entry = weak.cases[files.case]
    declared = info.region_values
    for region in sorted(entry):
        if region in declared and counts.get(region, 0) == 0:
            problems.append(Problem(f"region {region} ({info.region_name(region)}) has a weak target but no voxel in "
                                    f"the region map {Path(files.label).name}", file=file, case=files.case,
                                    region=region, hint="remove the target or fix the region map"))
    present = sorted(v for v in counts if v in declared)
    missing = [r for r in present if r not in entry and (files.case, r) not in rejected]
    if present and not any(r in entry for r in present) and len(missing) == len(present):
        problems.append(Problem("no region of this case has a weak target, so the case carries no supervision",
                                file=file, case=files.case, severity="warning",
                                hint="add targets for its regions or remove the case"))
    return missing


# ------------------------------------------------------------------------------------------------- the set-up

def check_setup() -> list[Problem]:
    """nnU-Net folder variables, nnUNet_extTrainer, trainer discovery by nnU-Net, the optional CRF backend."""
    problems: list[Problem] = []
    for name in NNUNET_FOLDER_VARIABLES:
        value = os.environ.get(name)
        if not value:
            problems.append(Problem(f"environment variable {name} is not set",
                                    hint=f"export {name}=/path/to/{name} (see nnU-Net's "
                                         f"documentation/setting_up_paths.md)"))
        elif not Path(value).expanduser().is_dir():
            needed = name == "nnUNet_raw"
            problems.append(Problem(f"{name}={value} does not exist",
                                    severity="error" if needed else "warning",
                                    hint=f"mkdir -p {value}" if needed else "nnU-Net will create it"))

    try:
        from nnunetv2_dram.paths import trainers_path
        ours = str(trainers_path())
    except Exception as e:
        ours = None
        problems.append(Problem(f"the trainers folder of nnunetv2_dram cannot be located ({_describe_exception(e)})",
                                hint="reinstall nnunetv2_dram (pip install -e .)"))
    ext = os.environ.get("nnUNet_extTrainer")
    if ours is not None:
        listed = [p for p in (ext or "").split(os.pathsep) if p.strip()]
        if not ext:
            problems.append(Problem("environment variable nnUNet_extTrainer is not set; nnU-Net cannot find the "
                                    "dRAM trainers", hint="export nnUNet_extTrainer=$(nnunetv2_dram trainers-path)"))
        elif not any(os.path.realpath(p) == os.path.realpath(ours) for p in listed):
            problems.append(Problem(f"nnUNet_extTrainer={ext} does not contain {ours}",
                                    hint=f"export nnUNet_extTrainer=\"$nnUNet_extTrainer{os.pathsep}"
                                         f"$(nnunetv2_dram trainers-path)\""))

    for trainer in TRAINER_NAMES:
        try:
            with _silenced():
                from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
                recursive_find_trainer_class_by_name(trainer)
        except Exception as e:
            problems.append(Problem(f"nnU-Net cannot find the trainer {trainer} ({_short_reason(e)})",
                                    hint="point nnUNet_extTrainer at $(nnunetv2_dram trainers-path); if it already "
                                         "does, the trainer module fails to import"))

    try:
        import pydensecrf.densecrf  # noqa: F401
    except Exception as e:
        problems.append(Problem(f"the optional CRF backend pydensecrf is not importable ({_describe_exception(e)}); "
                                f"'--crf dense' will not work", severity="warning", hint=CRF_INSTALL_HINT))
    return problems


def _short_reason(e: BaseException) -> str:
    if isinstance(e, RuntimeError) and "Could not find requested nnunet trainer" in str(e):
        return "not found"
    if isinstance(e, AssertionError):
        return "it does not inherit from nnUNetTrainer"
    return _describe_exception(e)
