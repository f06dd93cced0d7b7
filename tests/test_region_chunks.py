"""Region chunks keep the whole region in view and its lesion fraction, through resampling and augmentation."""
import numpy as np
import pytest

from nnunetv2_dram.synthetic.chest_ct import generate_case
from nnunetv2_dram.training.region_chunks import (ChunkSpec, balanced_probabilities, build_region_samples,
                                                  extract_chunk, paste_chunk, region_bboxes)
from nnunetv2_dram.weak_labels.format import parse_weak_labels, FORMAT

# stated tolerance: after fitting a region into the chunk (shrinking it up to ~2x) and augmenting it, its
# lesion fraction stays within 2 percentage points + 10 % of itself of the true fraction
ABS_TOL, REL_TOL = 0.02, 0.10


@pytest.fixture(scope="module")
def case():
    # the first seed whose case has lesions in at least three regions
    for seed in range(50):
        c = generate_case(seed, shape=(40, 96, 96))
        if sum(v > 1.0 for v in c.region_percent.values()) >= 3:
            return c
    raise AssertionError("no suitable synthetic case")


def _arrays(case):
    data = case.image[None].astype(np.float32) / 1000.0
    seg = case.regions[None].astype(np.int16)
    return data, seg, case.lesion[None].astype(np.float32)


@pytest.mark.parametrize("augment", [False, True])
def test_chunk_keeps_whole_region_and_fraction(case, augment):
    data, seg, lesion = _arrays(case)
    spec = ChunkSpec.from_configuration((32, 48, 48), case.spacing, margin_mm=10.0)
    samples, _ = build_region_samples({"c": region_bboxes(seg)}, None)
    assert {s.region for s in samples} == set(np.unique(case.regions)) - {0}
    rng = np.random.default_rng(0)
    for s in samples:
        for _ in range(3 if augment else 1):
            img, reg, placement, ext = extract_chunk(
                data, seg, s, spec, rng=rng, zoom_jitter=(0.8, 1.0) if augment else None,
                random_position=augment, mirror_axes=(0, 1, 2) if augment else (), extra=lesion)
            assert img.shape == (1, 32, 48, 48) and reg.shape == (1, 32, 48, 48)
            r = reg[0].numpy() > 0
            # whole region in view: its voxel count is the original count times the zoom^3 (up to resampling of the outline)
            zoom = placement.resized_shape[0] / (placement.crop[0][1] - placement.crop[0][0])
            assert r.sum() == pytest.approx(s.voxels * zoom ** 3, rel=0.25)
            true = case.lesion[case.regions == s.region].mean()
            got = ext[0].numpy()[r].mean()
            assert abs(got - true) <= ABS_TOL + REL_TOL * true, (s.region, true, got)
            # outside the region the image is one constant (masked), inside it is the CT
            outside = img[0].numpy()[~r]
            assert np.ptp(outside) == 0


def test_paste_back_restores_the_region(case):
    data, seg, lesion = _arrays(case)
    spec = ChunkSpec.from_configuration((32, 48, 48), case.spacing, margin_mm=10.0)
    samples, _ = build_region_samples({"c": region_bboxes(seg)}, None)
    out = np.zeros(case.regions.shape, np.float32)
    for s in samples:
        _, reg, placement, ext = extract_chunk(data, seg, s, spec, extra=lesion)
        paste_chunk(ext, placement, case.regions == s.region, out)
    inside = case.regions > 0
    assert np.all(out[~inside] == 0)
    # the round trip (shrink, then grow back) blurs lesion outlines but keeps them where they were
    pasted = out[inside] > 0.5
    truth = case.lesion[inside] > 0
    iou = (pasted & truth).sum() / max((pasted | truth).sum(), 1)
    assert iou > 0.6


def test_two_d_chunks_need_one_slice():
    data = np.zeros((1, 2, 20, 20), np.float32)
    seg = np.ones((1, 2, 20, 20), np.int16)
    s, _ = build_region_samples({"c": region_bboxes(seg)}, None)
    spec = ChunkSpec.from_configuration((16, 16), (1.0, 1.0))
    with pytest.raises(ValueError, match="one slice per case"):
        extract_chunk(data, seg, s[0], spec)


def test_samples_follow_weak_labels_and_balance_bins():
    seg = np.zeros((1, 4, 8, 8), np.int16)
    seg[0, :, :4] = 1
    seg[0, :, 4:] = 2
    index = {f"c{i}": region_bboxes(seg) for i in range(4)}
    weak, problems = parse_weak_labels({"format": FORMAT, "target": "percentage", "cases": {
        "c0": {"1": 0, "2": 0}, "c1": {"1": 0, "2": 0}, "c2": {"1": 0, "2": 40}, "c3": {"1": 0, "3": 5}}})
    assert not problems
    samples, problems = build_region_samples(index, weak)
    # region 3 has a target but no voxels: reported, naming case and region
    assert len(problems) == 1 and problems[0].case == "c3" and problems[0].region == 3
    assert len(samples) == 7  # c3/2 has no target: present but unsupervised
    p = balanced_probabilities(samples)
    bins = np.array([s.bin for s in samples])
    # every severity bin is drawn equally often in expectation
    assert p[bins == 0].sum() == pytest.approx(p[bins != 0].sum())
    missing, problems = build_region_samples({"cX": region_bboxes(seg)}, weak)
    assert not missing and problems[0].case == "cX" and "no entry" in problems[0].message


def test_a_chunks_spacing_is_the_zoomed_spacing(case):
    """The refinement's CRF measures in mm: a chunk shrunk by a zoom of z has voxels 1/z times the size."""
    data, seg, _ = _arrays(case)
    spec = ChunkSpec.from_configuration((16, 24, 24), case.spacing, margin_mm=10.0)
    samples, _ = build_region_samples({"c": region_bboxes(seg)}, None)
    rng = np.random.default_rng(1)
    _, _, placement, _ = extract_chunk(data, seg, samples[0], spec, rng=rng, zoom_jitter=(0.8, 0.8))
    crop = [b - a for a, b in placement.crop]
    assert all(r < c for r, c in zip(placement.resized_shape, crop))  # this chunk was shrunk
    spacing = spec.chunk_spacing(placement)
    assert spacing == pytest.approx([s * c / r for s, c, r in zip(case.spacing, crop, placement.resized_shape)])
    # the chunk's physical extent is the crop's
    assert [s * r for s, r in zip(spacing, placement.resized_shape)] == pytest.approx(
        [s * c for s, c in zip(case.spacing, crop)])
