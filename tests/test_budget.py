"""What every plugin trainer takes from the environment at construction (seed, learning rate), and the
environment variables that no longer set the training length."""
import random

import numpy as np
import pytest
import torch

from nnunetv2_dram.training.budget import RETIRED_BUDGET_VARIABLES, TRAINER_VARIABLES, apply_environment_settings


class _Trainer:
    """Only what apply_environment_settings touches; real trainers run through it in the CLI tests."""

    def __init__(self, local_rank=0):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.initial_lr = 1e-2
        self.local_rank = local_rank
        self.log = []

    def print_to_log_file(self, *args):
        self.log.append(" ".join(str(a) for a in args))


class DRAMTrainer_5epochs_20its(_Trainer):
    pass


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in TRAINER_VARIABLES:
        monkeypatch.delenv(k, raising=False)


def test_nothing_set_changes_nothing():
    t = _Trainer()
    apply_environment_settings(t)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.initial_lr) == (1000, 250, 1e-2) and t.log == []


def test_learning_rate_is_applied_and_logged(monkeypatch):
    monkeypatch.setenv("NNUNETV2_DRAM_LR", "1e-3")
    t = _Trainer()
    apply_environment_settings(t)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.initial_lr) == (1000, 250, 1e-3)
    assert any("0.001" in line for line in t.log)


@pytest.mark.parametrize("value", ["fast", "0", "-1e-3", "nan"])
def test_bad_learning_rate_stops_with_its_name(value, monkeypatch):
    monkeypatch.setenv("NNUNETV2_DRAM_LR", value)
    with pytest.raises(SystemExit, match="NNUNETV2_DRAM_LR"):
        apply_environment_settings(_Trainer())


@pytest.mark.parametrize("variable", RETIRED_BUDGET_VARIABLES)
def test_budget_variables_stop_the_trainer_and_name_the_trainer_to_use(variable, monkeypatch):
    # a run meant to be short must not silently train for the full length
    monkeypatch.setenv(variable, "3")
    with pytest.raises(SystemExit, match=f"{variable}.*-tr _Trainer_5epochs_20its"):
        apply_environment_settings(_Trainer())
    with pytest.raises(SystemExit, match="-tr DRAMTrainer_5epochs_20its"):
        apply_environment_settings(DRAMTrainer_5epochs_20its())


def test_seed_makes_initialisation_repeatable(monkeypatch):
    monkeypatch.setenv("NNUNETV2_DRAM_SEED", "5")
    draws = []
    for _ in range(2):
        apply_environment_settings(_Trainer())
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    monkeypatch.setenv("NNUNETV2_DRAM_SEED", "five")
    with pytest.raises(SystemExit, match="NNUNETV2_DRAM_SEED"):
        apply_environment_settings(_Trainer())


def test_seed_differs_per_ddp_rank(monkeypatch):
    # DDP ranks sample regions from their own global RNG: the same seed on every rank gives identical batches
    monkeypatch.setenv("NNUNETV2_DRAM_SEED", "5")
    draws = {}
    for rank in (0, 1, 1):
        t = _Trainer(local_rank=rank)
        apply_environment_settings(t)
        draws.setdefault(rank, []).append(np.random.rand(4).tolist())
    assert draws[0][0] != draws[1][0] and draws[1][0] == draws[1][1]
    assert any("rank 1 = 6" in line for line in t.log)
