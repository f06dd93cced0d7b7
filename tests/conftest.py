"""Shared fixtures: a private nnU-Net workspace per test, so tests never touch a user's folders."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them crawl."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class Workspace:
    """A private nnU-Net workspace with a generated, planned and preprocessed weak dataset."""

    def __init__(self, root: Path):
        self.root = root
        self.raw, self.preprocessed, self.results = (root / n for n in
                                                     ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        from nnunetv2_dram.paths import trainers_path
        self.env = {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                    "nnUNet_results": str(self.results), "nnUNet_extTrainer": str(trainers_path()),
                    "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f",
                    "OMP_NUM_THREADS": "2"}

    def environ(self, **extra) -> dict:
        env = dict(os.environ)
        from nnunetv2_dram.training.budget import TRAINER_VARIABLES
        for k in TRAINER_VARIABLES:
            env.pop(k, None)
        env.update(self.env)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, program: str, *args, check: bool = True, **env):
        import subprocess
        import sys
        exe = Path(sys.executable).parent / program
        proc = subprocess.run([str(exe), *map(str, args)], env=self.environ(**env), capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{program} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc


def make_workspace(root: Path, dataset_id: int, mode: str = "3d", n_train: int = 6, n_test: int = 2,
                   shape=(32, 64, 64), target: str = "percentage", configuration: str = "3d_fullres",
                   seed: int = 0) -> tuple[Workspace, str]:
    """Generate a synthetic weak dataset and plan/preprocess it with the compact `quick` plans."""
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions, plan_and_preprocess
    from nnunetv2_dram.synthetic.dataset import write_weak_dataset
    ws = Workspace(root)
    for folder in (ws.raw, ws.preprocessed, ws.results):
        folder.mkdir(parents=True, exist_ok=True)
    path = write_weak_dataset(ws.raw, dataset_id, n_train=n_train, n_test=n_test, shape=shape, mode=mode,
                              target=target, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ws.env.items():
            mp.setenv(k, v)
        plan_and_preprocess(PipelineOptions(dataset=path.name, new_id=0, configuration=configuration,
                                            preset="quick", num_processes=2), path.name)
    return ws, path.name


@pytest.fixture(scope="session")
def weak3d(tmp_path_factory):
    """(workspace, dataset name): 3-D synthetic chest CTs, planned with nnUNetPlans_quick."""
    return make_workspace(tmp_path_factory.mktemp("ws3d"), 701)


@pytest.fixture(scope="session")
def weak2d(tmp_path_factory):
    """(workspace, dataset name): 2-D (one slice per case, left/right lung) synthetic data, CTSS targets."""
    return make_workspace(tmp_path_factory.mktemp("ws2d"), 702, mode="2d", n_train=8, n_test=2,
                          shape=(1, 96, 96), target="ctss", configuration="2d")


@contextmanager
def edited_weak_labels(ws: Workspace, dataset: str, edit):
    """Temporarily change a dataset's weak_labels.json (edit(cases) -> the case it broke); restored afterwards."""
    path = ws.raw / dataset / "weak_labels.json"
    original = path.read_bytes()
    try:
        weak = json.loads(original)
        case = edit(weak["cases"])
        path.write_text(json.dumps(weak))
        yield case
    finally:
        path.write_bytes(original)
