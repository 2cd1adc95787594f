"""Runs jaxmix's command lines once per case, cheaply: `python cli_driver.py CASES.json`.

The driver imports train.py, the other command-line modules and the libraries they use
once, without starting a JAX backend, then forks a child per case. The child sets the
case's environment, puts its stdout and stderr in files and runs the case's command:
train.py's entry point exactly as `python train.py ARGS` does
(`absl.app.run(train.main, flags_parser=train.parse_flags)`), or another command's
`main(ARGS)` as `python -m MODULE ARGS` does; its exit status is the case's. A case
costs its own work, not another second of imports.

As root (who reads and writes any file) the driver first re-executes itself without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that file modes hold for the cases as
for any other user: an unreadable file is unreadable.

CASES.json: [{"argv": [...], "env": {...}, "out": PREFIX, "cli": MODULE}, ...]
("cli": "train" or absent for train.py, else the module holding the command's `main`,
e.g. "jaxmix.generate"); each child writes PREFIX.stdout, PREFIX.stderr and
PREFIX.status.
"""
import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_TIMEOUT_S = 120


def drop_dac_override():
    """Root only: drop the two capabilities that bypass file modes from the bounding set
    and re-execute (the new image's capabilities come from that set)."""
    import ctypes
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    caps = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if not any(libc.prctl(23, cap, 0, 0, 0) == 1 for cap in caps):  # PR_CAPBSET_READ
        return  # already without them
    for cap in caps:
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    os.execv(sys.executable, [sys.executable, *sys.argv])


def preload(cases):
    """train.py (its absl flags are defined at import), what a run imports later and
    the modules of the other commands the cases run."""
    import importlib
    sys.path.insert(0, ROOT)
    for name in ("jaxmix.train.loop", "jaxmix.data.text", "jaxmix.hf"):
        importlib.import_module(name)
    for name in {c["cli"] for c in cases if c.get("cli", "train") != "train"}:
        importlib.import_module(name)
    return importlib.import_module("train")


def run_command(train, case):
    """The case's command in this process; returns its exit status."""
    if case.get("cli", "train") != "train":
        return sys.modules[case["cli"]].main(case["argv"])
    from absl import app
    sys.argv = [os.path.join(ROOT, "train.py"), *case["argv"]]
    app.run(train.main, flags_parser=train.parse_flags)
    return 0


def child(train, case):
    os.environ.update(case.get("env", {}))
    for fd, suffix in ((1, "stdout"), (2, "stderr")):
        out = os.open(f"{case['out']}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    status = 1
    try:
        status = run_command(train, case)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, status 1
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def wait(pid):
    deadline = time.time() + CASE_TIMEOUT_S
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main(path):
    drop_dac_override()
    with open(path) as f:
        cases = json.load(f)
    train = preload(cases)
    for case in cases:
        pid = os.fork()
        if pid == 0:
            child(train, case)
        status = wait(pid)
        with open(f"{case['out']}.status", "w") as f:
            f.write(str(status))


if __name__ == "__main__":
    main(sys.argv[1])
