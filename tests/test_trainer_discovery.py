"""nnU-Net's own resolver finds the plugin's trainers through nnUNet_extTrainer (as set up by the README)."""
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_dram.paths import trainers_path

TRAINERS = ["DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer", "DRAMTrainerWithCRF",
            "DRAMTrainerCoarseRefinement", "DRAMTrainerWithoutHead", "DRAMTrainerHeadOnly",
            "DRAMTrainerPointwiseHead", "DRAMTrainerDecoderHead", "DRAMTrainerWithoutAttention",
            "DRAMTrainerHalfDRAMWeight", "DRAMTrainerFullDRAMWeight", "DRAMTrainerWithAttention",
            "nnUNetTrainerBudget"]


def test_trainers_path_command_prints_the_trainers_folder():
    out = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), "trainers-path"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert Path(out) == trainers_path()
    assert (Path(out) / "DRAMTrainer.py").is_file()


@pytest.mark.parametrize("name", TRAINERS)
def test_nnunet_resolver_finds_plugin_trainer(name, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_path()))
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    cls = recursive_find_trainer_class_by_name(name)
    assert cls.__name__ == name and issubclass(cls, nnUNetTrainer)
    assert cls.__module__.startswith("nnunetv2_dram."), "the shim must re-export the class from the package"


def test_resolver_fails_without_the_variable(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    with pytest.raises(RuntimeError, match="nnUNet_extTrainer"):
        recursive_find_trainer_class_by_name("DRAMTrainer")


def test_shims_import_nothing_but_the_package():
    # each shim is a docstring and one re-export: nnU-Net imports every module of the folder while searching
    import ast
    for f in trainers_path().glob("*.py"):
        body = ast.parse(f.read_text()).body
        code = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert all(isinstance(n, ast.ImportFrom) and n.module.startswith("nnunetv2_dram.") for n in code), f.name


@pytest.mark.parametrize("value,expected", [(None, False), ("f", False), ("t", True), ("true", True)])
def test_weak_trainers_compile_only_when_asked(value, expected, monkeypatch):
    # nnU-Net compiles by default on a GPU; our refinement under torch.compile was far slower to start (docs)
    import torch
    from nnunetv2_dram.training.dram_trainers import DRAMTrainer
    if value is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", value)
    trainer = object.__new__(DRAMTrainer)  # the decision needs only the device
    trainer.device = torch.device("cuda")
    assert trainer._do_i_compile() is expected
