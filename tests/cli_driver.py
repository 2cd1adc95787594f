"""Runs train.py's command line once per case, cheaply: `python cli_driver.py CASES.json`.

The driver imports train.py and the libraries it uses once, without starting a JAX
backend, then forks a child per case. The child sets the case's environment, puts its
stdout and stderr in files and runs train.py's entry point exactly as `python train.py
ARGS` does (`absl.app.run(train.main, flags_parser=train.parse_flags)`); its exit
status is the case's. A case costs its own work, not another second of imports.

As root (who reads and writes any file) the driver first re-executes itself without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that file modes hold for the cases as
for any other user: an unreadable file is unreadable.

CASES.json: [{"argv": [...], "env": {...}, "out": PREFIX}, ...]; each child writes
PREFIX.stdout, PREFIX.stderr and PREFIX.status.
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


def preload():
    """train.py (its absl flags are defined at import) and what a run imports later."""
    import importlib
    sys.path.insert(0, ROOT)
    for name in ("jaxmix.train.loop", "jaxmix.data.text", "jaxmix.hf"):
        importlib.import_module(name)
    return importlib.import_module("train")


def child(train, case):
    from absl import app
    os.environ.update(case.get("env", {}))
    for fd, suffix in ((1, "stdout"), (2, "stderr")):
        out = os.open(f"{case['out']}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = [os.path.join(ROOT, "train.py"), *case["argv"]]
    status = 1
    try:
        app.run(train.main, flags_parser=train.parse_flags)
        status = 0
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
    train = preload()
    with open(path) as f:
        cases = json.load(f)
    for case in cases:
        pid = os.fork()
        if pid == 0:
            child(train, case)
        status = wait(pid)
        with open(f"{case['out']}.status", "w") as f:
            f.write(str(status))


if __name__ == "__main__":
    main(sys.argv[1])
