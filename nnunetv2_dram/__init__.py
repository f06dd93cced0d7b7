"""nnunetv2_dram: weakly supervised lesion segmentation with dense regression activation maps, inside nnU-Net v2.

Importing this package is cheap on purpose: nnU-Net's trainer search imports the shims in `trainers/`,
which import from here, and nothing heavy may run at that moment. `__version__` is looked up on first use.
"""
from __future__ import annotations

DISTRIBUTION = "nnunetv2_dram"


def _version() -> str:
    """The installed distribution's version (setup.py's `version`); in an uninstalled source checkout, read from
    setup.py itself."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        import re
        from pathlib import Path
        setup_py = Path(__file__).resolve().parent.parent / "setup.py"
        found = re.search(r"""\bversion\s*=\s*["']([^"']+)["']""",
                          setup_py.read_text(encoding="utf-8")) if setup_py.is_file() else None
        return found.group(1) if found else "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
