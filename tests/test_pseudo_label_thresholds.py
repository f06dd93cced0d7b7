"""From a lesion map to a pseudo label: calibrated selection, its tie-breaking, CTSS 1's lower bound, and maps that
keep their lobe-edge values when resampled."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_dram.inference.region_inference import fill_outside_regions
from nnunetv2_dram.pseudo_labels.thresholds import pseudo_label, threshold_region
from nnunetv2_dram.weak_labels.format import CTSS1_MIN_PERCENT, parse_region_value


def test_calibrated_selection_takes_the_map_at_one_half_when_it_fits():
    p = np.array([0.9, 0.8, 0.2, 0.1])
    target, _ = parse_region_value([25, 75], "percentage")
    sel, thr = threshold_region(p, target)
    assert sel.tolist() == [True, True, False, False] and thr == 0.5


def test_ties_are_broken_by_the_map_before_the_crf_not_by_position():
    after_crf = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # saturated by the CRF
    before_crf = np.array([0.55, 0.6, 0.9, 0.95, 0.1, 0.2])
    target, _ = parse_region_value(50.0, "percentage")  # 3 of 6
    by_position, _ = threshold_region(after_crf, target)
    assert by_position.tolist() == [True, True, True, False, False, False]
    by_map, _ = threshold_region(after_crf, target, tie_break=before_crf)
    assert by_map.tolist() == [False, True, True, True, False, False]
    regions = np.ones(6, dtype=int)
    label = pseudo_label(after_crf, regions, "calibrated", {1: target}, tie_break=before_crf)
    assert label.tolist() == [0, 1, 1, 1, 0, 0]


def test_ctss_1_means_some_lesion():
    target, _ = parse_region_value(1, "ctss")
    assert target.low == CTSS1_MIN_PERCENT > 0 and target.high == 5.0
    p = np.full(4000, 0.1)
    p[7] = 0.3  # the map says 0 %: CTSS 1 still gets its most probable voxels
    sel, _ = threshold_region(p, target)
    assert sel.sum() == round(CTSS1_MIN_PERCENT / 100 * 4000) and sel[7]
    zero, _ = parse_region_value(0, "ctss")
    assert threshold_region(p, zero)[0].sum() == 0


def test_midpoint_selection_takes_the_middle_of_the_interval_whatever_the_map_says():
    p = np.linspace(0.99, 0.01, 200)  # half the region above 0.5
    ctss2, _ = parse_region_value(2, "ctss")  # 5-25 %
    calibrated, _ = threshold_region(p, ctss2)
    assert calibrated.sum() == 50 and calibrated[:50].all()  # the map at 0.5 (50 %) clipped to the interval's 25 %
    middle, _ = threshold_region(p, ctss2, midpoint=True)
    assert middle.sum() == 30 and middle[:30].all()  # 15 % of 200 voxels, the most probable ones
    narrow = np.linspace(0.3, 0.01, 200)  # the map at 0.5 says 0 %
    assert threshold_region(narrow, ctss2)[0].sum() == 10 and threshold_region(narrow, ctss2, midpoint=True)[0].sum() == 30
    exact, _ = parse_region_value(12.5, "percentage")  # an exact percentage: both rules take its count
    assert threshold_region(p, exact, midpoint=True)[0].sum() == threshold_region(p, exact)[0].sum() == 25
    zero, _ = parse_region_value(0, "ctss")
    assert threshold_region(p, zero, midpoint=True)[0].sum() == 0
    regions = np.repeat([1, 2], 100)
    label = pseudo_label(np.concatenate([p[::2], p[::2]]), regions, "midpoint", {1: ctss2, 2: zero})
    assert label[:100].sum() == 15 and label[100:].sum() == 0


def test_a_resampled_map_keeps_its_lobe_edge_values():
    """A sub-pleural lesion at the lobe's border: resampled as it is, its edge is averaged with the zeros outside the
    lobe; extended outwards first, it keeps its value."""
    prob = np.zeros((1, 40, 40), np.float32)
    inside = np.zeros_like(prob, dtype=bool)
    inside[:, 5:35, 10:30] = True
    prob[:, 5:35, 10:14] = 0.9  # lesion along the left border of the lobe
    prob[inside & (prob == 0)] = 0.05

    def upsample(a):
        return F.interpolate(torch.from_numpy(a)[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
    fine_inside = upsample(inside.astype(np.float32)).numpy() > 0.5
    damped = upsample(prob).numpy()[fine_inside & (upsample(prob).numpy() > 0.3)]
    filled = fill_outside_regions(prob, inside, (1.0, 1.0))
    assert np.array_equal(filled[inside], prob[inside])
    edge = upsample(filled).numpy()[:, 10:70, 20:22][fine_inside[:, 10:70, 20:22]]
    assert edge.min() > 0.85  # the lesion's outermost fine voxels stay lesion
    assert upsample(prob).numpy()[:, 10:70, 20:22][fine_inside[:, 10:70, 20:22]].min() < 0.75  # and would not have
    assert damped.size > 0


@pytest.mark.parametrize("spacing", [None, (3.0, 1.0, 1.0)])
def test_filling_is_a_no_op_without_an_outside(spacing):
    prob = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    assert np.array_equal(fill_outside_regions(prob, np.ones_like(prob, dtype=bool), spacing), prob)
