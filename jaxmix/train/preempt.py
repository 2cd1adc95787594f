"""Stopping a training run cleanly on SIGTERM (what schedulers send on preemption) or
SIGINT (Ctrl-C): the run finishes its current step, saves a checkpoint with the data
position, waits for the save and exits 0. A second SIGINT stops at once.

One process: a Python signal handler sets a flag the loop reads after every step.
Several processes: JAX's preemption sync (`multihost_utils.reached_preemption_sync_point`,
whose runtime catches SIGTERM on any process and agrees on one step for all of them),
so every process saves at the same step; SIGINT keeps its default there (one process
stopping alone would leave the others waiting in a collective).
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """`install()` before the loop, `restore()` after it; `reached(step)` is True at the
    step where the run should save and stop, `name` the signal that asked for it."""

    def __init__(self):
        self.name = None
        self.multi_process = jax.process_count() > 1
        self._old = {}

    def install(self):
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame):
        del frame
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.name = signal.Signals(signum).name

    def reached(self, step):
        """Call after every step (on every process, from the same start step)."""
        if self.multi_process:
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.name = "SIGTERM"
                return True
            return False
        return self.name is not None
