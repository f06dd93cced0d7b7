"""nnU-Net's own command-line programs, called as a user would call them (real CLI, real folders)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


class CommandFailed(RuntimeError):
    pass


def program_command(name: str) -> list[str]:
    """How to start a console script: the one next to our interpreter (a venv's bin/), else on PATH, else its
    entry point through this interpreter (installations without console scripts, e.g. `pip install --target`)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return [str(here)]
    found = shutil.which(name)
    if found:
        return [found]
    from importlib.metadata import entry_points
    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    if not eps:
        raise CommandFailed(f"'{name}' not found: is nnunetv2 installed in this environment ({sys.executable})?")
    module, _, func = eps[0].value.partition(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func} as f; "
                                  f"sys.exit(f())"]


def run_nnunet(name: str, *args, env: dict | None = None, log_file: str | os.PathLike | None = None,
               quiet: bool = False) -> float:
    """Run an nnU-Net program; returns seconds taken. Output goes to the console and/or `log_file`."""
    cmd = [*program_command(name), *[str(a) for a in args]]
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    full_env.setdefault("PYTHONUNBUFFERED", "1")  # progress reaches the log as it happens
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    if log_file is None and not quiet:
        rc = subprocess.call(cmd, env=full_env)
        tail = ""
    else:
        log_file = Path(log_file) if log_file else None
        if log_file:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        with subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as proc:
            lines = []
            with (open(log_file, "a") if log_file else open(os.devnull, "w")) as log:
                for line in proc.stdout:
                    log.write(line)
                    lines.append(line)
                    lines = lines[-40:]
                    if not quiet:
                        sys.stdout.write(line)
            rc = proc.wait()
        tail = "".join(lines)
    dt = time.time() - t0
    if rc != 0:
        raise CommandFailed(f"{name} failed with exit code {rc}" + (f"; last output:\n{tail}" if tail else "")
                            + (f"\nfull log: {log_file}" if log_file else ""))
    return dt
