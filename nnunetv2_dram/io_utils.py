"""Small file helpers shared by every stage: nothing is ever half-written.

Writers produce a temporary file next to the target (same extension, so image writers pick the right
format) and rename it into place only once it is complete.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from nnunetv2_dram.weak_labels.format import atomic_write_text  # noqa: F401  (re-exported)

COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd", ".tar.gz")


def split_suffix(name: str) -> tuple[str, str]:
    """('CASE_0000', '.nii.gz') for 'CASE_0000.nii.gz'."""
    for s in COMPOUND_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)], s
    p = Path(name)
    return p.stem if p.suffix else name, p.suffix


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder, with the target's extension; rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = split_suffix(path.name)
    tmp = path.parent / f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_sitk_image(image, path: str | os.PathLike, compress: bool = True) -> None:
    """SimpleITK image -> file, atomically."""
    import SimpleITK as sitk
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a whole folder under a temporary name next to `path`, rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
