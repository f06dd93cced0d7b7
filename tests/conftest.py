"""Shared fixtures: a private nnU-Net workspace per test, so tests never touch a user's folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnUNet_raw/_preprocessed/_results under tmp_path, our trainers on nnUNet_extTrainer, 2 worker processes."""
    folders = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
        folders[name] = folder
    from nnunetv2_dram.paths import trainers_path
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_path()))
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "f")
    return folders
