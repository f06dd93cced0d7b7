"""Synthetic chest CT weak datasets: the embedded default data of the demo, the tests and the benchmarks."""
from nnunetv2_dram.synthetic.chest_ct import LOBE_LABELS, LUNG_LABELS_2D, SyntheticCase, generate_case
from nnunetv2_dram.synthetic.dataset import (SUPPORTED_FILE_ENDINGS, case_ids, case_seed, dataset_folder_name,
                                             dataset_json_for, region_labels_for, write_weak_dataset)
from nnunetv2_dram.synthetic.montage import save_dataset_montage, save_montage

__all__ = ["LOBE_LABELS", "LUNG_LABELS_2D", "SUPPORTED_FILE_ENDINGS", "SyntheticCase", "case_ids", "case_seed",
           "dataset_folder_name", "dataset_json_for", "generate_case", "region_labels_for", "save_dataset_montage",
           "save_montage", "write_weak_dataset"]
