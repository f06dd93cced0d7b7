"""One default per flag across the sub-commands: `-f all`, `-device auto` (the GPU when torch sees one, else the
CPU with a notice), resolved by one helper."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_dram.cli import COMMANDS, UserError, build_parser
from nnunetv2_dram.commands.shared_flags import resolve_device

REQUIRED = {"pseudolabels": ["-d", "1", "-o", "2"], "pipeline": ["-d", "1", "-o", "2"], "demo": [],
            "regions": ["-i", "x", "-o", "y"]}


def _defaults(command: str):
    return build_parser().parse_args([command, *REQUIRED.get(command, [])])


def test_every_command_with_a_fold_defaults_to_all():
    with_fold = [c for c in COMMANDS if any(a.dest == "f" for a in _subparser(c)._actions)]
    assert set(with_fold) >= {"pseudolabels", "pipeline"}
    for command in with_fold:
        assert _defaults(command).f == "all", command


def test_every_command_with_a_device_defaults_to_auto():
    with_device = [c for c in COMMANDS if any(a.dest == "device" for a in _subparser(c)._actions)]
    assert set(with_device) == {"demo", "pipeline", "pseudolabels", "regions"}
    for command in with_device:
        action = next(a for a in _subparser(command)._actions if a.dest == "device")
        assert action.option_strings == ["-device"] and action.default == "auto", command
        assert set(action.choices) == {"auto", "cuda", "cpu", "mps"}, command


def _subparser(command: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu_with_a_notice(capsys):
    device = resolve_device("auto", "nnunetv2_dram test")
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert device == "cuda" and err == ""
    else:
        assert device == "cpu"
        assert err.count("\n") == 1 and "nnunetv2_dram test" in err and "CPU" in err


def test_explicit_devices():
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(UserError, match="-device cuda"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is for machines without a GPU")
def test_pipeline_without_device_says_it_runs_on_the_cpu(nnunet_env):
    # the notice comes before anything else: here the dataset does not exist, so nothing else happens
    proc = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), "pipeline", "-d", "999", "-o", "998"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    first, *rest = proc.stderr.splitlines()
    assert first == "nnunetv2_dram pipeline: no GPU visible to torch; running on the CPU (-device cpu)"
    assert "999" in rest[-1] and "Traceback" not in proc.stderr


def test_every_command_with_a_threshold_defaults_to_midpoint_and_refuses_an_unknown_one(nnunet_env):
    with_threshold = [c for c in COMMANDS if any(a.dest == "threshold" for a in _subparser(c)._actions)]
    assert set(with_threshold) == {"pipeline", "pseudolabels"}
    for command in with_threshold:
        assert _defaults(command).threshold == "midpoint", command
        # refused before anything else (the dataset does not even exist)
        proc = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), command, "-d", "999", "-o", "998",
                               "--threshold", "middle", "-device", "cpu"], capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, command
        assert "--threshold 'middle': use calibrated, midpoint, otsu or a number" in proc.stderr, command
