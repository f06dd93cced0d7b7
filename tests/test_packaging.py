"""Version, licence, build metadata and the pinned set-up of scripts/run.sh."""
import ast
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _setup_kwargs() -> dict:
    """setup()'s literal keyword arguments, read from setup.py without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass
    return out


def test_version_comes_from_setup_py():
    version = _setup_kwargs()["version"]
    import nnunetv2_dram
    from importlib.metadata import version as installed
    assert nnunetv2_dram.__version__ == installed("nnunetv2_dram") == version
    out = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"nnunetv2_dram {version}"


def test_version_without_an_installed_distribution_is_read_from_setup_py(monkeypatch):
    import importlib.metadata
    import nnunetv2_dram

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert nnunetv2_dram._version() == _setup_kwargs()["version"]


def test_licence_is_the_apache_license_2_0():
    text = (REPO / "LICENSE").read_text()
    assert _setup_kwargs()["license"] == "Apache-2.0"
    for part in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION",
                 "9. Accepting Warranty or Additional Liability", "END OF TERMS AND CONDITIONS",
                 "http://www.apache.org/licenses/LICENSE-2.0"):
        assert part in text
    assert len(text.splitlines()) > 190, "the full text, not a pointer to it"


def test_pyproject_declares_the_setuptools_build_and_leaves_metadata_to_setup_py():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = pyproject["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    names = {Requirement(r).name for r in build["requires"]}
    assert names == {"setuptools", "wheel"}
    assert "project" not in pyproject, "package metadata stays in setup.py"
    kwargs = _setup_kwargs()
    assert kwargs["extras_require"]["test"] and kwargs["entry_points"]["console_scripts"]


def _pins() -> dict:
    lines = (REPO / "requirements" / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {r.name: r for r in reqs}


def test_constraints_pin_one_version_each_inside_setup_py_ranges():
    pins = _pins()
    assert set(pins) == {"torch", "torchvision", "nnunetv2", "pydensecrf2"}
    versions = {}
    for name, req in pins.items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name} must be pinned exactly"
        versions[name] = spec.version
    kwargs = _setup_kwargs()
    ranges = [Requirement(r) for r in kwargs["install_requires"] + kwargs["extras_require"]["crf"]]
    for req in ranges:
        if req.name in versions:
            assert req.specifier.contains(versions[req.name]), (req, versions[req.name])


def _fake_venv(tmp_path: Path, torch_installed: bool) -> tuple[dict, Path]:
    """A venv whose python only records what run.sh asks of it (and the constraints it is given)."""
    log = tmp_path / "calls.log"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/usr/bin/env bash
echo "CALL $*" >> "{log}"
if [ "$1" = "-c" ]; then
  case "$2" in
    "import torch") exit {0 if torch_installed else 1} ;;
    *) exit 1 ;;
  esac
fi
prev=""
for a in "$@"; do
  if [ "$prev" = "-c" ]; then sed 's/^/PIN /' "$a" >> "{log}"; fi
  prev="$a"
done
exit 0
""")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, NNUNETV2_DRAM_VENV=str(tmp_path / "venv"))
    return env, log


def _setup_calls(tmp_path: Path, torch_installed: bool) -> list[str]:
    env, log = _fake_venv(tmp_path, torch_installed)
    subprocess.run(["bash", str(REPO / "scripts" / "run.sh"), "setup"], env=env, check=True, capture_output=True)
    return log.read_text().splitlines()


def test_run_sh_is_valid_bash_without_machine_specific_cases():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "run.sh")], check=True)
    text = (REPO / "scripts" / "run.sh").read_text()
    assert "/etc/" not in text and "requirements/constraints.txt" in text


def test_run_sh_installs_the_pinned_versions(tmp_path):
    calls = _setup_calls(tmp_path, torch_installed=False)
    constraints = str(REPO / "requirements" / "constraints.txt")
    torch_call = next(i for i, c in enumerate(calls) if c.startswith("CALL -m pip install") and " torch " in c + " ")
    assert calls[torch_call].endswith(f"-c {constraints} torch torchvision")
    plugin_call = next(i for i, c in enumerate(calls) if f"-e {REPO}[test]" in c)
    assert plugin_call > torch_call, "torch goes in before nnU-Net"
    assert f"-c {constraints} -e" in calls[plugin_call]
    pins_given = [c for c in calls[plugin_call + 1:] if c.startswith("PIN ")]
    assert {"PIN torch==2.14.1", "PIN nnunetv2==2.8.1", "PIN pydensecrf2==1.1"} <= set(pins_given)


def test_run_sh_keeps_a_torch_that_is_there(tmp_path):
    calls = _setup_calls(tmp_path, torch_installed=True)
    assert not any(c.startswith("CALL -m pip install") and (" torch" in c.split("-e")[0]) for c in calls), calls
    plugin_call = next(i for i, c in enumerate(calls) if "-e " in c and "[test]" in c)
    assert " -c " in calls[plugin_call]
    pins_given = {c for c in calls[plugin_call + 1:] if c.startswith("PIN ")}
    assert "PIN nnunetv2==2.8.1" in pins_given
    assert not any(p.startswith(("PIN torch==", "PIN torchvision==")) for p in pins_given)
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("tmp.*")
                 if p.is_file() and "nnunetv2==" in p.read_text(errors="ignore")]
    assert not leftovers, "the filtered constraints file is removed"
