"""The environment settings every plugin trainer reads at construction (budget, seed, learning rate)."""
import random

import numpy as np
import pytest
import torch

from nnunetv2_dram.training.budget import TRAINER_VARIABLES, apply_training_budget


class _Trainer:
    """Only what apply_training_budget touches; a real trainer runs through it in the CLI tests."""

    def __init__(self):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.initial_lr = 1e-2
        self.log = []

    def print_to_log_file(self, *args):
        self.log.append(" ".join(str(a) for a in args))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in TRAINER_VARIABLES:
        monkeypatch.delenv(k, raising=False)


def test_nothing_set_changes_nothing():
    t = _Trainer()
    assert apply_training_budget(t) == {}
    assert (t.num_epochs, t.num_iterations_per_epoch, t.initial_lr) == (1000, 250, 1e-2) and t.log == []


def test_budget_and_learning_rate_are_applied_and_logged(monkeypatch):
    monkeypatch.setenv("NNUNETV2_DRAM_EPOCHS", "3")
    monkeypatch.setenv("NNUNETV2_DRAM_ITERATIONS", "7")
    monkeypatch.setenv("NNUNETV2_DRAM_LR", "1e-3")
    t = _Trainer()
    apply_training_budget(t)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.initial_lr) == (3, 7, 1e-3)
    assert any("0.001" in line for line in t.log) and any("'num_epochs': 3" in line for line in t.log)


@pytest.mark.parametrize("value", ["fast", "0", "-1e-3", "nan"])
def test_bad_learning_rate_stops_with_its_name(value, monkeypatch):
    monkeypatch.setenv("NNUNETV2_DRAM_LR", value)
    with pytest.raises(SystemExit, match="NNUNETV2_DRAM_LR"):
        apply_training_budget(_Trainer())


def test_seed_makes_initialisation_repeatable(monkeypatch):
    monkeypatch.setenv("NNUNETV2_DRAM_SEED", "5")
    draws = []
    for _ in range(2):
        apply_training_budget(_Trainer())
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    monkeypatch.setenv("NNUNETV2_DRAM_SEED", "five")
    with pytest.raises(SystemExit, match="NNUNETV2_DRAM_SEED"):
        apply_training_budget(_Trainer())
