"""Where nnU-Net's three folders and our trainers live.

nnU-Net reads `nnUNet_raw`, `nnUNet_preprocessed`, `nnUNet_results` from the environment each time it needs
them, so filling in missing ones here (before any nnU-Net command runs) is enough for both in-process calls
and the subprocesses we start.
"""
from __future__ import annotations

import os
from pathlib import Path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
WORKSPACE_ENV = "NNUNETV2_DRAM_WORKSPACE"


def default_workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV, Path.home() / "nnunetv2_dram_workspace")).expanduser()


def ensure_nnunet_paths(workspace: str | os.PathLike | None = None, verbose: bool = True) -> dict[str, str]:
    """Fill in the nnU-Net folder variables that are not set, under `workspace` (default: $NNUNETV2_DRAM_WORKSPACE
    or ~/nnunetv2_dram_workspace). Set ones are left alone. Also points nnUNet_extTrainer at our trainers."""
    root = Path(workspace).expanduser() if workspace is not None else default_workspace()
    filled = []
    for name in NNUNET_FOLDERS:
        if not os.environ.get(name):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(folder)
            filled.append(name)
    ensure_ext_trainer_path()
    if filled and verbose:
        print(f"[nnunetv2_dram] {', '.join(filled)} not set; using {root}")
    return {name: os.environ[name] for name in NNUNET_FOLDERS}


def trainers_path() -> Path:
    """The folder to put into `nnUNet_extTrainer` (works for editable and regular installs)."""
    try:
        import nnunetv2_dram.ext_trainers as ext  # installed: mapped from the repo's trainers/
        return Path(ext.__file__).resolve().parent
    except ImportError:  # running from a source checkout without installing
        here = Path(__file__).resolve().parent.parent / "trainers"
        if here.is_dir():
            return here
        raise


def ensure_ext_trainer_path() -> None:
    """Add our trainers folder to nnUNet_extTrainer (keeping whatever the user has there)."""
    ours = str(trainers_path())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if ours not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [ours])
