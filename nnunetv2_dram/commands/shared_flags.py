"""Flags that several commands share, defined once so that each has one default everywhere:
`-f` (fold, default `all`), `-device` (default `auto`: the GPU when torch sees one, else the CPU) and the
pseudo-label `--threshold` (default `midpoint`)."""
from __future__ import annotations

import sys

DEFAULT_FOLD = "all"
DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
DEFAULT_DEVICE = "auto"


def add_fold_flag(parser, what: str) -> None:
    parser.add_argument("-f", default=DEFAULT_FOLD,
                        help=f"{what}: 0..4 or 'all' (default: {DEFAULT_FOLD}, every training case)")


def add_device_flag(parser, what: str) -> None:
    parser.add_argument("-device", dest="device", default=DEFAULT_DEVICE, choices=DEVICE_CHOICES,
                        help=f"device for {what}: auto (default: cuda when torch sees a GPU, else cpu), cuda, cpu "
                             f"or mps")


def gpu_available() -> bool:
    import torch
    return torch.cuda.is_available()


def resolve_device(requested: str, command: str = "nnunetv2_dram") -> str:
    """The device a command runs on. 'auto' becomes 'cuda' when torch sees a GPU, else 'cpu' with a one-line notice
    on stderr; an explicit 'cuda' or 'mps' that torch cannot use is a UserError (nothing has run yet)."""
    from nnunetv2_dram.cli import UserError
    import torch
    if requested not in DEVICE_CHOICES:
        raise UserError(f"-device {requested!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if gpu_available():
            return "cuda"
        print(f"{command}: no GPU visible to torch; running on the CPU (-device cpu)", file=sys.stderr, flush=True)
        return "cpu"
    if requested == "cuda" and not gpu_available():
        raise UserError("-device cuda but torch sees no CUDA device; use -device cpu (or leave -device out: "
                        "auto picks the CPU)")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("-device mps but torch sees no MPS device; use -device cpu (or leave -device out)")
    return requested


THRESHOLD_RULES = ("calibrated", "midpoint", "otsu")


def add_threshold_flag(parser, help_text: str) -> None:
    from nnunetv2_dram.pseudo_labels.thresholds import DEFAULT_THRESHOLD
    parser.add_argument("--threshold", default=DEFAULT_THRESHOLD, help=help_text)


def check_threshold(value: str) -> str:
    """A pseudo-label threshold: one of THRESHOLD_RULES or a number; anything else is a UserError before any work."""
    from nnunetv2_dram.cli import UserError
    if value in THRESHOLD_RULES:
        return value
    try:
        float(value)
    except ValueError:
        raise UserError(f"--threshold {value!r}: use {', '.join(THRESHOLD_RULES)} or a number")
    return value
