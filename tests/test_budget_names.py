"""Training length in the trainer's name, the nnU-Net way: `<Trainer>_<E>epochs[_<I>its]` for every plugin trainer
and stock nnUNetTrainer, found by nnU-Net's own resolver through nnUNet_extTrainer."""
import ast
import inspect
import pickle

import pytest

from nnunetv2_dram.paths import trainers_path
from nnunetv2_dram.training.budget import budget_trainer_name, parse_budget_trainer_name, validation_iterations



def _exposed_trainers() -> list[str]:
    """Every class name the plugin's trainers folder re-exports (its modules are `from ... import Name` shims)."""
    names = set()
    for f in trainers_path().rglob("*.py"):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                names |= {a.asname or a.name for a in node.names if not a.name.startswith("__")}
    return sorted(names - {"nnUNetTrainerBudget"})


PLUGIN_TRAINERS = _exposed_trainers()


@pytest.fixture
def resolve(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_path()))
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name


def test_names_round_trip():
    assert budget_trainer_name("DRAMTrainer", 5, 20) == "DRAMTrainer_5epochs_20its"
    assert budget_trainer_name("CAMTrainer", 12) == "CAMTrainer_12epochs"
    assert parse_budget_trainer_name("DRAMTrainer_5epochs_20its") == ("DRAMTrainer", 5, 20)
    assert parse_budget_trainer_name("nnUNetTrainer_250epochs_NoMirroring_3epochs") == \
        ("nnUNetTrainer_250epochs_NoMirroring", 3, None)
    for not_a_budget in ("DRAMTrainer", "DRAMTrainer_0epochs", "DRAMTrainer_05epochs", "DRAMTrainer_5epochs_its",
                         "DRAMTrainer_5epochs_0its", "_5epochs"):
        assert parse_budget_trainer_name(not_a_budget) is None, not_a_budget
    with pytest.raises(ValueError):
        budget_trainer_name("DRAMTrainer", 0, 5)
    assert validation_iterations(2) == 2 and validation_iterations(40) == 8


def test_the_spec_trainers_are_among_them():
    assert {"DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer"} <= set(PLUGIN_TRAINERS)


@pytest.mark.parametrize("base", PLUGIN_TRAINERS + ["nnUNetTrainer"])
def test_nnunet_resolver_builds_budgeted_subclasses(base, resolve):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    name = f"{base}_3epochs_7its"
    cls = resolve(name)
    assert cls.__name__ == name and cls.__module__ == "nnunetv2_dram.training.budget_trainer"
    assert issubclass(cls, nnUNetTrainer) and cls.__mro__[1].__name__ == (base if base != "nnUNetTrainer"
                                                                          else "StockTrainer")
    assert (cls.budget_epochs, cls.budget_iterations) == (3, 7)
    # nnU-Net records constructor arguments by parameter name: the explicit signature is kept
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "plans", "configuration", "fold",
                                                                 "dataset_json", "device"]
    assert resolve(name) is cls, "the same name gives the same class"
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert resolve(f"{base}_2epochs").budget_iterations is None


def test_nnunets_own_names_stay_nnunets(resolve):
    cls = resolve("nnUNetTrainer_5epochs")
    assert cls.__module__.startswith("nnunetv2.training")


def test_unknown_base_or_malformed_length_is_not_found(resolve):
    for name in ("NoSuchTrainer_5epochs", "DRAMTrainer_0epochs", "DRAMTrainer_5epoch"):
        with pytest.raises(RuntimeError, match="Could not find"):
            resolve(name)


def test_budget_class_of_a_trainer_in_another_extension_folder(tmp_path, monkeypatch):
    # a user's variant in their own nnUNet_extTrainer folder gets budget names too
    (tmp_path / "MyDRAMVariant.py").write_text(
        "import torch\n"
        "from nnunetv2_dram.training.dram_trainers import DRAMTrainer\n\n\n"
        "class MyDRAMVariant(DRAMTrainer):\n"
        "    margin_mm = 20.0\n\n"
        "    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,\n"
        "                 device: torch.device = torch.device('cuda')):\n"
        "        super().__init__(plans, configuration, fold, dataset_json, device)\n")
    monkeypatch.setenv("nnUNet_extTrainer", f"{trainers_path()}:{tmp_path}")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    cls = recursive_find_trainer_class_by_name("MyDRAMVariant_4epochs_10its")
    assert cls.margin_mm == 20.0 and cls.__mro__[1].__name__ == "MyDRAMVariant"


def test_old_name_still_loads(resolve):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    cls = resolve("nnUNetTrainerBudget")
    assert cls.__name__ == "nnUNetTrainerBudget" and issubclass(cls, nnUNetTrainer)


def test_pipeline_trainer_names():
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions
    full = PipelineOptions(dataset="Dataset001_X", new_id=2)
    assert full.trainer_name("DRAMTrainer") == "DRAMTrainer" and full.final_trainer == "nnUNetTrainer"
    short = PipelineOptions(dataset="Dataset001_X", new_id=2, epochs=12, iterations=40)
    assert short.trainer_name("CAMTrainer") == "CAMTrainer_12epochs_40its"
    assert short.final_trainer == "nnUNetTrainer_12epochs_40its"
    # one flag alone: the other keeps nnU-Net's default, always spelled out (never nnU-Net's own _Xepochs class)
    assert PipelineOptions(dataset="Dataset001_X", new_id=2, epochs=5).final_trainer == "nnUNetTrainer_5epochs_250its"
    assert PipelineOptions(dataset="Dataset001_X", new_id=2, iterations=30).trainer_name("DRAMTrainer") == \
        "DRAMTrainer_1000epochs_30its"
    assert PipelineOptions(dataset="Dataset001_X", new_id=2, preset="quick").final_trainer == \
        "nnUNetTrainer_1000epochs_250its"


def test_class_unpickles_in_a_fresh_process_without_nnunet_ext_trainer(resolve):
    # DDP workers and multiprocessing pools may receive the class by reference: the name alone rebuilds it
    import os
    import subprocess
    import sys
    data = pickle.dumps(resolve("DRAMTrainerNoRefine_2epochs_4its"))
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    code = ("import pickle, sys; cls = pickle.loads(sys.stdin.buffer.read()); "
            "print(cls.__name__, cls.__mro__[1].__name__, cls.budget_epochs, cls.budget_iterations)")
    out = subprocess.run([sys.executable, "-c", code], input=data, env=env, capture_output=True, check=True).stdout
    assert out.decode().split() == ["DRAMTrainerNoRefine_2epochs_4its", "DRAMTrainerNoRefine", "2", "4"]
