"""The weak trainers' code under torch.distributed, as `nnUNetv2_train ... -num_gpus N` runs it: two CPU
processes (gloo backend) on a generated weak dataset. Covers the all-reduce of the region metrics and that every
rank draws its own region samples (with NNUNETV2_DRAM_SEED: seed + rank)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

TRAINER = "DRAMTrainerNoRefine"
BATCHES = 6
# per rank: (mean training loss, region errors of its batches)
RANK_OUTPUTS = {0: (1.0, [1.0, 2.0, 3.0]), 1: (3.0, [10.0])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, env: dict, dataset: str, out_dir: str):
    """One DDP rank: build the trainer as nnU-Net's run_ddp does (process group first), then its data loader and
    epoch-end hooks."""
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        from nnunetv2.run.run_training import get_trainer_from_args
        trainer = get_trainer_from_args(dataset, "3d_fullres", "all", TRAINER, "nnUNetPlans_quick",
                                        device=torch.device("cpu"))
        assert trainer.is_ddp and trainer.local_rank == rank
        # nnU-Net puts a DDP trainer on cuda:<rank>; the plugin's data and metric code runs on the CPU here
        trainer.device = torch.device("cpu")
        trainer._set_batch_size_and_oversample()
        mt_train, _ = trainer.get_dataloaders()
        drawn = [[list(k) for k in next(mt_train)["keys"]] for _ in range(BATCHES)]
        loss, errors = RANK_OUTPUTS[rank]
        trainer.on_train_epoch_end([{"loss": np.array(loss), "abs_err": np.array(errors[:1])},
                                    {"loss": np.array(loss), "abs_err": np.array(errors[1:])}])
        trainer.on_validation_epoch_end([{"loss": np.array(loss), "abs_err": np.array(errors),
                                          "bin_hit": np.array([1.0] * len(errors))}])
        hits = trainer._all_reduce_mean([0.0], np.array([1.0, 0.0]) if rank == 0 else np.array([1.0, 1.0, 1.0]))
        logged = {k: trainer.logger.get_value(k, step=0) for k in ("train_losses", "train_region_mae", "val_losses",
                                                                   "val_region_mae")}
        result = {"batch_size": trainer.batch_size, "drawn": drawn, "train_loss": logged["train_losses"],
                  "train_mae": logged["train_region_mae"], "val_loss": logged["val_losses"],
                  "val_mae": logged["val_region_mae"], "hit_rate": hits[1]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        # no rank may tear down its gloo connections while the other still reads from them
        dist.barrier()
    finally:
        _tear_down_in_order(dist, rank, world_size, out_dir)


def _tear_down_in_order(dist, rank: int, world_size: int, out_dir: str, timeout_s: float = 60.0) -> None:
    """Rank 0 hosts the TCP store: it tears down last, after every other rank has (a rank whose store vanished while
    it was still tearing down aborted, "terminate called without an active exception")."""
    import time
    if rank != 0:
        dist.destroy_process_group()
        Path(out_dir, f"down{rank}").touch()
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(Path(out_dir, f"down{r}").exists() for r in range(1, world_size)):
        time.sleep(0.05)
    dist.destroy_process_group()


def _run_ranks(ws, dataset, tmp_path, **env) -> list[dict]:
    import torch.multiprocessing as mp
    run_env = ws.environ(**env)
    mp.spawn(_rank_main, args=(2, _free_port(), run_env, dataset, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("seed", [None, "3"])
def test_ranks_share_region_metrics_and_draw_their_own_regions(weak3d, tmp_path, seed):
    ws, dataset = weak3d
    ranks = _run_ranks(ws, dataset, tmp_path, **({"NNUNETV2_DRAM_SEED": seed} if seed else {}))
    # nnU-Net splits the plans' batch of 2 over the ranks
    assert [r["batch_size"] for r in ranks] == [1, 1]
    # every rank logs the same numbers: losses averaged over ranks, region errors over all regions of all ranks
    for r in ranks:
        assert r["train_loss"] == pytest.approx(2.0) and r["val_loss"] == pytest.approx(2.0)
        assert r["train_mae"] == pytest.approx(4.0) and r["val_mae"] == pytest.approx(4.0)
        assert r["hit_rate"] == pytest.approx(0.8)
    # each rank draws its own region samples, also when seeded (seed + rank)
    assert ranks[0]["drawn"] != ranks[1]["drawn"], ranks
    if seed:
        again = _run_ranks(ws, dataset, tmp_path, NNUNETV2_DRAM_SEED=seed)
        assert [r["drawn"] for r in again] == [r["drawn"] for r in ranks], "seeded runs repeat"
