"""The weak dataset format (docs/reference.md, "Weak dataset"): weak_labels.json and its checker."""
from nnunetv2_dram.weak_labels.format import (CTSS_BANDS, FILENAME, FORMAT, RegionTarget, WeakLabels,
                                              load_weak_labels, parse_weak_labels, percent_to_ctss,
                                              read_weak_labels, save_weak_labels)
from nnunetv2_dram.weak_labels.problems import Problem, WeakDatasetError
from nnunetv2_dram.weak_labels.checker import (check_setup, check_weak_dataset, inspect_weak_dataset,
                                               resolve_raw_dataset_dir)
