"""The synthetic chest-CT weak dataset: determinism, geometry, weak labels that match the masks, layout, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dram.synthetic import (LOBE_LABELS, LUNG_LABELS_2D, generate_case, save_dataset_montage,
                                     save_montage, write_weak_dataset)
from nnunetv2_dram.weak_labels.format import load_weak_labels, percent_to_ctss

SMALL = (32, 64, 64)
TINY = (16, 40, 40)


def read(path: Path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def percentages_from_disk(labels_file: Path, reference_file: Path) -> dict[int, float]:
    regions, _ = read(labels_file)
    lesion, _ = read(reference_file)
    return {int(k): 100.0 * float(lesion[regions == k].sum()) / float((regions == k).sum())
            for k in np.unique(regions) if k > 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 small training cases and 2 test cases, written once for the whole module."""
    return write_weak_dataset(tmp_path_factory.mktemp("raw"), 501, n_train=12, n_test=2, seed=3, shape=SMALL)


def test_generate_case_is_deterministic_by_seed():
    a, b, c = generate_case(11, shape=TINY), generate_case(11, shape=TINY), generate_case(12, shape=TINY)
    for name in ("image", "regions", "lesion"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.spacing == b.spacing and a.origin == b.origin and a.region_percent == b.region_percent
    assert not np.array_equal(a.image, c.image)


def test_case_looks_like_a_chest_ct():
    case = generate_case(5, shape=SMALL)
    image, regions, lesion = case.image, case.regions, case.lesion
    assert image.dtype == np.int16 and regions.dtype == np.uint8 and lesion.dtype == np.uint8
    assert image.shape == regions.shape == lesion.shape == SMALL
    assert set(np.unique(lesion)) <= {0, 1}
    assert np.median(image[:, :3, :3]) < -900                          # air in the corners
    assert (image > 300).sum() > 50                                     # ribs and spine
    lung = regions > 0
    assert -950 < np.median(image[lung & (lesion == 0)]) < -750        # aerated parenchyma
    assert np.percentile(image[lung & (lesion == 0)], 99.5) > -400     # vessels inside the lungs
    # patient left (lobes 1, 2) at larger x than patient right (3, 4, 5); lower lobes further back than upper
    x = np.arange(regions.shape[2])[None, None, :]
    assert (x * np.isin(regions, (1, 2))).sum() / np.isin(regions, (1, 2)).sum() > \
        (x * np.isin(regions, (3, 4, 5))).sum() / np.isin(regions, (3, 4, 5)).sum()
    y = np.arange(regions.shape[1])[None, :, None]
    assert (y * (regions == 2)).sum() / (regions == 2).sum() > (y * (regions == 1)).sum() / (regions == 1).sum()
    z = np.arange(regions.shape[0])[:, None, None]
    assert (z * (regions == 3)).sum() / (regions == 3).sum() > (z * (regions == 5)).sum() / (regions == 5).sum()


def test_lesions_are_denser_than_lung_and_inside_it():
    for seed in range(6):
        case = generate_case(seed, shape=SMALL)
        assert not np.any((case.lesion > 0) & (case.regions == 0))
        if case.lesion.sum() > 50:
            lung = case.regions > 0
            assert np.median(case.image[case.lesion > 0]) > np.median(case.image[lung & (case.lesion == 0)]) + 150
            return
    pytest.fail("no case with lesions among 6 seeds")


def test_fused_lobe_is_absent_from_map_and_percentages():
    case = generate_case(2, shape=TINY, fused_lobe=4)
    assert 4 not in np.unique(case.regions) and 4 not in case.region_percent
    assert set(case.region_percent) == {1, 2, 3, 5}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        generate_case(0, shape=TINY, mode="4d")
    with pytest.raises(ValueError, match="file ending"):
        write_weak_dataset(tmp_path, 1, n_train=1, n_test=0, shape=TINY, file_ending=".png")
    with pytest.raises(ValueError, match="dataset id"):
        write_weak_dataset(tmp_path, 1000, n_train=1, n_test=0, shape=TINY)
    assert not any(tmp_path.iterdir())


def test_layout_and_dataset_json(dataset):
    assert dataset.name == "Dataset501_SynthChest"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == LOBE_LABELS
    assert dataset_json["numTraining"] == 12 and dataset_json["file_ending"] == ".nii.gz"
    train = [f"synth_{i:03d}" for i in range(12)]
    test = ["synth_012", "synth_013"]
    names = lambda sub: sorted(p.name for p in (dataset / sub).iterdir())  # noqa: E731
    assert names("imagesTr") == [f"{c}_0000.nii.gz" for c in train]
    for sub in ("labelsTr", "referenceTr"):
        assert names(sub) == [f"{c}.nii.gz" for c in train]
    assert names("imagesTs") == [f"{c}_0000.nii.gz" for c in test]
    for sub in ("labelsTs", "referenceTs"):
        assert names(sub) == [f"{c}.nii.gz" for c in test]
    weak = load_weak_labels(dataset / "weak_labels.json")
    assert weak.target == "percentage" and sorted(weak.cases) == train
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_geometry_is_consistent_and_anisotropic(dataset):
    spacings = set()
    for image_file in sorted((dataset / "imagesTr").iterdir()) + sorted((dataset / "imagesTs").iterdir()):
        case = image_file.name[: -len("_0000.nii.gz")]
        split = image_file.parent.name[-2:]
        image, img = read(image_file)
        assert image.dtype == np.int16 and image.shape == SMALL
        for sub in ("labels", "reference"):
            array, other = read(dataset / f"{sub}{split}" / f"{case}.nii.gz")
            assert array.shape == image.shape
            assert other.GetSpacing() == img.GetSpacing() and other.GetOrigin() == img.GetOrigin()
            assert other.GetDirection() == img.GetDirection()
        sx, sy, sz = img.GetSpacing()
        assert sx == sy and 1.2 <= sx <= 1.8 and 2.0 <= sz <= 3.0
        spacings.add((sx, sz))
    assert len(spacings) > 5  # jittered per case


def test_weak_labels_match_masks_on_disk(dataset):
    weak = json.loads((dataset / "weak_labels.json").read_text())["cases"]
    all_values = []
    for case, targets in weak.items():
        regions, _ = read(dataset / "labelsTr" / f"{case}.nii.gz")
        lesion, _ = read(dataset / "referenceTr" / f"{case}.nii.gz")
        assert not np.any((lesion > 0) & (regions == 0)), f"{case}: lesion outside the lungs"
        recomputed = percentages_from_disk(dataset / "labelsTr" / f"{case}.nii.gz",
                                           dataset / "referenceTr" / f"{case}.nii.gz")
        assert sorted(int(k) for k in targets) == sorted(recomputed)  # every region present, nothing else
        for key, value in targets.items():
            assert value == pytest.approx(recomputed[int(key)], abs=0.05 + 1e-9), (case, key)
            assert (value == 0) == (recomputed[int(key)] == 0), (case, key)
        all_values += list(targets.values())
    values = np.array(all_values)
    assert 0.2 <= (values == 0).mean() <= 0.6, "roughly a third to a half of the lobes should be lesion-free"
    assert (values > 50).any(), "some lobes should be severely involved"
    assert ((values > 0) & (values < 25)).any()


def test_montage_of_dataset_and_of_a_case(dataset, tmp_path):
    png = save_dataset_montage(dataset, tmp_path / "sheet.png", max_cases=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    case = generate_case(1, shape=TINY)
    single = save_montage(case.image, case.regions, case.lesion, case.spacing, tmp_path / "one.png", title="one")
    assert single.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and single.stat().st_size > 2000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ctss_target_and_other_file_ending(tmp_path):
    path = write_weak_dataset(tmp_path, 502, n_train=3, n_test=0, seed=1, shape=TINY, target="ctss",
                              file_ending=".mha")
    assert json.loads((path / "dataset.json").read_text())["file_ending"] == ".mha"
    assert not (path / "imagesTs").exists()
    weak = json.loads((path / "weak_labels.json").read_text())
    assert weak["target"] == "ctss"
    load_weak_labels(path / "weak_labels.json")
    for case, targets in weak["cases"].items():
        recomputed = percentages_from_disk(path / "labelsTr" / f"{case}.mha", path / "referenceTr" / f"{case}.mha")
        for key, score in targets.items():
            assert isinstance(score, int) and 0 <= score <= 5
            assert score == percent_to_ctss(recomputed[int(key)])


def test_2d_mode(tmp_path):
    path = write_weak_dataset(tmp_path, 503, n_train=3, n_test=1, seed=2, shape=(64, 48, 56), mode="2d")
    assert json.loads((path / "dataset.json").read_text())["labels"] == LUNG_LABELS_2D
    levels = set()
    for case in ("synth_000", "synth_001", "synth_002"):
        image, img = read(path / "imagesTr" / f"{case}_0000.nii.gz")
        regions, _ = read(path / "labelsTr" / f"{case}.nii.gz")
        assert image.shape == regions.shape == (1, 48, 56)
        assert set(np.unique(regions)) == {0, 1, 2}
        levels.add(img.GetOrigin()[2])
    assert len(levels) == 3  # a different slice level per case
    weak = json.loads((path / "weak_labels.json").read_text())["cases"]
    assert all(set(t) == {"1", "2"} for t in weak.values())


def test_2d_slice_ignores_z_and_looks_like_a_slice_of_a_chest():
    """A 2-D case is a slice of a scan with the default volume's proportions, whatever z the shape gives: a z of 1
    used to squeeze the whole chest into the slice, so that every vessel tree lay in it (aerated lung then had a
    median of about -640 HU and a 75th percentile of about -330 HU)."""
    one, many, two = (generate_case(7, shape=s, mode="2d") for s in ((1, 64, 64), (48, 64, 64), (64, 64)))
    for other in (many, two):
        assert np.array_equal(one.image, other.image) and np.array_equal(one.lesion, other.lesion)
        assert one.origin == other.origin
    assert one.image.shape == (1, 64, 64)
    parenchyma = []
    for seed in range(6):
        case = generate_case(seed, shape=(1, 96, 96), mode="2d")
        parenchyma.append(case.image[(case.regions > 0) & (case.lesion == 0)])
    parenchyma = np.concatenate(parenchyma)
    assert -950 < np.median(parenchyma) < -750
    assert np.percentile(parenchyma, 75) < -650
    assert np.percentile(parenchyma, 99.5) > -400  # vessels are still there


def test_parallel_generation_gives_the_same_arrays(tmp_path):
    serial = write_weak_dataset(tmp_path / "a", 504, n_train=2, n_test=1, seed=4, shape=TINY)
    parallel = write_weak_dataset(tmp_path / "b", 504, n_train=2, n_test=1, seed=4, shape=TINY, num_processes=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.nii.gz"))
    assert len(files) == 9 and files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.nii.gz"))
    for rel in files:
        a, img_a = read(serial / rel)
        b, img_b = read(parallel / rel)
        assert np.array_equal(a, b) and img_a.GetSpacing() == img_b.GetSpacing(), rel
    assert (serial / "weak_labels.json").read_text() == (parallel / "weak_labels.json").read_text()


def test_refuses_to_overwrite_unless_asked(tmp_path):
    first = write_weak_dataset(tmp_path, 505, n_train=1, n_test=0, seed=0, shape=TINY)
    before = read(first / "imagesTr" / "synth_000_0000.nii.gz")[0]
    with pytest.raises(FileExistsError, match="Dataset505_SynthChest"):
        write_weak_dataset(tmp_path, 505, n_train=1, n_test=0, seed=1, shape=TINY)
    with pytest.raises(FileExistsError, match="505"):
        write_weak_dataset(tmp_path, 505, name="Other", n_train=1, n_test=0, shape=TINY)
    assert np.array_equal(read(first / "imagesTr" / "synth_000_0000.nii.gz")[0], before)
    # overwrite replaces our own dataset (also under another name)...
    second = write_weak_dataset(tmp_path, 505, name="Other", n_train=1, n_test=0, seed=1, shape=TINY,
                                overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset505_Other"]
    assert not np.array_equal(read(second / "imagesTr" / "synth_000_0000.nii.gz")[0], before)
    # ...but never a dataset someone else made
    users = tmp_path / "Dataset506_Mine"
    users.mkdir()
    (users / "dataset.json").write_text('{"labels": {"background": 0}}')
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        write_weak_dataset(tmp_path, 506, n_train=1, n_test=0, shape=TINY, overwrite=True)
    assert (users / "dataset.json").is_file()


def test_generate_command(nnunet_env, tmp_path, capsys):
    from nnunetv2_dram.cli import main
    png = tmp_path / "montage.png"
    argv = ["generate", "-d", "507", "--train", "2", "--test", "1", "--shape", *map(str, TINY), "--seed", "5",
            "--target", "ctss", "--montage", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    path = nnunet_env["nnUNet_raw"] / "Dataset507_SynthChest"
    assert str(path) in out and png.stat().st_size > 0
    assert json.loads((path / "weak_labels.json").read_text())["target"] == "ctss"
    assert len(list((path / "imagesTs").iterdir())) == 1
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--mode", "2d"]) == 0
    assert read(path / "imagesTr" / "synth_000_0000.nii.gz")[0].shape == (1,) + TINY[1:]
