"""Region maps (lung lobes) from the label numbering of other tools, checked against the CT they belong to.

Our region labels (docs/reference.md, "Weak dataset"): background 0, left upper lobe 1, left lower lobe 2, right upper lobe 3,
right middle lobe 4, right lower lobe 5.

Inputs that are understood:
  * a multi-label image (one file, one integer label per structure), e.g. TotalSegmentator `--ml` output or
    lungmask LTRCLobes output;
  * a TotalSegmentator per-structure folder (one binary mask per structure, file name = structure name).

Presets record where their numbers come from (public sources, read for facts only):
  * TotalSegmentator: `class_map` in wasserth/TotalSegmentator `totalsegmentator/map_to_binary.py`
    (task "total" = v2 numbering, "total_v1" = v1 numbering; checked at commits 0275d304 and 0e65a448).
    A `roi_subset` run keeps these ids in the multi-label output (`totalsegmentator/nnunet.py` filters the
    class map, it does not renumber), and per-structure output is written as `<structure name>.nii.gz`
    (`save_segmentation_nifti` in `totalsegmentator/nnunet.py`).
  * lungmask: "Semantics of output ... Five label models (Lung lobes)" in JoHof/lungmask `README.md`
    (commit 0653c701).
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from nnunetv2_dram.io_utils import split_suffix, write_sitk_image
from nnunetv2_dram.weak_labels.problems import Problem, WeakDatasetError

LOBE_LABELS = {"background": 0, "left_upper_lobe": 1, "left_lower_lobe": 2, "right_upper_lobe": 3,
               "right_middle_lobe": 4, "right_lower_lobe": 5}
LEFT_LOBES = (1, 2)
RIGHT_LOBES = (3, 4, 5)

# Structure names used by TotalSegmentator (same names in v1 and v2; source: map_to_binary.py, see module doc).
TOTALSEGMENTATOR_LOBE_STRUCTURES = {
    "lung_upper_lobe_left": 1,
    "lung_lower_lobe_left": 2,
    "lung_upper_lobe_right": 3,
    "lung_middle_lobe_right": 4,
    "lung_lower_lobe_right": 5,
}

# File name endings that SimpleITK reads and that may hold a label map.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


class MissingDependencyError(ImportError):
    """An optional tool is not installed; the message says which pip package to install."""


@dataclass(frozen=True)
class RegionPreset:
    name: str
    description: str
    source: str  # where the numbers were read (repository + path)
    label_map: Mapping[int, int]  # label value in the tool's multi-label file -> our region
    structure_map: Mapping[str, int] = field(default_factory=dict)  # per-structure file name -> our region


PRESETS: dict[str, RegionPreset] = {
    "totalsegmentator_v2": RegionPreset(
        name="totalsegmentator_v2",
        description="TotalSegmentator >= 2.0, task 'total' (multi-label --ml file or per-structure folder)",
        # wasserth/TotalSegmentator totalsegmentator/map_to_binary.py, class_map["total"]: 10..14
        source="wasserth/TotalSegmentator totalsegmentator/map_to_binary.py class_map['total']",
        label_map={10: 1, 11: 2, 12: 3, 13: 4, 14: 5},
        structure_map=TOTALSEGMENTATOR_LOBE_STRUCTURES),
    "totalsegmentator_v1": RegionPreset(
        name="totalsegmentator_v1",
        description="TotalSegmentator 1.x (or 2.x with --v1_order), task 'total'",
        # wasserth/TotalSegmentator totalsegmentator/map_to_binary.py, class_map["total_v1"]: 13..17
        source="wasserth/TotalSegmentator totalsegmentator/map_to_binary.py class_map['total_v1']",
        label_map={13: 1, 14: 2, 15: 3, 16: 4, 17: 5},
        structure_map=TOTALSEGMENTATOR_LOBE_STRUCTURES),
    "lungmask_ltrclobes": RegionPreset(
        name="lungmask_ltrclobes",
        description="lungmask, model LTRCLobes or LTRCLobes_R231 (one multi-label file)",
        # JoHof/lungmask README.md, "Five label models (Lung lobes)": 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL
        source="JoHof/lungmask README.md 'Semantics of output'",
        label_map={1: 1, 2: 2, 3: 3, 4: 4, 5: 5}),
    "identity": RegionPreset(
        name="identity",
        description="already in our numbering (1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL); files named after our regions",
        source="nnunetv2_dram's lobe labels (docs/reference.md, 'Weak dataset')",
        label_map={1: 1, 2: 2, 3: 3, 4: 4, 5: 5},
        structure_map={name: value for name, value in LOBE_LABELS.items() if value}),
}


@dataclass
class RegionMapReport:
    input: str
    output: str
    mapping: str  # preset name or mapping file
    kind: str  # "multi-label file" or "per-structure folder"
    used: dict = field(default_factory=dict)  # source label / structure name -> our region (present in input)
    dropped: dict = field(default_factory=dict)  # source label -> voxels, or structure name -> None (not read)
    region_voxels: dict = field(default_factory=dict)  # our region -> voxel count in the output
    missing_regions: list = field(default_factory=list)
    reoriented: str | None = None
    geometry_from_ct: bool = False
    warnings: list = field(default_factory=list)  # Problem(severity="warning")
    # signs that the preset does not fit the file (wrong numbering, left/right swapped): the map is probably wrong
    suspicious: list = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.output}: regions " + ", ".join(f"{r}={n}" for r, n in sorted(self.region_voxels.items()))]
        if self.dropped:
            names = sorted(map(str, self.dropped))
            parts.append(f"dropped {len(names)} unmapped label(s)/structure(s): " + ", ".join(names[:12])
                         + (" ..." if len(names) > 12 else ""))
        if self.reoriented:
            parts.append(f"reoriented {self.reoriented}")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# mappings


@dataclass(frozen=True)
class RegionMapping:
    """What `convert_region_map` applies: a preset or a user's mapping file, resolved."""
    name: str
    label_map: Mapping[int, int]
    structure_map: Mapping[str, int]
    preset: RegionPreset | None = None


