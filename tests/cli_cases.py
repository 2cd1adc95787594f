"""Helpers of the bad-input tests: cases run through tests/cli_driver.py, snapshots of
the folders a case must leave alone, and the one-line-error verdict.

A bad-input case passes when its command exits with status 2 after exactly one
`error:` line, the last line it prints, which holds every needle of the case (the
field and the fix), with no traceback, and the folders it was given are unchanged
byte for byte (or were never created)."""
import json
import os
import pathlib
import subprocess
import sys

from conftest import ROOT, subprocess_env


def write(path, text, mode=None):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)
    return str(path)


def snapshot(path):
    """Every file and folder under `path`: its mode, and its bytes for files."""
    if not os.path.lexists(path):
        return None
    os.chmod(path, os.stat(path).st_mode | 0o700)  # to look inside a sealed case
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            found[os.path.relpath(full, path)] = (
                st.st_mode, pathlib.Path(full).read_bytes() if name in files else None)
    return found


def run_driver(runs, spec_path, env_extra=None):
    """Runs every {"cli", "argv", "env", "out"} of `runs` through the driver (a child
    per case); returns [(exit status, stdout, stderr)] in order."""
    pathlib.Path(spec_path).write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_driver.py"),
                           str(spec_path)], cwd=ROOT, env=subprocess_env(env_extra),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = []
    for run in runs:
        status, stdout, stderr = (pathlib.Path(f"{run['out']}.{s}").read_text()
                                  for s in ("status", "stdout", "stderr"))
        out.append((status, stdout, stderr))
    return out


def one_line_problem(needles, status, err, before, after):
    """What is wrong with a case's outcome (see the module docstring), or None."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    last = ([line for line in err.splitlines() if line.strip()] or [""])[-1]
    if "Traceback" in err:
        return f"a traceback: {err[-1500:]}"
    if len(errors) != 1 or last != errors[0]:
        return f"not exactly one error line, last: {err[-1500:]}"
    missing = [n for n in needles if n not in last]
    if missing:
        return f"{missing} not in {last!r}"
    if status != "2":
        return f"exit status {status}: {last}"
    if after != before:
        return f"files changed: {sorted(set(after or {}) ^ set(before or {})) or 'contents'}"
    return None