def _region_value(value, labels: Mapping[str, int], where: str) -> int:
    if isinstance(value, str) and value in labels:
        return int(labels[value])
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise WeakDatasetError([Problem(f"target region {json.dumps(value)} must be a label value or one of "
                                        f"{sorted(labels)}", file=where)], title="invalid region mapping")
    try:
        v = int(value)
    except ValueError:
        raise WeakDatasetError([Problem(f"target region {json.dumps(value)} is not a region name or label value",
                                        file=where, hint=f"use one of {sorted(labels)} or an integer")],
                               title="invalid region mapping") from None
    if not 0 <= v <= 255:
        raise WeakDatasetError([Problem(f"target region {v} must be in 0..255", file=where)],
                               title="invalid region mapping")
    return v


def load_mapping(mapping: str | os.PathLike | Mapping, labels: Mapping[str, int] = LOBE_LABELS) -> RegionMapping:
    """A custom mapping {"source_label": target_region, ...} from a JSON file or a dict.

    Keys are label values of the source file ("13") or structure file names ("lung_upper_lobe_left", for
    per-structure folders); targets are our label values or region names ("left_upper_lobe"). A target of 0
    drops the source label on purpose (it is then not reported as unmapped).
    """
    where = "mapping"
    if not isinstance(mapping, Mapping):
        where = str(mapping)
        path = Path(mapping)
        if not path.is_file():
            raise WeakDatasetError([Problem("mapping file not found", file=where)], title="invalid region mapping")
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeakDatasetError([Problem(f"not valid JSON ({e})", file=where)],
                                   title="invalid region mapping") from None
        if not isinstance(mapping, Mapping) or not mapping:
            raise WeakDatasetError([Problem('must be a non-empty JSON object {"source_label": target_region}',
                                            file=where)], title="invalid region mapping")
    label_map: dict[int, int] = {}
    structure_map: dict[str, int] = {}
    for key, value in mapping.items():
        target = _region_value(value, labels, f"{where} (key {json.dumps(key)})")
        key_text = str(key).strip()
        try:
            label_map[int(key_text)] = target
        except ValueError:
            stem = split_suffix(key_text)[0] if key_text.endswith(IMAGE_SUFFIXES) else key_text
            structure_map[stem] = target
    return RegionMapping(name=where, label_map=label_map, structure_map=structure_map)


def resolve_mapping(preset: str | None = None, mapping: str | os.PathLike | Mapping | None = None,
                    labels: Mapping[str, int] = LOBE_LABELS) -> RegionMapping:
    if mapping is not None:
        return load_mapping(mapping, labels)
    preset = preset or "totalsegmentator_v2"
    if preset not in PRESETS:
        raise WeakDatasetError([Problem(f"unknown region preset {preset!r}",
                                        hint=f"use one of {sorted(PRESETS)} or a mapping JSON file")],
                               title="invalid region mapping")
    p = PRESETS[preset]
    return RegionMapping(name=p.name, label_map=dict(p.label_map), structure_map=dict(p.structure_map), preset=p)


# ---------------------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Geometry:
    size: tuple  # SimpleITK order (x, y, z)
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of_image(cls, image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "Geometry":
        """Header only: a CT is not read into memory to learn its grid."""
        import SimpleITK as sitk
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise WeakDatasetError([Problem(f"cannot read image header ({_short_error(e)})", file=str(path))],
                                   title="unreadable image") from None
        return cls(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                   tuple(reader.GetDirection()))

    def differences(self, other: "Geometry") -> list[str]:
        """What differs, within tolerances a NIfTI float32 header round trip stays inside (the same as the
        dataset checker's: spacing relative 1e-4, origin 1e-3 mm, direction cosines 1e-4)."""
        out = []
        if self.size != other.size:
            return [f"shape {other.size} vs CT {self.size} (x, y, z)"]
        if not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=0):
            out.append(f"spacing {_fmt(other.spacing)} vs CT {_fmt(self.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=1e-3):
            out.append(f"origin {_fmt(other.origin)} vs CT {_fmt(self.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=1e-4):
            out.append(f"direction {_fmt(other.direction)} vs CT {_fmt(self.direction)}")
        return out


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _short_error(e: BaseException) -> str:
    """SimpleITK's exceptions end with the useful line after several lines of C++ location."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _orientation_code(direction) -> str:
    import SimpleITK as sitk
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(direction)


def align_to_reference(image, reference: Geometry, path: str, ct_path: str) -> tuple[object, str | None]:
    """Return `image` on the CT's grid with the CT's exact header, or raise naming both files.

    Only lossless changes are made: an axis permutation/flip when the label map was written in another
    orientation (e.g. RAS by a nibabel-based tool) and copying the CT's header once it matches within tolerance.
    """
    import SimpleITK as sitk
    reoriented = None
    geometry = Geometry.of_image(image)
    if image.GetDimension() != len(reference.size):
        raise WeakDatasetError([Problem(f"region map is {image.GetDimension()}-D but the CT {ct_path} is "
                                        f"{len(reference.size)}-D", file=path)], title="geometry mismatch")
    if geometry.differences(reference) and image.GetDimension() == 3:
        source_code, target_code = _orientation_code(geometry.direction), _orientation_code(reference.direction)
        if source_code != target_code:
            candidate = sitk.DICOMOrient(image, target_code)
            if not Geometry.of_image(candidate).differences(reference):
                image, reoriented = candidate, f"{source_code} -> {target_code}"
    problems = Geometry.of_image(image).differences(reference)
    if problems:
        raise WeakDatasetError([Problem("region map does not lie on the CT's voxel grid: " + "; ".join(problems),
                                        file=path,
                                        hint=f"make the region map from this CT ({ct_path}) or resample it onto the "
                                             f"CT with nearest-neighbour interpolation")], title="geometry mismatch")
    out = sitk.Image(image)
    out.SetSpacing(reference.spacing)
    out.SetOrigin(reference.origin)
    out.SetDirection(reference.direction)
    return out, reoriented


# ---------------------------------------------------------------------------------------------------------------
# conversion


def _read_label_image(path: Path):
    import SimpleITK as sitk
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise WeakDatasetError([Problem(f"cannot read image ({_short_error(e)})", file=str(path))],
                               title="unreadable region map") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise WeakDatasetError([Problem(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a "
                                        f"region map holds one integer label per voxel", file=str(path))],
                               title="invalid region map")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all() or not np.array_equal(array, np.round(array)):
            raise WeakDatasetError([Problem("holds non-integer values (a probability map?); a region map holds "
                                            "integer labels", file=str(path),
                                            hint="threshold/argmax it into labels first")],
                                   title="invalid region map")
    return image, np.asarray(array)


def _label_counts(array: np.ndarray) -> dict[int, int]:
    if array.dtype.kind in "uif":  # float maps were checked to hold integers
        flat = array.reshape(-1)
        lo, hi = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
        if lo >= 0 and hi < 1 << 16:
            counts = np.bincount(flat.astype(np.int64, copy=False), minlength=hi + 1)
            return {int(v): int(c) for v, c in enumerate(counts) if c}
    values, counts = np.unique(array, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _apply_label_map(array: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
    out = np.zeros(array.shape, dtype=np.uint8)
    for source, target in label_map.items():
        if target:
            out[array == source] = target
    return out


def is_per_structure_folder(folder: str | os.PathLike, mapping: RegionMapping) -> Path | None:
    """The folder holding the structure masks (the folder itself or its `segmentations/`), or None."""
    folder = Path(folder)
    for candidate in (folder, folder / "segmentations"):
        if candidate.is_dir() and any(_structure_name(p) in mapping.structure_map for p in _image_files(candidate)):
            return candidate
    return None


def _structure_name(path: Path) -> str:
    return split_suffix(path.name)[0]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES))


def _convert_folder(folder: Path, mapping: RegionMapping, report: RegionMapReport):
    import SimpleITK as sitk
    if not mapping.structure_map:
        raise WeakDatasetError([Problem(f"is a folder, but the mapping {mapping.name!r} numbers labels of one "
                                        f"multi-label file and names no structure files", file=str(folder),
                                        hint="give the multi-label file, or a mapping with structure names")],
                               title="invalid region map input")
    root = is_per_structure_folder(folder, mapping)
    if root is None:
        present = [p.name for p in _image_files(folder)][:8]
        raise WeakDatasetError([Problem(f"holds none of the structure files {sorted(mapping.structure_map)} "
                                        f"(found: {present or 'no image files'})", file=str(folder),
                                        hint="point at TotalSegmentator's output folder of this case")],
                               title="invalid region map input")
    reference_image = None
    out = None
    overlap = 0
    for path in _image_files(root):
        name = _structure_name(path)
        target = mapping.structure_map.get(name)
        if target is None:
            report.dropped[name] = None  # not read: a full TotalSegmentator folder holds ~100 other structures
            continue
        if target == 0:
            continue
        image, array = _read_label_image(path)
        if reference_image is None:
            reference_image, out = image, np.zeros(array.shape, dtype=np.uint8)
        else:
            diff = Geometry.of_image(reference_image).differences(Geometry.of_image(image))
            if diff:
                raise WeakDatasetError([Problem("structure mask lies on another grid than the other masks of this "
                                                "folder: " + "; ".join(d.replace("CT", "first mask") for d in diff),
                                                file=str(path))], title="geometry mismatch")
        inside = array != 0
        overlap += int(np.count_nonzero(inside & (out != 0) & (out != target)))
        out[inside] = target
        report.used[name] = target
    if reference_image is None:
        raise WeakDatasetError([Problem("every matching structure file maps to background", file=str(root))],
                               title="invalid region map input")
    if overlap:
        report.warnings.append(Problem(f"{overlap} voxel(s) belong to more than one structure mask; the later file "
                                       f"(alphabetical) wins", file=str(root), severity="warning"))
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference_image)
    return image, out


def _convert_file(path: Path, mapping: RegionMapping, report: RegionMapReport):
    import SimpleITK as sitk
    image, array = _read_label_image(path)
    counts = _label_counts(array)
    out = _apply_label_map(array, mapping.label_map)
    for value, n in counts.items():
        if value == 0:
            continue
        target = mapping.label_map.get(value)
        if target is None:
            report.dropped[value] = n
        elif target:
            report.used[value] = target
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result, out, counts


def _laterality_warning(image, array: np.ndarray, path: str) -> Problem | None:
    """Left lobes must lie to the patient's left of the right lobes (+x in LPS physical space).

    This catches a preset that does not fit the file (e.g. TotalSegmentator v1 numbering read as v2, which maps
    pancreas/adrenals onto left lobes) and images whose header has left and right swapped.
    """
    centroids = []
    for group in (LEFT_LOBES, RIGHT_LOBES):
        mask = np.isin(array, group)
        n = int(np.count_nonzero(mask))
        if n == 0:
            return None
        index = []
        for axis in range(array.ndim):  # numpy axes are (z, y, x); SimpleITK indices are (x, y, z)
            profile = mask.sum(axis=tuple(a for a in range(array.ndim) if a != axis))
            index.append(float((profile * np.arange(profile.size)).sum() / n))
        centroids.append(image.TransformContinuousIndexToPhysicalPoint(tuple(reversed(index))))
    if centroids[0][0] <= centroids[1][0]:
        return Problem("the left-lobe regions (1, 2) lie on the patient's right of the right-lobe regions (3, 4, 5): "
                       "the preset's numbering does not fit this file, or its header swaps left and right",
                       file=path, severity="warning",
                       hint="check --preset (TotalSegmentator v1 and v2 number lobes differently)")
    return None


def _other_preset_hint(counts: dict[int, int], mapping: RegionMapping, present_regions: set[int]) -> str | None:
    wanted = {v for v in mapping.label_map.values() if v}
    if mapping.preset is None or present_regions >= wanted:
        return None
    for other in PRESETS.values():
        if other.name in (mapping.preset.name, "identity"):
            continue
        if all(source in counts for source in other.label_map):
            return other.name
    return None


def convert_region_map(input_path: str | os.PathLike, output_path: str | os.PathLike,
                       preset: str | None = "totalsegmentator_v2", mapping: str | os.PathLike | Mapping | None = None,
                       reference_ct: str | os.PathLike | None = None,
                       labels: Mapping[str, int] = LOBE_LABELS) -> RegionMapReport:
    """Map a tool's lobe labels onto our region labels and write the region map atomically.

    input_path: a multi-label image or a per-structure folder (TotalSegmentator; `segmentations/` inside is found).
    preset / mapping: a name from PRESETS, or a custom mapping (JSON file or dict; see `load_mapping`).
    reference_ct: the CT the map belongs to; its grid must match (shape, spacing, origin, direction) and its
    header is copied into the output. Labels with no mapping are dropped and listed in the report.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise WeakDatasetError([Problem("region map input not found", file=str(input_path))],
                               title="missing region map")
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise WeakDatasetError([Problem("output would overwrite the input", file=str(output_path),
                                        hint="write the converted map somewhere else")], title="refused")
    resolved = resolve_mapping(preset, mapping, labels)
    report = RegionMapReport(input=str(input_path), output=str(output_path), mapping=resolved.name,
                             kind="per-structure folder" if input_path.is_dir() else "multi-label file")
    counts: dict[int, int] = {}
    if input_path.is_dir():
        image, array = _convert_folder(input_path, resolved, report)
    else:
        image, array, counts = _convert_file(input_path, resolved, report)

    if reference_ct is not None:
        image, report.reoriented = align_to_reference(image, Geometry.of_file(reference_ct), str(input_path),
                                                      str(reference_ct))
        report.geometry_from_ct = True
        if report.reoriented:
            import SimpleITK as sitk
            array = sitk.GetArrayViewFromImage(image)

    present = _label_counts(np.asarray(array))
    present.pop(0, None)
    report.region_voxels = dict(sorted(present.items()))
    wanted = sorted({v for v in (*resolved.label_map.values(), *resolved.structure_map.values()) if v})
    report.missing_regions = [r for r in wanted if r not in present]
    if not present:
        raise WeakDatasetError([Problem(f"no voxel maps to any region with mapping {resolved.name!r} (labels found: "
                                        f"{sorted(counts)[:20] or 'none'})", file=str(input_path),
                                        hint="pick the preset of the tool that made this file, or a mapping file")],
                               title="empty region map")
    if report.missing_regions:
        hint = _other_preset_hint(counts, resolved, set(present))
        empty = Problem(f"region(s) {report.missing_regions} are empty", file=str(input_path), severity="warning",
                        hint=f"the labels fit preset {hint!r}" if hint else
                        "a region without voxels cannot carry a weak target")
        (report.suspicious if hint else report.warnings).append(empty)
    if dict(labels) == LOBE_LABELS:  # sidedness is only known for our lobe numbering
        lateral = _laterality_warning(image, np.asarray(array), str(input_path))
        if lateral:
            report.suspicious.append(lateral)
    write_sitk_image(image, output_path)
    return report


# ---------------------------------------------------------------------------------------------------------------
# running the segmentation tools (optional dependencies, imported only when asked for)


def _missing(tool: str, package: str, e: ImportError) -> MissingDependencyError:
    return MissingDependencyError(f"{tool} is not installed (import failed: {e}). Install it with "
                                  f"`pip install {package}` (it downloads its model weights on first use), or "
                                  f"run {tool} yourself and convert its output with --preset.")


def run_lungmask(ct_path: str | os.PathLike, output_path: str | os.PathLike, *, force_cpu: bool = False,
                 batch_size: int = 20) -> RegionMapReport:
    """Lobes of one CT with lungmask's LTRCLobes model, written in our numbering on the CT's grid."""
    try:
        import lungmask  # noqa: F401
    except ImportError as e:
        raise _missing("lungmask", "lungmask", e) from None
    import SimpleITK as sitk
    ct = sitk.ReadImage(str(ct_path))
    try:
        from lungmask import LMInferer  # lungmask >= 0.2.9
        inferer = LMInferer(modelname="LTRCLobes", force_cpu=force_cpu, batch_size=batch_size, tqdm_disable=True)
        labels = inferer.apply(ct)
    except ImportError:
        from lungmask import mask as lm_mask  # older releases: get_model(type, name) + apply(image, model)
        labels = lm_mask.apply(ct, lm_mask.get_model("unet", "LTRCLobes"), force_cpu=force_cpu,
                               batch_size=batch_size)
    labels = np.asarray(labels)
    if labels.shape != sitk.GetArrayViewFromImage(ct).shape:
        raise WeakDatasetError([Problem(f"lungmask returned an array of shape {labels.shape} for a CT of shape "
                                        f"{sitk.GetArrayViewFromImage(ct).shape}", file=str(ct_path))],
                               title="lungmask failed")
    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.CopyInformation(ct)
    output_path = Path(output_path)
    with tempfile.TemporaryDirectory(prefix=".lungmask.", dir=output_path.parent if output_path.parent.exists()
                                     else None) as tmp:
        raw = Path(tmp) / "ltrclobes.nii.gz"
        sitk.WriteImage(label_image, str(raw), True)
        return convert_region_map(raw, output_path, preset="lungmask_ltrclobes", reference_ct=ct_path)


def run_totalsegmentator(ct_path: str | os.PathLike, output_path: str | os.PathLike, *, fast: bool = False,
                         device: str = "gpu") -> RegionMapReport:
    """Lobes of one CT with TotalSegmentator (task 'total', roi_subset = the five lobes), in our numbering.

    Per-structure output is requested because its file names are the same in v1 and v2, unlike label values.
    """
    try:
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as e:
        raise _missing("TotalSegmentator", "TotalSegmentator", e) from None
    output_path = Path(output_path)
    with tempfile.TemporaryDirectory(prefix=".totalseg.", dir=output_path.parent if output_path.parent.exists()
                                     else None) as tmp:
        kwargs = dict(ml=False, task="total", roi_subset=list(TOTALSEGMENTATOR_LOBE_STRUCTURES), fast=fast,
                      quiet=True, device=device)
        accepted = inspect.signature(totalsegmentator).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}  # 1.x has no `device`
        totalsegmentator(str(ct_path), str(tmp), **kwargs)
        return convert_region_map(tmp, output_path, preset="totalsegmentator_v2", reference_ct=ct_path)


RUNNERS = {"lungmask": run_lungmask, "totalsegmentator": run_totalsegmentator}


def preset_table(name: str) -> str:
    """A preset's label table as Markdown-ish text (for --list-presets and the docs)."""
    p = PRESETS[name]
    region_names = {v: k for k, v in LOBE_LABELS.items()}
    lines = [f"{p.name}: {p.description}", f"  source: {p.source}"]
    structure_by_region = {v: k for k, v in p.structure_map.items()}
    for source, target in sorted(p.label_map.items()):
        extra = f"  (file {structure_by_region[target]}.nii.gz)" if target in structure_by_region else ""
        lines.append(f"  {source:>3} -> {target} {region_names.get(target, '')}{extra}")
    return "\n".join(lines)
